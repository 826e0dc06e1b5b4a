#!/bin/sh
# Set up a fresh Debian 12 machine and run the main job: boot a VM (QEMU 10, TCG) whose
# GPU is vgpu-backend, run a guest program that registers its own buffer as a USERPTR
# blob and computes saxpy and a matrix multiply on it on the (simulated) host GPU with
# zero copies, verify the results in guest memory, and save a screenshot.
#
#   sh scripts/demo.sh [--size-mib N]     (as root, or with sudo available)
set -eu
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
echo "=== host setup (QEMU 10 from bookworm-backports; quick when already done)"
$SUDO sh scripts/setup-host.sh
. scripts/python-env.sh
$PY -m pip install --quiet --disable-pip-version-check -e .
RESULTS=${VGPU_RESULTS_DIR:-/tmp/vgpu-results}
echo "=== VM demo on vgpu-backend"
$PY scripts/vm.py demo --backend ours --screenshot "$RESULTS/demo.png" "$@"
echo "=== screenshot: $RESULTS/demo.png"
