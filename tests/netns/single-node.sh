#!/usr/bin/env bash
# Single-node agent on a real veth pair: VIP via netlink, gratuitous ARP checked field by field
# in a tcpdump capture, neighbour cache update, round-robin through VIP:6443, dead backends,
# re-adding a VIP removed by hand, link flap, SIGTERM cleanup, no take-over of a VIP another
# host answers for (ARP probe / DAD); then the same for an IPv6 VIP.
source "$(dirname "$0")/../lib.sh"
need ip ss tcpdump tshark python3 curl

mkns A agent   # runs kube-vip
mkns P peer    # the client and the three backends
ip link add "v$TAG" type veth peer name "p$TAG"
ip link set "v$TAG" netns "$A" name vip0
ip link set "p$TAG" netns "$P" name eth0
nsx "$A" ip addr add 10.77.0.1/24 dev vip0
nsx "$A" ip -6 addr add fd77::1/64 dev vip0 nodad
nsx "$A" ip link set vip0 up
nsx "$P" ip addr add 10.77.0.2/24 dev eth0
nsx "$P" ip -6 addr add fd77::2/64 dev eth0 nodad
for i in 1 2 3; do
  nsx "$P" ip addr add 10.77.0.1$i/24 dev eth0
  nsx "$P" ip -6 addr add fd77::1$i/64 dev eth0 nodad
done
nsx "$P" ip link set eth0 up
AGENT_MAC=$(nsx "$A" cat /sys/class/net/vip0/address)
VIP=10.77.0.100

start_backends() { # family-specific addresses: 10.77.0.1N or fd77::1N
  local i
  for i in "$@"; do
    ip netns exec "$P" python3 "$SUPPORT/backend.py" "backend$i" "$(backend_addr "$i")" 6444 &
    eval "BACKEND_PID_$i=$!"
    ip netns exec "$P" python3 "$SUPPORT/http_backend.py" "web$i" "$(backend_addr "$i")" 8081 &
    eval "HTTP_PID_$i=$!"
  done
  for i in "$@"; do wait_until 5 nsx "$P" python3 "$SUPPORT/client.py" "$(backend_addr "$i")" 6444 1 1; done
}
backend_addr() { if [ "${V6:-}" ]; then echo "fd77::1$1"; else echo "10.77.0.1$1"; fi; }
stop_backend() {
  local v="BACKEND_PID_$1" h="HTTP_PID_$1"
  kill "${!v}" "${!h}" 2>/dev/null || true
  wait "${!v}" "${!h}" 2>/dev/null || true
}

write_config() { # VIP BACKEND_ADDR...
  local vip=$1; shift
  { echo "vip: $vip"
    echo "interface: vip0"
    echo "singleNode: true"
    echo "gratuitousARP: true"
    echo "arpRefreshSeconds: 0"
    echo "loadBalancers:"
    lb_entry api tcp 6443 true 6444 "$@"
    echo "  connectTimeoutMs: 500"
    lb_entry web http 8080 false 8081 "$@"
  } > "$WORK/config.yaml"
}

# Each start logs to a file of its own (agent-N.log, AGENT_LOG the current one): the checks
# read the run they are about, and the panic check at the end reads them all.
RUNS=0
start_agent() {
  RUNS=$((RUNS + 1))
  AGENT_LOG=$WORK/agent-$RUNS.log
  ip netns exec "$A" "$KUBE_VIP" start -c "$WORK/config.yaml" >"$AGENT_LOG" 2>&1 &
  AGENT=$!
}

# ---------- IPv4 ----------
start_backends 1 2 3
write_config "$VIP" 10.77.0.11 10.77.0.12 10.77.0.13
check "kube-vip check accepts the test config" quiet "$KUBE_VIP" check -c "$WORK/config.yaml"

# A stale neighbour entry with the wrong MAC, as a client would have after a failover.
nsx "$P" ip neigh replace "$VIP" lladdr 02:de:ad:be:ef:01 dev eth0 nud stale
ip netns exec "$P" tcpdump -i eth0 -U -n -w "$WORK/arp.pcap" arp 2>/dev/null &
TCPDUMP=$!
sleep 1 # tcpdump needs a moment before it captures
start_agent
check "VIP $VIP is added to vip0" wait_until 5 has_addr "$A" vip0 "$VIP"
check "VIP is a /32 host address" bash -c "ip -n $A -o addr show dev vip0 | grep -q 'inet $VIP/32 '"
# The burst is at 0, 0.25, 0.75 s: wait for three rounds.
sleep 1.2
kill "$TCPDUMP"; wait "$TCPDUMP" 2>/dev/null || true

