################################################################################
#
# kube-vip
#
################################################################################

# Installed from a prebuilt static musl binary (BR2_PACKAGE_KUBE_VIP_PREBUILT_PATH),
# not built with the cargo package infrastructure: see README.md of this
# BR2_EXTERNAL tree for the reasons. There is nothing to download, so the
# package has no version, site or source.
KUBE_VIP_LICENSE = Apache-2.0
# Copying a static binary needs no cross compiler.
KUBE_VIP_ADD_TOOLCHAIN_DEPENDENCY = NO

# Empty option: the cargo output of the repository holding this tree.
KUBE_VIP_PREBUILT = $(or $(call qstrip,$(BR2_PACKAGE_KUBE_VIP_PREBUILT_PATH)),$(BR2_EXTERNAL_KUBE_VIP_PATH)/../target/x86_64-unknown-linux-musl/release/kube-vip)

# "Build" = check the binary and take a copy, so that the target is installed
# from what was checked even if the file changes meanwhile. The target has no
# loader or libc for it if it is not static.
define KUBE_VIP_BUILD_CMDS
	@if [ ! -f '$(KUBE_VIP_PREBUILT)' ]; then \
		echo "kube-vip: prebuilt binary '$(KUBE_VIP_PREBUILT)' not found." >&2; \
		echo "kube-vip: build it (scripts/build in the kube-vip repository) or set BR2_PACKAGE_KUBE_VIP_PREBUILT_PATH." >&2; \
		exit 1; \
	fi
	@desc=`file -bL '$(KUBE_VIP_PREBUILT)'`; \
	case "$$desc" in \
	*"ELF 64-bit"*x86-64*) ;; \
	*) echo "kube-vip: '$(KUBE_VIP_PREBUILT)' is not an x86-64 ELF binary: $$desc" >&2; exit 1 ;; \
	esac; \
	case "$$desc" in \
	*"statically linked"* | *"static-pie linked"*) ;; \
	*) echo "kube-vip: '$(KUBE_VIP_PREBUILT)' is not statically linked (build it for x86_64-unknown-linux-musl): $$desc" >&2; exit 1 ;; \
	esac
	$(INSTALL) -D -m 0755 '$(KUBE_VIP_PREBUILT)' $(@D)/kube-vip
endef

define KUBE_VIP_INSTALL_TARGET_CMDS
	$(INSTALL) -D -m 0755 $(@D)/kube-vip $(TARGET_DIR)/usr/bin/kube-vip
endef

$(eval $(generic-package))
