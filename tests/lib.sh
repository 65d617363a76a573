#!/usr/bin/env bash
# Shared harness for the tests that need root: network namespaces made per run (unique names,
# deleted on every exit path), TAP-like result lines, and a closing "N passed, N failed" line.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KUBE_VIP=${KUBE_VIP:-$ROOT/target/x86_64-unknown-linux-musl/release/kube-vip}
SUPPORT=$ROOT/tests/support
# Short and unique: namespace names carry it, and interface names are limited to 15 bytes.
TAG=${TAG:-t$$}
WORK=$(mktemp -d "/tmp/kube-vip-test.$TAG.XXXX")
PASS=0
FAIL=0
NAMESPACES=()

cleanup() {
  local ns pid
  exec 2>/dev/null # bash reports every background job killed here; that is expected
  for ns in "${NAMESPACES[@]}"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
  done
  for ns in "${NAMESPACES[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" = 0 ] || { echo "these tests need root (network namespaces)"; exit 1; }
[ -x "$KUBE_VIP" ] || { echo "no kube-vip binary at $KUBE_VIP (run scripts/build, or set KUBE_VIP)"; exit 1; }

# mkns VAR NAME: creates namespace $TAG-NAME with lo up and stores its name in VAR.
# (Not `VAR=$(mkns ...)`: a subshell would lose the record that cleanup needs.)
mkns() {
  local ns="$TAG-$2"
  ip netns add "$ns"
  NAMESPACES+=("$ns")
  ip -n "$ns" link set lo up
  printf -v "$1" '%s' "$ns"
}

# nsx NS CMD...: runs CMD inside namespace NS. For a background job use `ip netns exec` itself:
# it execs in place, so $! is the process (a backgrounded function would be a subshell).
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

ok() { PASS=$((PASS + 1)); echo "ok $((PASS + FAIL)) - $*"; }
not_ok() { FAIL=$((FAIL + 1)); echo "not ok $((PASS + FAIL)) - $*"; }

# check DESC CMD...: one result line from CMD's exit status.
check() { local d=$1; shift; if "$@"; then ok "$d"; else not_ok "$d"; fi; }
# quiet CMD...: CMD with its output discarded (`check D quiet CMD`, not `check D CMD >/dev/null`,
# which would discard the result line too).
quiet() { "$@" >/dev/null 2>&1; }

# wait_until SECONDS CMD...: polls CMD every 20 ms; status 0 once it succeeds, 1 on timeout.
wait_until() {
  local deadline=$(( $(date +%s%N) + ${1%.*} * 1000000000 )); shift
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s%N)" -lt "$deadline" ] || return 1
    sleep 0.02
  done
}

# cmd | has [GREP-OPTION...] PATTERN: cmd's output matches. Use it instead of `grep -q` in a pipe:
# grep -q exits at its first match, the writer then dies of SIGPIPE, and under pipefail a match
# reads as a miss (CI saw exactly that on `docker logs | grep -q`). Without -q, grep reads to EOF.
has() { grep "$@" >/dev/null; }

# has_addr NS IFACE IP: the address is on the interface.
has_addr() { ip -n "$1" -o addr show dev "$2" | has -w "inet6\? $3/\(32\|128\)"; }

# lb_entry NAME TYPE PORT BIND_TO_VIP BACKEND_PORT ADDR...: one item of a `loadBalancers:` list.
# Further keys of the entry may follow it as lines indented by two spaces.
lb_entry() {
  local name=$1 type=$2 port=$3 bind=$4 bport=$5 a
  shift 5
  printf -- '- name: %s\n  type: %s\n  port: %s\n  bindToVip: %s\n  backends:\n' \
    "$name" "$type" "$port" "$bind"
  for a in "$@"; do printf -- '  - {address: "%s", port: %s}\n' "$a" "$bport"; done
}

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

summary() {
  echo "$PASS passed, $FAIL failed"
  [ "$FAIL" -eq 0 ]
}
