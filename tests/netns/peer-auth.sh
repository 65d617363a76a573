#!/usr/bin/env bash
# Hostile peers on the Raft port (issue 10): three seed-shaped nodes, and a rogue host speaking
# the wire format (tests/support/rogue_peer.py) that forges Hello + AppendEntries / Vote /
# FullSnapshot / Handover / PreVote claiming a peer's identity, with terms 2^40 and 2^64-1.
#   (a) from a non-peer address (the client namespace), no key configured;
#   (b') from a peer's own address (a process in server2's namespace), no key configured:
#       the hello passes the address check, so the terms and identities in the frames are what
#       must be refused.
# While it runs the VIP holders are sampled every 10 ms: the holder never changes, the VIP is
# never unheld, no agent exits; afterwards a kill -9 of the holder still fails over.
source "$(dirname "$0")/../lib.sh"
source "$ROOT/tests/cluster-lib.sh"

TERM_2_40=1099511627776
TERM_MAX=18446744073709551615

make_cluster_net
for i in 1 2 3; do node_config "$i"; done
for i in 1 2 3; do start_node "$i"; done
check "a leader takes the VIP" wait_until 5 one_holder
check "the startAsLeader node (server1) holds the VIP" holder_is 1
sleep 1

# rogue NS HOST CLAIMED_FROM TERM: forges every kind at HOST:10000 from namespace NS.
rogue() {
  local ns=$1 host=$2 from=$3 term=$4 to
  for to in server1 server2 server3; do
    [ "$to" = "$from" ] && continue
    nsx "$ns" python3 "$SUPPORT/rogue_peer.py" "$host" 10000 "$from" "$to" "$term" | sed "s/^/#   $to: /"
  done
}
rogue_all() { # rogue_all NS CLAIMED_FROM: every node, both terms
  local ns=$1 from=$2 term i
  for term in "$TERM_2_40" "$TERM_MAX"; do
    for i in 1 2 3; do rogue "$ns" "${NODE_IP[$i]}" "$from" "$term"; done
  done
}
all_running() { local i; for i in 1 2 3; do kill -0 "${NODE_PID[$i]}" 2>/dev/null || return 1; done; }

# --- (a) a non-peer address claims to be server1 and server2
start_sampler rogue-a
m1=$(log_mark 1)
rogue_all "$CLIENT" server2 > "$WORK/rogue-a.out"
rogue_all "$CLIENT" server1 >> "$WORK/rogue-a.out"
sleep 1
stop_sampler rogue-a
head -5 "$WORK/rogue-a.out"
echo "#   holders seen: $(holders_seen rogue-a)"
check "(a) non-peer address: every forged hello is refused" \
  bash -c "! grep -v ': Error\$' '$WORK/rogue-a.out' | grep -q ."
check "(a) non-peer address: the refusal names the address" \
  log_since 1 "$m1" 'refusing raft connection from 10.88.0.2:.*configured at 10.88.0.1'
check "(a) non-peer address: server1 held the VIP in every 10 ms sample" test "$(holders_seen rogue-a)" = "n1 "
check "(a) non-peer address: no agent exited" all_running

# --- (b') a process beside server2's agent, at server2's own address, no key
start_sampler rogue-b
m1=$(log_mark 1)
rogue_all "$N2" server2 > "$WORK/rogue-b.out"
sleep 1
stop_sampler rogue-b
head -5 "$WORK/rogue-b.out"
echo "#   holders seen: $(holders_seen rogue-b)"
check "(b') peer's address, forged terms: no AppendEntries / Vote / FullSnapshot is answered" \
  bash -c "! grep -E ' (AppendEntries|Vote|FullSnapshot): HelloAck (AppendEntries|Vote|FullSnapshot)\$' '$WORK/rogue-b.out' | grep -q ."
check "(b') peer's address: the refusal says why (term absurdly ahead)" \
  log_since 1 "$m1" 'refusing AppendEntries from 10.88.0.12:.*absurdly ahead'
check "(b') peer's address: server1 held the VIP in every 10 ms sample" test "$(holders_seen rogue-b)" = "n1 "
check "(b') peer's address: no agent exited" all_running

# --- afterwards: a kill -9 of the holder still fails over (no overflowing term was stored)
stop_node 1 KILL
live_holder() { holders | tr ' ' '\n' | grep -vx 1; }
check "after the forgeries, kill -9 of the holder: another node takes the VIP" wait_until 5 live_holder
check "after the failover: both survivors still run" bash -c "kill -0 ${NODE_PID[2]} && kill -0 ${NODE_PID[3]}"
m1=$(log_mark 1)
start_node 1
check "server1 restarts with its state (no corrupt vote on disk) and follows" \
  wait_until 5 log_since 1 "$m1" 'is leading'
check "no panic in any log" bash -c "! grep -qi panick '$WORK'/node*.log"
[ "$FAIL" -eq 0 ] || { for i in 1 2 3; do echo "# ---- node$i.log"; sed 's/^/#   /' "$WORK/node$i.log" | tail -30; done; }
summary
