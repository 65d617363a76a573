#!/usr/bin/env bash
# Buildroot post-build script for the kube-vip appliance.
# $1: the target directory. Runs after the rootfs overlay has been copied.
set -euo pipefail

target=${1:?usage: post-build.sh TARGET_DIR}

# The overlay's scripts must be executable; git keeps the mode, but an
# archive or a copy made with the wrong tool may not.
chmod 0755 "$target/init" "$target"/usr/libexec/kube-vip-appliance/*

# Our /etc/inittab runs our sysinit only. Init scripts other packages put in
# /etc/init.d are not run; say so rather than let them be silently ignored.
shopt -s nullglob
unused=("$target"/etc/init.d/S*)
if ((${#unused[@]})); then
	echo "post-build.sh: note: the appliance's inittab does not run /etc/init.d scripts (installed: ${unused[*]##*/})" >&2
fi

if [[ -x $target/usr/bin/kube-vip ]]; then
	kube_vip_sum=$(sha256sum "$target/usr/bin/kube-vip" | cut -c1-16)
else
	echo "post-build.sh: WARNING: no /usr/bin/kube-vip in the image (enable BR2_PACKAGE_KUBE_VIP)" >&2
	kube_vip_sum=missing
fi

# Printed by sysinit at boot, next to the kernel version.
mkdir -p "$target/etc/kube-vip-appliance"
{
	echo "image=buildroot-${BR2_VERSION:-unknown}"
	echo "kube_vip=real"
	echo "kube_vip_sha256=$kube_vip_sum"
} >"$target/etc/kube-vip-appliance/build-info"
