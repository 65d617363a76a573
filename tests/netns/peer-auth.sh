#!/usr/bin/env bash
# Hostile peers on the Raft port (issue 10): three seed-shaped nodes, and a rogue host speaking
# the wire format (tests/support/rogue_peer.py) that forges Hello + AppendEntries / Vote /
# FullSnapshot / Handover / PreVote claiming a peer's identity, with terms 2^40 and 2^64-1.
#   (a) from a non-peer address (the client namespace), no key configured;
#   (b') from a peer's own address (a process in server2's namespace), no key configured:
#       the hello passes the address check, so the terms and identities in the frames are what
#       must be refused.
# Then the cluster gets a key (peerKeyFile) and rotates it through all three nodes, one restart
# at a time (new key second everywhere, then first, then alone), and is attacked again:
#   (b) from a peer's own address, with no key (plain and keyed hello);
#   (c) with a wrong key (a random one, and the key retired by the rotation);
#   (d) replaying the dialer side of connections captured (tcpdump) from the real peers.
# While it runs the VIP holders are sampled every 10 ms: the holder never changes, the VIP is
# never unheld, no agent exits; afterwards a kill -9 of the holder still fails over.
source "$(dirname "$0")/../lib.sh"
source "$ROOT/tests/cluster-lib.sh"
need ip python3 tcpdump

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
# start_sampler, then wait for its first sample (a sampler stopped before it ran proves nothing).
sampling() { start_sampler "$1"; wait_until 5 test -s "$WORK/$1.samples"; }
all_running() { local i; for i in 1 2 3; do kill -0 "${NODE_PID[$i]}" 2>/dev/null || return 1; done; }

# --- (a) a non-peer address claims to be server1 and server2
sampling rogue-a
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
sampling rogue-b
m1=$(log_mark 1)
rogue_all "$N2" server2 > "$WORK/rogue-b.out"
sleep 1
stop_sampler rogue-b
head -5 "$WORK/rogue-b.out"
echo "#   holders seen: $(holders_seen rogue-b)"
check "(b') peer's address, forged terms: no AppendEntries / Vote / FullSnapshot is answered" \
  bash -c "! grep -E ' (AppendEntries|Vote|FullSnapshot): HelloAck (AppendEntries|Vote|FullSnapshot)\$' '$WORK/rogue-b.out' | grep -q ."
check "(b') peer's address: the refusal says why (term absurdly ahead)" \
  log_since 1 "$m1" 'refusing \(AppendEntries\|Vote\|FullSnapshot\) from 10.88.0.12:.*absurdly ahead'
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

# ===== keyed cluster
K1=$("$KUBE_VIP" sample key); K2=$("$KUBE_VIP" sample key)
check "kube-vip sample key prints fresh 32-byte hex keys" \
  bash -c "[[ '$K1' =~ ^[0-9a-f]{64}\$ ]] && [ '$K1' != '$K2' ]"
keys() { # keys LINE...: writes every node's key file
  local i
  for i in 1 2 3; do printf '%s\n' "$@" > "$WORK/key$i"; chmod 600 "$WORK/key$i"; done
}
keys "$K1"
for i in 1 2 3; do node_config "$i" "peerKeyFile: $WORK/key$i"; done
check "check shows peerKeyFile's path and never the key" \
  bash -c "out=\$('$KUBE_VIP' check -c '$WORK/node1.yaml' 2>&1); grep -q 'peerKeyFile: $WORK/key1' <<<\"\$out\" && ! grep -q '$K1' <<<\"\$out\""
chmod 644 "$WORK/key1"
check "check warns about a key file readable by others" \
  bash -c "'$KUBE_VIP' check -c '$WORK/node1.yaml' 2>&1 | grep -q 'readable by others'"
chmod 600 "$WORK/key1"
echo abcd > "$WORK/short.key"
node_config 3 "peerKeyFile: $WORK/short.key"
check "a too-short key is a config error naming peerKeyFile" \
  bash -c "! '$KUBE_VIP' check -c '$WORK/node3.yaml' 2>&1 | grep -q OK && '$KUBE_VIP' check -c '$WORK/node3.yaml' 2>&1 | grep -q 'peerKeyFile.*at least 32'"
node_config 3 "peerKeyFile: $WORK/missing.key"
check "a missing key file is a config error naming peerKeyFile" \
  bash -c "'$KUBE_VIP' check -c '$WORK/node3.yaml' 2>&1 | grep -q 'peerKeyFile.*cannot read'"
node_config 3 "peerKeyFile: $WORK/key3"
for i in 1 2 3; do stop_node "$i" KILL; done
for i in 1 2 3; do start_node "$i"; done
check "keyed cluster: a leader takes the VIP" wait_until 8 one_holder
sleep 1
check "keyed nodes log that the peer channel is authenticated" grep -q 'peer channel authenticated' "$WORK/node1.log"
check "unkeyed nodes logged how to set a key" grep -q 'NOT authenticated.*sample key' "$WORK/node1.log"
check "no key material in any log" bash -c "! grep -q -e '$K1' -e '$K2' '$WORK'/node*.log"

