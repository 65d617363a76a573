# shellcheck shell=bash
# qemu/lib.sh: boot kube-vip appliances under QEMU (TCG) on a private network.
#
# Source it from a bash script that runs as root with `set -euo pipefail`:
#
#   . qemu/lib.sh
#   kv_init                                 # workdir, cleanup trap, tools
#   kv_net_create                           # namespace with bridge br0
#   kv_host_add client 10.213.0.2/24        # namespace joined by a veth
#   kv_vm_state_disk vm1 /path/to/vm1-state.img  # optional, persistent
#   kv_vm_start vm1 /path/to/vm1-config.img # tap + QEMU inside the namespace
#   wait_console vm1 'kube-vip-appliance: booted' 60
#   vm_exec vm1 'ip -4 addr show eth0'
#   kv_ns client curl ...
#   vm_poweroff vm1                         # or vm_poweroff_force (poweroff -f)
#   kv_vm_start vm1 ...                     # boots vm1 again: same tap and MAC,
#                                           # console appended (see kv_vm_offset)
#
# Layout: one "switch" namespace holds the bridge, every VM's tap and the QEMU
# processes (QEMU runs there through `ip netns exec`, so it opens its tap in
# that namespace). Client and backend "hosts" are namespaces of their own,
# each joined to the bridge by a veth pair whose inner end is eth0. Nothing
# touches the host's own interfaces. Names carry $KV_RUN_ID (default: $$),
# so parallel runs do not collide, and kv_cleanup (trapped on EXIT, INT and
# TERM) kills the VMs and every process in our namespaces, then deletes them.
#
# Judge a boot by its console markers (wait_console), never by QEMU's exit
# status: QEMU exits 0 in cases that are failures (e.g. too little RAM).
#
# Settings (environment, read by kv_init / kv_vm_start):
#   KV_KERNEL, KV_INITRD   default image/out/vmlinuz, image/out/initramfs.cpio.lz4
#   KV_VM_MEM              MiB per VM (default 192)
#   KV_CMDLINE_EXTRA       appended to the kernel command line
#   KV_QEMU_ACCEL          default tcg (KVM does not boot here, see ENVIRONMENT.md)
#   KV_QEMU_MACHINE        default q35: its virtio devices come up ~0.4 s sooner
#                          under TCG than on "pc", where enabling each PCI
#                          device runs slow ACPI interrupt-link methods
#   KV_QEMU_BIOS           firmware; default qboot (/usr/share/qemu/qboot.rom,
#                          from qemu-system-data) when present: it hands over
#                          to the kernel ~0.4 s sooner than SeaBIOS under TCG.
#                          Empty: QEMU's default (SeaBIOS).
#   KV_BOOT                kernel (default): QEMU loads KV_KERNEL + KV_INITRD
#                          itself (-kernel/-initrd/-append); disk: the firmware
#                          boots KV_BOOT_IMAGE as the VM's first virtio disk (a
#                          qcow2 overlay per VM in the work directory, so each VM
#                          has its own disk, as on a hypervisor); cdrom: the
#                          firmware boots KV_BOOT_IMAGE as a CD (SATA, read-only).
#                          Firmware boots have the image's fixed command line, so
#                          the command channel (vm_exec) needs a config disk made
#                          with `image/make-config-disk -t ttyS1`.
#   KV_BOOT_IMAGE          default image/out/kube-vip-appliance.qcow2 (disk) or
#                          .iso (cdrom); a raw .img or an .iso works as a disk too
#   KV_FIRMWARE            for disk/cdrom boots: bios (SeaBIOS, QEMU's own;
#                          qboot cannot boot disks) or uefi (OVMF,
#                          /usr/share/ovmf/OVMF.fd); default bios
#   KV_KEEP_WORKDIR=1      keep logs even after a successful run
#   KV_SUBNET              first three octets of the test subnet (default 10.213.0)
#   KV_LOG_FILE            if set, kv_log lines go there instead of stderr
#                          (scripts/demo keeps its terminal output short)

