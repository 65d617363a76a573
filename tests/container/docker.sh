#!/usr/bin/env bash
# The container image under a real engine: built and saved by scripts/container (and loaded
# back, as a node without a registry would), then run on a user-defined bridge the test creates
# with its own subnet, with the capabilities the static pod grants (NET_ADMIN + NET_RAW + SYS_NICE, all
# others dropped), a read-only root and the config mounted read-only. Everything is checked
# from the host side of the bridge.
#   single   one agent, singleNode: VIP:6443 reaches three backends round-robin; `docker stop`
#            (SIGTERM) removes the VIP before the agent exits 0; restarts take it back.
#   bootstrap  the kubeadm flow in README.md (run on control-plane nodes): the first node's agent alone in
#            singleNode (Raft cannot elect a leader with one of three voters, and `kubeadm init`
#            needs the VIP), the others join clustered and wait, then the first node switches
#            to its clustered config and the three elect a leader; the VIP gap is measured.
#   cluster  three agents, Raft on :10000, startAsLeader on the first, state on volumes:
#            `docker stop` of the leader is a planned handover, `docker kill` an unplanned
#            failover; the VIP moves and never stays on the old leader.
#
# Network namespaces. In Kubernetes the agent runs with hostNetwork: the namespace holding the
# VIP is the node's and outlives the process. A container's own namespace dies with it, which
# would hide whether the agent removed the VIP itself. So each "node" here is a small container
# that only holds a namespace (like a pod's pause container), and the agent joins it with
# --network container:NODE. After the agent exits the namespace is still there to inspect
# (nsenter from the host: the image has no shell).
#
# Environment: KV_MODES (default "single bootstrap cluster"; KV_MODES=single for a build
# without Raft); KV_TEST_NET (first three octets of the test subnet, default 172.31.77; must be unused
# on this host); KEEP_WORK=1 keeps logs and configs and prints the agents' logs.
# shellcheck source=tests/container/lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=tests/container/engine.sh
source "$CT/engine.sh"
need docker dockerd ctr nsenter curl python3 busybox kubernetes-validate

T0=$(now_ms)
MODES=${KV_MODES:-single bootstrap cluster}
VIP=$NET.100
TAR=$ROOT/image/out/kube-vip-image.tar
CONF=/etc/kube-vip/config.yaml
NODES=3
CTR_NS=
IMAGE_WAS_THERE=1

test_cleanup() { # before engine.sh removes containers, network and images
  local c
  if [ "$FAIL" -gt 0 ] || [ -n "${KEEP_WORK:-}" ]; then
    for c in "${CONTAINERS[@]}"; do
      case $c in *-kv* | *-single | *-boot*) echo "# --- logs of $c"; dk logs "$c" 2>&1 | tail -n 30 | sed 's/^/#   /' ;; esac
    done
  fi
  if [ -n "$CTR_NS" ]; then
    # --sync: without it content is collected later and the namespace is "not empty" yet.
    ctr_ images rm --sync "docker.io/$IMAGE" >/dev/null 2>&1
    ctr --address "$sock" namespaces rm "$CTR_NS" >/dev/null 2>&1 ||
      echo "# warning: containerd namespace $CTR_NS left behind"
  fi
  # The image scripts/container built stays if it was there before (someone's working copy).
  if [ "$IMAGE_WAS_THERE" = 0 ]; then dk rmi "$IMAGE" >/dev/null 2>&1; fi
}

# ---------- engine and image ----------
engine_up
dk image inspect "$IMAGE" >/dev/null 2>&1 || IMAGE_WAS_THERE=0
t=$(now_ms)
check "scripts/container builds and saves $IMAGE" "$ROOT/scripts/container"
echo "#   build + save took $(( $(now_ms) - t )) ms"
size=$(dk image inspect -f '{{.Size}}' "$IMAGE")
bin_size=$(stat -c %s "$KUBE_VIP")
echo "#   image size $size bytes, binary $bin_size bytes"
check "image holds the binary and nothing more (size within 16 KiB of it)" \
  test "$size" -ge "$bin_size" -a "$size" -le $((bin_size + 16384))
check "saved image: tag $IMAGE" is "[\"$IMAGE\"]" "$TAR" 'd["tags"]'
check "saved image: one layer holding only kube-vip" is '[["kube-vip"]]' "$TAR" 'd["layers"]'
check "saved image: entrypoint /kube-vip, no cmd" is '[["/kube-vip"],null]' "$TAR" '[d["config"]["Entrypoint"], d["config"]["Cmd"]]'
check "saved image: OCI labels title, version, source, description, licenses" \
  is "[\"kube-vip\",\"$VERSION\",\"https://github.com/kube-vip/kube-vip\",true,\"Apache-2.0\"]" "$TAR" \
  '[d["config"]["Labels"]["org.opencontainers.image." + k] if k != "description" else bool(d["config"]["Labels"]["org.opencontainers.image.description"]) for k in ("title", "version", "source", "description", "licenses")]'
