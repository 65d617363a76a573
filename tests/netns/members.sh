#!/usr/bin/env bash
# Membership changes with real processes in namespaces (issue 13), every node keyed with one
# peerKeyFile. A client connects to VIP:6443 every 10 ms and the VIP holders are sampled every
# 10 ms on all five nodes, through the whole rolling replacement of a three-node cluster:
#   add server4 -> remove server1 (the leader: handover first) -> add server5 -> remove server2,
#   each removed agent stopped afterwards;
# then server3..5 fail over on their own after kill -9 of the holder. Also: a new node waits
# (no vote, no VIP) until added; refused changes (unknown id, quorum, a non-member asking); a
# removed node restarted with its old config and state never holds the VIP; a leader killed in
# the middle of a change (joint configuration) ends in one membership on every node.
source "$(dirname "$0")/../lib.sh"
source "$ROOT/tests/cluster-lib.sh"
need ip python3 sysctl

NODE_IP=(unused 10.88.0.11 10.88.0.12 10.88.0.13 10.88.0.14 10.88.0.15 10.88.0.16)
NODE_PID=(unused 0 0 0 0 0 0)
ALL="1 2 3 4 5 6"

make_cluster_net
mkns N4 n4; mkns N5 n5; mkns N6 n6
NODE_NS+=("$N4" "$N5" "$N6")
for i in 4 5 6; do plug "${NODE_NS[$i]}" "${NODE_IP[$i]}"; done

for i in $ALL; do : > "$WORK/node$i.log"; done
"$KUBE_VIP" sample key > "$WORK/peer.key"
chmod 600 "$WORK/peer.key"

# member_config I "J K ..." START_AS_LEADER: node I's config, with nodes J K ... as remotePeers.
member_config() {
  local i=$1 j
  {
    echo "remotePeers:"
    for j in $2; do printf -- "- id: server%s\n  address: %s\n  port: 10000\n" "$j" "${NODE_IP[$j]}"; done
    printf "localPeer:\n  id: server%s\n  address: %s\n  port: 10000\n" "$i" "${NODE_IP[$i]}"
    echo "vip: $VIP"
    echo "gratuitousARP: true"
    echo "singleNode: false"
    echo "startAsLeader: $3"
    echo "interface: eth0"
    echo "stateDir: $WORK/state$i"
    echo "peerKeyFile: $WORK/peer.key"
    echo "loadBalancers:"
    lb_entry "Kubernetes Control Plane" tcp 6443 true 6444 10.88.0.21 10.88.0.22 10.88.0.23
  } > "$WORK/node$i.yaml"
}

holders() { # the node numbers holding the VIP now, space separated (all six nodes)
  local i out=""
  for i in $ALL; do has_addr "${NODE_NS[$i]}" eth0 "$VIP" && out+="$i "; done
  echo "${out% }"
}
start_sampler() {
  python3 "$SUPPORT/vip_sampler.py" "$VIP" 10 "$WORK/$1.samples" "${NODE_NS[@]:1}" > "$WORK/$1.summary" &
  SAMPLER=$!
  SAMPLER_T0[$1]=$(now_ms)
}
members() { "$KUBE_VIP" members "$@"; }
# asked I ARGS...: `kube-vip members ARGS -c nodeI.yaml`, output (both streams) in $WORK/out;
# the exit status is kube-vip's.
asked() { local i=$1; shift; members "$@" -c "$WORK/node$i.yaml" > "$WORK/out" 2>&1; }
said() { has -- "$1" "$WORK/out"; }
show() { sed 's/^/#     /' "$WORK/out"; }
# voters_are I "a b c": node I's `members list -o json` has exactly voters serverA.. and no learner.
voters_are() {
  members list -o json -c "$WORK/node$1.yaml" 2>/dev/null | python3 -c '
import json, sys
m = json.load(sys.stdin)
want = sorted("server" + x for x in sys.argv[1].split())
got = sorted(x["id"] for x in m["members"] if x["role"] == "voter")
learners = [x["id"] for x in m["members"] if x["role"] != "voter"]
sys.exit(0 if got == want and not learners and m["changing"] is None else 1)' "$2"
}
fails() { ! "$@"; }
# voters_on "I J" "a b c": voters_are on every node listed.
voters_on() { local i; for i in $1; do voters_are "$i" "$2" || return 1; done; }
holder_among() { local h; h=$(holders); [[ $h =~ ^[$1]$ ]]; }
leader_of() { # the number of the leader node I knows of
  members list -o json -c "$WORK/node$1.yaml" 2>/dev/null |
    python3 -c 'import json,sys; print(next((x["id"][6:] for x in json.load(sys.stdin)["members"] if x["leader"]), ""))'
}

