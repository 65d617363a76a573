#!/usr/bin/env bash
# Observability of a three-node cluster in namespaces (tests/cluster-lib.sh), seen by a real
# Prometheus server (Debian's) that scrapes all three agents every second from its own
# namespace: sum(kube_vip_is_leader) is 1 and names the VIP holder; after a kill -9 of the
# holder it moves to the new one. Also: each node's /metrics passes `promtool check metrics`,
# /healthz and /readyz answer, and `kube-vip status` tells role, leader and VIP holder, refuses
# non-root users and says clearly when no agent runs. Backends: connections through the VIP
# raise kube_vip_backend_connections_total, and a killed backend shows kube_vip_backend_up 0
# in Prometheus and `down` in `kube-vip status` (table and JSON).
source "$(dirname "$0")/../lib.sh"
source "$ROOT/tests/cluster-lib.sh"
need ip iptables prometheus promtool curl setpriv python3

PORT=2112
make_cluster_net
for i in 1 2 3; do node_config "$i"; done
mkns PROM prom
plug "$PROM" 10.88.0.3

# ---------- before any agent runs ----------
rc=0
"$KUBE_VIP" status -c "$WORK/node1.yaml" >"$WORK/noagent.out" 2>"$WORK/noagent.err" || rc=$?
check "status without an agent: exit 1 and says no agent runs ($(head -c 120 "$WORK/noagent.err"))" \
  bash -c "[ $rc -eq 1 ] && grep -q 'no kube-vip agent is running' '$WORK/noagent.err'"

# ---------- Prometheus ----------
cat >"$WORK/prometheus.yml" <<YML
global:
  scrape_interval: 1s
  scrape_timeout: 900ms
  evaluation_interval: 1s
rule_files: ['$ROOT/deploy/alerts.yaml']
scrape_configs:
- job_name: kube-vip
  static_configs:
  - targets: ['${NODE_IP[1]}:$PORT', '${NODE_IP[2]}:$PORT', '${NODE_IP[3]}:$PORT']
YML
check "promtool accepts the scrape config" quiet promtool check config "$WORK/prometheus.yml"
ip netns exec "$PROM" prometheus --config.file="$WORK/prometheus.yml" \
  --storage.tsdb.path="$WORK/prom-data" --web.listen-address=127.0.0.1:9090 \
  --log.level=warn >"$WORK/prometheus.log" 2>&1 &
PROM_PID=$!

# promq EXPR: the instant vector, one "instance=value" (or "value") per series, sorted.
promq() {
  nsx "$PROM" curl -sf --max-time 2 --get --data-urlencode "query=$1" http://127.0.0.1:9090/api/v1/query |
    python3 -c '
import json, sys
r = json.load(sys.stdin)["data"]["result"]
out = []
for m in r:
    inst = m["metric"].get("instance", "")
    out.append((inst + "=" if inst else "") + m["value"][1])
print(" ".join(sorted(out)))'
}
prom_is() { [ "$(promq "$1")" = "$2" ]; } # prom_is EXPR WANT

node_url() { echo "http://${NODE_IP[$1]}:$PORT$2"; }
get() { nsx "$PROM" curl -s --max-time 2 -o /dev/null -w '%{http_code}' "$(node_url "$1" "$2")"; } # get I PATH: status code
body_is() { [ "$(nsx "$PROM" curl -s --max-time 2 "$(node_url "$1" "$2")")" = "$3" ]; } # body_is I PATH TEXT
code_is() { [ "$(get "$1" "$2")" = "$3" ]; } # code_is I PATH CODE

# ---------- one node alone: alive, not ready ----------
start_node 2
check "node 2 alone (no quorum, no leader): /healthz answers 200 all the same" wait_until 5 code_is 2 /healthz 200
check "node 2 alone: /readyz says 'no Raft leader known'" wait_until 5 body_is 2 /readyz 'no Raft leader known'
check "node 2 alone: /readyz is 503" code_is 2 /readyz 503
sleep 3
check "node 2 alone: /healthz still 200 after 3 more s without a leader" code_is 2 /healthz 200