# --- rotation: the followers restart one at a time, the leader re-reads its key file on
# SIGHUP; through each whole step the VIP must stay where it is (no leader change, no blip)
restart() { # restart I: SIGTERM node I, start it again, wait until it follows a leader
  local m; m=$(log_mark "$1")
  stop_node "$1" TERM
  start_node "$1"
  wait_until 8 log_since "$1" "$m" 'is leading'
}
phase=0
for step in "$K1 $K2" "$K2 $K1" "$K2"; do
  phase=$((phase + 1))
  # shellcheck disable=SC2086 # one key per word
  keys $step
  L=$(holders)
  sampling "rotate$phase"
  for i in 1 2 3; do
    [ "$i" = "$L" ] && continue
    check "rotation step $phase: follower server$i restarts with the new key file and follows" restart "$i"
  done
  m=$(log_mark "$L")
  kill -HUP "${NODE_PID[$L]}"
  check "rotation step $phase: the leader server$L reloads its key file on SIGHUP" \
    wait_until 3 log_since "$L" "$m" 'SIGHUP: reloaded peerKeyFile'
  # New connections from and to the leader use its new keys: make some.
  [ "$phase" != 3 ] || for i in 1 2 3; do [ "$i" = "$L" ] || check "rotation step 3: server$i restarts once more (only the new key left)" restart "$i"; done
  sleep 1
  stop_sampler "rotate$phase"
  echo "#   rotation step $phase: holders seen: $(holders_seen "rotate$phase")"
  check "rotation step $phase: server$L held the VIP in every 10 ms sample (no leader change, no blip)" \
    test "$(holders_seen "rotate$phase")" = "n$L "
done
check "after the rotation only the new key is in use, and nobody refused a peer's key" \
  bash -c "! grep -q 'authentication failed\|wrong key\|sent no key proof' '$WORK'/node*.log"

# --- (b) (c) (d) against the keyed cluster
L=$(holders)
sampling rogue-keyed
: > "$WORK/rogue-keyed.out"
# Refusals are logged once per 10 s per node: (b) goes to server1, (c) to server3, so each
# node's first line is the one the checks look for.
rogue_keyed() { # rogue_keyed I MODE...: both terms, every kind, at node I from server2's address
  local i=$1 term; shift
  for term in "$TERM_2_40" "$TERM_MAX"; do
    # shellcheck disable=SC2068 # MODE is empty or an option with its value
    nsx "$N2" python3 "$SUPPORT/rogue_peer.py" $@ "${NODE_IP[$i]}" 10000 server2 "server$i" "$term" \
      | sed "s/^/#   ${1:-plain} server$i: /" >> "$WORK/rogue-keyed.out"
  done
}
rogue_keyed 1            # (b) no key, plain hello
rogue_keyed 1 --keyed    # (b) no key, keyed hello with a garbage proof
rogue_keyed 3 --key "$("$KUBE_VIP" sample key)"  # (c) a random wrong key
rogue_keyed 3 --key "$K1"                        # (c) the key the rotation retired
# (d): capture a follower's restart (the peers' fresh handshakes with it), then replay them.
: > "$WORK/replay.out"
F=1; [ "$L" = 1 ] && F=3
ip netns exec "${NODE_NS[$F]}" tcpdump -i eth0 -U -s 0 -w "$WORK/raft.pcap" tcp port 10000 2>/dev/null &
DUMP=$!
sleep 0.5
restart "$F" || true
sleep 0.5
kill -INT "$DUMP"; wait "$DUMP" || true
# Followers do not dial; the capture holds the others' new connections to F. Replay each
# from the namespace (so the address) of the node that sent it.
for i in 1 2 3; do
  nsx "${NODE_NS[$i]}" python3 "$SUPPORT/replay_pcap.py" "$WORK/raft.pcap" "${NODE_IP[$i]}" 10000 6 \
    | sed 's/^/#   replay: /' >> "$WORK/replay.out" || true
done
sleep 1
stop_sampler rogue-keyed
head -4 "$WORK/rogue-keyed.out"; cat "$WORK/replay.out"
echo "#   holders seen: $(holders_seen rogue-keyed)"
check "(b)(c) no rogue hello is acknowledged past the key proof" \
  bash -c "! grep -q 'AuthOk\|: *\(AppendEntries\|Vote\|FullSnapshot\)\$' '$WORK/rogue-keyed.out'"
check "(b) a peer's address without a key is refused, naming the address" \
  grep -q 'refusing raft connection from 10.88.0.12:.*sent no key proof' "$WORK/node1.log"
check "(c) a wrong key is refused, naming the address" \
  grep -q 'refusing raft connection from 10.88.0.12:.*wrong key' "$WORK/node3.log"
check "(d) replayed handshakes were captured" grep -q 'bytes:' "$WORK/replay.out"
check "(d) no replayed connection got past the key proof" bash -c "! grep -q 'tagged-frame\|AuthOk' '$WORK/replay.out'"
check "(b)(c)(d) the holder never changed and the VIP was never unheld" test "$(holders_seen rogue-keyed)" = "n$L "
check "(b)(c)(d) no agent exited" all_running

# --- afterwards: a kill -9 of the holder still fails over
stop_node "$L" KILL
live_holder_not() { holders | tr ' ' '\n' | grep -vx "$L"; }
check "keyed cluster after the attacks, kill -9 of the holder: another node takes the VIP" wait_until 5 live_holder_not
check "no panic in any log" bash -c "! grep -qi panick '$WORK'/node*.log"
[ "$FAIL" -eq 0 ] || { for i in 1 2 3; do echo "# ---- node$i.log"; sed 's/^/#   /' "$WORK/node$i.log" | tail -30; done; }
summary