for i in 1 2 3; do member_config "$i" "$(echo 1 2 3 | tr -d "$i")" "$([ "$i" = 1 ] && echo true || echo false)"; done
for i in 1 2 3; do start_node "$i"; done
check "boot: server1 takes the VIP" wait_until 8 holder_is 1
check "members list on a follower: three voters, server1 leads" wait_until 5 voters_are 2 "1 2 3"
asked 2 list || true
show
check "members list names the leader" test "$(leader_of 2)" = 1

# --- a new node waits: not a member yet, no votes, no VIP
member_config 4 "1 2 3" false
m4=$(log_mark 4)
start_node 4
check "new node: logs that it is not a member yet" wait_until 5 log_since 4 "$m4" 'not a member of a cluster yet'
sleep 1
check "new node: never granted a vote nor holds the VIP while waiting" \
  bash -c "! grep -q 'granted vote' '$WORK/node4.log' && ! ip -n ${NODE_NS[4]} -o addr show dev eth0 | grep -q ' $VIP/'"
check "a node that is not a member cannot list members" fails asked 4 list
show
check "... and is told it is not a member" said 'not a member of any cluster yet'
check "a node that is not a member cannot change the membership" fails asked 4 remove --id server2
show
check "... and is told it is not a voting member" said 'not a voting member' 

# ===== the rolling replacement, under a 10 ms client probe and a 10 ms holder sampler
nsx "$CLIENT" python3 "$SUPPORT/probe.py" "$VIP" 6443 100 10 120 "$WORK/roll.probe" &
PROBE=$!
start_sampler roll
sleep 0.5
t_roll=$(now_ms)

# 1. add server4 (asked on a follower: forwarded to the leader)
t0=$(now_ms)
check "add server4 (asked on follower server2) succeeds" asked 2 add --id server4 --address 10.88.0.14:10000
show
echo "#   add server4 took $(( $(now_ms) - t0 )) ms"
check "add server4: it says server4 is a voter now" said 'server4 (10.88.0.14:10000) added as a voter'
check "add server4: four voters on server1's view" wait_until 3 voters_are 1 "1 2 3 4"
check "add server4: server4 itself sees the four voters (no restart)" wait_until 3 voters_are 4 "1 2 3 4"
check "add server4: server4 logs that it is a voter" wait_until 3 grep -q 'server4 is a voter of the cluster' "$WORK/node4.log"

# 2. remove server1, the leader: handover first
L=$(holders)
check "server1 still holds the VIP before its removal" test "$L" = 1
m1=$(log_mark 1)
t0=$(now_ms)
check "remove server1 (the leader, asked on server3) succeeds" asked 3 remove --id server1
show
echo "#   remove server1 took $(( $(now_ms) - t0 )) ms"
check "remove server1: leadership was handed over first" log_since 1 "$m1" 'handing leadership over to'
check "remove server1: server1 logs that it no longer votes" wait_until 3 log_since 1 "$m1" 'not a voter\|was removed from the cluster'
check "remove server1: another node holds the VIP" wait_until 3 holder_is_not 1
check "remove server1: voters are server2..4" wait_until 3 voters_are 2 "2 3 4"
sleep 0.5
check "remove server1: server1 holds no VIP" bash -c "! ip -n ${NODE_NS[1]} -o addr show dev eth0 | grep -q ' $VIP/'"
stop_node 1 TERM

# 3. add server5, asked on server4 (a member added at run time)
member_config 5 "2 3 4" false
start_node 5
check "add server5 (asked on server4) succeeds" wait_until 10 asked 4 add --id server5 --address 10.88.0.15:10000
show
check "add server5: voters are server2..5" wait_until 3 voters_are 5 "2 3 4 5"