# ---------- the cluster ----------
start_node 1; start_node 3
check "a leader takes the VIP" wait_until 5 one_holder
h=$(holders)
for i in 1 2 3; do
  check "node $i: /healthz answers 200" wait_until 5 code_is "$i" /healthz 200
  check "node $i: /readyz answers 200 (a leader is known)" wait_until 5 code_is "$i" /readyz 200
  nsx "$PROM" curl -s --max-time 2 "$(node_url "$i" /metrics)" >"$WORK/metrics$i.txt"
  check "node $i: promtool check metrics finds no problem in /metrics" \
    bash -c "promtool check metrics <'$WORK/metrics$i.txt' 2>&1 | tee '$WORK/lint$i.txt' >&2; [ \${PIPESTATUS[0]} -eq 0 ] && [ ! -s '$WORK/lint$i.txt' ]"
  want=0; [ "$i" = "$h" ] && want=1
  check "node $i: kube_vip_is_leader $want and kube_vip_vip_bound $want" \
    bash -c "grep -qx 'kube_vip_is_leader $want' '$WORK/metrics$i.txt' && grep -qx 'kube_vip_vip_bound $want' '$WORK/metrics$i.txt'"
done
check "the holder counts its announcements (kube_vip_announce_frames_sent_total{kind=\"arp_request\"} > 0)" \
  grep -q '^kube_vip_announce_frames_sent_total{kind="arp_request"} [1-9]' "$WORK/metrics$h.txt"
check "the holder observed its election-to-VIP-bound time once" \
  grep -qx 'kube_vip_election_to_vip_bound_seconds_count 1' "$WORK/metrics$h.txt"
check "a 404 for an unknown path" code_is 1 /x 404
check "a 405 for POST /metrics" \
  test "$(nsx "$PROM" curl -s -o /dev/null -w '%{http_code}' -X POST "$(node_url 1 /metrics)")" = 405

check "Prometheus scrapes all three agents (up == 1)" wait_until 20 prom_is 'count(up{job="kube-vip"} == 1)' 3
check "Prometheus: sum(kube_vip_is_leader) == 1" wait_until 5 prom_is 'sum(kube_vip_is_leader)' 1
check "Prometheus: kube_vip_is_leader is 1 on the VIP holder (node $h)" \
  wait_until 5 prom_is 'kube_vip_is_leader == 1' "${NODE_IP[$h]}:$PORT=1"
check "Prometheus: every node reports the same Raft term" wait_until 5 prom_is 'count(count_values("term", kube_vip_raft_term))' 1
check "Prometheus: all three agree on the leader" \
  wait_until 5 prom_is "count(kube_vip_raft_leader{address=\"${NODE_IP[$h]}:10000\"})" 3
check "Prometheus: kube_vip_build_info carries the version" \
  wait_until 5 prom_is "count(kube_vip_build_info{version=\"$("$KUBE_VIP" version | cut -d' ' -f2)\"})" 3

for i in 1 2 3; do echo "#   node $i RSS: $(awk '/VmRSS/ {print $2, $3}' "/proc/${NODE_PID[$i]}/status")"; done

# ---------- kube-vip status ----------
for i in 1 2 3; do
  rc=0
  ip netns exec "${NODE_NS[$i]}" "$KUBE_VIP" status -c "$WORK/node$i.yaml" >"$WORK/status$i.txt" 2>&1 || rc=$?
  want=follower; [ "$i" = "$h" ] && want=leader
  check "node $i: status says role $want, leader server$h" \
    bash -c "[ $rc -eq 0 ] && grep -qE '^role +$want\$' '$WORK/status$i.txt' && grep -qE '^leader +server$h ' '$WORK/status$i.txt'"
done
sed 's/^/#   /' "$WORK/status$h.txt"
check "status on the holder: VIP bound here" grep -q "^vip .*(bound here); held by this node (server$h)" "$WORK/status$h.txt"
f=$(( h % 3 + 1 ))
check "status on a follower: the leader holds the VIP" grep -q "held by server$h (the leader)" "$WORK/status$f.txt"
check "status -o json parses and agrees" bash -c \
  "'$KUBE_VIP' status -c '$WORK/node$h.yaml' -o json | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(not (s[\"role\"]==\"leader\" and s[\"vip_bound\"] and s[\"ready\"]==\"ok\"))'"
