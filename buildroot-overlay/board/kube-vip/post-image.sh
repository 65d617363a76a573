#!/usr/bin/env bash
# Buildroot post-image script for the kube-vip appliance: wraps bzImage and
# rootfs.cpio.gz into the same bootable images as image/build, with the same
# tool (image/mkimages of the repository that holds this tree):
#   kube-vip-appliance.iso    hybrid ISO, BIOS (ISOLINUX) + UEFI (systemd-boot)
#   kube-vip-appliance.img    raw GPT disk, BIOS (SYSLINUX) + UEFI (systemd-boot)
#   kube-vip-appliance.qcow2  the same disk as qcow2 (when qemu-img is there)
# in $BINARIES_DIR, next to bzImage and rootfs.cpio.gz. The boot loader files
# and tools come from the build host's Debian packages (`scripts/deps test`
# installs them): Buildroot's syslinux package ships neither gptmbr.bin nor
# its installer, and its systemd-boot needs systemd as init.
# $1: the images directory (BINARIES_DIR).
set -euo pipefail

images=${1:-${BINARIES_DIR:?no images directory}}
board=$(cd "$(dirname "$0")" && pwd)
mkimages=$board/../../../image/mkimages
[[ -x $mkimages ]] || {
	echo "post-image.sh: $mkimages not found: this tree must stay inside the kube-vip repository" >&2
	exit 1
}
# The kernel command line of `qemu -kernel` boots (README.md).
cmdline="console=ttyS0 quiet panic=-1 cryptomgr.notests"
qcow2=()
command -v qemu-img >/dev/null || qcow2=(--no-qcow2)
"$mkimages" -o "$images" -k "$images/bzImage" -i "$images/rootfs.cpio.gz" -c "$cmdline" "${qcow2[@]}"
