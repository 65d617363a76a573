#!/usr/bin/env bash
# The fresh-machine property, on every run: what the suites, benchmarks and demo run is
# installed by scripts/deps alone, on a Debian 12 that never ran anything of this project's.
#   1. every `need CMD...` in tests/, qemu/, scripts/, bench/ and image/ names a command that
#      scripts/deps declares, for the group that installs it (test; bench for the benchmarks)
#   2. in a clean Debian 12 minbase tree (mmdebstrap, cached and checked: cached_rootfs), which
#      must lack the test tools at first, `scripts/deps test` and then `scripts/deps bench`
#      leave every declared command of the group present and working (scripts/deps verify);
#      a second run installs nothing.
# The whole suite runs in a mount and PID namespace of its own: the tree is a tmpfs there,
# entered with chroot, with /proc, /dev and the caches mounted into it. The suite's shell is
# PID 1 there, so when it ends, however it ends, the kernel kills whatever still runs in the
# tree and the mounts vanish with the namespace (unshare passes a SIGTERM on). Downloaded .debs and pip wheels are kept in
# /var/cache/kube-vip-tools/fresh-{apt,pip,lists} so later runs only unpack (apt-get update
# still asks the mirror, which answers "not modified"). The Rust toolchain is a stated prerequisite, not installed
# by scripts/deps (DEPS_SKIP_RUST=1 here).
if [ -z "${KV_FRESH_NS:-}" ]; then
  exec unshare --mount --propagation private --pid --fork --kill-child=TERM \
    env KV_FRESH_NS=1 TAG="f$$" bash "$0" "$@"
fi
LIB_NO_BINARY=1 source "$(dirname "$0")/../lib.sh"
need mmdebstrap

CACHE=/var/cache/kube-vip-tools
TREE=$CACHE/bookworm-minbase.tar
APT_CACHE=$CACHE/fresh-apt
PIP_CACHE=$CACHE/fresh-pip
LISTS=$CACHE/fresh-lists # apt's package lists: apt-get update then only asks what changed
T0=$(now_ms)

