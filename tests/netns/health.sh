#!/usr/bin/env bash
# Health-aware load balancing against three TLS backends that answer /readyz like kube-apiserver
# (tests/support/readyz_backend.py, certificates made with openssl): an unready backend
# (/readyz 500, requests 503), one killed, one blackholed in mid-stream (iptables DROP), one
# flapping every 300 ms, one coming back (rise), all down, a watch moved off a backend marked
# down, and a caFile with the wrong CA. A client makes a new TLS request every 10 ms through the
# load balancer; after each fault no request may fail later than 1 s after it.
# HEALTH_CHECK=none (or any healthCheck flow map) runs the same checks against other settings,
# to show they can fail.
source "$(dirname "$0")/../lib.sh"
source "$(dirname "$0")/../health-lib.sh"
need ip iptables openssl python3 curl

HEALTH_CHECK=${HEALTH_CHECK:-"{type: https, path: /readyz}"}
make_health_net 10.88.0
# test-ca signs the backends' certificate; wrong-ca is the wrong one.
make_certs
make_ca wrong-ca
start_backends

{ health_config
  lb_entry api tcp 6443 false 6444 10.88.0.11 10.88.0.12 10.88.0.13
  echo "  backendCooldownMs: 2000"
  echo "  healthCheck: $HEALTH_CHECK"
  lb_entry verified tcp 6445 false 6444 10.88.0.11
  echo "  healthCheck: {type: https, caFile: $WORK/test-ca.crt}"
  lb_entry rr tcp 6447 false 6444 10.88.0.11 10.88.0.12 10.88.0.13
  echo "  balance: roundrobin"
  echo "  healthCheck: {type: https}"
  lb_entry wrongca tcp 6446 false 6444 10.88.0.12
  echo "  healthCheck: {type: https, caFile: $WORK/wrong-ca.crt}"
} > "$WORK/config.yaml"
check "kube-vip check accepts the config" quiet "$KUBE_VIP" check -c "$WORK/config.yaml"
"$KUBE_VIP" sample config --interface eth1 --vip 10.0.0.75 --localPeer server1:10.0.0.70:10000 \
  --lbType tcp --lbName api --lbPort 6443 --lbBackends 10.0.0.70:6444 > "$WORK/sample.yaml"
check "sample config checks kube-apiserver's /readyz over https" \
  bash -c "grep -A2 'healthCheck:' $WORK/sample.yaml | tr -d ' ' | tr '\n' ' ' | grep -q 'type:https path:/readyz'"
"$KUBE_VIP" check -c "$WORK/config.yaml" > "$WORK/effective.yaml" 2>/dev/null
check "check prints every healthCheck default" \
  bash -c "grep -q 'intervalMs: 200' $WORK/effective.yaml && grep -q 'rise: 3' $WORK/effective.yaml && grep -q 'balance: leastconn' $WORK/effective.yaml && grep -q 'maxConnections: 10000' $WORK/effective.yaml && grep -q 'onMarkedDown: close' $WORK/effective.yaml"

start_kube_vip "$WORK/config.yaml" "$WORK/agent.log"
rate() { nsx "$L" python3 "$SUPPORT/tls_client.py" rate 10.88.0.1 "${2:-6443}" 10 "$1" 2>/dev/null; }
check "all three backends serve through the load balancer" \
  wait_until 10 bash -c "$(declare -f rate nsx); L=$L SUPPORT=$SUPPORT; rate 1 | awk '\$2==\"ok\"{print \$3}' | sort -u | wc -l | grep -qx 3"
backend_log() { grep -c "\[api\] backend 10.88.0.1$1:6444 $2" "$WORK/agent.log" || true; }

# after_fault FILE FAULT_MS: prints "<failures> <failures later than 1 s after the fault>
# <ms from fault to last failure>".
after_fault() {
  awk -v f="$2" '$2=="fail"{n++; if ($1>f+1000) late++; if ($1-f>last) last=$1-f}
    END{printf "%d %d %d\n", n, late, last}' "$1"
}
# fault NAME CMD...: runs a client for 4 s, applies the fault (CMD) after 1 s, and checks that
# no request failed later than 1 s after it.
fault() {
  local name=$1 t res; shift
  rate 4 > "$WORK/$name.out" &
  local client=$!
  sleep 1
  t=$(now_ms)
  "$@"
  wait "$client"
  res=$(after_fault "$WORK/$name.out" "$t")
  echo "# $name: failed requests, failed later than 1 s after the fault, last failure after (ms): $res"
  check "$name: no request fails later than 1 s after the fault" test "$(echo "$res" | cut -d' ' -f2)" = 0
}