# Let the user reach the socket (a hostPath stateDir is created 0755): then only the socket's
# own mode (0600) and the agent's peer-credential check keep it out.
chmod 711 "$WORK" "$WORK/state1"
chmod 644 "$WORK/node1.yaml"
rc=0
setpriv --reuid=65534 --regid=65534 --clear-groups "$KUBE_VIP" status -c "$WORK/node1.yaml" >/dev/null 2>"$WORK/nobody.err" || rc=$?
check "status as a non-root user is refused ($(head -c 100 "$WORK/nobody.err"))" \
  bash -c "[ $rc -eq 1 ] && grep -q 'run kube-vip status as root' '$WORK/nobody.err'"
check "the status socket is mode 0600" test "$(stat -c %a "$WORK/state1/kube-vip.sock")" = 600

# ---------- backends: traffic and a dead one ----------
# Every node checks the three backends (tcp checks by default), leader or not; the holder
# proxies VIP:6443 to them. Then backend 3's process is killed: every node marks it down.
HI="instance=\"${NODE_IP[$h]}:$PORT\""
DEAD=10.88.0.23:6444
check "Prometheus: kube_vip_backend_up is 1 for all 3 backends on all 3 nodes" \
  wait_until 10 prom_is 'count(kube_vip_backend_up{lb="Kubernetes Control Plane"} == 1)' 9
conns() { promq "sum(kube_vip_backend_connections_total{$HI})"; }
before=$(conns)
ok=0
for _ in $(seq 30); do
  nsx "$CLIENT" python3 "$SUPPORT/client.py" "$VIP" 6443 100 2 >/dev/null 2>&1 && ok=$((ok + 1))
done
echo "#   30 connections through the VIP: $ok answered; holder's connections_total before: ${before:-none}"
check "Prometheus: 30 connections through the VIP raise the holder's kube_vip_backend_connections_total by 30" \
  wait_until 5 prom_is "sum(kube_vip_backend_connections_total{$HI}) - ${before:-0}" 30
check "Prometheus: the holder counted the bytes both ways (sent >= 3000, received > 0)" \
  wait_until 5 prom_is "(sum(kube_vip_backend_sent_bytes_total{$HI}) >= bool 3000) * (sum(kube_vip_backend_received_bytes_total{$HI}) > bool 0)" 1
check "Prometheus: no proxied connection is left open on the holder (active_connections 0)" \
  wait_until 5 prom_is "sum(kube_vip_backend_active_connections{$HI})" 0
check "Prometheus: health checks are timed on every node (check duration count > 0 for 9 series)" \
  wait_until 5 prom_is 'count(kube_vip_backend_health_check_duration_seconds_count > 0)' 9
dead_pid=""
for p in $(ip netns pids "$BE"); do
  if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q "backend.py backend3 "; then dead_pid=$p; fi
done
check "found backend 3's process in the backends' namespace" test -n "$dead_pid"
[ -z "$dead_pid" ] || kill -9 "$dead_pid"
check "Prometheus: kube_vip_backend_up{backend=\"$DEAD\"} is 0 on all 3 nodes" \
  wait_until 10 prom_is "count(kube_vip_backend_up{backend=\"$DEAD\"} == 0)" 3
check "Prometheus: the other backends stay up (6 series of kube_vip_backend_up 1)" \
  prom_is 'count(kube_vip_backend_up == 1)' 6
ip netns exec "${NODE_NS[$h]}" "$KUBE_VIP" status -c "$WORK/node$h.yaml" >"$WORK/status-dead.txt" 2>&1 || true
sed 's/^/#   /' "$WORK/status-dead.txt"
check "status on the holder: backends 2/3 up" grep -qE '^backends +2/3 up$' "$WORK/status-dead.txt"
check "status on the holder: $DEAD down, its last check failed (connection refused)" \
  grep -qE "$DEAD +down .*last check .* ago failed: .*[Rr]efused" "$WORK/status-dead.txt"
