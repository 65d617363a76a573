#!/usr/bin/env bash
# A three-node kube-vip cluster on a bridge, shaped like the guide's: sourced after tests/lib.sh
# by the cluster test and by scripts/bench.
#   sw      namespace holding the bridge br0
#   n1..n3  nodes 10.88.0.11-13, interface eth0, Raft on :10000, config like the seed
#   client  10.88.0.2
#   be      backends 10.88.0.21-23, :6444 (answer with their name)
# VIP 10.88.0.100, load balancer VIP:6443 -> backends:6444.

VIP=10.88.0.100
NODE_IP=(unused 10.88.0.11 10.88.0.12 10.88.0.13)
NODE_PID=(unused 0 0 0)

# plug NS IP: joins namespace NS to the bridge as eth0 with address IP/24.
plug() {
  local ns=$1 ip=$2 a b
  a="a${ns##*-}$TAG"; b="b${ns##*-}$TAG"
  a=${a:0:15}; b=${b:0:15}
  ip link add "$a" type veth peer name "$b"
  ip link set "$a" netns "$ns" name eth0
  ip link set "$b" netns "$SW"
  nsx "$SW" ip link set "$b" master br0 up
  nsx "$ns" ip addr add "$ip/24" dev eth0
  nsx "$ns" ip link set eth0 up
}

make_cluster_net() {
  mkns SW sw
  nsx "$SW" ip link add br0 type bridge
  nsx "$SW" ip link set br0 up
  mkns N1 n1; mkns N2 n2; mkns N3 n3
  NODE_NS=(unused "$N1" "$N2" "$N3")
  mkns CLIENT client
  mkns BE be
  local i
  for i in 1 2 3; do plug "${NODE_NS[$i]}" "${NODE_IP[$i]}"; done
  plug "$CLIENT" 10.88.0.2
  plug "$BE" 10.88.0.21
  nsx "$BE" ip addr add 10.88.0.22/24 dev eth0
  nsx "$BE" ip addr add 10.88.0.23/24 dev eth0
  # The client learns the VIP's MAC from gratuitous ARP even without a prior entry.
  nsx "$CLIENT" sysctl -qw net.ipv4.conf.eth0.arp_accept=1
  for i in 1 2 3; do
    ip netns exec "$BE" python3 "$SUPPORT/backend.py" "backend$i" "10.88.0.2$i" 6444 &
  done
  for i in 1 2 3; do wait_until 5 nsx "$BE" python3 "$SUPPORT/client.py" "10.88.0.2$i" 6444 1 1; done
}

# node_config I [EXTRA_YAML]: the seed's shape with node I as localPeer.
node_config() {
  local i=$1 j
  {
    echo "remotePeers:"
    for j in 1 2 3; do
      [ "$j" = "$i" ] && continue
      printf -- "- id: server%s\n  address: %s\n  port: 10000\n" "$j" "${NODE_IP[$j]}"
    done
    printf "localPeer:\n  id: server%s\n  address: %s\n  port: 10000\n" "$i" "${NODE_IP[$i]}"
    echo "vip: $VIP"
    echo "gratuitousARP: true"
    echo "singleNode: false"
    if [ "$i" = 1 ]; then echo "startAsLeader: true"; else echo "startAsLeader: false"; fi
    echo "interface: eth0"
    echo "stateDir: $WORK/state$i"
    echo "loadBalancers:"
    lb_entry "Kubernetes Control Plane" tcp 6443 true 6444 10.88.0.21 10.88.0.22 10.88.0.23
    [ -z "${2:-}" ] || echo "$2"
    # Extra keys for every node, for experiments: NODE_EXTRA='vipProbeMs: 0' bash tests/netns/...
    [ -z "${NODE_EXTRA:-}" ] || echo "$NODE_EXTRA"
  } > "$WORK/node$i.yaml"
}

start_node() { # start_node I: runs node I in the background, log appended to $WORK/node$I.log
  local i=$1
  echo "----- start $(date +%T.%N)" >> "$WORK/node$i.log"
  ip netns exec "${NODE_NS[$i]}" "$KUBE_VIP" start -c "$WORK/node$i.yaml" >>"$WORK/node$i.log" 2>&1 &
  NODE_PID[$i]=$!
}

stop_node() { # stop_node I SIGNAL: signals node I and waits for it to exit
  local i=$1 sig=$2
  # Never `kill 0`: that would signal this whole process group, the test included.
  [ "${NODE_PID[$i]}" -gt 0 ] || return 0
  kill "-$sig" "${NODE_PID[$i]}" 2>/dev/null || true
  wait "${NODE_PID[$i]}" 2>/dev/null || true
  NODE_PID[$i]=0
}

log_mark() { wc -l < "$WORK/node$1.log"; } # log_mark I: a position in node I's log
# log_since I MARK PATTERN: PATTERN appears in node I's log after MARK.
log_since() { tail -n +"$(( $2 + 1 ))" "$WORK/node$1.log" | has -- "$3"; }

holders() { # prints the node numbers holding the VIP now, space separated
  local i out=""
  for i in 1 2 3; do has_addr "${NODE_NS[$i]}" eth0 "$VIP" && out+="$i "; done
  echo "${out% }"
}

one_holder() { local h; h=$(holders); [ -n "$h" ] && [ "${h// /}" = "$h" ]; }
holder_is() { [ "$(holders)" = "$1" ]; }
holder_is_not() { local h; h=$(holders); one_holder && [ "$h" != "$1" ]; }

declare -A SAMPLER_T0=() SAMPLED_MS=()
start_sampler() { # start_sampler NAME: samples VIP holders every 10 ms into $WORK/NAME.samples
  python3 "$SUPPORT/vip_sampler.py" "$VIP" 10 "$WORK/$1.samples" "$N1" "$N2" "$N3" > "$WORK/$1.summary" &
  SAMPLER=$!
  SAMPLER_T0[$1]=$(now_ms)
}
stop_sampler() {
  kill -TERM "$SAMPLER"; wait "$SAMPLER" || true
  SAMPLED_MS[$1]=$(( $(now_ms) - ${SAMPLER_T0[$1]} ))
  cat "$WORK/$1.summary"
}
# never_two NAME: the sampler of run NAME sampled all along (enough_samples), and no sample saw
# two holders (they show as "a,b").
never_two() { enough_samples "$1" "${SAMPLED_MS[$1]}" && awk 'index($2, ",") {bad = 1} END {exit bad}' "$WORK/$1.samples"; }
# holders_seen NAME: the distinct holder sets in order, e.g. "n1 - n2".
holders_seen() {
  awk '{print $2}' "$WORK/$1.samples" | sed "s/$TAG-//g" | uniq | tr '\n' ' '
}
