# shellcheck shell=bash
# qemu/cluster-lib.sh: three kube-vip appliances shaped like the guide's seed
# config, with three stand-in apiservers and a client. Source it after
# qemu/lib.sh and kv_init; used by qemu/cluster-test, scripts/demo and
# bench/appliance.sh, so all three build the same cluster.
#
#   client   10.213.0.2 ----------+
#   backends .21 .22 .23 :6444 ---+-- br0 (namespace) --+-- tap -- vm1 .11  server1 (startAsLeader)
#     (one namespace, TLS,        |                     +-- tap -- vm2 .12  server2
#      qemu/backend/fake-apiserver.py)                  +-- tap -- vm3 .13  server3
#   VIP .100: the Raft leader holds it and balances VIP:6443 over the backends.
#
# Every VM gets a config disk (image/make-config-disk) and a state disk
# (image/make-state-disk) in $KV_WORKDIR, so a rebooted node keeps its Raft vote.
# VMs boot as qemu/lib.sh's KV_BOOT says (kernel, or the disk image through
# firmware); the config disks open the command channel (-t ttyS1, see
# KVC_CONFIG_DISK_ARGS), so vm_exec works either way.

KVC_NET=$KV_SUBNET
KVC_VIP=$KVC_NET.100
KVC_CLIENT_IP=$KVC_NET.2
KVC_BACKEND_IPS=("$KVC_NET.21" "$KVC_NET.22" "$KVC_NET.23")
KVC_VM_IPS=(unused "$KVC_NET.11" "$KVC_NET.12" "$KVC_NET.13")
KVC_CERTS=''
# Extra image/make-config-disk options for every config disk of the cluster:
# the command channel on ttyS1, which a firmware boot (KV_BOOT=disk) cannot
# get from the kernel command line.
KVC_CONFIG_DISK_ARGS=(-t ttyS1)

# kvc_network: switch, client, backends (three stand-in apiservers in one
# namespace, answering on :6444 with their names), test CA.
kvc_network() {
	local i
	kv_net_create
	kv_host_add client "$KVC_CLIENT_IP/24"
	kv_host_add backends "${KVC_BACKEND_IPS[0]}/24"
	for i in 1 2; do
		kv_ns backends ip addr add "${KVC_BACKEND_IPS[$i]}/24" dev eth0
	done
	KVC_CERTS=$KV_WORKDIR/certs
	kv_make_certs "$KVC_CERTS" "$KVC_VIP" "${KVC_BACKEND_IPS[@]}"
	for i in 1 2 3; do
		kv_backend_start "backend$i" "${KVC_BACKEND_IPS[$((i - 1))]}" "$KVC_CERTS" 6444 backends
	done
	kv_kubeconfig "https://$KVC_VIP:6443" "$KVC_CERTS/ca.crt" "$KV_WORKDIR/kubeconfig"
}

# kvc_config I [single]: vmI's config on stdout, the seed's shape: three peers
# server1..3 on :10000, startAsLeader on server1, eth0, the "Kubernetes Control
# Plane" load balancer on VIP:6443 -> backends:6444. stateDir is left at its
# default, /var/lib/kube-vip, where the appliance mounts the state disk.
# With "single": the seed's single-node variant (singleNode: true, no peers).
kvc_config() {
	local i=$1 mode=${2:-cluster} j
	if [[ $mode == single ]]; then
		echo "remotePeers: []"
	else
		echo "remotePeers:"
		for j in 1 2 3; do
			[[ $j == "$i" ]] && continue
			printf -- '- id: server%s\n  address: %s\n  port: 10000\n' "$j" "${KVC_VM_IPS[$j]}"
		done
	fi
	printf 'localPeer:\n  id: server%s\n  address: %s\n  port: 10000\n' "$i" "${KVC_VM_IPS[$i]}"
	echo "vip: $KVC_VIP"
	echo "gratuitousARP: true"
	if [[ $mode == single ]]; then echo "singleNode: true"; else echo "singleNode: false"; fi
	if [[ $i == 1 ]]; then echo "startAsLeader: true"; else echo "startAsLeader: false"; fi
	echo "interface: eth0"
	# With a peer key (KVC_PEER_KEY, put on every config disk by kvc_disks).
	[[ -z ${KVC_PEER_KEY:-} ]] || echo "peerKeyFile: /etc/kube-vip/peer.key"
	echo "loadBalancers:"
	echo "- name: Kubernetes Control Plane"
	echo "  type: tcp"
	echo "  port: 6443"
	echo "  bindToVip: true"
	echo "  backends:"
	for j in 0 1 2; do
		printf -- '  - port: 6444\n    address: %s\n' "${KVC_BACKEND_IPS[$j]}"
	done
}

