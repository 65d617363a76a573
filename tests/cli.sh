#!/usr/bin/env bash
# The command line and the config checks, through the real binary: the guide's seed config is
# accepted as written; every kind of bad config is refused with exit 1 and a message naming the
# field and the line; what `sample config` prints (from kube-vip 0.1's flags), `check` accepts;
# `start` with a bad config exits at once instead of running.
source "$(dirname "$0")/lib.sh"

SEED=$ROOT/tests/data/seed-config.yaml

check "the guide's seed config passes check" quiet "$KUBE_VIP" check -c "$SEED"

# bad NAME SED_EXPR FRAGMENT...: the seed edited by SED_EXPR must fail check with exit 1, and
# stderr must contain every FRAGMENT (grep -F).
bad() {
  local name=$1 expr=$2 rc=0 f missing=""; shift 2
  sed "$expr" "$SEED" >"$WORK/$name.yaml"
  "$KUBE_VIP" check -c "$WORK/$name.yaml" >/dev/null 2>"$WORK/$name.err" || rc=$?
  for f in "$@"; do grep -qF -- "$f" "$WORK/$name.err" || missing+=" [$f]"; done
  if [ "$rc" -eq 1 ] && [ -z "$missing" ]; then
    ok "$name: refused with $(head -c 160 "$WORK/$name.err" | tr '\n' ' ')"
  else
    not_ok "$name: exit $rc, missing$missing in: $(cat "$WORK/$name.err")"
  fi
}

bad "typo'd key" 's/gratuitousARP/gratuitousArp/' 'unknown field `gratuitousArp`' 'line 13'
bad "bad VIP address" 's/vip: 192.168.0.75/vip: 192.168.0.300/' 'vip: invalid IP address' 'line 12'
bad "bad peer address" 's/address: 192.168.0.72$/address: 192.168.0/' 'remotePeers[1].address' 'line 6'
bad "port 0" '0,/port: 10000/s//port: 0/' 'remotePeers[0].port' 'between 1 and 65535' 'line 4'
bad "port above 65535" 's/port: 6443/port: 70000/' 'loadBalancers[0].port' 'between 1 and 65535' 'line 20'
bad "duplicate peer id" 's/id: server3/id: server2/' 'remotePeers[1].id: duplicate peer id "server2"' '(line 5)'
bad "duplicate peer address" '0,/address: 192.168.0.71/s//address: 192.168.0.70/' \
  'remotePeers[0].address: duplicate peer address 192.168.0.70' '(line 3)'
bad "unknown load balancer type" 's/type: tcp/type: udp/' 'loadBalancers[0].type: unknown variant `udp`' 'line 19'
bad "load balancer without backends" '/backends:/,$d' 'loadBalancers[0].backends' 'has no backends' '(line 18)'
bad "VIP equal to a peer address" 's/vip: 192.168.0.75/vip: 192.168.0.71/' \
  'remotePeers[0].address: 192.168.0.71 is the VIP (line 3)'
bad "peers mixing IPv4 and IPv6" 's/address: 192.168.0.72$/address: fd00::72/' \
  'peers mix IPv4 and IPv6'
bad "heartbeat not below the election timeout" 's/^vip: .*/&\nheartbeatMs: 50/' \
  'heartbeatMs (50) must be less than electionTimeoutMinMs (40)'
bad "election timeouts the wrong way round" 's/^vip: .*/&\nelectionTimeoutMinMs: 200/' \
  'electionTimeoutMinMs (200) must be less than electionTimeoutMaxMs (120)'
bad "probe window too long" 's/^vip: .*/&\nvipProbeMs: 5000/' 'vipProbeMs (5000) must be at most 1000' '(line 13)'
bad "metricsAddress without a port" 's/^vip: .*/&\nmetricsAddress: "2112"/' 'metricsAddress: "2112" is not :port' '(line 13)'
bad "metricsAddress on the load balancer's port" 's/^vip: .*/&\nmetricsAddress: ":6443"/' 'metricsAddress: port 6443 is used by a load balancer'
bad "not YAML at all" '1i }{' 'invalid config'

# `start` with a bad config: a clear error and exit 1 at once, not a running agent.
rc=0
timeout 10 "$KUBE_VIP" start -c "$WORK/typo'd key.yaml" >/dev/null 2>"$WORK/start.err" || rc=$?
check "start with a bad config exits 1 at once" test "$rc" -eq 1
check "start with a bad config names the field" grep -qF 'unknown field `gratuitousArp`' "$WORK/start.err"
rc=0
"$KUBE_VIP" check -c "$WORK/no-such-file.yaml" 2>"$WORK/missing.err" || rc=$?
check "a missing config file: exit 1, the path named" \
  bash -c "[ $rc -eq 1 ] && grep -qF '$WORK/no-such-file.yaml' '$WORK/missing.err'"

# kube-vip 0.1's `sample config` flags, and what they print passes check.
"$KUBE_VIP" sample config --interface eth1 --vip 10.0.0.75 --arp --startAsLeader \
  --localPeer server1:10.0.0.70:10000 --remotePeers server2:10.0.0.71:10000,server3:10.0.0.72:10000 \
  --lbBindToVip --lbType tcp --lbName api --lbPort 6443 --lbBackends 10.0.0.70:6444,10.0.0.71:6444 \
  >"$WORK/sample.yaml"
check "sample config (0.1 flags) passes check" quiet "$KUBE_VIP" check -c "$WORK/sample.yaml"
check "sample config carries the flags' values" \
  bash -c "grep -q 'vip: 10.0.0.75' '$WORK/sample.yaml' && grep -q 'interface: eth1' '$WORK/sample.yaml' \
    && grep -q 'address: 10.0.0.71' '$WORK/sample.yaml' && grep -q 'startAsLeader: true' '$WORK/sample.yaml'"
"$KUBE_VIP" sample config --singleNode --vip 10.0.0.75 --interface eth1 >"$WORK/single.yaml"
check "sample config --singleNode passes check" quiet "$KUBE_VIP" check -c "$WORK/single.yaml"
rc=0
"$KUBE_VIP" sample config --vip 10.0.0.300 >/dev/null 2>"$WORK/flag.err" || rc=$?
check "sample config with a bad flag value fails, naming the flag" \
  bash -c "[ $rc -ne 0 ] && grep -qF -- '--vip' '$WORK/flag.err'"

# check prints the effective config: every optional key at its value, and it passes check.
"$KUBE_VIP" check -c "$SEED" >"$WORK/effective.yaml" 2>/dev/null
check "check prints metricsAddress with its default (:2112)" grep -qxE "metricsAddress: '?:2112'?" "$WORK/effective.yaml"
check "check prints the defaults it applied" \
  bash -c "grep -q '^vipProbeMs: 10' '$WORK/effective.yaml' && grep -q '^heartbeatMs: 20' '$WORK/effective.yaml'"

check "version names the crate version" bash -c "'$KUBE_VIP' version | grep -qx 'kube-vip $(awk -F'\"' '/^version/ {print $2; exit}' "$ROOT/Cargo.toml")'"
check "start --help teaches the 0.1 overrides" \
  bash -c "'$KUBE_VIP' start --help | grep -q -- --disableVIP && '$KUBE_VIP' start --help | grep -q -- --singleNode"

summary
