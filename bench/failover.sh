#!/usr/bin/env bash
# Failover benchmark: kube-vip (Raft) vs keepalived 2.2.7 (VRRP), three nodes on one bridge, all
# inside network namespaces made for the run (deleted on exit by tests/lib.sh).
#
# Usage: bench/failover.sh [quick|full]      (default full; needs root and a built binary)
#   quick  5 trials per scenario, 1-minute stability runs: a smoke run (~3 min). Writes its
#          section to $WORK/BENCHMARKS.md unless BENCH_OUT says otherwise, so a smoke run never
#          replaces the full results.
#   full   20 trials per scenario, 10-minute stability run for kube-vip, 5 minutes for
#          keepalived (~20 min). Waits first for a 1-minute load average below 0.7 (up to
#          20 min), then rewrites the "failover" section of BENCHMARKS.md.
#
# Scenarios (each: fault at t0, a client in its own namespace connecting to VIP:6443 in a loop;
# the figure is t0 -> end of the first answered connect after the outage, see PROBE_AWK):
#   ours kill       kill -9 of the leader, and its VIP deleted at once (a machine death)
#   ours kill-keep  kill -9 only: the dead process's VIP stays until its 1 s lifetime runs out
#   ours term       SIGTERM to the leader (planned handover)
#   ours kill-key, term-key   the same two with peerKeyFile set (authenticated peer channel),
#                   same run, so the cost of the key shows against the unkeyed numbers
#   ka kill         kill -9 of the MASTER's keepalived processes, and its VIP deleted at once
#   ka term         SIGTERM to the MASTER's keepalived (it sends a priority-0 advert)
#   stability       5 % egress loss + a CPU hog in every node namespace, holders sampled each 10 ms
#
# Environment: KUBE_VIP (binary), BENCH_OUT (markdown file to update), FO_TRIALS, FO_KA_TRIALS,
# FO_STAB_S, FO_KA_STAB_S (override the mode's counts), FO_LOAD_MAX (0.7), FO_LOAD_WAIT (s, 1200).
set -euo pipefail

MODE=${1:-full}
case $MODE in
  quick) trials=5; ka_trials=5; stab_s=60; ka_stab_s=60; load_wait=0 ;;
  full) trials=20; ka_trials=20; stab_s=600; ka_stab_s=300; load_wait=${FO_LOAD_WAIT:-1200} ;;
  *) echo "usage: bench/failover.sh [quick|full]" >&2; exit 2 ;;
esac
TRIALS=${FO_TRIALS:-$trials}
KA_TRIALS=${FO_KA_TRIALS:-$ka_trials}
STAB_S=${FO_STAB_S:-$stab_s}
KA_STAB_S=${FO_KA_STAB_S:-$ka_stab_s}
LOAD_MAX=${FO_LOAD_MAX:-0.7}

# A trial kills keepalived's parent and its VRRP child together; the orphaned child goes to
# PID 1, and this VM's init does not reap, so it would stay a zombie for good, and the next
# keepalived, finding that pid "alive" in its pid file, refuses to start. So the benchmark runs
# under a small Python parent that is a child subreaper (PR_SET_CHILD_SUBREAPER) and reaps them.
if [ -z "${FO_REAPER:-}" ]; then
  FO_REAPER=1 exec python3 -c '
import ctypes, os, signal, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)
child = os.fork()
if child == 0:
    os.execv("/bin/bash", ["bash"] + sys.argv[1:])
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, lambda n, _: os.kill(child, n))
while True:
    pid, status = os.wait()
    if pid == child:
        break
deadline = time.monotonic() + 2
while time.monotonic() < deadline:
    try:
        if os.waitpid(-1, os.WNOHANG)[0] == 0:
            time.sleep(0.05)
    except ChildProcessError:
        break
sys.exit(os.waitstatus_to_exitcode(status) % 256)
' "$0" "$@"
fi

# The probe gives up on a connect after PROBE_MS and tries again PROBE_GAP_MS later, so a
# failover is seen to within PROBE_MS + PROBE_GAP_MS (+ Python's own few hundred µs).
PROBE_MS=20
PROBE_GAP_MS=1
# The timers under test (the defaults, written out so the section states them).
TIMERS=$'heartbeatMs: 20\nelectionTimeoutMinMs: 40\nelectionTimeoutMaxMs: 120'
KA_PRIO=(unused 150 100 50)