# 4. remove server2 (may lead by now), asked on server5
m2=$(log_mark 2)
echo "#   before removing server2 the holder is server$(holders)"
check "remove server2 (asked on server5) succeeds" asked 5 remove --id server2
show
check "remove server2: voters are server3..5 on every remaining node" wait_until 3 voters_on "3 4 5" "3 4 5"
check "remove server2: one of server3..5 holds the VIP" wait_until 3 holder_among 345
stop_node 2 TERM
sleep 1
t_end=$(now_ms)
stop_sampler roll
kill -TERM "$PROBE"; wait "$PROBE" || true
# Only the replacement's window counts (the probe may log a try or two after it).
awk -v t="$t_roll" -v e="$t_end" '$1 >= t && $1 <= e' "$WORK/roll.probe" > "$WORK/roll.window"
gap=$(probe_gap "$WORK/roll.window" "$t_roll")
tries=$(wc -l < "$WORK/roll.window")
fails=$(awk '$2 == "fail"' "$WORK/roll.window" | wc -l)
# The longest run of 10 ms samples in which nobody held the VIP, in ms.
# (from the last sample with a holder to the next one with a holder)
vip_gap() { awk 'BEGIN {g = 0; p = 0} $2 == "-" {if (s == "") s = p; next} {if (s != "" && $1 - s > g) g = $1 - s; s = ""; p = $1} END {printf "%d", g}' "$WORK/$1.samples"; }
hgap=$(vip_gap roll)
echo "#   rolling replacement: holders seen $(holders_seen roll); longest time with no VIP holder ${hgap} ms; client longest outage ${gap} ms (connect timeout 100 ms); $fails of $tries connects failed"
check "rolling replacement: the VIP was unheld for at most 1 s (${hgap} ms)" test "$hgap" -le 1000
check "rolling replacement: no 10 ms sample ever saw two holders" never_two roll
check "rolling replacement: the client's longest outage is at most 1 s (${gap} ms)" test "$gap" -le 1000
check "final members list (server3): voters server3, server4, server5" voters_are 3 "3 4 5"
asked 3 list || true
show
check "members list -o json is valid JSON with a leader" test -n "$(leader_of 3)"

# --- refused changes
check "remove of an unknown id is refused" fails asked 3 remove --id server9
show
check "... with 'server9 is not a member'" said 'server9 is not a member'

# --- server3..5 fail over on their own after kill -9 of the holder
H=$(holders)
start_sampler kill
sleep 0.3 # the sampler's first sample must come before the kill (enough_samples)
t_kill=$(now_ms)
stop_node "$H" KILL
other_holds() { local h; h=$(holders | tr ' ' '\n' | grep -vx "$H" || true); [[ $h =~ ^[345]$ ]]; }
check "kill -9 of holder server$H: another of server3..5 takes the VIP" wait_until 5 other_holds
echo "#   kill -9 of server$H: new holder after $(( $(now_ms) - t_kill )) ms"
sleep 0.5
stop_sampler kill
# The dead process's address stays on its interface for its 1 s lifetime (cluster.sh): two live
# holders is what must never happen.
never_two_live() { enough_samples "$1" "${SAMPLED_MS[$1]}" && sed "s/$2//; s/,,/,/; s/ ,/ /; s/,\$//" "$WORK/$1.samples" | awk 'index($2, ",") {bad = 1} END {exit bad}'; }
check "kill -9: no sample saw two live holders" never_two_live kill "${NODE_NS[$H]}"

# --- quorum: with one of three voters dead, removing a live one is refused
# The dead voter's last answer must be older than the leader's 1 s "up" window.
sleep 1.2
LIVE=$(holders | tr ' ' '\n' | grep -vx "$H" | head -1)
OTHER=$(for i in 3 4 5; do if [ "$i" != "$H" ] && [ "$i" != "$LIVE" ]; then echo "$i"; fi; done)
check "removing a live voter while another is dead is refused" fails asked "$LIVE" remove --id "server$OTHER"
show
check "... because of the quorum" said 'fewer than the 2 a quorum needs'
check "... and the membership is unchanged" voters_are "$LIVE" "3 4 5"

# --- the removed server1 restarted with its old config (startAsLeader: true) and old state
start_sampler removed
m1=$(log_mark 1)
start_node 1
check "removed server1 restarted: logs that its state is no bootstrap" wait_until 5 log_since 1 "$m1" 'refusing to bootstrap from it'
check "removed server1 restarted: logs that it is out of the cluster" wait_until 5 log_since 1 "$m1" 'not a voter\|was removed from the cluster'
sleep 2
stop_sampler removed
never_held_by() { enough_samples "$1" "${SAMPLED_MS[$1]}" && ! awk '{print $2}' "$WORK/$1.samples" | has -- "$2"; }
check "removed server1 restarted: never held the VIP (10 ms samples)" never_held_by removed "${NODE_NS[1]}"
check "removed server1 restarted: the survivors still have one holder" one_holder
check "removed server1 asking for a change is refused" fails asked 1 add --id server6 --address 10.88.0.16:10000
show
stop_node 1 TERM