id_before=$(dk image inspect -f '{{.Id}}' "$IMAGE")
# As on a node without a registry: drop the tag, load the tarball, get the same image back.
# (rmi fails harmlessly if some container still uses the image; load then only re-tags.)
dk rmi "$IMAGE" >/dev/null 2>&1 || true
loads_same() { dk load -i "$TAR" >/dev/null && [ "$(dk image inspect -f '{{.Id}}' "$IMAGE")" = "$id_before" ]; }
check "docker load of the saved tarball gives back the same image" loads_same
# containerd (what kubelet uses): import into a throwaway namespace of the engine's containerd.
sock=
for s in /run/docker/containerd/containerd.sock /run/containerd/containerd.sock; do
  if [ -S "$s" ]; then sock=$s; break; fi
done
ctr_() { ctr --address "$sock" -n "$CTR_NS" "$@"; }
if command -v ctr >/dev/null && [ -n "$sock" ]; then
  CTR_NS=kvt-$TAG
  ctr_imports() { ctr_ images import "$TAR" >/dev/null 2>&1 && ctr_ images ls -q | has -x "docker.io/$IMAGE"; }
  check "ctr images import of the saved tarball (containerd, as kubelet's runtime would)" ctr_imports
else
  echo "# skip: ctr or a containerd socket missing; containerd import not tried"
fi

# ---------- network, backends, nodes ----------
build_busybox
make_network
start_backends
for i in $(seq "$NODES"); do
  run_c "kvt-$TAG-n$i" --network "$NETNAME" --ip "$NET.1$i" --cap-drop ALL "$BB_IMAGE" sleep 1000000
done

node_has_vip() { has_vip_in "kvt-$TAG-n$1" "$VIP"; }
holders() { # the nodes holding the VIP, space-separated
  local i out=()
  for i in $(seq "$NODES"); do if node_has_vip "$i"; then out+=("$i"); fi; done
  echo "${out[*]}"
}
one_holder() { local h; h=$(holders); [ -n "$h" ] && [ "$h" = "${h%% *}" ]; }
no_vip() { ! node_has_vip "$1"; }
# held_elsewhere N: some node other than N holds the VIP.
held_elsewhere() { local h; for h in $(holders); do [ "$h" = "$1" ] || return 0; done; return 1; }
state() { dk inspect -f "{{.State.$2}}" "$1"; }
exit_code() { state "$1" ExitCode; }
logged() { dk logs "$1" 2>&1 | has -- "$2"; }
# logged_since NAME UNIX_TS PATTERN: the container logged PATTERN since UNIX_TS (a restarted
# container's `docker logs` holds every earlier run too).
logged_since() { dk logs --since "$2" "$1" 2>&1 | has -- "$3"; }
# Bits 12 (CAP_NET_ADMIN), 13 (CAP_NET_RAW) and 23 (CAP_SYS_NICE), as the kernel sees the
# running agent.
caps() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }

