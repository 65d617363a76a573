#!/usr/bin/env bash
# Load balancer in front of three kube-apiserver stand-ins: sourced after tests/lib.sh by the
# health-check tests (tests/netns/health.sh, health-passive.sh) and by bench/health.sh.
#   L  namespace "lb"    kube-vip and the clients: NET.1 (and NET6::1) on eth0
#   B  namespace "back"  backends b1..b3 on NET.11-13:6444 (with NET6 also v1..v3 on
#                        NET6::11-13): TLS, answering /readyz like kube-apiserver
#                        (tests/support/readyz_backend.py)
# The certificates are made with openssl: CA test-ca signs the backends' certificate (IP SANs of
# every backend address).

# make_health_net NET [NET6]: the two namespaces joined by a veth pair, e.g. NET 10.88.0,
# NET6 fd00:88: (without it, IPv4 only).
make_health_net() {
  HEALTH_NET=$1 HEALTH_NET6=${2:-}
  local i
  mkns L lb
  mkns B back
  ip link add "l$TAG" type veth peer name "b$TAG"
  ip link set "l$TAG" netns "$L" name eth0
  ip link set "b$TAG" netns "$B" name eth0
  nsx "$L" ip addr add "$HEALTH_NET.1/24" dev eth0
  [ -z "$HEALTH_NET6" ] || nsx "$L" ip addr add "$HEALTH_NET6:1/64" dev eth0 nodad
  nsx "$L" ip link set eth0 up
  nsx "$B" ip link set eth0 up
  for i in 1 2 3; do
    nsx "$B" ip addr add "$HEALTH_NET.1$i/24" dev eth0
    [ -z "$HEALTH_NET6" ] || nsx "$B" ip addr add "$HEALTH_NET6:1$i/64" dev eth0 nodad
  done
}

# make_ca NAME: a self-signed CA, $WORK/NAME.crt and $WORK/NAME.key.
make_ca() {
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=$1" \
    -keyout "$WORK/$1.key" -out "$WORK/$1.crt" 2>/dev/null
}

# make_certs: CA test-ca, and $WORK/server.crt and .key (CN kube-apiserver, IP SANs of every
# backend address) signed by it.
make_certs() {
  local san="IP:$HEALTH_NET.11,IP:$HEALTH_NET.12,IP:$HEALTH_NET.13"
  [ -z "$HEALTH_NET6" ] || san+=",IP:$HEALTH_NET6:11,IP:$HEALTH_NET6:12,IP:$HEALTH_NET6:13"
  make_ca test-ca
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
    -keyout "$WORK/server.key" -out "$WORK/server.csr" 2>/dev/null
  printf 'subjectAltName=%s\n' "$san" > "$WORK/san.ext"
  openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/test-ca.crt" -CAkey "$WORK/test-ca.key" \
    -CAcreateserial -days 2 -extfile "$WORK/san.ext" -out "$WORK/server.crt" 2>/dev/null
}

# backend_addr NAME: the address of backend NAME (bN: NET.1N, vN: NET6::1N).
backend_addr() {
  case $1 in
    b*) echo "$HEALTH_NET.1${1#b}" ;;
    v*) echo "$HEALTH_NET6:1${1#v}" ;;
  esac
}

# start_backend NAME: backend NAME on its address, port 6444, in the background; its pid in
# BACKEND_NAME. Its /readyz answer comes from $WORK/state.NAME (set_state).
start_backend() {
  ip netns exec "$B" python3 "$SUPPORT/readyz_backend.py" "$1" "$(backend_addr "$1")" 6444 \
    "$WORK/server.crt" "$WORK/server.key" "$WORK/state.$1" &
  eval "BACKEND_$1=$!"
}

# set_state NAME ready|unready: written aside and renamed, so the backend never reads a half file.
set_state() { echo "$2" > "$WORK/state.$1.new"; mv "$WORK/state.$1.new" "$WORK/state.$1"; }

# start_backends: every backend (b1..b3, with NET6 v1..v3 too) ready and started; returns once
# each answers /readyz (fails if one does not within 10 s).
start_backends() {
  local i n names=(b1 b2 b3)
  [ -z "$HEALTH_NET6" ] || names+=(v1 v2 v3)
  for n in "${names[@]}"; do set_state "$n" ready; start_backend "$n"; done
  for n in "${names[@]}"; do
    i=$(backend_addr "$n")
    [[ $i != *:* ]] || i="[$i]"
    wait_until 10 nsx "$B" curl -sfk "https://$i:6444/readyz"
  done
}

# health_config: the head of a kube-vip config for L (VIP NET.100 on eth0, a single node) up
# to `loadBalancers:`; lb_entry items follow it.
health_config() {
  printf 'vip: %s.100\ninterface: eth0\nsingleNode: true\nloadBalancers:\n' "$HEALTH_NET"
}

# start_kube_vip CONFIG LOG: kube-vip in L as a load balancer only (--disableVIP), in the
# background, its output appended to LOG; its pid in AGENT.
start_kube_vip() {
  ip netns exec "$L" "$KUBE_VIP" start -c "$1" --disableVIP >>"$2" 2>&1 &
  # shellcheck disable=SC2034 # the suites' `kube-vip still runs` check reads it
  AGENT=$!
}