# "f" keeps our namespaces apart from the tests' ("t") and scripts/bench's ("b").
DEPS_GROUP=bench # `need` accepts what scripts/deps bench installs
TAG=f$$
# shellcheck source=tests/lib.sh
source "$(dirname "$0")/../tests/lib.sh"
# shellcheck source=tests/cluster-lib.sh
source "$ROOT/tests/cluster-lib.sh"
cd "$ROOT"

# Progress goes to fd 3 (the terminal's stderr). Commands' stderr goes to a file, because bash
# reports every kill -9'ed background job ("Killed ...") and kill -9 is what the trials do.
exec 3>&2 2>>"$WORK/stderr.log"
log() { echo "[$(date +%T)] $*" >&3; }
die() { log "FATAL: $*"; exit 1; }

# The work directory keeps every probe log, sample file and node log for looking into outliers.
KEEP_WORK=1
SAMPLER=
HOGS=()
# lib.sh's cleanup kills what runs inside our namespaces; the sampler runs outside them.
fo_cleanup() {
  [ -z "$SAMPLER" ] || kill "$SAMPLER" 2>/dev/null || true
  grep -v ' Killed ' "$WORK/stderr.log" | tail -20 >&3 || true
  echo "work files kept in $WORK" >&3
  cleanup
}
trap fo_cleanup EXIT

if [ "$MODE" = quick ]; then OUT=${BENCH_OUT:-$WORK/BENCHMARKS.md}; else OUT=${BENCH_OUT:-$ROOT/BENCHMARKS.md}; fi

need keepalived iptables ip python3 # scripts/deps bench installs them

# ------------------------------------------------------------------ quiet machine
# Two cores shared with other work: CPU contention stretches every timer measured here.
load1() { cut -d' ' -f1 /proc/loadavg; }
above() { awk -v a="$1" -v b="$2" 'BEGIN {exit !(a >= b)}'; }
LOAD_NOTE=
wait_low_load() {
  local end=$((SECONDS + load_wait)) l
  while l=$(load1); above "$l" "$LOAD_MAX"; do
    if [ "$SECONDS" -ge "$end" ]; then
      LOAD_NOTE="1-min load average still $l after waiting $((load_wait / 60)) min: ran anyway"
      log "$LOAD_NOTE"; return
    fi
    log "1-min load average $l >= $LOAD_MAX: waiting"
    sleep 15
  done
}
[ "$load_wait" -eq 0 ] || wait_low_load

# A rebuild by someone else during the run would change the binary under the restarts: run a
# copy, taken now that the wait is over.
cp -p "$KUBE_VIP" "$WORK/kube-vip"
KUBE_VIP=$WORK/kube-vip
BIN_INFO="$("$KUBE_VIP" --version 2>/dev/null || echo unknown), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- src 2>/dev/null || echo ' + uncommitted src changes'), binary built $(date -u -r "$KUBE_VIP" '+%Y-%m-%d %H:%M UTC')"
WAITED_S=$SECONDS
PHASE_LOADS=()
LOAD_START=$(load1)
RUN_START=$SECONDS
log "start: mode $MODE, load $LOAD_START, work $WORK"

# ------------------------------------------------------------------ helpers
RAW=$WORK/trials.raw
: > "$RAW"
: > "$WORK/stab.raw"

# The probe log is read the same way by the wait below and by record (times from T0, in ms):
#   first fail  the first failed try that ended after T0 (a try in flight at the fault counts)
#   restored    end of the first answered try started after the first failure (after T0 if
#               nothing failed). A SIGTERMed leader still serves until it lets go, so the
#               first answer after T0 alone would say nothing about a handover.
#   outage      restored - start of the first failed try (0 if none failed)
#   late        failed tries in the 500 ms after restored: a flap, or a slow answer on a busy box
# Tries that ended before T0 are ignored, and so are answers to tries started before it.
# shellcheck disable=SC2016 # awk program, expanded by awk
# Two passes over the file (`awk ... FILE FILE`): the first finds the first failure.
PROBE_AWK='
  NR == FNR { if ($2 == "fail" && $1 + $3 >= t && ff == "") ff = $1; next }
  $1 + $3 < t { next }
  { end = $1 + $3 }
  $2 == "fail" && rec != "" { if (end <= rec + 500) late++; next }
  $2 == "fail" {
    if ($4 == "ConnectionRefusedError") refused++
    else if ($4 ~ /^(ConnectionResetError|BrokenPipeError|ConnectionAbortedError|closed)$/) reset++
    else if ($4 ~ /^(TimeoutError|timeout)$/) timeout++
    else other++
    next
  }
  $2 == "ok" && rec == "" && $1 >= t && (ff == "" || $1 >= ff) { rec = end; who = $4 }