# kvc_disks I [CONFIG_FILE]: vmI's config disk (from CONFIG_FILE, default
# kvc_config I) at $KV_WORKDIR/vmI-config.img, and its state disk at
# $KV_WORKDIR/vmI-state.img unless that exists already (it is the node's
# memory). Prints the config disk's path.
kvc_disks() {
	local i=$1 cfg=${2:-} img=$KV_WORKDIR/vm$1-config.img
	if [[ -z $cfg ]]; then
		cfg=$KV_WORKDIR/vm$i.yaml
		kvc_config "$i" >"$cfg"
	fi
	"$KV_REPO/image/make-config-disk" -c "$cfg" -a "${KVC_VM_IPS[$i]}/24" -i eth0 -n "vm$i" \
		${KVC_PEER_KEY:+-k "$KVC_PEER_KEY"} "${KVC_CONFIG_DISK_ARGS[@]}" -o "$img" >/dev/null
	"$KV_REPO/image/make-state-disk" -o "$KV_WORKDIR/vm$i-state.img" >/dev/null
	echo "$img"
}

# kvc_boot I [CONFIG_DISK]: boot vmI with CONFIG_DISK (default: its own,
# made by kvc_disks) and its state disk.
kvc_boot() {
	local i=$1 disk=${2:-$KV_WORKDIR/vm$1-config.img}
	[[ -e $disk ]] || disk=$(kvc_disks "$i")
	kv_vm_state_disk "vm$i" "$KV_WORKDIR/vm$i-state.img"
	kv_vm_start "vm$i" "$disk"
}

# kvc_wait I REGEX TIMEOUT: wait_console on vmI's latest boot only.
kvc_wait() { wait_console "vm$1" "$2" "$3" "$(kv_vm_offset "vm$1")"; }

# kvc_console_has I REGEX: vmI's latest boot printed a line matching REGEX.
kvc_console_has() {
	# Not grep -q: see wait_console (SIGPIPE under pipefail).
	tail -c +"$(($(kv_vm_offset "vm$1") + 1))" "$(kv_console "vm$1")" | tr -d '\r' | grep -E -- "$2" >/dev/null
}

# kvc_holds I: vmI has the VIP on eth0 (asked inside the guest over the
# command channel: the ground truth, whatever ARP caches say). Status 0: it
# holds it; 1: it does not; 2: unknown (the guest did not answer in time; a
# busy or stuck guest may well hold the VIP, so this is never "not holding").
kvc_holds() {
	local out rc=0
	out=$(vm_exec "vm$1" 'ip -o -4 addr show dev eth0' 10 2>&1) || rc=$?
	if [[ $rc != 0 ]]; then
		kv_log "vm$1: cannot tell whether it holds the VIP (vm_exec status $rc: ${out##*$'\n'})"
		return 2
	fi
	# Not grep -q: see wait_console.
	grep "inet $KVC_VIP/" >/dev/null <<<"$out"
}

# kvc_holders: the numbers of the running VMs that hold the VIP, space
# separated; a VM that could not be asked shows as "?I", so a check for
# exactly one holder (^[123]$) fails rather than miss a second holder.
kvc_holders() {
	local i out='' rc
	for i in 1 2 3; do
		kv_vm_alive "vm$i" || continue
		rc=0
		kvc_holds "$i" || rc=$?
		case $rc in 0) out+="$i " ;; 2) out+="?$i " ;; esac
	done
	echo "${out% }"
}

# kvc_curl: one HTTPS request from the client to https://VIP:6443/version,
# verified against the test CA; prints the backend that answered.
kvc_curl() {
	local out
	out=$(kv_ns client curl -sS --fail --connect-timeout 2 --max-time 4 --cacert "$KVC_CERTS/ca.crt" \
		-o /dev/null -w '%header{x-backend}' "https://$KVC_VIP:6443/version") || return 1
	[[ -n $out ]] && echo "$out"
}

# kvc_kubectl: `kubectl version` in the client namespace against the VIP;
# prints the server's gitVersion (it names the backend, v1.20.15+backendN).
kvc_kubectl() {
	kv_ns client kubectl --kubeconfig "$KV_WORKDIR/kubeconfig" --request-timeout 10s \
		version -o json </dev/null 2>"$KV_WORKDIR/kubectl.err" >"$KV_WORKDIR/kubectl.json" || return 1
	"$KV_PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["serverVersion"]["gitVersion"])' \
		"$KV_WORKDIR/kubectl.json"
}