KV_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KV_REPO=$(dirname "$KV_LIB_DIR")
KV_RUN_ID=${KV_RUN_ID:-$$}
KV_SUBNET=${KV_SUBNET:-10.213.0}
KV_KERNEL=${KV_KERNEL:-$KV_REPO/image/out/vmlinuz}
KV_INITRD=${KV_INITRD:-$KV_REPO/image/out/initramfs.cpio.lz4}
KV_VM_MEM=${KV_VM_MEM:-192}
KV_QEMU_ACCEL=${KV_QEMU_ACCEL:-tcg}
KV_QEMU_MACHINE=${KV_QEMU_MACHINE:-q35}
if [[ -z ${KV_QEMU_BIOS+set} && -r /usr/share/qemu/qboot.rom ]]; then
	KV_QEMU_BIOS=/usr/share/qemu/qboot.rom
fi
KV_QEMU_BIOS=${KV_QEMU_BIOS:-}
KV_BOOT=${KV_BOOT:-kernel}
KV_FIRMWARE=${KV_FIRMWARE:-bios}
case $KV_BOOT in
disk) KV_BOOT_IMAGE=${KV_BOOT_IMAGE:-$KV_REPO/image/out/kube-vip-appliance.qcow2} ;;
cdrom) KV_BOOT_IMAGE=${KV_BOOT_IMAGE:-$KV_REPO/image/out/kube-vip-appliance.iso} ;;
*) KV_BOOT_IMAGE=${KV_BOOT_IMAGE:-} ;;
esac
KV_OVMF=/usr/share/ovmf/OVMF.fd
KV_NS_SW="kvsw-$KV_RUN_ID"
KV_WORKDIR=''
KV_NAMESPACES=()
KV_VMS=()
declare -A KV_VM_START=()  # VM name -> start time of its latest boot (epoch s, fractional)
declare -A KV_VM_OFFSET=() # VM name -> console log size when its latest boot began
declare -A KV_VM_MAC=()    # VM name -> MAC (kept across reboots, like a real NIC)
declare -A KV_VM_STATE=()  # VM name -> state disk image (read-write), see kv_vm_state_disk

kv_log() {
	if [[ -n ${KV_LOG_FILE:-} ]]; then
		echo "[$(date +%T.%3N)] $*" >>"$KV_LOG_FILE"
	else
		echo "[$(date +%T)] $*" >&2
	fi
}
kv_die() {
	echo "qemu/lib.sh: error: $*" >&2
	exit 1
}

# kv_now: seconds since the epoch with milliseconds.
kv_now() { date +%s.%3N; }
# kv_since T0: seconds elapsed since T0 (as printed by kv_now), 2 decimals.
kv_since() { awk -v a="$1" -v b="$(kv_now)" 'BEGIN { printf "%.2f", b - a }'; }

# need CMD...: CMD is declared in scripts/deps (group test) and installed; dies
# naming what is missing otherwise (scripts/deps test installs it).
need() {
	"$KV_REPO/scripts/deps" need test "$@" || kv_die "missing tools (above): run scripts/deps test"
}

# kv_initrd_cat FILE: the cpio archive inside an initramfs, whichever way it is
# compressed (image/build: lz4 legacy; Buildroot's rootfs.cpio.gz: gzip).
kv_initrd_cat() {
	case $(head -c 4 "$1" | od -An -tx1 | tr -d ' \n') in
	02214c18) lz4 -dc "$1" ;;
	*) zcat -f "$1" ;;
	esac
}

