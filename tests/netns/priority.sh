#!/usr/bin/env bash
# The control path runs ahead of every ordinary thread, the proxy does not: a single-node agent
# whose threads are read from /proc. With the default controlRealtimePriority (10) the main
# thread and every kv-control thread are SCHED_RR at 10 and every kv-proxy thread is SCHED_OTHER
# at nice 0 (nice -10 only ranks threads within one cgroup or login session: a lease lapsed
# under a flood beside another session, BENCHMARKS.md). `controlRealtimePriority: 0` keeps
# nice -10 only. Without CAP_SYS_NICE the agent says so and runs on, holding the VIP. `check`
# prints the key and refuses a priority over 99 naming it.
source "$(dirname "$0")/../lib.sh"
need ip setpriv

mkns A agent
nsx "$A" ip link add vip0 type veth peer name vip1
nsx "$A" ip link set vip1 up
nsx "$A" ip addr add 10.79.0.1/24 dev vip0
nsx "$A" ip link set vip0 up
VIP=10.79.0.100

config() { # config FILE [EXTRA]: a single-node config with one load balancer
  {
    echo "vip: $VIP"
    echo "interface: vip0"
    echo "singleNode: true"
    echo "vipProbeMs: 0"
    echo "metricsAddress: \"\""
    echo "stateDir: $WORK/state"
    echo "loadBalancers:"
    lb_entry lb tcp 6443 true 6444 10.79.0.11
    [ -z "${2:-}" ] || echo "$2"
  } > "$1"
}

# threads PID: "comm policy rt_priority nice" per thread (stat fields 2, 41, 40, 19).
threads() {
  local t s rest
  for t in /proc/"$1"/task/*; do
    s=$(cat "$t/stat" 2>/dev/null) || continue
    rest=${s##*) }
    # shellcheck disable=SC2086
    set -- $rest
    # After ") ": field 3 (state) is $1, so field N is ${N-2}.
    echo "$(cat "$t/comm") ${39} ${38} ${17}"
  done
}

# run NAME [PREFIX...]: starts the agent (config $WORK/NAME.yaml, log $WORK/NAME.log), waits
# until it holds the VIP, stores its threads in $WORK/NAME.threads, stops it.
run() {
  local name=$1 pid
  shift
  ip netns exec "$A" "$@" "$KUBE_VIP" start -c "$WORK/$name.yaml" >"$WORK/$name.log" 2>&1 &
  pid=$!
  if wait_until 10 has_addr "$A" vip0 "$VIP"; then
    sleep 0.3 # the proxy runtime's workers start with it; give the blocking pool a moment
    threads "$pid" > "$WORK/$name.threads"
  else
    echo "# $name: the VIP never came; log:"; sed 's/^/#   /' "$WORK/$name.log"
    : > "$WORK/$name.threads"
  fi
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  sed 's/^/#   /' "$WORK/$name.threads"
}

# all NAME COMM POLICY PRIO NICE: NAME's threads called COMM exist and all have these values.
all() {
  awk -v c="$2" -v p="$3" -v r="$4" -v n="$5" '
    $1 == c {seen++; if ($2 != p || $3 != r || $4 != n) bad++}
    END {exit !(seen > 0 && bad == 0)}' "$WORK/$1.threads"
}
kv() { basename "$KUBE_VIP" | cut -c1-15; } # the main thread's name

echo "# default: control path SCHED_RR 10, proxy normal"
config "$WORK/rt.yaml"
run rt
check "main thread: SCHED_RR (policy 2) at 10" all rt "$(kv)" 2 10 -10
check "kv-control threads: SCHED_RR at 10" all rt kv-control 2 10 -10
check "kv-proxy threads: SCHED_OTHER at nice 0" all rt kv-proxy 0 0 0
check "the log says so" has "control path at real-time priority 10 (SCHED_RR)" "$WORK/rt.log"

echo "# controlRealtimePriority: 0: nice -10 only"
config "$WORK/nice.yaml" "controlRealtimePriority: 0"
run nice
check "kv-control threads: SCHED_OTHER at nice -10" all nice kv-control 0 0 -10
check "kv-proxy threads: SCHED_OTHER at nice 0" all nice kv-proxy 0 0 0

echo "# without CAP_SYS_NICE: a warning, and the agent runs on"
cp "$WORK/rt.yaml" "$WORK/nocap.yaml"
run nocap setpriv --inh-caps=-sys_nice --bounding-set=-sys_nice
check "the VIP was held" test -s "$WORK/nocap.threads"
check "warns that real-time was refused" has "cannot run the control path at real-time priority 10" "$WORK/nocap.log"
check "kv-control threads: SCHED_OTHER" all nocap kv-control 0 0 0

echo "# check"
check "check prints controlRealtimePriority: 10" has -x "controlRealtimePriority: 10" < <("$KUBE_VIP" check -c "$WORK/rt.yaml" 2>/dev/null)
config "$WORK/bad.yaml" "controlRealtimePriority: 100"
rc=0
"$KUBE_VIP" check -c "$WORK/bad.yaml" >/dev/null 2>"$WORK/bad.err" || rc=$?
sed 's/^/#   /' "$WORK/bad.err"
refused() { [ "$rc" = 1 ] && has -F "controlRealtimePriority (100) must be 0 (none) to 99" "$WORK/bad.err"; }
check "check refuses 100, naming the key" refused
summary