# Every field of the frames about the VIP, from the capture (the health checks' own ARP for
# the backends, from the agent's address, is ordinary traffic and left out).
VIP_ARP="arp.dst.proto_ipv4 == $VIP"
fields=$(tshark -r "$WORK/arp.pcap" -Y "$VIP_ARP" -T fields -E separator=' ' \
  -e frame.len -e eth.src -e eth.dst -e arp.opcode -e arp.src.hw_mac -e arp.src.proto_ipv4 \
  -e arp.dst.hw_mac -e arp.dst.proto_ipv4 2>/dev/null | sort | uniq -c)
echo "$fields" | sed 's/^/#   /'
want_req="60 $AGENT_MAC ff:ff:ff:ff:ff:ff 1 $AGENT_MAC $VIP 00:00:00:00:00:00 $VIP"
want_rep="60 $AGENT_MAC ff:ff:ff:ff:ff:ff 2 $AGENT_MAC $VIP $AGENT_MAC $VIP"
count_of() { echo "$fields" | awk -v w="$1" '{c=$1; $1=""; sub(/^ /,""); if ($0==w) print c}'; }
check "gratuitous ARP request: len 60, broadcast, op 1, sender=target=VIP, sender MAC ours, target MAC 0" \
  test "$(count_of "$want_req")" -ge 3
check "gratuitous ARP reply: len 60, broadcast, op 2, sender=target=VIP, target MAC = sender MAC" \
  test "$(count_of "$want_rep")" -ge 3
want_probe="60 $AGENT_MAC ff:ff:ff:ff:ff:ff 1 $AGENT_MAC 0.0.0.0 00:00:00:00:00:00 $VIP"
check "ARP probe before taking: broadcast, op 1, sender IP 0.0.0.0, target VIP, twice" \
  test "$(count_of "$want_probe")" -eq 2
first=$(tshark -r "$WORK/arp.pcap" -Y "$VIP_ARP" -T fields -e arp.src.proto_ipv4 2>/dev/null | head -2 | sort -u)
check "both probes went out before the first gratuitous frame" test "$first" = 0.0.0.0
check "no other ARP frames were sent" test "$(echo "$fields" | wc -l)" -eq 3
check "peer's stale neighbour entry for the VIP now has the agent's MAC" \
  bash -c "ip -n $P neigh show $VIP dev eth0 | grep -q 'lladdr $AGENT_MAC'"

check "load balancer listens on VIP:6443" wait_until 5 nsx "$P" python3 "$SUPPORT/client.py" "$VIP" 6443 1 1

answers=()
for _ in 1 2 3 4 5 6; do answers+=("$(nsx "$P" python3 "$SUPPORT/client.py" "$VIP" 6443 1000 2>/dev/null | cut -d' ' -f1)"); done
echo "#   answers: ${answers[*]}"
rr_ok() {
  local a="${answers[*]}"
  # Each backend twice, and every window of three distinct: strict rotation.
  for b in backend1 backend2 backend3; do [ "$(grep -o "$b" <<<"$a" | wc -l)" -eq 2 ] || return 1; done
  for i in 0 1 2 3; do
    [ "$(printf '%s\n' "${answers[@]:$i:3}" | sort -u | wc -l)" -eq 3 ] || return 1
  done
}
check "six clients are spread round-robin over three backends" rr_ok
check "half-close: 1 MB sent then shutdown(WR) arrives whole before the answer" \
  bash -c "ip netns exec $P python3 $SUPPORT/client.py $VIP 6443 1048576 2>/dev/null | grep -q ' 1048576\$'"

