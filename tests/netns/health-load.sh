#!/usr/bin/env bash
# The proxy cannot starve the control plane: a three-node cluster whose load balancer is
# saturated with new connections by wrk (one request per connection) for DURATION seconds
# (default 60), backends answering at once (HAProxy's `http-request return`), health checks on.
# Passes with 0 leader changes and 0 lease lapses on every node, and the VIP held by one node.
source "$(dirname "$0")/../lib.sh"
source "$(dirname "$0")/../cluster-lib.sh"
DURATION=${DURATION:-60}
need ip wrk haproxy curl python3 sysctl

make_cluster_net
cat > "$WORK/fast.cfg" <<EOF
global
  maxconn 8000
defaults
  mode http
  timeout client 10s
  timeout connect 5s
  timeout server 10s
frontend fast
  bind 10.88.0.21:8081
  bind 10.88.0.22:8081
  bind 10.88.0.23:8081
  http-request return status 200 content-type text/plain string ok
EOF
ip netns exec "$BE" haproxy -db -f "$WORK/fast.cfg" >"$WORK/fast.log" 2>&1 &
check "the backends answer" wait_until 5 nsx "$BE" curl -sf http://10.88.0.21:8081/
for i in 1 2 3; do
  node_config "$i" "$(lb_entry flood tcp 8080 true 8081 10.88.0.21 10.88.0.22 10.88.0.23)"
  start_node "$i"
done
check "a leader holds the VIP" wait_until 20 one_holder
leader=$(holders)
sleep 2
for i in 1 2 3; do eval "MARK_$i=$(log_mark "$i")"; done
nsx "$CLIENT" timeout $((DURATION + 20)) wrk -t2 -c256 -d"${DURATION}s" -H 'Connection: close' \
  "http://$VIP:8080/" > "$WORK/wrk.out" 2>&1 || true
sed 's/^/# /' "$WORK/wrk.out" | grep -E 'Requests/sec|requests in|Socket errors|Non-2xx' || true
rps=$(awk '/Requests\/sec/ {print int($2)}' "$WORK/wrk.out")
check "wrk saturated the load balancer (over 500 connections/s)" test "${rps:-0}" -gt 500
changes=0 lapses=0
for i in 1 2 3; do
  m="MARK_$i"
  c=$(tail -n +"$(( ${!m} + 1 ))" "$WORK/node$i.log" | grep -c 'is leading\|no leader known' || true)
  l=$(tail -n +"$(( ${!m} + 1 ))" "$WORK/node$i.log" | grep -c 'no quorum acknowledgement within' || true)
  echo "# node $i: $c leader change(s), $l lease lapse(s) during the flood"
  changes=$((changes + c)); lapses=$((lapses + l))
done
downs=0
for i in 1 2 3; do
  m="MARK_$i"
  d=$(tail -n +"$(( ${!m} + 1 ))" "$WORK/node$i.log" | grep -c ' DOWN: ' || true)
  downs=$((downs + d))
done
echo "# backends marked down during the flood (all nodes): $downs"
check "flood: no backend marked down by starved health checks" test "$downs" = 0
check "flood: 0 leader changes" test "$changes" = 0
check "flood: 0 lease lapses" test "$lapses" = 0
check "flood: the same node holds the VIP" holder_is "$leader"
summary
