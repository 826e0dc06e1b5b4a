#!/bin/sh
# Install what scripts/vm.py needs on a Debian 12 (bookworm) host.  Run as root.
# Idempotent and quiet: when everything is present it only runs dpkg-query.
#
#   QEMU 10 from bookworm-backports (Debian 12's QEMU 7.2 refuses vhost-user without KVM),
#   busybox-static for the guest initramfs, e2fsprogs + debootstrap for the optional
#   Debian guest image, and Debian's python3-numpy/python3-pytest/python3-construct because
#   the default guest root is this host's own root filesystem shared read-only over 9p
#   (the guest tests import the protocol package, which needs construct);
#   python3-pytest-timeout gives each guest test its own time limit (vm.py test);
#   valgrind counts instructions for scripts/bench_instructions.py (and its test).
set -eu

BACKPORTS_SOURCES=/etc/apt/sources.list.d/bookworm-backports.sources
BACKPORTS_PACKAGES="qemu-system-x86 qemu-system-gui qemu-utils"
DEBIAN_PACKAGES="busybox-static cpio xz-utils e2fsprogs debootstrap python3 python3-venv python3-pip python3-numpy python3-pytest python3-pytest-timeout python3-construct valgrind"

if [ "$(id -u)" -ne 0 ]; then
    echo "setup-host.sh: must run as root" >&2
    exit 1
fi
if ! grep -q 'VERSION_CODENAME=bookworm' /etc/os-release; then
    echo "setup-host.sh: expected Debian 12 (bookworm), found:" >&2
    grep PRETTY_NAME /etc/os-release >&2 || true
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
APT_QUIET="-q -o Dpkg::Use-Pty=0 -o APT::Sandbox::User=root"

# Packages whose status is not "install ok installed".
missing_packages() {
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
            printf '%s\n' "$pkg"
        fi
    done
}

# QEMU must come from backports (>= 10); a bookworm 7.2 install counts as missing.
qemu_is_backports() {
    version=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
    case "$version" in
        *bpo12*) return 0 ;;
        *) return 1 ;;
    esac
}

APT_LOG=$(mktemp)
trap 'rm -f "$APT_LOG"' EXIT

# Run apt-get quietly; show its output only when it fails.
apt_quiet() {
    # shellcheck disable=SC2086
    if ! apt-get $APT_QUIET "$@" >"$APT_LOG" 2>&1; then
        cat "$APT_LOG" >&2
        echo "setup-host.sh: apt-get $* failed" >&2
        exit 1
    fi
}

apt_updated=no
apt_update_once() {
    if [ "$apt_updated" = no ]; then
        apt_quiet update
        apt_updated=yes
    fi
}

if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat >"$BACKPORTS_SOURCES" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    echo "setup-host.sh: added $BACKPORTS_SOURCES"
    apt_update_once
fi

# shellcheck disable=SC2086
missing_debian=$(missing_packages $DEBIAN_PACKAGES)
# shellcheck disable=SC2086
missing_backports=$(missing_packages $BACKPORTS_PACKAGES)
if ! qemu_is_backports; then
    missing_backports=$BACKPORTS_PACKAGES
fi

if [ -n "$missing_debian" ] || [ -n "$missing_backports" ]; then
    apt_update_once
    # A fresh machine has no package lists at all: `apt-get download` of the guest
    # kernel (scripts/vmrunner/kernel.py) needs them too, and update above provides them.
    if [ -n "$missing_debian" ]; then
        echo "setup-host.sh: installing" $missing_debian
        # shellcheck disable=SC2086
        apt_quiet install -y --no-install-recommends $missing_debian
    fi
    if [ -n "$missing_backports" ]; then
        echo "setup-host.sh: installing from bookworm-backports:" $missing_backports
        # shellcheck disable=SC2086
        apt_quiet install -y --no-install-recommends -t bookworm-backports $missing_backports
    fi
fi

if [ ! -x /usr/lib/qemu/vhost-user-gpu ]; then
    echo "setup-host.sh: /usr/lib/qemu/vhost-user-gpu is missing after install" >&2
    exit 1
fi
if ! apt-cache pkgnames linux-image-6.1.0- 2>/dev/null | grep -q 'amd64$'; then
    apt_update_once
fi