'

# settled FILE T0: service is restored and the 500 ms after it have been watched.
settled() { awk -v t="$2" "$PROBE_AWK"' END { exit !(rec != "" && end >= rec + 500) }' "$1" "$1"; }

# record IMPL KIND N T0 FILE OLD: appends one line to $RAW:
#   impl kind n t0 restored outage refused reset timeout other late old-holder answer
record() {
  awk -v t="$4" -v id="$1 $2 $3 $4" -v old="$6" "$PROBE_AWK"'
    END {
      if (rec == "") { r = "NA"; o = "NA" }
      else { r = sprintf("%.0f", rec - t); o = sprintf("%.0f", ff == "" ? 0 : rec - ff) }
      printf "%s %s %s %d %d %d %d %d %s %s\n", id, r, o, refused, reset, timeout, other, late,
        old, (who == "" ? "-" : who)
    }' "$5" "$5" >> "$RAW"
  tail -1 "$RAW"
}

# steady SECONDS: exactly one holder, and still the same one SECONDS later.
steady() { local h; h=$(holders); one_holder || return 1; sleep "$1"; [ "$(holders)" = "$h" ]; }

vip_gone() { ! has_addr "$1" eth0 "$VIP"; }

# tests/lib.sh's has_addr pipes into `grep -q`: under pipefail, grep leaving at the first match
# can kill `ip` with SIGPIPE while it still writes, and the VIP then looks absent (seen here).
# Same test, but grep reads everything.
has_addr() { ip -n "$1" -o addr show dev "$2" | grep -w "inet6\? $3/\(32\|128\)" >/dev/null; }

# ------------------------------------------------------------------ the two implementations
# fault IMPL KIND H: the fault on holder H. Kept minimal: the clock is already running.
KA_PID=(unused 0 0 0)
KILL_PIDS=()
ka_pids() { # ka_pids I: keepalived's parent and VRRP child in node I's namespace
  local p
  for p in $(ip netns pids "${NODE_NS[$1]}"); do
    [ "$(cat "/proc/$p/comm" 2>/dev/null)" = keepalived ] && echo "$p"
  done
  return 0
}
fault() {
  local impl=$1 kind=$2 h=$3
  case $impl-$kind in
    ours-kill | ours-kill-key) kill -KILL "${NODE_PID[$h]}"; nsx "${NODE_NS[$h]}" ip addr del "$VIP/32" dev eth0 ;;
    ours-kill-keep) kill -KILL "${NODE_PID[$h]}" ;;
    ours-term | ours-term-key) kill -TERM "${NODE_PID[$h]}" ;;
    # A machine death: keepalived and the node's server stop at the same instant (SIGSTOP
    # first: the VRRP child gets SIGTERM when its parent dies and would still send its
    # priority-0 advert and remove the VIP, a planned handover), the VIP goes, then the kill.
    ka-kill)
      kill -STOP "${KILL_PIDS[@]}"
      nsx "${NODE_NS[$h]}" ip addr del "$VIP/32" dev eth0
      kill -KILL "${KILL_PIDS[@]:1}"
      # The server is a stand-in for the node's API server: it lives on for the next trial.
      kill -CONT "${KILL_PIDS[0]}" ;;
    ka-term) kill -TERM "${KA_PID[$h]}" ;;
  esac
  # Reap a killed process at once, so the restart below finds its slot free.
  if [ "${kind%-key}" != term ]; then
    if [ "$impl" = ours ]; then { wait "${NODE_PID[$h]}"; } 2>/dev/null || true; NODE_PID[h]=0
    else { wait "${KA_PID[$h]}"; } 2>/dev/null || true; KA_PID[h]=0; fi
  fi
}

