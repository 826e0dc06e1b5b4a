#!/bin/sh
# Set up a fresh Debian 12 machine and run every test: lint, types, host-side tests
# (unit, protocol, simulated KFD, front-end simulator against our back-end and QEMU's C
# reference), then the guest suite in a real VM (QEMU 10, TCG) against our back-end
# (Linux DRM path + userspace driver) and the 2D subset against the C reference.
#
#   sh scripts/test.sh            (as root, or with sudo available)
#
# VM logs and screendumps go to $VGPU_RESULTS_DIR (default /tmp/vgpu-results).  Each VM step
# has its own --timeout (the guest suite runs ~1 min, boot takes 5-50 s under TCG); inside
# the guest each test also has vm.py's --per-test-timeout (pytest-timeout).
set -eu
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi

step() { printf '\n=== %s (%s)\n' "$1" "$(date +%T)"; }

step "host setup: QEMU 10 from bookworm-backports, guest tooling"
$SUDO sh scripts/setup-host.sh
step "python packages"
. scripts/python-env.sh
$PY -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'

step "ruff"
$PY -m ruff check .
step "mypy --strict"
$PY -m mypy
step "host tests (pytest tests/)"
$PY -m pytest -q -p no:cacheprovider tests

step "VM: guest console on vgpu-backend (QMP screendump check)"
$PY scripts/vm.py console-check --backend ours --timeout 300 \
    --screenshot "${VGPU_RESULTS_DIR:-/tmp/vgpu-results}/console-ours.png"
step "VM: guest suite on vgpu-backend (DRM path + userspace driver)"
$PY scripts/vm.py test --backend ours --second-gpu --timeout 900
step "VM: guest suite on vgpu-backend busy-polling (--poll-max-us 500)"
$PY scripts/vm.py test --backend ours --backend-arg=--poll-max-us=500 --second-gpu \
    --timeout 900
step "VM: DRM suite behind vhost-user-vga (libvirt's device for a primary video), 2 heads"
$PY scripts/vm.py test --backend ours --gpu-device vhost-user-vga --heads 2 \
    --no-second-gpu --timeout 600
step "VM: userspace-driver suite with guest RAM on host huge pages (hugetlb=on)"
if [ "$(id -u)" = 0 ]; then
    $PY scripts/vm.py test --backend ours --second-gpu --host-hugetlb --timeout 600 \
        -- -k userspace
else
    echo "skipped: --host-hugetlb raises vm.nr_hugepages for the run, which needs root"
fi
step "VM: guest suite on QEMU's C reference back-end (2D subset)"
$PY scripts/vm.py test --backend reference --second-gpu --timeout 900
step "all tests passed"