# kvc_probe_start FILE: from now on, the client starts one curl to the VIP
# every 100 ms (each in the background, so a hanging one does not delay the
# next); each appends "START_MS END_MS EXIT_STATUS BACKEND" to FILE.
kvc_probe_start() {
	: >"$1"
	# `ip netns exec` itself, not kv_ns: a backgrounded function would be a
	# subshell, and $! would not be the probe.
	ip netns exec "$(kv_ns_name client)" "$KV_LIB_DIR/https-probe" \
		"https://$KVC_VIP:6443/version" "$KVC_CERTS/ca.crt" 0.1 "$1" &
	# shellcheck disable=SC2034 # read by name in kvc_stop_job
	KVC_PROBE_PID=$!
}
# kvc_stop_job VAR: SIGTERM the background job whose pid is in VAR, reap it, clear VAR.
kvc_stop_job() {
	local pid=${!1:-}
	[[ -n $pid ]] || return 0
	kill -TERM "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
	printf -v "$1" '%s' ''
}
kvc_probe_stop() { kvc_stop_job KVC_PROBE_PID; }
# kvc_probe_first_ok FILE T0_MS: end time (ms since the epoch) of the first
# successful request that started after T0_MS; empty if none.
kvc_probe_first_ok() {
	awk -v t="$2" '$1 >= t && $3 == 0 { if (m == "" || $2 < m) m = $2 } END { print m }' "$1"
}
# kvc_wait_probe_ok FILE T0_MS TIMEOUT: wait until kvc_probe_first_ok has an answer.
kvc_wait_probe_ok() {
	local i
	for ((i = 0; i < $3 * 10; i++)); do
		[[ -n $(kvc_probe_first_ok "$1" "$2") ]] && return 0
		sleep 0.1
	done
	return 1
}

# kvc_arp_start FILE: the client asks "who has the VIP?" every 100 ms with
# raw ARP requests and logs every answer with the answering MAC (two holders
# would both answer). kvc_arp_stop ends it; kvc_arp_summary FILE sums it up.
kvc_arp_start() {
	ip netns exec "$(kv_ns_name client)" \
		"$KV_PYTHON" "$KV_LIB_DIR/arp-sampler.py" eth0 "$KVC_CLIENT_IP" "$KVC_VIP" 0.1 "$1" &
	# shellcheck disable=SC2034 # read by name in kvc_stop_job
	KVC_ARP_PID=$!
}
kvc_arp_stop() { kvc_stop_job KVC_ARP_PID; }
# kvc_arp_macs FILE: the distinct MACs that answered, space separated.
kvc_arp_macs() { awk '$1 == "reply" { print $3 }' "$1" | sort -u | tr '\n' ' ' | sed 's/ $//'; }
# kvc_arp_summary FILE: requests, replies, who answered (VM names) and the
# longest time without any answer.
kvc_arp_summary() {
	local f=$1 map='' i
	for i in 1 2 3; do map+="$(kv_vm_mac "vm$i")=vm$i "; done
	awk -v map="$map" '
		BEGIN { n = split(map, m, " "); for (k = 1; k <= n; k++) { split(m[k], kv, "="); name[kv[1]] = kv[2] } }
		$1 == "request" { req++; if (first == "") first = $2; last_req = $2 }
		$1 == "reply" { rep++; who = ($3 in name) ? name[$3] : $3; cnt[who]++
			gap = $2 - (prev == "" ? first : prev); if (gap > maxgap) maxgap = gap; prev = $2 }
		END {
			if (prev != "" && last_req - prev > maxgap) maxgap = last_req - prev
			s = ""; for (w in cnt) s = s w ":" cnt[w] " "
			printf "%d requests, %d replies, answered by %s; longest gap without an answer %d ms\n", req, rep, s, maxgap
		}' "$f"
}

# kvc_cluster_up [TIMEOUT]: make the disks and boot vm1..vm3 at once; wait
# until each console shows kube-vip joined the cluster.
kvc_cluster_up() {
	local t=${1:-90} i
	for i in 1 2 3; do kvc_disks "$i" >/dev/null; done
	for i in 1 2 3; do kvc_boot "$i"; done
	for i in 1 2 3; do
		kvc_wait "$i" '^kube-vip-appliance: booted$' "$t" || return 1
	done
	for i in 1 2 3; do
		kvc_wait "$i" 'joined cluster as server' "$t" || return 1
	done
}

# kvc_wait_serving TIMEOUT: wait (from the client) for the first HTTPS 200 from
# https://VIP:6443/version; prints "END_TIME BACKEND" (END_TIME as kv_now).
# Polls lightly (qemu/wait-https.py), to leave the CPU to the booting VMs.
kvc_wait_serving() {
	kv_ns client "$KV_PYTHON" "$KV_LIB_DIR/wait-https.py" "https://$KVC_VIP:6443/version" \
		"$KVC_CERTS/ca.crt" "$1"
}
