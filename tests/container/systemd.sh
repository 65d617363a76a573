#!/usr/bin/env bash
# deploy/kube-vip.service under a real systemd (Debian 12's, PID 1 in a container on the test's
# bridge): `systemd-analyze verify`, start with the whole sandbox (capability bounding set,
# ProtectSystem=strict, syscall filter, ...), the VIP and round-robin from the host, capabilities
# as the kernel sees them, Raft state written under ProtectSystem=strict (a one-node cluster),
# restart after SIGKILL, clean stop (exit 0, VIP removed), and a bad config stopped by
# ExecStartPre before the VIP is touched.
#
# Needs a Debian rootfs with systemd: made once with mmdebstrap from the Debian mirror and kept
# in /var/cache/kube-vip-tools, checked before every use (cached_rootfs in tests/lib.sh; about
# 1-2 min and 200 MB the first time). KV_TEST_NET as in docker.sh.
# shellcheck source=tests/container/lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=tests/container/engine.sh
source "$CT/engine.sh"

T0=$(now_ms)
ROOTFS=/var/cache/kube-vip-tools/bookworm-systemd.tar
SD_IMAGE=kube-vip-test/systemd:$TAG
SD=kvt-$TAG-sd
VIP=$NET.100
UNIT=$ROOT/deploy/kube-vip.service

test_cleanup() {
  if [ "$FAIL" -gt 0 ] || [ -n "${KEEP_WORK:-}" ]; then
    echo "# --- journal of kube-vip.service"
    dk exec "$SD" journalctl -u kube-vip --no-pager 2>&1 | tail -n 40 | sed 's/^/#   /'
  fi
}

x() { dk exec "$SD" "$@"; }
prop() { x systemctl show -p "$1" --value kube-vip; }
has_vip() { has_vip_in "$SD" "$VIP"; }
no_vip() { ! has_vip; }
system_up() { case $(x systemctl is-system-running 2>/dev/null) in running | degraded) ;; *) return 1 ;; esac; }
active() { [ "$(x systemctl is-active kube-vip 2>/dev/null)" = active ]; }
journal_has() { x journalctl -u kube-vip --no-pager | has -- "$1"; }
indent() { sed 's/^/#   /'; }

write_config() { # EXTRA-YAML-LINES...: a config for the node at $NET.11
  {
    echo "vip: $VIP"
    echo "interface: eth0"
    echo "gratuitousARP: true"
    printf '%s\n' "$@"
    echo "loadBalancers:"
    lb_entry api tcp 6443 true 6444 "$NET.21" "$NET.22" "$NET.23"
    echo "  connectTimeoutMs: 500"
  } >"$WORK/config.yaml"
  dk cp "$WORK/config.yaml" "$SD:/etc/kube-vip/config.yaml"
}

# ---------- a systemd machine ----------
need mmdebstrap docker dockerd nsenter curl busybox
cached_rootfs "$ROOTFS" --variant=minbase --include=systemd,systemd-sysv,dbus,iproute2
engine_up
IMAGES_MADE+=("$SD_IMAGE")
dk import -c 'CMD ["/sbin/init"]' "$ROOTFS" "$SD_IMAGE" >/dev/null
build_busybox
make_network
start_backends
# systemd as PID 1 needs to mount and make namespaces for the sandbox: every capability (but
# CAP_SYS_RESOURCE, which this kind of VM withholds, so --privileged fails), no seccomp profile,
# its own /run, and the host's cgroup tree (cgroup v1 here) to read.
run_c "$SD" --network "$NETNAME" --ip "$NET.11" --hostname kvt-node \
  --cap-add ALL --cap-drop SYS_RESOURCE \
  --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
  --tmpfs /run --tmpfs /run/lock -v /sys/fs/cgroup:/sys/fs/cgroup:ro \
  "$SD_IMAGE" /sbin/init
check "systemd boots in the node container" wait_until 30 system_up

x mkdir -p /etc/kube-vip
dk cp "$KUBE_VIP" "$SD:/usr/local/bin/kube-vip"
dk cp "$UNIT" "$SD:/etc/systemd/system/kube-vip.service"
write_config "singleNode: true"
# verify prints nothing for a clean unit (and checks ExecStart's binary exists, here it does).
verify_out=$(x systemd-analyze verify /etc/systemd/system/kube-vip.service 2>&1 || echo "exit status $?")
[ -z "$verify_out" ] || indent <<<"$verify_out"
check "systemd-analyze verify: the unit is clean" test -z "$verify_out"
x systemctl daemon-reload

# ---------- single node under the sandbox ----------
check "systemctl enable --now kube-vip" x systemctl enable --quiet --now kube-vip
check "service is active" wait_until 5 active
check "VIP is on the node's eth0" wait_until 5 has_vip
pid=$(prop MainPID)
# status FIELD: a field of the agent's /proc/PID/status, read inside the machine.
# shellcheck disable=SC2016 # awk's $1, $2
status() { x awk -v k="$1:" '$1 == k {print $2}' "/proc/$pid/status"; }
check "agent has exactly NET_ADMIN + NET_RAW (effective, bounding, ambient)" \
  test "$(status CapEff) $(status CapBnd) $(status CapAmb)" = "0000000000003000 0000000000003000 0000000000003000"