# kv_init: check we can work and have the tools, make the work directory and
# trap kv_cleanup on every way out (and report the step that killed a script).
kv_init() {
	[[ $(id -u) == 0 ]] || kv_die "must run as root (network namespaces, taps)"
	# Debian's kubectl as unpacked by scripts/deps comes first: another
	# package may own /usr/bin/kubectl on some machines.
	if [[ -x /usr/local/lib/kube-vip-tools/bin/kubectl && :$PATH: != *:/usr/local/lib/kube-vip-tools/bin:* ]]; then
		PATH=/usr/local/lib/kube-vip-tools/bin:$PATH
	fi
	need qemu-system-x86_64 ip curl openssl python3 kubectl mke2fs ping cpio lz4
	case $KV_BOOT in
	kernel) ;;
	disk | cdrom) need qemu-img ;;
	*) kv_die "KV_BOOT=$KV_BOOT: want kernel, disk or cdrom" ;;
	esac
	case $KV_FIRMWARE in
	bios) ;;
	uefi) need /usr/share/ovmf/OVMF.fd ;;
	*) kv_die "KV_FIRMWARE=$KV_FIRMWARE: want bios or uefi" ;;
	esac
	KV_PYTHON=${KV_PYTHON:-$(command -v /usr/bin/python3 || command -v python3)}
	KV_WORKDIR=$(mktemp -d "/tmp/kube-vip-qemu.$KV_RUN_ID.XXXXXX")
	# A script that dies under set -e says where (the ERR trap, inherited by
	# functions with set -E), before kv_cleanup tears everything down.
	set -E
	trap 'kv_on_err $? $LINENO "$BASH_COMMAND"' ERR
	trap kv_cleanup EXIT
	# Let EXIT do the work, with the conventional status for the signal.
	trap 'exit 130' INT
	trap 'exit 143' TERM
	kv_log "work directory $KV_WORKDIR (run id $KV_RUN_ID)"
}