check "status on the holder: 10.88.0.21:6444 up, its last check passed" \
  grep -qE "10\.88\.0\.21:6444 +up .*last check .* ago passed" "$WORK/status-dead.txt"
check "status -o json: $DEAD down with a failed last check, the others up" bash -c \
  "ip netns exec '${NODE_NS[$f]}' '$KUBE_VIP' status -c '$WORK/node$f.yaml' -o json | python3 -c '
import json, sys
b = {x[\"backend\"]: x for x in json.load(sys.stdin)[\"backends\"]}
d = b[\"$DEAD\"]
sys.exit(not (len(b) == 3 and d[\"state\"] == \"down\" and d[\"last_check_ok\"] is False
  and d[\"last_check_ago_ms\"] < 5000 and all(x[\"state\"] == \"up\" for k, x in b.items() if k != \"$DEAD\")))'"
nsx "$PROM" curl -s --max-time 2 "$(node_url "$h" /metrics)" >"$WORK/metrics-backends.txt"
check "the holder's /metrics with traffic and a dead backend: promtool check metrics finds no problem" \
  bash -c "promtool check metrics <'$WORK/metrics-backends.txt' 2>&1 | tee '$WORK/lint-backends.txt' >&2; [ \${PIPESTATUS[0]} -eq 0 ] && [ ! -s '$WORK/lint-backends.txt' ]"

# ---------- hostile clients on the endpoint ----------
# 40 connections that never send a request from one client, and one that sends garbage: the
# endpoint serves 4 per client and closes the rest at once, so another client (a scraper; on a
# node, kubelet's loopback probe) is answered without waiting, and the agent is not disturbed.
nsx "$CLIENT" python3 - "${NODE_IP[$h]}" "$PORT" <<'PY' &
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
idle = [socket.create_connection((host, port), timeout=2) for _ in range(40)]
g = socket.create_connection((host, port), timeout=2)
g.sendall(b"\x16\x03\x01\x02\x00" + b"\xff" * 4096 + b"\r\n\r\n")
time.sleep(8)
PY
HOSTILE=$!
sleep 0.5
t0=$(now_ms)
code=$(nsx "$PROM" curl -s --max-time 14 -o /dev/null -w '%{http_code}' "$(node_url "$h" /healthz)" || true)
t1=$(now_ms)
echo "#   /healthz beside 40 idle connections from another client: $code after $((t1 - t0)) ms"
check "40 idle connections from one client: another client's /healthz answers 200 within 1 s" \
  test "$code" = 200 -a $((t1 - t0)) -lt 1000
check "40 idle connections: the holder keeps the VIP" holder_is "$h"
wait "$HOSTILE" 2>/dev/null || true
check "after the hostile clients: /metrics answers at once" code_is "$h" /metrics 200

# ---------- a follower cut off from the leader: alive, not ready ----------
# Raft keeps the last leader it knew while cut off; /readyz must not: it needs the leader's
# appends to keep arriving.
f=$(( h % 3 + 1 ))
raft_port() { local dir; for dir in --dport --sport; do nsx "${NODE_NS[$f]}" iptables "$1" "$2" -p tcp "$dir" 10000 -j DROP; done; }
body_has() { nsx "$PROM" curl -s --max-time 2 "$(node_url "$1" "$2")" | has "$3"; } # body_has I PATH PATTERN
raft_port -A INPUT; raft_port -A OUTPUT
check "node $f cut off from its peers: /readyz says 'no message from the leader'" \
  wait_until 5 body_has "$f" /readyz 'no message from the leader'
check "node $f cut off: /readyz is 503" code_is "$f" /readyz 503
check "node $f cut off: /healthz still 200 (liveness never depends on the leader)" code_is "$f" /healthz 200
raft_port -D INPUT; raft_port -D OUTPUT
check "node $f healed: /readyz 200 again" wait_until 5 code_is "$f" /readyz 200
check "the cut and the heal left one holder" wait_until 5 one_holder
h=$(holders)

# ---------- kill -9 of the holder ----------
old=$h
stop_node "$old" KILL
check "a new holder takes the VIP" wait_until 5 holder_is_not "$old"
h=$(holders)
echo "#   VIP moved from node $old to node $h"
check "Prometheus: kube_vip_is_leader moves to the new holder (node $h)" \
  wait_until 15 prom_is 'kube_vip_is_leader == 1' "${NODE_IP[$h]}:$PORT=1"
check "Prometheus: sum(kube_vip_is_leader) == 1 after the failover" wait_until 5 prom_is 'sum(kube_vip_is_leader)' 1
check "Prometheus: the killed node's target is down" wait_until 5 prom_is "up{instance=\"${NODE_IP[$old]}:$PORT\"}" "${NODE_IP[$old]}:$PORT=0"
# Takes minus releases is what it holds now; a lease lapse on a busy host may add a pair.
NEWI="instance=\"${NODE_IP[$h]}:$PORT\""
check "Prometheus: the new holder's VIP takes minus releases is 1 (it holds it now)" \
  wait_until 10 prom_is "kube_vip_vip_takes_total{$NEWI} - kube_vip_vip_releases_total{$NEWI}" "${NODE_IP[$h]}:$PORT=1"
echo "#   new holder's takes: $(promq "kube_vip_vip_takes_total{$NEWI}")"
check "Prometheus: the new holder's election-to-bound time is under 2 s" \
  wait_until 5 prom_is "kube_vip_election_to_vip_bound_seconds_bucket{instance=\"${NODE_IP[$h]}:$PORT\",le=\"2.56\"}" "${NODE_IP[$h]}:$PORT=1"
check "Prometheus: the survivors saw a leader change (raft_leader_changes_total >= 2)" \
  wait_until 5 prom_is "count(kube_vip_raft_leader_changes_total >= 2)" 2
survivor=$(( h % 3 + 1 )); [ "$survivor" = "$old" ] && survivor=$(( survivor % 3 + 1 ))
nsx "$PROM" curl -s --max-time 2 "$(node_url "$survivor" /metrics)" >"$WORK/after.txt"
check "a survivor counts connection errors to the dead peer" \
  grep -q "^kube_vip_peer_connection_errors_total{peer=\"server$old\"} [1-9]" "$WORK/after.txt"

# ---------- a stopped agent ----------
stop_node "$survivor" TERM
rc=0
"$KUBE_VIP" status -c "$WORK/node$survivor.yaml" >/dev/null 2>"$WORK/gone.err" || rc=$?
check "status after SIGTERM: exit 1, no agent (socket removed)" \
  bash -c "[ $rc -eq 1 ] && grep -q 'no kube-vip agent is running' '$WORK/gone.err' && [ ! -e '$WORK/state$survivor/kube-vip.sock' ]"
# The alert rules, loaded by the real server: all evaluate cleanly, and the two-leader alert
# never fired through boot and failover. (It may go pending: after a kill -9 the dead holder's
# last sample counts until its next failed scrape, beside the new holder's; `for` covers that.)
rules_ok() {
  nsx "$PROM" curl -sf --max-time 2 http://127.0.0.1:9090/api/v1/rules | python3 -c '
import json, sys
rules = [r for g in json.load(sys.stdin)["data"]["groups"] for r in g["rules"]]
sys.exit(not (len(rules) == 5 and all(r["health"] == "ok" for r in rules)))'
}
check "Prometheus loaded deploy/alerts.yaml: 5 rules, all evaluate cleanly" wait_until 5 rules_ok
echo "#   KubeVipTwoLeaders pending at some point: $(promq 'count(max_over_time(ALERTS{alertname="KubeVipTwoLeaders",alertstate="pending"}[10m]))')"
check "KubeVipTwoLeaders never fired (ALERTS over the whole run)" \
  prom_is 'count(max_over_time(ALERTS{alertname="KubeVipTwoLeaders",alertstate="firing"}[10m]))' ''
check "Prometheus itself logged no error" bash -c "! grep -q 'level=error' '$WORK/prometheus.log'"
kill "$PROM_PID" 2>/dev/null || true
wait "$PROM_PID" 2>/dev/null || true

summary
