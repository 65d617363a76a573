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

# A suite that dies (set -e) says where: the ERR trap (inherited by functions: set -E) notes
# the first failing command that ends the script, with its line and the functions it was in;
# cleanup then counts it as a failed check, so the summary line says so.
DIED=
set -E
on_err() {
  local rc=$1 line=$2 cmd=$3 i where=""
  # Only the script's own shell (a failing command inside $(...) is reported by the line that
  # used it), once, and only under set -e (cleanup code runs with set +e, where a failing
  # command is expected and ends nothing).
  [ "$BASH_SUBSHELL" = 0 ] && [ -z "$DIED" ] && [[ $- == *e* ]] || return 0
  # Each function it was in, with the line that called it: "(in nsx, called at cluster.sh:117)".
  for ((i = 1; i < ${#FUNCNAME[@]} - 1; i++)); do
    where+="${where:+; }${FUNCNAME[$i]}, called at $(basename "${BASH_SOURCE[$((i + 1))]}"):${BASH_LINENO[$i]}"
  done
  DIED="$(basename "${BASH_SOURCE[1]:-$0}"):$line${where:+ (in $where)}: \`$cmd\` exited $rc"
  echo "# suite died at $DIED"
}
trap 'on_err $? $LINENO "$BASH_COMMAND"' ERR

cleanup() { # (no `exit` here: the script keeps the status it was ending with)
  local ns pid
  trap - ERR
  set +e
  if [ -n "$DIED" ]; then
    not_ok "the suite ran to its end (it died at $DIED)"
    echo "$PASS passed, $FAIL failed"
  fi
  exec 2>/dev/null # bash reports every background job killed here; that is expected
  # Background jobs of this shell that live outside our namespaces (samplers, probes,
  # tcpdump started with ip netns exec are inside and go below).
  for pid in $(jobs -p); do kill -9 "$pid" 2>/dev/null || true; done
  for ns in "${NAMESPACES[@]}"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
  done
  for ns in "${NAMESPACES[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  # --one-file-system: never into something a test mounted under $WORK (a /dev bind, say).
  [ -n "${KEEP_WORK:-}" ] || rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" = 0 ] || { echo "these tests need root (network namespaces)"; exit 1; }
[ -n "${LIB_NO_BINARY:-}" ] || [ -x "$KUBE_VIP" ] || { echo "no kube-vip binary at $KUBE_VIP (run scripts/build, or set KUBE_VIP)"; exit 1; }

# need CMD...: the suite runs CMD. Fails loudly unless scripts/deps declares CMD for this
# group (DEPS_GROUP: test, or bench for the benchmarks) and it is there; so no suite can start
# using a tool that a fresh machine would lack (tests/fresh/deps.sh checks the declarations).
need() {
  local out
  if ! out=$("$ROOT/scripts/deps" need "${DEPS_GROUP:-test}" "$@" 2>&1); then
    sed 's/^/# /' <<<"$out"
    DIED="need $*: a command is undeclared or missing (above)"
    exit 1
  fi
}

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

# cached_rootfs TAR MMDEBSTRAP-OPTION...: a Debian 12 tree as a tarball, made once with
# `mmdebstrap OPTIONS bookworm TAR` and kept (e.g. in /var/cache/kube-vip-tools). Never trusted
# because it exists: the stamp TAR.ok (size and sha256, written last, after the content check
# passed) must match, else whatever is there (an interrupted run, a directory) is made again.
# mmdebstrap picks its output format from the name's suffix: the temporary name ends in .tar.
cached_rootfs() {
  local tar=$1 stamp=$1.ok tmp=${1%.tar}.tmp.tar t
  shift
  mkdir -p "$(dirname "$tar")"
  exec 8>"$tar.lock"
  flock 8 # one maker at a time; the others then find it made
  if [ -f "$tar" ] && [ -f "$stamp" ] &&
    [ "$(stat -c %s "$tar") $(sha256sum <"$tar" | cut -d' ' -f1)" = "$(cat "$stamp")" ]; then
    exec 8>&-
    return 0
  fi
  echo "# making $tar with mmdebstrap (once: a minute or two, then kept)"
  rm -rf "$tar" "$stamp" "$tmp"
  t=$(now_ms)
  mmdebstrap --quiet "$@" bookworm "$tmp"
  if ! [ -f "$tmp" ] || ! tar -tf "$tmp" | has -x './etc/debian_version'; then
    echo "# mmdebstrap left no tarball with ./etc/debian_version at $tmp"
    rm -rf "$tmp"
    exec 8>&-
    return 1
  fi
  mv "$tmp" "$tar"
  echo "$(stat -c %s "$tar") $(sha256sum <"$tar" | cut -d' ' -f1)" >"$stamp.tmp"
  mv "$stamp.tmp" "$stamp"
  echo "#   made in $(( ($(now_ms) - t) / 1000 )) s, $(( $(stat -c %s "$tar") >> 20 )) MiB"
  exec 8>&-
}

# enough_samples NAME MS: vip_sampler.py's $WORK/NAME.samples has at least one sample per 20 ms
# of MS (half its nominal rate), and at least 10: a sampler that died or stalled proves nothing.
enough_samples() {
  local n
  n=$(grep -c . "$WORK/$1.samples" 2>/dev/null || true)
  [ "${n:-0}" -ge 10 ] && [ "${n:-0}" -ge $(($2 / 20)) ] ||
    { echo "#   $1: only ${n:-0} samples over $2 ms"; return 1; }
}
# probe_gap FILE T0_MS: from tests/support/probe.py's FILE, the longest time in ms from T0_MS on
# without an answered connect (the first answer after T0_MS counts from T0_MS); 999999 if none
# was answered after T0_MS (no answers is no small gap).
probe_gap() {
  awk -v t="$2" 'BEGIN {p = t; g = -1}
    $2 == "ok" {e = $1 + $3; if (e > t) {d = e - (p > t ? p : t); if (d > g) g = d} p = e}
    END {printf "%d", g < 0 ? 999999 : g}' "$1"
}
# held_by_none NAME MS: enough samples of run NAME, and not one saw a holder.
held_by_none() { enough_samples "$1" "$2" && awk '$2 != "-" {bad = 1} END {exit bad}' "$WORK/$1.samples"; }

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

summary() {
  echo "$PASS passed, $FAIL failed"
  trap - ERR # a failed check ends the suite here with status 1; that is no "died"
  [ "$FAIL" -eq 0 ]
}