# --- a leader killed in the middle of a change (joint configuration)
# Bring the dead voter back, make server6 a caught-up learner, freeze both followers, and ask
# the leader to promote server6: it writes the joint configuration but cannot commit it; kill
# it, thaw the followers. Every node must end with one membership, no change in progress.
start_node "$H"
check "the killed voter rejoins" wait_until 5 voters_are "$H" "3 4 5"
member_config 6 "3 4 5" false
# server6 is not running: the add waits for it to catch up (10 s), then leaves it a learner.
members add --id server6 --address 10.88.0.16:10000 -c "$WORK/node$LIVE.yaml" > "$WORK/learner.out" 2>&1 &
ADD=$!
sleep 1
check "a second change while one is in progress is refused" fails asked "$LIVE" remove --id "server$OTHER"
show
check "... saying a change is already in progress" said 'already in progress'
wait "$ADD" || true
sed 's/^/#     /' "$WORK/learner.out"
check "an add whose node never catches up fails, saying it stays a learner" has 'stays a learner' "$WORK/learner.out"
start_node 6
L=$(leader_of "$LIVE")
check "a leader is known ($L)" test -n "$L"
learner_caught_up() { grep -q 'server6 joined as a learner\|is a learner' "$WORK/node6.log"; }
check "server6 is a learner that has caught up" wait_until 5 learner_caught_up
F=$(for i in 3 4 5; do if [ "$i" != "$L" ]; then echo "$i"; fi; done | tr '\n' ' ')
mL=$(log_mark "$L")
for i in $F; do kill -STOP "${NODE_PID[$i]}"; done
members add --id server6 --address 10.88.0.16:10000 -c "$WORK/node$L.yaml" > "$WORK/joint.out" 2>&1 &
ASK=$!
joint_written() { log_since "$L" "$mL" 'membership change asked: Add'; }
wait_until 3 joint_written || true
sleep 0.3
stop_node "$L" KILL
for i in $F; do kill -CONT "${NODE_PID[$i]}"; done
wait "$ASK" || true
sed 's/^/#     joint add: /' "$WORK/joint.out"
F1=${F%% *}
survivors_agree() {
  local a b
  a=$(members list -o json -c "$WORK/node$F1.yaml" 2>/dev/null | python3 -c 'import json,sys; m=json.load(sys.stdin); print(m["changing"], sorted((x["id"],x["role"]) for x in m["members"]))') || return 1
  for i in $F 6; do
    b=$(members list -o json -c "$WORK/node$i.yaml" 2>/dev/null | python3 -c 'import json,sys; m=json.load(sys.stdin); print(m["changing"], sorted((x["id"],x["role"]) for x in m["members"]))') || return 1
    [ "$a" = "$b" ] || return 1
  done
  [[ $a == None* ]]
}
check "leader killed mid-change: the survivors and server6 agree on one membership, no change in progress" wait_until 10 survivors_agree
start_node "$L"
F="$F $L"
check "... and the killed leader, restarted, agrees too" wait_until 10 survivors_agree
asked "$F1" list || true
show
check "after the mid-change kill: exactly one holder" wait_until 5 one_holder

# --- a node removed while it was down (dead for good, then back with its old state): its log
# never got the removal, so it believes it still votes; the members refuse its pre-votes and
# votes, and it never holds the VIP
L=$(leader_of "$F1")
followers=$(members list -o json -c "$WORK/node$F1.yaml" | python3 -c 'import json,sys; print(" ".join(x["id"][6:] for x in json.load(sys.stdin)["members"] if x["role"] == "voter" and not x["leader"]))')
X=${followers%% *}
Y=$(echo "$followers" | tr ' ' '\n' | grep -vx "$X" | head -1)
echo "#   leader server$L; removing server$X while down, asking server$Y"
stop_node "$X" KILL
sleep 1.2
check "remove server$X while it is down (asked on server$Y)" asked "$Y" remove --id "server$X"
show
start_sampler back
mY=$(log_mark "$Y"); mL=$(log_mark "$L")
start_node "$X"
sleep 3
stop_sampler back
check "server$X, back with the state that missed its removal, never held the VIP" never_held_by back "${NODE_NS[$X]}"
check "... the others kept exactly one holder" one_holder
refused_by_members() { log_since "$Y" "$mY" "refusing pre-vote from ${NODE_IP[$X]}:.*not a voter" || log_since "$L" "$mL" "refusing pre-vote from ${NODE_IP[$X]}:.*not a voter"; }
check "... the members refused its pre-votes: not a voter of the current membership" refused_by_members

check "no panic in any log" bash -c "! grep -qi panick '$WORK'/node*.log"
[ "$FAIL" -eq 0 ] || { for i in $ALL; do echo "# ---- node$i.log"; sed 's/^/#   /' "$WORK/node$i.log" 2>/dev/null | tail -40; done; }
summary