# The http load balancer listens on every address (bindToVip: false): use the agent's own.
web=$(nsx "$P" curl -s --max-time 2 -H 'Host: api.example:8080' http://10.77.0.1:8080/healthz)
echo "#   http answer: $web"
web2=$(nsx "$P" curl -s --max-time 2 http://10.77.0.1:8080/x)
http_ok() {
  python3 - "$web" "$web2" <<'PY'
import json, sys
a, b = (json.loads(x) for x in sys.argv[1:3])
assert a["path"] == "/healthz" and a["xff"] == "10.77.0.2", a
assert a["xfh"] == "api.example:8080" and a["xfp"] == "http", a
assert a["backend"] != b["backend"], (a, b)   # round-robin per request
PY
}
check "http load balancer forwards with X-Forwarded-For/-Host/-Proto, round-robin" http_ok

stop_backend 2
answers=()
for _ in 1 2 3 4 5 6; do answers+=("$(nsx "$P" python3 "$SUPPORT/client.py" "$VIP" 6443 10 2>/dev/null | cut -d' ' -f1)"); done
echo "#   answers with backend2 dead: ${answers[*]}"
check "dead backend2 is skipped: six answers, none from backend2" \
  bash -c "[ \$(printf '%s\n' ${answers[*]} | grep -c '^backend[13]$') -eq 6 ]"

stop_backend 1; stop_backend 3
start=$(now_ms)
res=$(nsx "$P" python3 "$SUPPORT/client.py" "$VIP" 6443 10 5 2>/dev/null || true)
elapsed=$(( $(now_ms) - start ))
echo "#   all backends dead: client got '$res' after ${elapsed} ms"
# Closing with the client's bytes unread makes the kernel send RST, so "reset"/"not connected"
# are the same outcome as a clean close: no answer, no hang.
closed_no_answer() { [[ $res == CLOSED || $res == *"not connected"* || $res == *"reset by peer"* ]]; }
check "all backends dead: client is closed without an answer" closed_no_answer
check "all backends dead: closed within 1 s" test "$elapsed" -lt 1000
check "all-dead is logged" grep -q 'all 3 backends failed' "$AGENT_LOG"
start_backends 1 2 3

nsx "$A" ip addr del "$VIP/32" dev vip0
start=$(now_ms)
check "VIP removed by hand is put back within 1 s" wait_until 1 has_addr "$A" vip0 "$VIP"
echo "#   re-added after $(( $(now_ms) - start )) ms"
check "re-adding is logged" grep -q 'removed from vip0 from outside' "$AGENT_LOG"

nsx "$A" ip link set vip0 down
sleep 0.3
nsx "$A" ip link set vip0 up
# Link down flushes the node's own IPv6 address (not the agent's business); a node's network
# manager would put it back, so do that here for the IPv6 part below.
nsx "$A" ip -6 addr replace fd77::1/64 dev vip0 nodad
check "after a link flap the VIP is on vip0" wait_until 2 has_addr "$A" vip0 "$VIP"
check "after a link flap the VIP is announced again" wait_until 3 grep -q 'link vip0 is up; announcing' "$AGENT_LOG"
check "after a link flap the load balancer answers" wait_until 3 nsx "$P" python3 "$SUPPORT/client.py" "$VIP" 6443 1 1

kill -TERM "$AGENT"
rc=0; wait "$AGENT" || rc=$?
check "SIGTERM: agent exits 0" test "$rc" -eq 0
check "SIGTERM: VIP is removed" bash -c "! ip -n $A -o addr show dev vip0 | grep -q '$VIP/'"
check "SIGTERM: removal is logged" grep -q "VIP $VIP released" "$AGENT_LOG"
check "SIGTERM: nothing listens on 6443 any more" bash -c "! ip netns exec $A ss -Htln | grep -q ':6443 '"
check "no panic in the log" bash -c "! grep -qi panick $AGENT_LOG"

# Another host on the link has the VIP (a misconfigured machine; or an old leader whose process
# is frozen): the agent must not take it while that host answers, and must take it once it
# stops. conflict_test VIP: the peer namespace plays the other host.
conflict_test() {
  local vip=$1 fam=IPv4 plen=32 opts=() peer_mac
  [ -z "${V6:-}" ] || { fam=IPv6; plen=128; opts=(nodad); }
  peer_mac=$(nsx "$P" cat /sys/class/net/eth0/address)
  nsx "$P" ip addr add "$vip/$plen" dev eth0 "${opts[@]}"
  start_agent
  # The agent's interface is sampled every 10 ms from its start until just before the other
  # host lets the address go: it must never hold it (for IPv6 there is no other evidence).
  python3 "$SUPPORT/vip_sampler.py" "$vip" 10 "$WORK/conflict$fam.samples" "$A" >"$WORK/conflict$fam.summary" &
  SAMPLER=$!
  sleep 1.5
  check "$fam VIP in use: logged with the other host's MAC" \
    grep -q "VIP $vip is in use by $peer_mac (a host that is not one of our peers)" "$AGENT_LOG"
  if [ "$fam" = IPv4 ]; then
    # Held past the 3 s fast span: the probes slow from every 20 ms (up to 100 frames/s) to
    # every 0.5 s (at most 4 frames/s), so a lasting conflict does not flood the LAN. tcpdump
    # takes a second or so to start capturing: count what a 4 s run sees.
    sleep 2
    timeout 4 ip netns exec "$P" tcpdump -i eth0 -U -n -w "$WORK/slow.pcap" \
      "arp and ether src $AGENT_MAC" 2>/dev/null || true
    local n
    n=$(tshark -r "$WORK/slow.pcap" -Y "arp.src.proto_ipv4 == 0.0.0.0 && arp.dst.proto_ipv4 == $vip" 2>/dev/null | wc -l)
    check "$fam VIP in use for over 3 s: still probing, at most 4 frames a second (saw $n in under 4 s)" \
      test "$n" -ge 2 -a "$n" -le 16
  fi
  kill -TERM "$SAMPLER"; wait "$SAMPLER" || true
  echo "#   agent's interface while the other host had the VIP: $(cat "$WORK/conflict$fam.summary")"
  check "$fam VIP in use by another host: the agent never takes it (every 10 ms sample until the other host lets go)" \
    held_by_none "conflict$fam" 1500
  nsx "$P" ip addr del "$vip/$plen" dev eth0
  check "$fam VIP released by the other host: the agent takes it within 1 s" wait_until 1 has_addr "$A" vip0 "$vip"
  check "$fam VIP free again: logged" grep -q "VIP $vip is free after" "$AGENT_LOG"
  kill -TERM "$AGENT"; wait "$AGENT" || true
}
conflict_test "$VIP"

# ---------- IPv6 ----------
stop_backend 1; stop_backend 2; stop_backend 3
V6=1
VIP6=fd77::100
start_backends 1 2 3
write_config "$VIP6" fd77::11 fd77::12 fd77::13
ip netns exec "$P" tcpdump -i eth0 -U -n -w "$WORK/na.pcap" icmp6 2>/dev/null &
TCPDUMP=$!
sleep 1
start_agent
check "IPv6 VIP $VIP6 is added as /128" wait_until 5 has_addr "$A" vip0 "$VIP6"
sleep 1.2
kill "$TCPDUMP"; wait "$TCPDUMP" 2>/dev/null || true
na=$(tshark -r "$WORK/na.pcap" -Y 'icmpv6.type == 136' -T fields -E separator=' ' \
  -e eth.src -e eth.dst -e ipv6.src -e ipv6.dst -e ipv6.hlim -e icmpv6.nd.na.flag.o \
  -e icmpv6.nd.na.flag.s -e icmpv6.nd.na.target_address -e icmpv6.opt.linkaddr -e icmpv6.checksum.status 2>/dev/null | sort | uniq -c)
echo "$na" | sed 's/^/#   /'
check "unsolicited NA: to all-nodes, hop limit 255, override set, solicited clear, target VIP, our MAC, good checksum" \
  bash -c "echo '$na' | grep -Eq '^ *[3-9][0-9]* $AGENT_MAC 33:33:00:00:00:01 $VIP6 ff02::1 255 (1|True) (0|False) $VIP6 $AGENT_MAC (1|Good)\$'"
check "IPv6 load balancer answers on [VIP]:6443" wait_until 5 nsx "$P" python3 "$SUPPORT/client.py" "$VIP6" 6443 1 1
kill -TERM "$AGENT"; wait "$AGENT" || true
check "SIGTERM: IPv6 VIP is removed" bash -c "! ip -n $A -o addr show dev vip0 | grep -q '$VIP6/'"
conflict_test "$VIP6"

# Every start's log, not only the first: a panic in the conflict or IPv6 runs counts too.
check "no panic in any of the $RUNS agent logs" bash -c "[ \$(ls '$WORK'/agent-*.log | wc -l) = $RUNS ] && ! grep -qi panick '$WORK'/agent-*.log"
summary