# recover IMPL KIND H: brings node H back and waits until the cluster is settled again, so
# every trial starts from the same state: three members, one stable holder.
recover() {
  local impl=$1 kind=$2 h=$3 mark l
  if [ "$impl" = ours ]; then
    [ "${NODE_PID[$h]}" = 0 ] || wait "${NODE_PID[$h]}" || true
    NODE_PID[h]=0
    # Let the dead process's address run out by itself (that is what this variant measures:
    # the sampler sees how long two nodes held the VIP); a restart would remove it early.
    [ "$kind" != kill-keep ] || wait_until 6 vip_gone "${NODE_NS[$h]}" || die "stale VIP on n$h outlived its lifetime"
    mark=$(log_mark "$h")
    start_node "$h"
    l=$(holders)
    [[ $l =~ ^[123]$ ]] || die "no single holder while n$h restarts: '$l'"
    wait_until 10 log_since "$h" "$mark" "The Node \[${NODE_IP[$l]}:10000\] is leading" ||
      die "restarted n$h does not follow n$l"
  else
    [ "${KA_PID[$h]}" = 0 ] || wait "${KA_PID[$h]}" || true
    KA_PID[h]=0
    mark=$(wc -l < "$WORK/ka$h.log")
    start_ka "$h"
    wait_until 10 log_since_file "$WORK/ka$h.log" "$mark" 'Entering BACKUP STATE' ||
      die "restarted keepalived on n$h did not enter BACKUP"
  fi
  wait_until 10 steady 0.5 || die "no stable holder after restarting n$h"
}
log_since_file() { tail -n +"$(($2 + 1))" "$1" | has -- "$3"; }

# trial IMPL KIND N: one measured fault on whoever holds the VIP now.
trial() {
  local impl=$1 kind=$2 n=$3 h f probe t0
  h=$(holders)
  [[ $h =~ ^[123]$ ]] || die "trial $impl-$kind $n: expected one holder, got '$h'"
  f=$WORK/$impl-$kind.$n.probe
  ip netns exec "$CLIENT" python3 "$SUPPORT/probe.py" "$VIP" 6443 "$PROBE_MS" "$PROBE_GAP_MS" 120 "$f" &
  probe=$!
  # Start from a working path: the client must already be getting answers through the VIP.
  wait_until 5 grep -q ' ok ' "$f" || die "probe gets no answer before trial $impl-$kind $n"
  sleep 0.2
  # Looked up before the clock starts.
  [ "$impl" != ka ] || mapfile -t KILL_PIDS < <(echo "${SERVER_PID[$h]}"; ka_pids "$h")
  t0=$(date +%s%3N)
  fault "$impl" "$kind" "$h"
  wait_until 30 settled "$f" "$t0" || log "  $impl-$kind $n: not restored within 30 s"
  kill -TERM "$probe"; wait "$probe" || true
  log "  $impl-$kind $n/$4: $(record "$impl" "$kind" "$n" "$t0" "$f" "n$h")"
  recover "$impl" "$kind" "$h"
}

# series IMPL KIND COUNT: COUNT trials under one sampler run, so its max_holders covers the
# faults and the restarts between them.
series() {
  local n
  log "$1 $2: $3 trials"
  start_sampler "$1-$2"
  for ((n = 1; n <= $3; n++)); do trial "$1" "$2" "$n" "$3"; done
  stop_sampler "$1-$2" >/dev/null
  SAMPLER=
  PHASE_LOADS+=("$1 $2 $(load1)")
  log "  sampler: $(cat "$WORK/$1-$2.summary"), load $(load1)"
}

start_ka() { # start_ka I: keepalived for node I, its console log time-stamped (it logs seconds only)
  local i=$1
  echo "----- start $(date +%T.%N)" >> "$WORK/ka$i.log"
  # A killed instance leaves its pid files; a machine that died would come back with /run empty.
  rm -f "$WORK/ka$i.pid" "$WORK/ka$i.vrrp.pid" "$WORK/ka$i.checkers.pid"
  # -P: VRRP only (no checkers); -n -l -G: foreground, console log, no syslog; own pid files
  # so three instances on one host do not see each other as "already running".
  ip netns exec "${NODE_NS[$i]}" keepalived -n -l -D -G -P -f "$WORK/ka$i.conf" -p "$WORK/ka$i.pid" \
    -r "$WORK/ka$i.vrrp.pid" -c "$WORK/ka$i.checkers.pid" > >(stamp >> "$WORK/ka$i.log") 2>&1 &
  KA_PID[i]=$!
}
stamp() { local l; while IFS= read -r l; do printf '%s %s\n' "$EPOCHREALTIME" "$l"; done; }

