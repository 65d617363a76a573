#!/usr/bin/env bash
# scripts/bench health: failed requests per backend fault kind, ours vs HAProxy 2.6 configured as
# kubeadm's HA guide (option httpchk GET /readyz, http-check expect status 200, check check-ssl
# verify none, default inter/fall/rise). Same namespaces, same three TLS backends answering
# /readyz (tests/health-lib.sh, as the health tests), same client: a new TLS request every 10 ms
# through the load balancer (tests/support/tls_client.py). Each run: 2 s healthy, the fault, 6 s more.
# Reports failed requests and ms from the fault to the last failure, rewriting its own section
# of BENCHMARKS.md. Run under `flock /tmp/kv-heavy.lock`. ~2 minutes.
set -euo pipefail
TAG=h$$
# shellcheck source=tests/lib.sh
source "$(dirname "$0")/../tests/lib.sh"
# shellcheck source=tests/health-lib.sh
source "$ROOT/tests/health-lib.sh"
OUT=${BENCH_OUT:-$ROOT/BENCHMARKS.md}
FAULTS=(${BENCH_FAULTS:-unready killed blackholed})
TARGETS=(${BENCH_TARGETS:-ours haproxy})
command -v haproxy >/dev/null || "$ROOT/scripts/deps" bench

make_health_net 10.89.0
make_certs

{ health_config
  lb_entry api tcp 6443 false 6444 10.89.0.11 10.89.0.12 10.89.0.13
  echo "  healthCheck: {type: https, path: /readyz}"
} > "$WORK/ours.yaml"
# kubeadm's HA guide (docs/ha-considerations.md), with /readyz as the issue asks.
cat > "$WORK/haproxy.cfg" <<EOF
global
    maxconn 8000
defaults
    mode                    http
    option                  dontlognull
    option http-server-close
    option                  redispatch
    retries                 1
    timeout http-request    10s
    timeout queue           20s
    timeout connect         5s
    timeout client          35s
    timeout server          35s
    timeout http-keep-alive 10s
    timeout check           10s
    maxconn                 3000
frontend apiserver
    bind *:6443
    mode tcp
    default_backend apiserverbackend
backend apiserverbackend
    option httpchk GET /readyz
    http-check expect status 200
    mode tcp
    balance roundrobin
    server b1 10.89.0.11:6444 check check-ssl verify none
    server b2 10.89.0.12:6444 check check-ssl verify none
    server b3 10.89.0.13:6444 check check-ssl verify none
EOF

stop_backends() {
  local i p
  for i in 1 2 3; do p="BACKEND_b$i"; kill -9 "${!p}" 2>/dev/null || true; wait "${!p}" 2>/dev/null || true; done
  nsx "$B" iptables -F INPUT 2>/dev/null || true
}
start_target() {
  case $1 in
    ours) start_kube_vip "$WORK/ours.yaml" "$WORK/ours.log" ;;
    haproxy) ip netns exec "$L" haproxy -db -f "$WORK/haproxy.cfg" >>"$WORK/haproxy.log" 2>&1 & ;;
  esac
  TARGET=$!
  wait_until 10 bash -c "[ -n \"\$(ip netns exec $L ss -Htln 'sport = :6443')\" ]" ||
    { echo "$1 did not start listening:" >&2; tail -5 "$WORK/$1.log" >&2; exit 1; }
  sleep 3 # every backend checked up
}
stop_target() { kill "$TARGET" 2>/dev/null || true; wait "$TARGET" 2>/dev/null || true; }
fault() {
  case $1 in
    unready) set_state b1 unready ;;
    killed) kill -9 "$BACKEND_b1" ;;
    blackholed) nsx "$B" iptables -I INPUT -d 10.89.0.11 -j DROP ;;
  esac
}

declare -A RES
for f in "${FAULTS[@]}"; do
  for t in "${TARGETS[@]}"; do
    start_backends
    start_target "$t"
    nsx "$L" python3 "$ROOT/tests/support/tls_client.py" rate 10.89.0.1 6443 10 8 > "$WORK/$t.$f.out" 2>/dev/null &
    client=$!
    sleep 2
    t0=$(now_ms)
    fault "$f"
    wait "$client"
    RES[$t.$f]=$(awk -v f="$t0" '$2=="fail"{n++; if ($1-f>last) last=$1-f} END{printf "%d %d %d\n", n, (last>0?last:0), NR}' "$WORK/$t.$f.out")
    echo "[$(date +%T)] $f $t: failed, ms to last failure, requests: ${RES[$t.$f]}" >&2
    stop_target
    stop_backends
  done
done

section() {
  echo "## Health checks: failed requests per backend fault (scripts/bench health)"
  echo
  echo "- Date: $(date -u +%F), machine: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
  echo "- Other engineers' builds and tests were loading the machine at the same time; one run per row."
  echo "- Three TLS backends answering /readyz (Python, tests/support/readyz_backend.py); a client"
  echo "  starting a new TLS connection with one GET every 10 ms for 8 s; the fault hits backend 1"
  echo "  2 s in. unready: /readyz 500 and requests 503; killed: kill -9 (connects refused);"
  echo "  blackholed: iptables DROP of everything to it."
  echo "- ours: tcp load balancer, \`healthCheck: {type: https, path: /readyz}\` at its defaults"
  echo "  (200 ms interval and timeout, fall 2, rise 3), leastconn. HAProxy $(haproxy -v | head -1 | cut -d' ' -f3):"
  echo "  kubeadm's HA guide, \`option httpchk GET /readyz\`, \`http-check expect status 200\`,"
  echo "  \`check check-ssl verify none\`, default inter 2 s, fall 3, rise 2, roundrobin."
  echo
  echo "| fault | ours: failed | ours: last failure after fault | HAProxy: failed | HAProxy: last failure after fault |"
  echo "| --- | --- | --- | --- | --- |"
  for f in "${FAULTS[@]}"; do
    read -r on ol _ <<< "${RES[ours.$f]:-- - -}"
    read -r hn hl _ <<< "${RES[haproxy.$f]:-- - -}"
    echo "| $f | $on | $ol ms | $hn | $hl ms |"
  done
}
section > "$WORK/section.md"
cat "$WORK/section.md"
python3 "$ROOT/bench/results.py" section "$OUT" health "$WORK/section.md"