# shellcheck disable=SC2016 # awk's $5, $6
root_mode() { x awk '$5 == "/" {print $6}' "/proc/$pid/mountinfo" | cut -d, -f1; }
check "sandbox in force: no_new_privs, seccomp filter, / mounted read-only" \
  test "$(status NoNewPrivs) $(status Seccomp) $(root_mode)" = "1 2 ro"
check "VIP:6443 answers from the host" wait_until 5 get "$VIP:6443"
check "round-robin through the VIP from the host" rr_ok "$VIP:6443"
# The metrics endpoint (default :2112) and the status socket work inside the unit's sandbox.
healthz() { [ "$(curl -s --max-time 1 "http://$NET.11:2112/healthz")" = ok ]; }
check "/healthz on :2112 answers ok from the host" wait_until 5 healthz
bound_metric() { curl -s --max-time 1 "http://$NET.11:2112/metrics" | has -x 'kube_vip_vip_bound 1'; }
check "/metrics from the host: kube_vip_vip_bound 1" bound_metric
status_bound() {
  x /usr/local/bin/kube-vip status -c /etc/kube-vip/config.yaml >"$WORK/status.txt" 2>&1
  indent <"$WORK/status.txt"
  grep -q '^vip .*(bound here)' "$WORK/status.txt"
}
check "kube-vip status on the node (socket in StateDirectory): VIP bound here" status_bound
check "StateDirectory made /var/lib/kube-vip, mode 0700" \
  test "$(x stat -c '%a %U' /var/lib/kube-vip)" = "700 root"

# A crash: systemd restarts it after RestartSec (2 s); the new agent takes the VIP over.
x systemctl kill -s SIGKILL kube-vip
restarted() { [ "$(prop NRestarts)" = 1 ] && active; }
check "after SIGKILL: restarted by Restart=on-failure within 6 s" wait_until 6 restarted
check "after SIGKILL: VIP held and serving again" wait_until 5 get "$VIP:6443"

t=$(now_ms)
x systemctl stop kube-vip
echo "#   systemctl stop took $(( $(now_ms) - t )) ms"
check "systemctl stop: agent exited 0 on SIGTERM" \
  test "$(prop ExecMainCode) $(prop ExecMainStatus) $(prop Result)" = "1 0 success"
check "systemctl stop: VIP removed" no_vip
check "systemctl stop: release logged" journal_has "VIP $VIP released"

# ---------- Raft state under ProtectSystem=strict ----------
# A one-node cluster: Raft writes its vote and log to stateDir, which the sandbox must allow
# (StateDirectory) while the rest of the file system stays read-only.
write_config "singleNode: false" "startAsLeader: true" \
  "localPeer: {id: node1, address: \"$NET.11\", port: 10000}" "stateDir: /var/lib/kube-vip"
x systemctl reset-failed kube-vip 2>/dev/null || true
check "one-node cluster: service starts" x systemctl start kube-vip
check "one-node cluster: leader takes the VIP" wait_until 10 has_vip
check "one-node cluster: Raft state written to /var/lib/kube-vip" \
  test -n "$(x find /var/lib/kube-vip -type f)"
echo "#   state files: $(x find /var/lib/kube-vip -type f | tr '\n' ' ')"
x systemctl stop kube-vip
check "one-node cluster: stop exits 0 and removes the VIP" \
  test "$(prop ExecMainStatus)" = 0 -a "$(has_vip && echo held)" = ""
denials=$(x journalctl -u kube-vip --no-pager | grep -iE 'operation not permitted|permission denied|read-only file system|bad system call' || true)
# A kernel with RT_GROUP_SCHED (cgroup v1 cpu.rt_runtime_us exists) gives a new cgroup, such as
# this container's, no real-time runtime: SCHED_RR is refused there even to root, whatever the
# unit permits (LimitRTPRIO=10). The agent's one warning per start says so and it runs at nice
# -10. That is the host's cgroup setup, not the unit's sandbox: not counted, but shown.
if [ -e /sys/fs/cgroup/cpu/cpu.rt_runtime_us ]; then
  rt=$(grep -F 'cannot run the control path at real-time priority' <<<"$denials" || true)
  [ -z "$rt" ] || echo "# real-time refused: RT_GROUP_SCHED kernel, container cgroup without rt runtime"
  denials=$(grep -vF 'cannot run the control path at real-time priority' <<<"$denials" || true)
fi
[ -z "$denials" ] || indent <<<"$denials"
check "no sandbox denials in the journal" test -z "$denials"

# ---------- bad config ----------
write_config "singleNode: true" "vipp: 10.0.0.1"
x systemctl reset-failed kube-vip 2>/dev/null || true
start_fails() { ! x systemctl start kube-vip 2>/dev/null; }
check "bad config: systemctl start fails" start_fails
check "bad config: ExecStartPre's check names the field" journal_has 'unknown field .vipp.'
check "bad config: the VIP was never taken" no_vip
x systemctl stop kube-vip 2>/dev/null || true # ends the restart loop

echo "# systemd test took $(( $(now_ms) - T0 )) ms"
summary