ka_config() { # ka_config I: VRRP instance like a typical API-server VIP setup, no scripts
  cat > "$WORK/ka$1.conf" <<EOF
global_defs {
  router_id n$1
}
vrrp_instance apiserver {
  state BACKUP
  nopreempt
  interface eth0
  virtual_router_id 51
  priority ${KA_PRIO[$1]}
  advert_int 1
  virtual_ipaddress {
    $VIP/32 dev eth0
  }
}
EOF
}

# stability IMPL SECONDS: loss and CPU hogs on every node, holders sampled for SECONDS.
stability() {
  local impl=$1 secs=$2 i marks=() p
  log "$impl stability: ${secs} s with 5 % egress loss and a CPU hog per node"
  for i in 1 2 3; do
    # No sch_netem in this kernel: drop 5 % of each node's outgoing packets with iptables,
    # which is what `tc qdisc add dev eth0 root netem loss 5%` does on the node's interface.
    nsx "${NODE_NS[$i]}" iptables -A OUTPUT -m statistic --mode random --probability 0.05 -j DROP
    ip netns exec "${NODE_NS[$i]}" sh -c 'while :; do :; done' &
    HOGS+=("$!")
  done
  for i in 1 2 3; do
    if [ "$impl" = ours ]; then marks+=("$(log_mark "$i")"); else marks+=("$(wc -l < "$WORK/ka$i.log")"); fi
  done
  start_sampler "$impl-stab"
  sleep "$secs"
  stop_sampler "$impl-stab" >/dev/null
  SAMPLER=
  PHASE_LOADS+=("$impl stability (3 hogs) $(load1)")
  for p in "${HOGS[@]}"; do kill "$p"; wait "$p" 2>/dev/null || true; done
  HOGS=()
  for i in 1 2 3; do
    nsx "${NODE_NS[$i]}" iptables -D OUTPUT -m statistic --mode random --probability 0.05 -j DROP
  done
  # End marks too: the shutdown that follows must not count as instability.
  for i in 1 2 3; do
    if [ "$impl" = ours ]; then marks+=("$(log_mark "$i")"); else marks+=("$(wc -l < "$WORK/ka$i.log")"); fi
  done
  echo "$impl $secs ${marks[*]}" >> "$WORK/stab.raw"
  log "  sampler: $(cat "$WORK/$impl-stab.summary")"
}

# ------------------------------------------------------------------ run
make_cluster_net

log "kube-vip: three nodes"
for i in 1 2 3; do node_config "$i" "$TIMERS"; start_node "$i"; done
wait_until 10 steady 0.5 || die "kube-vip cluster did not settle"
series ours kill "$TRIALS"
series ours kill-keep "$TRIALS"
series ours term "$TRIALS"
stability ours "$STAB_S"
for i in 1 2 3; do stop_node "$i" TERM; done
for i in 1 2 3; do vip_gone "${NODE_NS[$i]}" || die "a stopped kube-vip left the VIP on n$i"; done

log "kube-vip with peerKeyFile: three nodes"
"$KUBE_VIP" sample key > "$WORK/peer.key"
chmod 600 "$WORK/peer.key"
for i in 1 2 3; do node_config "$i" "$TIMERS
peerKeyFile: $WORK/peer.key"; start_node "$i"; done
wait_until 10 steady 0.5 || die "keyed kube-vip cluster did not settle"
series ours kill-key "$TRIALS"
series ours term-key "$TRIALS"
for i in 1 2 3; do stop_node "$i" TERM; done
for i in 1 2 3; do vip_gone "${NODE_NS[$i]}" || die "a stopped kube-vip left the VIP on n$i"; done

log "keepalived: three instances"
# keepalived only moves the address: a stand-in server in each node namespace answers on
# 0.0.0.0:6443 (so it answers on the VIP wherever the VIP is), same reply shape as the backends.
SERVER_PID=(unused 0 0 0)
for i in 1 2 3; do
  ip netns exec "${NODE_NS[$i]}" python3 "$SUPPORT/backend.py" "ka-n$i" 0.0.0.0 6443 &
  SERVER_PID[i]=$!