# kv_on_err STATUS LINE COMMAND: the ERR trap; logs the first failing command
# of the script's own shell (not of a $(...) whose failure the caller sees).
KV_DIED=''
kv_on_err() {
	[[ $BASH_SUBSHELL == 0 && -z $KV_DIED && $- == *e* ]] || return 0
	local i where=''
	for ((i = 1; i < ${#FUNCNAME[@]} - 1; i++)); do
		where+="${where:+; }${FUNCNAME[$i]}, called at ${BASH_SOURCE[$((i + 1))]##*/}:${BASH_LINENO[$i]}"
	done
	KV_DIED="${BASH_SOURCE[1]##*/}:$2${where:+ (in $where)}: \`$3\` exited $1"
	kv_log "died at $KV_DIED"
}

# kv_cleanup: kill VMs and everything running in our namespaces, delete the
# namespaces. Keeps the work directory (logs) when the script failed.
kv_cleanup() {
	local rc=$? vm pid ns
	trap - EXIT INT TERM ERR
	set +e
	# Forget our background jobs, so bash does not report each one killed
	# below as "Terminated".
	disown -a 2>/dev/null
	for vm in "${KV_VMS[@]}"; do
		pid=$(kv_vm_pid "$vm")
		[[ -n $pid ]] && kill -TERM "$pid" 2>/dev/null
	done
	for ns in "${KV_NAMESPACES[@]}"; do
		# Only processes we started can live in namespaces we created.
		for pid in $(ip netns pids "$ns" 2>/dev/null); do
			kill -TERM "$pid" 2>/dev/null
		done
	done
	sleep 0.3
	for ns in "${KV_NAMESPACES[@]}"; do
		for pid in $(ip netns pids "$ns" 2>/dev/null); do
			kill -KILL "$pid" 2>/dev/null
		done
		ip netns del "$ns" 2>/dev/null
	done
	if [[ -n $KV_WORKDIR && -d $KV_WORKDIR ]]; then
		if [[ $rc != 0 || ${KV_KEEP_WORKDIR:-0} == 1 ]]; then
			kv_log "qemu/lib.sh: logs kept in $KV_WORKDIR"
		else
			rm -rf "$KV_WORKDIR"
		fi
	fi
	exit "$rc"
}

# kv_ns_name NAME: the namespace name of host NAME.
kv_ns_name() { echo "kv$KV_RUN_ID-$1"; }

# kv_ns NAME CMD...: run CMD in host NAME's namespace ("sw" = the switch).
kv_ns() {
	local name=$1
	shift
	if [[ $name == sw ]]; then
		ip netns exec "$KV_NS_SW" "$@"
	else
		ip netns exec "$(kv_ns_name "$name")" "$@"
	fi
}

# kv_net_create: the switch namespace with bridge br0 (no address of its own).
kv_net_create() {
	ip netns add "$KV_NS_SW" || kv_die "cannot create namespace $KV_NS_SW"
	KV_NAMESPACES+=("$KV_NS_SW")
	ip -n "$KV_NS_SW" link set lo up
	# STP off: ports forward at once instead of after a listening delay.
	ip -n "$KV_NS_SW" link add br0 type bridge stp_state 0 forward_delay 0
	ip -n "$KV_NS_SW" link set br0 up
}

# kv_host_add NAME ADDR/PREFIX: a namespace joined to the bridge; its end of
# the veth is eth0. NAME: up to 10 characters (interface names are short).
kv_host_add() {
	local name=$1 addr=$2 ns
	[[ $name =~ ^[a-z0-9]{1,10}$ ]] || kv_die "host name '$name': use 1-10 of [a-z0-9]"
	ns=$(kv_ns_name "$name")
	ip netns add "$ns" || kv_die "cannot create namespace $ns"
	KV_NAMESPACES+=("$ns")
	ip -n "$KV_NS_SW" link add "v-$name" type veth peer name eth0 netns "$ns"
	ip -n "$KV_NS_SW" link set "v-$name" master br0 up
	ip -n "$ns" link set lo up
	ip -n "$ns" addr add "$addr" dev eth0
	ip -n "$ns" link set eth0 up
}

# kv_vm_pid VM: QEMU's pid (empty if unknown).
kv_vm_pid() { cat "$KV_WORKDIR/$1.pid" 2>/dev/null || true; }

# kv_vm_alive VM: true while VM's QEMU runs.
kv_vm_alive() {
	local pid
	pid=$(kv_vm_pid "$1")
	[[ -n $pid ]] && kill -0 "$pid" 2>/dev/null
}

# kv_console VM: path of VM's console log (ttyS0).
kv_console() { echo "$KV_WORKDIR/$1.console"; }

# kv_vm_state_disk VM IMAGE: attach IMAGE (image/make-state-disk) read-write
# to VM at every boot from now on; the appliance mounts it on /var/lib/kube-vip.
kv_vm_state_disk() {
	[[ -r $2 && -w $2 ]] || kv_die "state disk $2 not readable and writable"
	KV_VM_STATE[$1]=$2
}

# kv_vm_start VM CONFIG_DISK [QEMU_ARGS...]: tap "t-VM" on br0 and a VM with
# the appliance kernel+initramfs (or its boot image: KV_BOOT), CONFIG_DISK as read-only virtio disk (pass ""
# for none), the state disk if one was given (kv_vm_state_disk), console
# (ttyS0) into $KV_WORKDIR/VM.console and the command channel (ttyS1, see
# vm_exec) on a unix socket. Returns at once; follow the boot with
# wait_console. Calling it again for a VM whose QEMU has ended boots it again
# (a new QEMU, possibly with another config disk) on the same tap with the
# same MAC; its console log is appended to, after a "=== boot N" line.
kv_vm_start() {
	local vm=$1 disk=$2 idx mac cmdline log
	shift 2
	[[ $vm =~ ^[a-z0-9]{1,10}$ ]] || kv_die "VM name '$vm': use 1-10 of [a-z0-9]"
	if [[ $KV_BOOT == kernel ]]; then
		[[ -r $KV_KERNEL && -r $KV_INITRD ]] ||
			kv_die "no appliance image ($KV_KERNEL, $KV_INITRD): run image/build first"
	else
		[[ -r $KV_BOOT_IMAGE ]] || kv_die "no boot image $KV_BOOT_IMAGE: run image/build first"
	fi
	[[ -z $disk || -r $disk ]] || kv_die "config disk $disk not readable"
	log=$KV_WORKDIR/$vm.console
	if [[ -n ${KV_VM_MAC[$vm]:-} ]]; then
		kv_vm_alive "$vm" && kv_die "$vm is still running; power it off before booting it again"
		mac=${KV_VM_MAC[$vm]}
		echo "=== boot $(($(grep -c '^=== boot ' "$log") + 1)) ($(date +%T))" >>"$log"
	else
		KV_VMS+=("$vm")
		idx=${#KV_VMS[@]}
		# Locally administered, unique per run (run id) and per VM (index).
		mac=$(printf '52:54:%02x:%02x:%02x:%02x' $(((KV_RUN_ID >> 16) & 255)) \
			$(((KV_RUN_ID >> 8) & 255)) $((KV_RUN_ID & 255)) "$idx")
		KV_VM_MAC[$vm]=$mac
		ip -n "$KV_NS_SW" tuntap add dev "t-$vm" mode tap
		ip -n "$KV_NS_SW" link set "t-$vm" master br0 up
		echo "=== boot 1 ($(date +%T))" >"$log"
	fi
	KV_VM_OFFSET[$vm]=$(stat -c %s "$log")
	# The appliance's command line (image/out/build-info) plus the command
	# channel. cryptomgr.notests skips the crypto self-tests at boot: ~0.5 s
	# of emulated CPU, and kube-vip uses no kernel crypto.
	cmdline="console=ttyS0 quiet panic=-1 cryptomgr.notests kva.ctl=ttyS1 ${KV_CMDLINE_EXTRA:-}"
	local -a args=(
		-name "$vm" -machine "$KV_QEMU_MACHINE" -accel "$KV_QEMU_ACCEL" -cpu max -smp 1 -m "$KV_VM_MEM"
		-nodefaults -no-user-config -display none -no-reboot
		-chardev "file,id=con,path=$log,append=on" -serial chardev:con
		-chardev "socket,id=ctl,path=$KV_WORKDIR/$vm.ctl,server=on,wait=off" -serial chardev:ctl
		-monitor "unix:$KV_WORKDIR/$vm.mon,server=on,wait=off"
		-netdev "tap,id=n0,ifname=t-$vm,script=no,downscript=no"
		-device "virtio-net-pci,netdev=n0,mac=$mac"
	)
	kv_boot_args "$vm" "$cmdline"
	[[ -z $disk ]] || args+=(-drive "file=$disk,format=raw,if=virtio,readonly=on")
	# Written by the guest; QEMU flushes to the file when the guest flushes
	# (fsync), so what kube-vip made durable survives even poweroff -f.
	[[ -z ${KV_VM_STATE[$vm]:-} ]] || args+=(-drive "file=${KV_VM_STATE[$vm]},format=raw,if=virtio")
	KV_VM_START[$vm]=$(kv_now)
	ip netns exec "$KV_NS_SW" qemu-system-x86_64 "${args[@]}" "$@" \
		</dev/null >"$KV_WORKDIR/$vm.qemu.log" 2>&1 &
	# `ip netns exec` execs QEMU, so $! is QEMU's pid. Written here only, in
	# one rename: with QEMU's own -pidfile on the same file, a reader could
	# catch it truncated and take a running VM for dead.
	echo "$!" >"$KV_WORKDIR/$vm.pid.tmp"
	mv -f "$KV_WORKDIR/$vm.pid.tmp" "$KV_WORKDIR/$vm.pid"
	kv_log "$vm: QEMU started (mac $mac, config disk ${disk:-none}, state disk ${KV_VM_STATE[$vm]:-none}, boot $KV_BOOT${KV_BOOT_IMAGE:+ $(basename "$KV_BOOT_IMAGE") $KV_FIRMWARE})"
}

# kv_boot_args VM CMDLINE: add how VM boots (KV_BOOT, KV_FIRMWARE) to the
# caller's args array. The boot device comes first in the boot order
# (bootindex=0); config and state disks are virtio disks after it.
kv_boot_args() {
	local vm=$1 cmdline=$2 disk fmt
	if [[ $KV_BOOT == kernel ]]; then
		args+=(-kernel "$KV_KERNEL" -initrd "$KV_INITRD" -append "$cmdline")
		[[ -z $KV_QEMU_BIOS ]] || args+=(-bios "$KV_QEMU_BIOS")
		return 0
	fi
	[[ -z ${KV_CMDLINE_EXTRA:-} ]] || kv_log "$vm: KV_CMDLINE_EXTRA is ignored: a $KV_BOOT boot has the image's own command line"
	[[ $KV_FIRMWARE == bios ]] || args+=(-bios "$KV_OVMF")
	if [[ $KV_BOOT == cdrom ]]; then
		args+=(-drive "if=none,id=boot,media=cdrom,readonly=on,format=raw,file=$KV_BOOT_IMAGE"
			-device "ide-cd,drive=boot,bus=ide.0,bootindex=0")
		return 0
	fi
	# The VM's own disk: a qcow2 overlay on the image, made at its first boot
	# and kept across reboots (like a disk a hypervisor copied for it).
	disk=$KV_WORKDIR/$vm-boot.qcow2
	if [[ ! -e $disk ]]; then
		fmt=raw
		[[ $KV_BOOT_IMAGE != *.qcow2 ]] || fmt=qcow2
		qemu-img create -q -f qcow2 -F "$fmt" -b "$(realpath "$KV_BOOT_IMAGE")" "$disk" ||
			kv_die "cannot make $disk on $KV_BOOT_IMAGE"
	fi
	args+=(-drive "if=none,id=boot,format=qcow2,file=$disk" -device "virtio-blk-pci,drive=boot,bootindex=0")
}

# kv_vm_mac VM: VM's MAC address.
kv_vm_mac() { echo "${KV_VM_MAC[$1]:-}"; }

# kv_vm_offset VM: where VM's latest boot begins in its console log (pass it
# to wait_console to ignore earlier boots).
kv_vm_offset() { echo "${KV_VM_OFFSET[$1]:-0}"; }

# kv_vm_elapsed VM: seconds since VM's QEMU was started.
kv_vm_elapsed() { kv_since "${KV_VM_START[$1]}"; }

# console_offset VM: current size of VM's console log, to pass to wait_console
# so that it only looks at what comes after (e.g. the second start).
console_offset() { stat -c %s "$(kv_console "$1")" 2>/dev/null || echo 0; }

# wait_console VM REGEX TIMEOUT [OFFSET]: wait until VM's console log has a
# line matching the extended regular expression (after byte OFFSET). Fails
# after TIMEOUT seconds or as soon as QEMU is gone, showing the log's tail.
wait_console() {
	local vm=$1 re=$2 timeout=$3 off=${4:-0} log deadline
	log=$(kv_console "$vm")
	deadline=$(awk -v n="$(kv_now)" -v t="$timeout" 'BEGIN { printf "%.3f", n + t }')
	while :; do
		# grep without -q: it reads to the end, so tr never dies of SIGPIPE
		# (with pipefail, that would turn a match into a failure).
		if tail -c +"$((off + 1))" "$log" 2>/dev/null | tr -d '\r' | grep -E -- "$re" >/dev/null; then
			return 0
		fi
		if ! kv_vm_alive "$vm"; then
			# One last look: QEMU may have written the line just before exiting.
			tail -c +"$((off + 1))" "$log" 2>/dev/null | tr -d '\r' | grep -E -- "$re" >/dev/null && return 0
			kv_log "$vm: QEMU is not running; '$re' never appeared. QEMU said:"
			sed 's/^/    /' "$KV_WORKDIR/$vm.qemu.log" >&2
			kv_show_console "$vm"
			return 1
		fi
		if awk -v n="$(kv_now)" -v d="$deadline" 'BEGIN { exit !(n > d) }'; then
			kv_log "$vm: no '$re' on the console within ${timeout}s"
			kv_show_console "$vm"
			return 1
		fi
		sleep 0.2
	done
}

# kv_show_console VM [LINES]: print the end of VM's console log.
kv_show_console() {
	kv_log "$1: last ${2:-30} console lines:"
	tail -n "${2:-30}" "$(kv_console "$1")" 2>/dev/null | tr -d '\r' | sed 's/^/    | /' >&2
}

# vm_exec VM 'COMMAND' [TIMEOUT]: run a shell command line in the guest over
# the ttyS1 command channel; prints its output (stdout+stderr) and returns its
# exit status (124 on timeout). One command at a time per VM.
vm_exec() {
	local vm=$1 cmd=$2 timeout=${3:-20}
	# This boot's channel: after a reboot the log still has the last one's line.
	wait_console "$vm" 'kube-vip-appliance: control channel on' "$timeout" "$(kv_vm_offset "$vm")" >/dev/null 2>&1 ||
		kv_die "$vm: no command channel (is kva.ctl=ttyS1 on the kernel command line?)"
	"$KV_PYTHON" - "$KV_WORKDIR/$vm.ctl" "$cmd" "$timeout" <<'PY'
import os, re, socket, sys, time
path, cmd, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
token = os.urandom(6).hex()
# stdin from /dev/null so a command cannot swallow the next ones; the end
# marker is printed with a format so an echo of this line could not match it.
if "\n" in cmd:
    sys.exit("vm_exec: the command must be a single line")
line = "{ %s ;} </dev/null 2>&1; printf '\\n%%s %%d\\n' \"@@KVEND-%s\" $?\n" % (cmd, token)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
s.sendall(line.encode())
buf = b""
end = time.monotonic() + timeout
pat = re.compile(rb"\n?@@KVEND-" + token.encode() + rb" (\d+)\n")
while time.monotonic() < end:
    s.settimeout(max(0.05, end - time.monotonic()))
    try:
        chunk = s.recv(65536)
    except socket.timeout:
        break
    if not chunk:
        break
    buf += chunk
    m = pat.search(buf)
    if m:
        sys.stdout.write(buf[:m.start()].decode(errors="replace").replace("\r", ""))
        if not buf[:m.start()].endswith(b"\n") and m.start() > 0:
            sys.stdout.write("\n")
        sys.exit(int(m.group(1)))
sys.stdout.write(buf.decode(errors="replace"))
sys.stderr.write("vm_exec: timed out after %gs\n" % timeout)
sys.exit(124)
PY
}

# vm_poweroff VM [TIMEOUT]: clean shutdown from inside (busybox poweroff, so
# the shutdown script stops kube-vip first); kills QEMU if it is still there
# after TIMEOUT seconds (default 30). Returns 1 if it had to kill.
vm_poweroff() {
	local vm=$1 timeout=${2:-30} i
	kv_vm_alive "$vm" || return 0
	# busybox poweroff only signals init and returns, so the answer still
	# comes back. (A bare write-and-close on the socket can be lost.)
	vm_exec "$vm" poweroff 10 >/dev/null 2>&1 || kv_log "$vm: poweroff over the command channel failed"
	for ((i = 0; i < timeout * 5; i++)); do
		kv_vm_alive "$vm" || {
			kv_log "$vm: powered off"
			return 0
		}
		sleep 0.2
	done
	kv_log "$vm: did not power off within ${timeout}s, killing it"
	vm_kill "$vm"
	return 1
}

# vm_poweroff_force VM [TIMEOUT]: `poweroff -f` in the guest: the kernel powers
# off at once, without the shutdown script, so kube-vip gets no SIGTERM and
# cannot hand over (the failure case, as close to pulling the plug as a guest
# can get, but a real guest poweroff). Prints "SENT GONE": when the command
# went out on the command channel and when QEMU was seen gone (kv_now
# format; QEMU polled every 20 ms). Returns 1 (after killing QEMU) if the
# guest did not power off within TIMEOUT seconds (default 20).
vm_poweroff_force() {
	local vm=$1 timeout=${2:-20} sent i
	kv_vm_alive "$vm" || kv_die "$vm is not running"
	wait_console "$vm" 'kube-vip-appliance: control channel on' 20 "$(kv_vm_offset "$vm")" >/dev/null 2>&1 ||
		kv_die "$vm: no command channel"
	# No end marker can come back from a guest that is gone: send the line,
	# note the time, and hold the connection until QEMU closes it (closing
	# at once could lose the line before QEMU has read it).
	sent=$("$KV_PYTHON" - "$KV_WORKDIR/$vm.ctl" "$timeout" <<'PY'
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(b"poweroff -f\n")
print("%.3f" % time.time(), flush=True)
s.settimeout(float(sys.argv[2]))
try:
    while s.recv(4096):
        pass
except OSError:
    pass
PY
	) || kv_log "$vm: poweroff -f over the command channel failed"
	for ((i = 0; i < timeout * 50; i++)); do
		if ! kv_vm_alive "$vm"; then
			echo "${sent:-$(kv_now)} $(kv_now)"
			kv_log "$vm: powered off (poweroff -f)"
			return 0
		fi
		sleep 0.02
	done
	kv_log "$vm: did not power off within ${timeout}s, killing it"
	vm_kill "$vm"
	echo "${sent:-$(kv_now)} $(kv_now)"
	return 1
}

# vm_kill VM: stop VM's QEMU at once (like pulling the plug).
vm_kill() {
	local vm=$1 pid i
	pid=$(kv_vm_pid "$vm")
	[[ -n $pid ]] || return 0
	kill -TERM "$pid" 2>/dev/null || return 0
	for ((i = 0; i < 25; i++)); do
		kill -0 "$pid" 2>/dev/null || return 0
		sleep 0.2
	done
	kill -KILL "$pid" 2>/dev/null || true
}

# kv_make_certs DIR IP...: self-signed CA and a server certificate for the
# stand-in apiservers, valid for the given IPs (VIP, backends) and the usual
# in-cluster names. Writes DIR/{ca.crt,ca.key,server.crt,server.key}.
kv_make_certs() { "$KV_LIB_DIR/backend/make-certs" "$@" >/dev/null; }

# kv_backend_start NAME ADDR CERTDIR [PORT] [HOST]: start the stand-in
# kube-apiserver NAME on ADDR:PORT (default 6444) in host HOST's namespace
# (default: the host called NAME); waits until it listens.
kv_backend_start() {
	local name=$1 addr=$2 certs=$3 port=${4:-6444} host=${5:-$1} i
	kv_ns "$host" "$KV_PYTHON" "$KV_LIB_DIR/backend/fake-apiserver.py" \
		--name "$name" --address "$addr" --port "$port" \
		--cert "$certs/server.crt" --key "$certs/server.key" \
		</dev/null >"$KV_WORKDIR/$name.backend.log" 2>&1 &
	for ((i = 0; i < 50; i++)); do
		grep -q '^listening' "$KV_WORKDIR/$name.backend.log" 2>/dev/null && return 0
		sleep 0.1
	done
	cat "$KV_WORKDIR/$name.backend.log" >&2
	kv_die "backend $name did not start"
}

# kv_kubeconfig SERVER_URL CA_FILE OUT: a kubeconfig for kubectl with a dummy
# token: the stand-in apiserver ignores it, and without any credentials
# kubectl stops to prompt for a user name.
kv_kubeconfig() {
	cat >"$3" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kube-vip-test
  cluster:
    server: $1
    certificate-authority: $2
users:
- name: anonymous
  user: {token: kube-vip-test}
contexts:
- name: kube-vip-test
  context: {cluster: kube-vip-test, user: anonymous}
current-context: kube-vip-test
EOF
}