# ---------- 1. every need is declared ----------
# needs_in FILE...: "FILE CMD..." for each `need` line (the words after it, up to a comment).
needs_in() {
  awk '$1 == "need" && FILENAME !~ /tests\/lib\.sh$/ {
         out = FILENAME
         for (i = 2; i <= NF && $i !~ /^#/; i++) if ($i ~ /^[A-Za-z0-9._+\/-]+$/) out = out " " $i
         print out }' "$@"
}
files=$(cd "$ROOT" && grep -rlE '^\s*need [A-Za-z]' tests qemu scripts bench image 2>/dev/null || true)
declared_ok=1
n_files=0
while read -r f cmds; do
  [ -n "$f" ] || continue
  n_files=$((n_files + 1))
  case $f in bench/* | scripts/bench) group=bench ;; *) group=test ;; esac
  # shellcheck disable=SC2086 # one word per command
  if ! out=$("$ROOT/scripts/deps" declared "$group" $cmds 2>&1); then
    echo "#   $f: $out"
    declared_ok=0
  fi
done < <(cd "$ROOT" && [ -z "$files" ] || needs_in $files)
echo "#   $n_files files say \`need\`"
check "every \`need\` in the suites, benches and demo is declared in scripts/deps for its group" \
  test "$declared_ok" = 1 -a "$n_files" -gt 0

# ---------- 2. scripts/deps in a clean Debian 12 ----------
cached_rootfs "$TREE" --variant=minbase
# One such check at a time on this machine: they share the download caches, and apt in one
# tree would find the other's lock on them.
exec 7>"$CACHE/fresh.lock"
t=$(now_ms)
flock 7
[ $(( $(now_ms) - t )) -lt 1000 ] || echo "#   waited $(( ($(now_ms) - t) / 1000 )) s for another fresh-machine check"
root=$WORK/root
mkdir -p "$root" "$APT_CACHE/partial" "$PIP_CACHE" "$LISTS/partial"
# Unmount before lib.sh's cleanup removes $WORK: $root/dev is the real /dev.
# (Lazily: what still runs in the tree is killed by the kernel once this shell, PID 1 of the
# namespace, is gone.)
fresh_cleanup() {
  local pid
  exec 2>/dev/null # bash reports the job killed here; that is expected
  for pid in $(jobs -p); do kill -9 "$pid" 2>/dev/null || true; done
  umount -R -l "$root" 2>/dev/null || true
  cleanup
}
trap fresh_cleanup EXIT
mount -t tmpfs -o size=4g,mode=0755 kv-fresh "$root"
t=$(now_ms)
tar -xf "$TREE" -C "$root"
echo "#   tree unpacked in $(( $(now_ms) - t )) ms"
# Only scripts/deps goes in: it must need nothing else of the project.
install -D -m 0755 "$ROOT/scripts/deps" "$root/root/kv/scripts/deps"
# The machine's network setup, not the project's: name servers, and the CA bundle and pip
# config through which this machine reaches Debian and PyPI (a fresh machine of this kind has
# them before anything of ours runs).
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
# (update-ca-certificates, run when a package pulls in ca-certificates, rebuilds the bundle
# from /usr/local/share/ca-certificates, so those go in too.)
for f in /etc/ssl/certs/ca-certificates.crt /etc/pip.conf /usr/local/share/ca-certificates/*.crt; do
  if [ -f "$f" ]; then install -D -m 0644 "$f" "$root$f"; fi
done
# A chroot, not a booted machine: no service may start (docker.io's postinst would try).
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"
# A throwaway tree: dpkg need not fsync every file.
echo force-unsafe-io >"$root/etc/dpkg/dpkg.cfg.d/kv-unsafe-io"
mkdir -p "$root/root/.cache/pip"
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount --bind "$APT_CACHE" "$root/var/cache/apt/archives"
mount --bind "$PIP_CACHE" "$root/root/.cache/pip"
mount --bind "$LISTS" "$root/var/lib/apt/lists"

# in_tree CMD...: CMD inside the tree as root, with a clean environment.
in_tree() {
  chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 DEPS_SKIP_RUST=1 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
}
# step LOG CMD...: CMD in the tree, output to $WORK/LOG (its tail shown when it fails).
step() {
  local log=$WORK/$1 rc=0
  shift
  # In the background: `wait` lets a SIGTERM's trap run at once, not after apt-get is done.
  in_tree "$@" >"$log" 2>&1 &
  wait $! || rc=$?
  [ "$rc" = 0 ] || sed 's/^/#   | /' "$log" | tail -n 25
  return "$rc"
}
DEPS=/root/kv/scripts/deps

bare_tree() { ! in_tree "$DEPS" verify test >/dev/null 2>&1; }
check "the clean tree lacks the test commands before scripts/deps runs (it is a fresh machine)" bare_tree
for group in test bench; do
  t=$(now_ms)
  check "scripts/deps $group in the clean tree: installs, then finds every declared $group command working" \
    step "deps-$group.log" "$DEPS" "$group"
  echo "#   scripts/deps $group took $(( ($(now_ms) - t) / 1000 )) s"
  check "scripts/deps verify $group: every command of 'scripts/deps commands $group' is there" \
    step "verify-$group.log" "$DEPS" verify "$group"
done
check "the commands were really checked (group test declares at least 20)" \
  test "$(in_tree "$DEPS" commands test | wc -l)" -ge 20
quiet_second_run() {
  local out
  out=$(in_tree "$DEPS" test 2>&1) && [ -z "$out" ] || { sed 's/^/#   | /' <<<"$out"; return 1; }
}
check "a second scripts/deps test installs nothing (quick when all is there)" quiet_second_run

echo "# fresh-machine check took $(( ($(now_ms) - T0) / 1000 )) s"
summary