done
for i in 1 2 3; do ka_config "$i"; start_ka "$i"; done
wait_until 15 steady 1 || die "keepalived did not settle"
series ka kill "$KA_TRIALS"
series ka term "$KA_TRIALS"
stability ka "$KA_STAB_S"

RUN_S=$((SECONDS - RUN_START))
log "measurements done in ${RUN_S} s; writing the report"

# ------------------------------------------------------------------ report
model=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
MACHINE="$(nproc) vCPU $model, Linux $(uname -r)"
BODY=$WORK/failover.md
{
  echo "## Failover ($(date -u '+%Y-%m-%d'), $MACHINE)"
  echo
  echo "- Run: \`bench/failover.sh $MODE\` took $((RUN_S / 60)) min after waiting $((WAITED_S / 60)) min for a quiet machine; 1-min load average at start $LOAD_START${LOAD_NOTE:+ ($LOAD_NOTE)}, at the end of each phase: $(printf '%s; ' "${PHASE_LOADS[@]}" | sed 's/; $//')"
  echo "- Machine: $(nproc) CPUs ($model), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, kernel $(uname -r)"
  echo "- kube-vip: $BIN_INFO; timers heartbeatMs 20, electionTimeoutMinMs 40, electionTimeoutMaxMs 120"
  echo "- keepalived: $(keepalived --version 2>&1 | head -1 | cut -d' ' -f1-2) (Debian $(dpkg-query -W -f='${Version}' keepalived 2>/dev/null || echo '?')), VRRP multicast, advert_int 1, priorities ${KA_PRIO[1]}/${KA_PRIO[2]}/${KA_PRIO[3]}, all \`state BACKUP\` + \`nopreempt\` (like kube-vip: a restarted node never takes the VIP back), no scripts"
  echo
  python3 - "$WORK" "$PROBE_MS" "$PROBE_GAP_MS" <<'PY'
import math
import os
import sys

work, probe_ms, gap_ms = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = [l.split() for l in open(os.path.join(work, "trials.raw")) if l.strip()]


def pct(v, p):  # nearest rank
    v = sorted(v)
    return v[max(0, math.ceil(p / 100 * len(v)) - 1)]


def summary(name):
    try:
        return dict(kv.split("=") for kv in open(os.path.join(work, name + ".summary")).read().split())
    except (OSError, ValueError):
        return {}


def double_runs(name):
    """Durations (ms) of the stretches in which two or more nodes held the VIP."""
    runs, start, last = [], None, None
    for line in open(os.path.join(work, name + ".samples")):
        t, who = line.split()
        t = float(t)
        if "," in who:
            start = t if start is None else start
            last = t
        elif start is not None:
            runs.append(last - start + 10)
            start = None
    if start is not None:
        runs.append(last - start + 10)
    return runs


labels = {
    ("ours", "kill"): "kube-vip: kill -9 leader + VIP deleted (machine death)",
    ("ours", "kill-keep"): "kube-vip: kill -9 leader only (VIP left to expire)",
    ("ours", "term"): "kube-vip: SIGTERM leader (planned handover)",
    ("ours", "kill-key"): "kube-vip + peerKeyFile: kill -9 leader + VIP deleted",
    ("ours", "term-key"): "kube-vip + peerKeyFile: SIGTERM leader",
    ("ka", "kill"): "keepalived: kill -9 MASTER + VIP deleted",
    ("ka", "term"): "keepalived: SIGTERM MASTER (priority-0 advert)",
}
print("### Fault → service restored through VIP:6443 (ms)")
print()
print("| Scenario | n | restored min | p50 | p99 | max | outage p50 (max) | failed tries/trial: refused+reset, median (max) | timeouts, median (max) | failed tries ≤ 500 ms after restored (trials) | max holders (10 ms samples) |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for key, label in labels.items():
    rs = [r for r in rows if (r[0], r[1]) == key]
    if not rs:
        continue
    ok = [r for r in rs if r[4] != "NA"]
    rec = [int(r[4]) for r in ok]
    out = [int(r[5]) for r in ok]
    miss = len(rs) - len(ok)
    rr = [int(r[6]) + int(r[7]) for r in rs]
    to = [int(r[8]) for r in rs]
    other = sum(int(r[9]) for r in rs)
    late = sum(int(r[10]) for r in rs)
    late_trials = sum(int(r[10]) > 0 for r in rs)
    s = summary(f"{key[0]}-{key[1]}")
    mh = s.get("max_holders", "?")
    if s.get("double_samples", "0") != "0":
        d = double_runs(f"{key[0]}-{key[1]}")
        mh += f" ({s['double_samples']} samples in {len(d)} stretches, longest {max(d):.0f} ms)"
    stats = " | ".join(str(pct(rec, p)) for p in (0, 50, 99, 100)) if rec else "– | – | – | –"
    n = f"{len(rs)}" + (f" ({miss} not restored)" if miss else "")
    to_s = f"{pct(to, 50)} ({max(to)})" + (f", {other} other" if other else "")
    outs = f"{pct(out, 50)} ({max(out)})" if out else "–"
    print(f"| {label} | {n} | {stats} | {outs} | {pct(rr, 50)} ({max(rr)}) | "
          f"{to_s} | {late} ({late_trials}) | {mh} |")
print()
def p50(kind):
    v = [int(r[4]) for r in rows if (r[0], r[1]) == ("ours", kind) and r[4] != "NA"]
    return pct(v, 50) if v else None


for plain, keyed in (("kill", "kill-key"), ("term", "term-key")):
    a, b = p50(plain), p50(keyed)
    if a and b:
        print(f"peerKeyFile cost, {plain}: restored p50 {a} ms without a key, {b} ms with one "
              f"({(b - a) / a * 100:+.0f} %).")
print()
print("*Restored*: fault → end of the first answered connect started after the first failed one "
      "(a SIGTERMed leader still answers for a few ms). *Outage*: start of the first failed connect → "
      "restored. Medians (p50) are nearest-rank too. "
      f"Probe: next connect {gap_ms} ms after the previous try ends, connect timeout {probe_ms} ms, so "
      f"a recovery is seen at most ~{probe_ms + gap_ms} ms late; p99 is nearest-rank (with 20 trials, "
      "the maximum).")
print()

print("### Stability: 5 % egress loss + one CPU hog per node")
print()
print("| | duration | samples | leader changes (holder changes in samples) | elections logged | VIP lapses (lease) | VIP removals logged | max holders | samples with no holder | longest no-holder gap |")
print("|---|---|---|---|---|---|---|---|---|---|")
for line in open(os.path.join(work, "stab.raw")):
    impl, secs, *marks = line.split()
    samples = [l.split() for l in open(os.path.join(work, f"{impl}-stab.samples"))]
    holders = [w for _, w in samples]
    changes, prev = 0, None
    for w in holders:
        if w != "-" and "," not in w:
            if prev is not None and w != prev:
                changes += 1
            prev = w
    maxh = max((0 if w == "-" else len(w.split(","))) for w in holders)
    none = sum(w == "-" for w in holders)
    longest, start = 0.0, None
    for t, w in samples:
        if w == "-":
            start = float(t) if start is None else start
            longest = max(longest, float(t) - start + 10)
        else:
            start = None
    elections = lapses = removals = 0
    for i, m, e in zip((1, 2, 3), marks[:3], marks[3:]):
        path = os.path.join(work, f"node{i}.log" if impl == "ours" else f"ka{i}.log")
        lines = open(path).read().splitlines()[int(m):int(e)]
        if impl == "ours":
            me = f"10.88.0.1{i}:10000"
            won = sum(f"The Node [{me}] is leading" in l for l in lines)
            elections += won
            # A new leader logs one lapse before its first quorum acknowledgement: not a lapse.
            lapses += sum("no quorum acknowledgement" in l for l in lines) - won
            removals += sum("released from" in l for l in lines)
        else:
            elections += sum("Entering MASTER STATE" in l for l in lines)
    name = "kube-vip" if impl == "ours" else "keepalived"
    lap = str(lapses) if impl == "ours" else "n/a"
    rem = str(removals) if impl == "ours" else "n/a"
    print(f"| {name} | {int(secs) // 60} min {int(secs) % 60} s | {len(samples)} | {changes} | {elections} | {lap} | {rem} | "
          f"{maxh} | {none} | {longest:.0f} ms |")
PY
  cat <<EOF

**Method.** Namespaces: a bridge, three nodes n1–n3 (10.88.0.11–13, eth0), a client
(10.88.0.2, \`arp_accept=1\`) and three backends, built by \`tests/cluster-lib.sh\`. VIP
$VIP. kube-vip runs its tcp load balancer on VIP:6443 → backends:6444; keepalived only moves the
address, so each node namespace runs a stand-in server on 0.0.0.0:6443 that answers itself (one hop
less than kube-vip's path; well under a millisecond). The client runs \`tests/support/probe.py\`:
connect, send a byte, half-close, read the answer; a try counts as a success only if an answer
arrives, and only tries *started* after the fault count. The fault time t0 is taken just before
the signal. Each trial starts with the probe already getting answers; after it the faulted node
is restarted and the next trial waits until it has rejoined (kube-vip: it logs the current
leader; keepalived: it enters BACKUP) and one holder has been stable for 0.5 s.
- *kill -9 + VIP deleted* (a machine death): the kernel of a killed kube-vip keeps the VIP up
  to its 1 s address lifetime (keepalived's: for ever), which a dead machine would not, so the
  script deletes the VIP from the killed node's namespace right after \`kill -9\` (a few ms;
  well inside the 80 ms lease, so before any successor can be elected). keepalived: its two processes
  and the node's stand-in server are SIGSTOPped at once, the VIP deleted, then keepalived
  SIGKILLed (a plain \`kill -9\` of the parent first hands its VRRP child a SIGTERM, and the
  child then still sends its priority-0 advert: a planned handover, seen here once).
- *kill -9 only, VIP left to expire* (process death): the dead node keeps answering ARP for the
  VIP and refusing connects until the new leader's gratuitous ARP reaches the client; two nodes
  hold the address until its lifetime runs out. The new leader's probe (\`vipProbeMs\`) sees the
  dead node's address answer, finds that node's Raft port refusing connections (no process) and
  takes the VIP at once instead of waiting for the expiry. Expected; the restart waits for it,
  so the sampler sees the whole stretch.
- Failed tries before *restored* are counted by kind: *refused+reset* (RST, or accepted and
  closed unanswered) vs *timeouts* (no answer within ${PROBE_MS} ms: the SYN went to a MAC that no longer
  has the VIP). Counts scale with the probe's pace (a refused try takes ~0.5 ms, a timeout
  ${PROBE_MS} ms), and a handover shorter than ${PROBE_MS} ms still shows as one timeout.
- Max holders: the VIP sampler (\`tests/support/vip_sampler.py\`, one netlink dump per node every
  10 ms) runs through all trials of a row, restarts included.
- Stability: this kernel has no \`sch_netem\`, so 5 % loss is \`iptables -A OUTPUT -m statistic
  --mode random --probability 0.05 -j DROP\` in each node namespace (egress only, like netem on
  the node's interface); plus \`sh -c 'while :; do :; done'\` in each node namespace (3 hogs on
  $(nproc) CPUs). *Leader changes* counts changes of the (single) holder between samples;
  *elections* counts "is leading" lines naming the node itself (kube-vip) or "Entering MASTER
  STATE" (keepalived); *VIP lapses* counts "no quorum acknowledgement" lines minus the one every new
  leader logs before its first acknowledgement; *VIP removals* counts "VIP … released" lines (a
  lapse that ends before the agent acts removes nothing).$([ "$KA_STAB_S" -lt "$STAB_S" ] && echo " keepalived's run is shorter, to keep the whole benchmark near 20 minutes.")
- Raw data (probe logs, 10 ms samples, node logs with ms timestamps) stay in the run's work
  directory under /tmp; the slowest trial of each row is printed with its time for the logs.
EOF
} > "$BODY"

# Replace our section between markers, leave every other section alone (same markers as
# scripts/bench's sections, so both can rewrite the file independently).
python3 "$ROOT/bench/results.py" section "$OUT" failover "$BODY"

echo
sed -n '/^### /,/^\*\*Method/p' "$BODY" | sed '$d'
# Where to look in the node logs (UTC, ms) for the slowest trial of each row.
echo "slowest trials:"
sort -k1,2 -k5,5n "$RAW" | awk '$5 != "NA" {last[$1 " " $2] = $0} END {for (k in last) print last[k]}' |
  while read -r impl kind n t0 rest _; do
    echo "  $impl $kind #$n: ${rest} ms, fault at $(date -u -d "@${t0:0:10}.${t0:10}" +%T.%3N) UTC"
  done
echo "section \"failover\" written to $OUT"