# ---------- unready: /readyz 500, requests 503 ----------
fault unready set_state b1 unready
check "unready: logged once as DOWN with the reason" \
  test "$(grep -c '\[api\] backend 10.88.0.11:6444 DOWN: /readyz 500 (2 in a row)' "$WORK/agent.log")" = 1

# ---------- coming back: rise ----------
t=$(now_ms)
set_state b1 ready
check "coming back: UP after rise (3 checks)" wait_until 3 grep -q '\[api\] backend 10.88.0.11:6444 UP' "$WORK/agent.log"
echo "# back up after $(( $(now_ms) - t )) ms"
check "coming back: it gets requests again" \
  bash -c "$(declare -f rate nsx); L=$L SUPPORT=$SUPPORT; rate 1 | grep -q ' ok b1'"

# ---------- a watch is moved off a backend marked down ----------
nsx "$L" python3 "$SUPPORT/tls_client.py" watch 10.88.0.1 6443 "$WORK/watch.name" > "$WORK/watch.out" &
WATCH=$!
wait_until 5 test -s "$WORK/watch.name"
victim=$(cat "$WORK/watch.name"); victim=${victim#b}
t=$(now_ms)
set_state "b$victim" unready
if wait_until 3 bash -c "! kill -0 $WATCH"; then
  ended=$(awk '{print $2}' "$WORK/watch.out")
  echo "# watch on b$victim ended $((ended - t)) ms after the backend became unready"
  check "watch: closed within 1 s of its backend becoming unready" test $((ended - t)) -le 1000
else
  not_ok "watch: still open 3 s after its backend became unready"
  kill "$WATCH" 2>/dev/null || true
fi
nsx "$L" python3 "$SUPPORT/tls_client.py" watch 10.88.0.1 6443 "$WORK/watch2.name" > /dev/null &
WATCH2=$!
wait_until 5 test -s "$WORK/watch2.name"
check "watch: the reconnected watch is on another backend" test "$(cat "$WORK/watch2.name")" != "b$victim"
kill "$WATCH2" 2>/dev/null || true
set_state "b$victim" ready
wait_until 3 bash -c "[ \$(grep -c '\[api\] backend 10.88.0.1$victim:6444 UP' $WORK/agent.log) -ge $(( $(backend_log "$victim" UP) + 1 )) ]" || true
sleep 1

# ---------- killed ----------
fault killed kill -9 "$BACKEND_b2"
start_backend b2
wait_until 5 bash -c "[ \$(grep -c '\[api\] backend 10.88.0.12:6444 UP' $WORK/agent.log) -ge 1 ]" || true
sleep 1

# ---------- blackholed in mid-stream: iptables DROP, a watch on it ----------
nsx "$L" python3 "$SUPPORT/tls_client.py" watch 10.88.0.1 6443 "$WORK/watch3.name" > "$WORK/watch3.out" &
WATCH3=$!
wait_until 5 test -s "$WORK/watch3.name"
hole=$(cat "$WORK/watch3.name"); hole=${hole#b}
drop() { nsx "$B" iptables -I INPUT -d "10.88.0.1$hole" -j DROP; }
fault "blackholed (b$hole)" drop
check "blackholed: its watch was closed" wait_until 2 bash -c "! kill -0 $WATCH3"
kill "$WATCH3" 2>/dev/null || true
check "blackholed: DOWN names the timeout" grep -q "\[api\] backend 10.88.0.1$hole:6444 DOWN: .*timed out" "$WORK/agent.log"
nsx "$B" iptables -D INPUT -d "10.88.0.1$hole" -j DROP
sleep 1.5

# ---------- flapping every 300 ms: no state flapping ----------
before=$(( $(backend_log 3 UP) + $(backend_log 3 DOWN) ))
# Python keeps the 300 ms on a monotonic schedule; a shell loop of sleeps drifts on a busy machine.
python3 - "$WORK/state.b3" <<'EOF'
import os, sys, time
path, start = sys.argv[1], time.monotonic()
for k in range(20):
    with open(path + ".new", "w") as f:
        f.write("unready" if k % 2 == 0 else "ready")
    os.rename(path + ".new", path)
    time.sleep(max(0.0, start + (k + 1) * 0.3 - time.monotonic()))
EOF
set_state b3 unready
sleep 0.5
changes=$(( $(backend_log 3 UP) + $(backend_log 3 DOWN) - before ))
echo "# flapping for 6 s: $changes state change(s)"
check "flapping: at most one state change (down), no flapping" test "$changes" -le 1
set_state b3 ready
wait_until 3 bash -c "grep '\[api\] backend 10.88.0.13:6444' $WORK/agent.log | tail -1 | grep -q UP" || true

# ---------- all down ----------
for i in 1 2 3; do set_state "b$i" unready; done
rate 2 > "$WORK/alldown.out"
sleep 1
check "all down: logged once" test "$(grep -c '\[api\] all 3 backends are down' "$WORK/agent.log")" = 1
slow=$(awk '$2=="fail" {n++} END{print n+0}' "$WORK/alldown.out")
echo "# all down: $slow of $(wc -l < "$WORK/alldown.out") requests failed"
for i in 1 2 3; do set_state "b$i" ready; done
check "all down: the end is logged once" wait_until 3 grep -q '\[api\] a backend is up again' "$WORK/agent.log"
check "all down: requests succeed again" \
  wait_until 3 bash -c "$(declare -f rate nsx); L=$L SUPPORT=$SUPPORT; rate 0.5 | grep -q ' ok '"

# ---------- caFile ----------
# The verified entry's backend is b1, which the tests above made unready: its checks got through
# TLS to the HTTP answer, and none ever failed in TLS.
check "caFile with the right CA: verified, checks reach /readyz" \
  bash -c "grep -q '\[verified\] backend 10.88.0.11:6444 DOWN: /readyz 500' $WORK/agent.log && ! grep -q '\[verified\] .*TLS' $WORK/agent.log"
check "caFile with a wrong CA: DOWN with a clear reason" \
  grep -q '\[wrongca\] backend 10.88.0.12:6444 DOWN: TLS: invalid peer certificate: UnknownIssuer' "$WORK/agent.log"

# ---------- spread of watches after a backend restarts, per balance ----------
# 30 watches over three backends; b1 is killed (its watches reconnect to b2 and b3) and started
# again; then 15 more watches come. leastconn sends them to b1, roundrobin spreads them.
spread() { # DIR: "b1 b2 b3" counts of watches now on each backend
  local i n out=""
  for i in 1 2 3; do n=$(cat "$1"/* 2>/dev/null | grep -cx "b$i" || true); out+="$n "; done
  echo "${out% }"
}
for port in 6443 6447; do
  mkdir -p "$WORK/w$port" "$WORK/x$port"
  ip netns exec "$L" python3 "$SUPPORT/tls_client.py" watches 10.88.0.1 "$port" 30 "$WORK/w$port" &
  eval "WATCHES_$port=$!"
done
wait_until 10 bash -c "[ \$(ls $WORK/w6443 | wc -l) = 30 ] && [ \$(ls $WORK/w6447 | wc -l) = 30 ]" || true
echo "# 30 watches: leastconn $(spread "$WORK/w6443"), roundrobin $(spread "$WORK/w6447") (b1 b2 b3)"
kill -9 "$BACKEND_b1"
sleep 1.5
start_backend b1
last_is_up() { grep "\[$1\] backend 10.88.0.11:6444" "$WORK/agent.log" | tail -1 | has UP; }
wait_until 5 bash -c "$(declare -f last_is_up has); WORK=$WORK; last_is_up api && last_is_up rr" || true
sleep 1
for port in 6443 6447; do
  ip netns exec "$L" python3 "$SUPPORT/tls_client.py" watches 10.88.0.1 "$port" 15 "$WORK/x$port" &
  eval "MORE_$port=$!"
done
wait_until 10 bash -c "[ \$(ls $WORK/x6443 | wc -l) = 15 ] && [ \$(ls $WORK/x6447 | wc -l) = 15 ]" || true
spread_all() { local i n out=""; for i in 1 2 3; do n=$(cat "$1"/* "$2"/* 2>/dev/null | grep -cx "b$i" || true); out+="$n "; done; echo "${out% }"; }
lc=$(spread_all "$WORK/w6443" "$WORK/x6443"); rr=$(spread_all "$WORK/w6447" "$WORK/x6447")
echo "# 45 watches after b1 restarted: leastconn $lc, roundrobin $rr (b1 b2 b3)"
lc_b1=${lc%% *}
check "leastconn: the restarted backend gets the new watches (at least 12 of 45 on b1)" test "$lc_b1" -ge 12
kill "$WATCHES_6443" "$WATCHES_6447" "$MORE_6443" "$MORE_6447" 2>/dev/null || true

check "kube-vip still runs" kill -0 "$AGENT"
grep -E 'DOWN|UP|all .* down|up again' "$WORK/agent.log" | sed 's/^/# /' | tail -40
summary
