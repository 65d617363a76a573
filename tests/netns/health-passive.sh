#!/usr/bin/env bash
# Passive detection and IPv6 backends, against TLS backends that answer /readyz like
# kube-apiserver (tests/support/readyz_backend.py):
# - a hung backend: its process stopped (SIGSTOP), so its kernel still completes TCP handshakes
#   and `tcp` checks pass, but no TLS ServerHello ever comes. firstByteTimeoutMs must close the
#   clients that wait on it, cool it down, log why, and leave no proxied connection hanging.
# - IPv6 backends: health checks and proxied connections over IPv6, a DOWN logged with the
#   bracketed address.
# FIRST_BYTE=0 runs the same checks with passive detection off, to show they can fail.
source "$(dirname "$0")/../lib.sh"
source "$(dirname "$0")/../health-lib.sh"
need ip openssl python3 curl

FIRST_BYTE=${FIRST_BYTE:-1000}
make_health_net 10.89.0 fd00:89:
make_certs
start_backends

{ health_config
  # tcp checks, which a hung process passes: only passive detection can find it.
  lb_entry api tcp 6443 false 6444 10.89.0.11 10.89.0.12 10.89.0.13
  echo "  healthCheck: {type: tcp}"
  echo "  firstByteTimeoutMs: $FIRST_BYTE"
  lb_entry rr tcp 6449 false 6444 10.89.0.11 10.89.0.12 10.89.0.13
  echo "  healthCheck: {type: tcp}"
  echo "  balance: roundrobin"
  echo "  backendCooldownMs: 5000"
  echo "  firstByteTimeoutMs: $FIRST_BYTE"
  lb_entry api6 tcp 6448 false 6444 fd00:89::11 fd00:89::12 fd00:89::13
  echo "  healthCheck: {type: https, path: /readyz}"
} > "$WORK/config.yaml"
check "kube-vip check accepts the config" quiet "$KUBE_VIP" check -c "$WORK/config.yaml"
"$KUBE_VIP" check -c "$WORK/config.yaml" > "$WORK/effective.yaml" 2> "$WORK/check.err"
check "check warns about tcp checks of an API server port, once" \
  test "$(grep -c 'warning: loadBalancers\[0\] ("api"): tcp health checks of port 6444' "$WORK/check.err")" = 1
check "check prints firstByteTimeoutMs" grep -q "firstByteTimeoutMs: $FIRST_BYTE" "$WORK/effective.yaml"

start_kube_vip "$WORK/config.yaml" "$WORK/agent.log"
rate() { nsx "$L" python3 "$SUPPORT/tls_client.py" rate 10.89.0.1 "$2" 20 "$1" 2>/dev/null; }
served_by() { rate 1 "$1" | awk '$2=="ok"{print $3}' | sort -u | tr '\n' ' '; }
check "startup log spells the check type as the config does" \
  wait_until 5 grep -q 'load balancer "api": tcp health checks every' "$WORK/agent.log"
check "all three IPv4 backends serve" wait_until 10 bash -c "$(declare -f rate served_by nsx); L=$L SUPPORT=$SUPPORT; served_by 6443 | grep -qx 'b1 b2 b3 '"

# ---------- IPv6 backends ----------
check "IPv6: all three backends serve through the load balancer" \
  wait_until 10 bash -c "$(declare -f rate served_by nsx); L=$L SUPPORT=$SUPPORT; served_by 6448 | grep -qx 'v1 v2 v3 '"
set_state v1 unready
check "IPv6: an unready backend is marked DOWN, logged with its bracketed address" \
  wait_until 3 grep -q '\[api6\] backend \[fd00:89::11\]:6444 DOWN: /readyz 500 (2 in a row)' "$WORK/agent.log"
check "IPv6: requests avoid it" bash -c "$(declare -f rate served_by nsx); L=$L SUPPORT=$SUPPORT; ! served_by 6448 | grep -q v1"
set_state v1 ready
check "IPv6: it comes back" wait_until 3 grep -q '\[api6\] backend \[fd00:89::11\]:6444 UP' "$WORK/agent.log"

# ---------- a hung backend: accepts TCP, never answers ----------
metric() { # NAME BACKEND: the api load balancer's sample for BACKEND, or "none"
  nsx "$L" curl -s --max-time 2 http://10.89.0.1:2112/metrics |
    awk -v m="kube_vip_backend_$1{lb=\"api\",backend=\"$2\"}" '$1==m {print $2; f=1} END {if (!f) print "none"}'
}
kill -STOP "$BACKEND_b1"
t=$(now_ms)
rate 6 6449 > "$WORK/hung-rr.out" &
rr_client=$!
rate 6 6443 > "$WORK/hung.out"
wait "$rr_client"
total=$(wc -l < "$WORK/hung.out")
failed=$(awk '$2=="fail"' "$WORK/hung.out" | wc -l)
rr_total=$(wc -l < "$WORK/hung-rr.out")
rr_failed=$(awk '$2=="fail"' "$WORK/hung-rr.out" | wc -l)
echo "# hung b1 for 6 s at 50 requests/s each (client timeout 2 s): leastconn $failed of $total failed, roundrobin $rr_failed of $rr_total"
check "hung backend: its connections fail passively, logged once per cooldown with the reason" \
  grep -q "\[api\] backend 10.89.0.11:6444 failed: no answer [0-9]* ms after a client's first bytes (firstByteTimeoutMs); closing that client" "$WORK/agent.log"
check "hung backend: tcp checks still pass it (only passive detection sees it)" \
  bash -c "! grep -q '\[api\] backend 10.89.0.11:6444 DOWN' $WORK/agent.log"
# Every proxied connection to it is closed within firstByteTimeoutMs; without the bound they
# would hang for as long as the process does (its kernel answers keepalives).
check "hung backend: no proxied connection to it is left open 2 s after the clients stopped" \
  wait_until 3 bash -c "$(declare -f metric nsx); L=$L; [ \"\$(metric active_connections 10.89.0.11:6444)\" = 0 ]"
check "hung backend: counted in connect_failures_total" \
  bash -c "$(declare -f metric nsx); L=$L; f=\$(metric connect_failures_total 10.89.0.11:6444); [ \"\$f\" != none ] && [ \"\${f%.*}\" -ge 1 ]"
check "hung backend, leastconn: fewer than a fifth of the requests failed" test $((failed * 5)) -lt "$total"
# roundrobin keeps sending every third client to it unless it cools down (5 s here: each
# passive failure buys that much).
check "hung backend, roundrobin: fewer than a fifth of the requests failed" test $((rr_failed * 5)) -lt "$rr_total"
kill -CONT "$BACKEND_b1"
check "resumed backend serves again" \
  wait_until 8 bash -c "$(declare -f rate nsx); L=$L SUPPORT=$SUPPORT; rate 1 6443 | grep -q ' ok b1'"

check "kube-vip still runs" kill -0 "$AGENT"
grep -E 'DOWN|UP|failed|firstByte' "$WORK/agent.log" | sed 's/^/# /' | tail -20
summary