# rt_or_said NAME PID: the agent logged that its control path runs at real-time priority 10 and
# its kv-control threads do (policy 2 = SCHED_RR), or it logged that real time was refused (a
# kernel with RT_GROUP_SCHED whose container cgroups get no real-time runtime, as here).
rt_or_said() {
  local t p
  # (The refusal's wording contains the success's words: match the success's whole phrase.)
  if logged "$1" "control path at real-time priority 10 (SCHED_RR)"; then
    for t in /proc/"$2"/task/*; do
      [ "$(cat "$t/comm" 2>/dev/null)" = kv-control ] || continue
      p=$(awk '{print $40, $41}' "$t/stat")
      [ "$p" = "10 2" ] || { echo "# kv-control thread at rt_priority/policy $p"; return 1; }
    done
    echo "#   control path at SCHED_RR 10"
  elif logged "$1" "cannot run the control path at real-time priority 10"; then
    echo "#   real time refused in the container (logged); control path at nice -10"
  else
    return 1
  fi
}

write_config() { # MODE N: node N's config for single or cluster
  local mode=$1 i=$2 j
  {
    echo "vip: $VIP"
    echo "interface: eth0"
    echo "gratuitousARP: true"
    if [ "$mode" = cluster ]; then
      echo "singleNode: false"
      echo "startAsLeader: $([ "$i" = 1 ] && echo true || echo false)"
      echo "localPeer: {id: node$i, address: \"$NET.1$i\", port: 10000}"
      echo "remotePeers:"
      for j in $(seq "$NODES"); do
        [ "$j" = "$i" ] || echo "- {id: node$j, address: \"$NET.1$j\", port: 10000}"
      done
      echo "stateDir: /var/lib/kube-vip"
    else
      echo "singleNode: true"
    fi
    echo "loadBalancers:"
    lb_entry api tcp 6443 true 6444 "$NET.21" "$NET.22" "$NET.23"
    echo "  connectTimeoutMs: 500"
  } >"$WORK/$mode$i.yaml"
}

# start_agent NAME NODE CONFIG [VOLUME]: an agent as the static pod runs it: in node NODE's
# namespace, only NET_ADMIN + NET_RAW + SYS_NICE, the config read-only where the manifest mounts it, and
# (clustered) Raft state on a volume at the manifest's /var/lib/kube-vip.
start_agent() { # NAME NODE CONFIG [STATE_VOLUME [START_FLAG...]]
  local name=$1 node=$2 config=$3 state=()
  if [ -n "${4:-}" ]; then
    VOLUMES+=("$4")
    state=(-v "$4:/var/lib/kube-vip")
  fi
  run_c "$name" --network "container:kvt-$TAG-n$node" \
    --cap-drop ALL --cap-add NET_ADMIN --cap-add NET_RAW --cap-add SYS_NICE \
    --read-only --security-opt no-new-privileges \
    -v "$config:$CONF:ro" "${state[@]}" \
    "$IMAGE" start -c "$CONF" "${@:5}"
}

# stop_agent NAME: `docker stop` (SIGTERM, SIGKILL after 10 s); sets STOP_MS.
stop_agent() {
  local t
  t=$(now_ms)
  dk stop -t 10 "$1" >/dev/null
  STOP_MS=$(( $(now_ms) - t ))
}

check_in_image() { dk run --rm --network none -v "$1:$CONF:ro" "$IMAGE" check -c "$CONF" >/dev/null 2>&1; }

single_node() {
  local kv=kvt-$TAG-single kv_pid
  write_config single 1
  check "single: kube-vip check (in the image, config mounted read-only) accepts the config" \
    check_in_image "$WORK/single1.yaml"
  start_agent "$kv" 1 "$WORK/single1.yaml"
  check "single: agent takes the VIP in the node's namespace" wait_until 5 node_has_vip 1
  kv_pid=$(state "$kv" Pid)
  check "single: agent runs with exactly NET_ADMIN + NET_RAW + SYS_NICE effective and bounding" \
    test "$(caps "$kv_pid" CapEff) $(caps "$kv_pid" CapBnd)" = "0000000000803000 0000000000803000"
  check "single: control path at SCHED_RR 10, or the agent logged why not" rt_or_said "$kv" "$kv_pid"
  check "single: VIP:6443 answers from the host" wait_until 5 get "$VIP:6443"
  check "single: six connections from the host reach three backends round-robin" rr_ok "$VIP:6443"

  stop_agent "$kv"
  echo "#   docker stop took $STOP_MS ms"
  check "single: docker stop: agent exits 0" test "$(exit_code "$kv")" = 0
  check "single: docker stop: exited on SIGTERM, not the 10 s SIGKILL" test "$STOP_MS" -lt 5000
  check "single: docker stop: VIP gone from the node's namespace (which lives on: the agent removed it)" \
    no_vip 1
  check "single: docker stop: release logged before exit" logged "$kv" "VIP $VIP released"
  check "single: docker stop: VIP:6443 no longer answers" no_answer "$VIP:6443"

  # kubelet restarts a container in the same pod; here: docker start.
  dk start "$kv" >/dev/null
  check "single: restarted agent takes the VIP again" wait_until 5 node_has_vip 1
  wait_until 5 get "$VIP:6443" || true
  check "single: restarted agent: VIP:6443 answers round-robin" rr_ok "$VIP:6443"

  # A crash (SIGKILL) runs no cleanup. The agent adds the VIP with a 1 s lifetime that it keeps
  # renewing, so the kernel drops a dead agent's VIP by itself.
  dk kill "$kv" >/dev/null
  dk wait "$kv" >/dev/null || true
  local t
  t=$(now_ms)
  check "single: docker kill: the VIP left behind expires within 2 s (1 s address lifetime)" \
    wait_until 2 no_vip 1
  echo "#   expired after $(( $(now_ms) - t )) ms"
  dk start "$kv" >/dev/null
  wait_until 5 get "$VIP:6443" || true
  check "single: after a kill, the restarted agent holds the VIP and serves round-robin" rr_ok "$VIP:6443"
  stop_agent "$kv"
  check "single: final docker stop: exit 0 and no VIP left" \
    test "$(exit_code "$kv")" = 0 -a -z "$(holders)"
}

cluster() {
  local i t leader new old kv=kvt-$TAG-kv
  for i in $(seq "$NODES"); do write_config cluster "$i"; done
  all_configs_ok() { local i; for i in $(seq "$NODES"); do check_in_image "$WORK/cluster$i.yaml" || return 1; done; }
  check "cluster: kube-vip check (in the image) accepts the three configs" all_configs_ok
  for i in $(seq "$NODES"); do start_agent "$kv$i" "$i" "$WORK/cluster$i.yaml" "kvt-$TAG-state$i"; done
  # Nothing below means anything without a leader: stop here if there is none. (return 0: the
  # not_ok is counted; a failing status would end the whole script under set -e.)
  if wait_until 10 one_holder; then ok "cluster: exactly one node holds the VIP"; else
    not_ok "cluster: exactly one node holds the VIP (holders: '$(holders)')"; return 0
  fi
  leader=$(holders)
  echo "#   leader: node$leader"
  check "cluster: the startAsLeader node (node1) is the first leader" test "$leader" = 1
  wait_until 5 get "$VIP:6443" || true
  check "cluster: VIP:6443 answers from the host, round-robin" rr_ok "$VIP:6443"

  # Planned handover: SIGTERM to the leader's agent. A handover, not a quick failover: the old
  # leader says it hands over, the new one that it was asked to stand, nobody that it failed,
  # the VIP is off the old leader's namespace the moment the agent is gone (checked first: its
  # 1 s lifetime would remove it anyway a moment later), and the client's gap stays short.
  local since gap probe=$WORK/planned.probe
  since=$(date +%s.%N)
  python3 "$SUPPORT/probe.py" "$VIP" 6443 100 0 20 "$probe" http &
  local probe_pid=$!
  sleep 0.5
  t=$(now_ms)
  stop_agent "$kv$leader"
  local vip_left=no
  node_has_vip "$leader" && vip_left=yes
  local looked=$(( $(now_ms) - t ))
  check "planned: old leader's namespace has no VIP right after its agent exited ($looked ms after docker stop began)" \
    test "$vip_left" = no
  check "planned: old leader's agent exits 0" test "$(exit_code "$kv$leader")" = 0
  if wait_until 3 held_elsewhere "$leader"; then ok "planned: another node holds the VIP within 3 s"; else
    not_ok "planned: another node holds the VIP within 3 s"; kill "$probe_pid"; return 0
  fi
  new=$(holders)
  echo "#   new leader: node$new, $(( $(now_ms) - t )) ms after docker stop began"
  check "planned: exactly one holder" one_holder
  check "planned: VIP:6443 answers again within 3 s" wait_until 3 get "$VIP:6443"
  sleep 0.3
  kill -TERM "$probe_pid"; wait "$probe_pid" || true
  gap=$(probe_gap "$probe" "$t")
  echo "#   planned: longest client gap ${gap} ms ($(awk -v t="$t" '$1 > t && $2 == "fail"' "$probe" | wc -l) failed tries, 100 ms timeout)"
  check "planned: the old leader logged 'handing leadership over'" logged_since "$kv$leader" "$since" 'handing leadership over to'
  check "planned: the new leader (node$new) logged 'handover requested by leader'" \
    logged_since "$kv$new" "$since" 'handover requested by leader'
  no_failed_handover() { local i; for i in $(seq "$NODES"); do ! logged_since "$kv$i" "$since" 'refused or failed\|handover: ' || return 1; done; }
  check "planned: no agent logged a failed or refused handover" no_failed_handover
  check "planned: the client's longest gap is under 500 ms (${gap} ms; a failover waits out a lease)" test "$gap" -lt 500
  since=$(date +%s.%N)
  dk start "$kv$leader" >/dev/null # rejoins as a follower, with its Raft state from the volume
  check "planned: the restarted old leader follows node$new (its log since the restart)" \
    wait_until 10 logged_since "$kv$leader" "$since" "The Node \[$NET.1$new:10000\] is leading"
  sleep 1
  check "planned: the restarted old leader rejoins without taking the VIP" test "$(holders)" = "$new"

  # Unplanned: SIGKILL to the current leader's agent. Its VIP outlives it until the address
  # lifetime (1 s) runs out; meanwhile the new leader's gratuitous ARP moves the clients.
  old=$new
  t=$(now_ms)
  dk kill "$kv$old" >/dev/null
  if wait_until 3 held_elsewhere "$old"; then ok "unplanned: another node takes the VIP within 3 s"; else
    not_ok "unplanned: another node takes the VIP within 3 s"; return 0
  fi
  echo "#   unplanned failover after $(( $(now_ms) - t )) ms"
  check "unplanned: VIP:6443 answers within 3 s" wait_until 3 get "$VIP:6443"
  check "unplanned: the killed leader's namespace loses the VIP within 2 s (1 s lifetime)" \
    wait_until 2 no_vip "$old"
  echo "#   old leader's VIP gone $(( $(now_ms) - t )) ms after the kill"
  new=$(holders)
  since=$(date +%s.%N)
  dk start "$kv$old" >/dev/null # kubelet's restart
  check "unplanned: the restarted agent follows node$new (its log since the restart)" \
    wait_until 10 logged_since "$kv$old" "$since" "The Node \[$NET.1$new:10000\] is leading"
  sleep 1
  check "unplanned: the restarted agent rejoins; the VIP stays on node$new only" test "$(holders)" = "$new"
  check "unplanned: VIP:6443 still answers round-robin" rr_ok "$VIP:6443"

  for i in $(seq "$NODES"); do stop_agent "$kv$i"; done
  check "cluster: all stopped: every agent exited 0" \
    test "$(for i in $(seq "$NODES"); do exit_code "$kv$i"; done | sort -u)" = 0
  check "cluster: all stopped: no node holds the VIP" test -z "$(holders)"
}

bootstrap() {
  local i t gap b=kvt-$TAG-boot
  for i in $(seq "$NODES"); do write_config cluster "$i"; done
  # As README's step 3 (`sample manifest --singleNode`): node 1's cluster config, run with the
  # --singleNode override.
  check "bootstrap: kube-vip check accepts node 1's config" check_in_image "$WORK/cluster1.yaml"
  start_agent "${b}1" 1 "$WORK/cluster1.yaml" "kvt-$TAG-bstate1" --singleNode
  check "bootstrap: node1 alone (singleNode) holds the VIP, as kubeadm init needs" wait_until 5 node_has_vip 1
  check "bootstrap: VIP:6443 answers" wait_until 5 get "$VIP:6443"
  # kubeadm join on nodes 2 and 3, then their manifests: clustered, startAsLeader false.
  for i in 2 3; do start_agent "$b$i" "$i" "$WORK/cluster$i.yaml" "kvt-$TAG-bstate$i"; done
  sleep 2
  check "bootstrap: nodes 2 and 3 wait for a cluster and leave the VIP on node1" test "$(holders)" = 1
  check "bootstrap: nodes 2 and 3 log that no leader is known yet" logged "${b}2" "no leader known"
  # Node 1's manifest regenerated without --singleNode: kubelet stops the old pod (SIGTERM) and starts
  # the new one with the same state hostPath, still empty (singleNode writes no Raft state).
  t=$(now_ms)
  stop_agent "${b}1"
  check "bootstrap: the singleNode agent exits 0 and releases the VIP" \
    test "$(exit_code "${b}1")" = 0 -a -z "$(holders)"
  start_agent "${b}1c" 1 "$WORK/cluster1.yaml" "kvt-$TAG-bstate1"
  check "bootstrap: node1 initializes the three-node cluster" wait_until 5 logged "${b}1c" "initializing a cluster of 3 nodes"
  check "bootstrap: a leader of the three holds the VIP within 5 s" wait_until 5 one_holder
  check "bootstrap: VIP:6443 answers again" wait_until 5 get "$VIP:6443"
  gap=$(( $(now_ms) - t ))
  echo "#   leader node$(holders); VIP:6443 unanswered for ${gap} ms (docker stop of the bootstrap agent to first answer)"
  check "bootstrap: round-robin through the clustered VIP" rr_ok "$VIP:6443"
  for i in 1c 2 3; do stop_agent "$b$i"; done
  check "bootstrap: all stopped, exit 0, no VIP" \
    test "$(for i in 1c 2 3; do exit_code "$b$i"; done | sort -u) $(holders)" = "0 "
}

for mode in $MODES; do
  case $mode in
    single) single_node ;;
    bootstrap) bootstrap ;;
    cluster) cluster ;;
    *) echo "unknown mode '$mode' in KV_MODES"; exit 1 ;;
  esac
done

echo "# docker test took $(( $(now_ms) - T0 )) ms"
summary
