#!/bin/sh
# A documented QEMU command line for vgpu-backend (QEMU >= 10.0; 7.2 refuses vhost-user
# without KVM).  Usage:  qemu/run-qemu.sh KERNEL INITRD [EXTRA QEMU ARGS...]
#
# The back-end listens on a unix socket; QEMU connects to it with a socket chardev.
# Guest RAM must be a shareable fd-backed object (memfd, share=on) so the back-end can
# map it: the guest's pages ARE the GPU buffers for USERPTR blobs.
#
# Environment: VGPU_SOCKET (default /tmp/vgpu-backend.sock), VGPU_RAM (2G), VGPU_ACCEL
# (tcg), VGPU_DISPLAY (none), VGPU_BACKEND_CMD (default: vgpu-backend from PATH, else
# this checkout's .venv, else python3 -m vgpu_backend from this checkout).
set -eu
KERNEL=${1:?usage: run-qemu.sh KERNEL INITRD [QEMU ARGS...]}
INITRD=${2:?usage: run-qemu.sh KERNEL INITRD [QEMU ARGS...]}
shift 2
for file in "$KERNEL" "$INITRD"; do  # before a back-end starts for nothing
    [ -r "$file" ] || { echo "run-qemu.sh: cannot read $file" >&2; exit 1; }
done
SOCK=${VGPU_SOCKET:-/tmp/vgpu-backend.sock}
RAM=${VGPU_RAM:-2G}
REPO=$(cd "$(dirname "$0")/.." && pwd)

if [ -n "${VGPU_BACKEND_CMD:-}" ]; then
    BACKEND_CMD=$VGPU_BACKEND_CMD
elif command -v vgpu-backend >/dev/null; then
    BACKEND_CMD=vgpu-backend
elif [ -x "$REPO/.venv/bin/vgpu-backend" ]; then
    BACKEND_CMD=$REPO/.venv/bin/vgpu-backend
else
    BACKEND_CMD="env PYTHONPATH=$REPO python3 -m vgpu_backend"
fi

# 1. the back-end (it exits 0 when QEMU disconnects, and removes its socket file once
#    QEMU is connected).  A socket file nothing listens on is left by a back-end that
#    was killed: the back-end replaces it; one that something listens on is refused.
listening() {  # is a unix socket listening on path $1?  (/proc/net/unix flag 0x10000)
    awk -v path="$1" 'NR > 1 && $4 == "00010000" && $8 == path { found = 1 }
                      END { exit !found }' /proc/net/unix
}
if [ -e "$SOCK" ] && listening "$SOCK"; then
    echo "run-qemu.sh: $SOCK is in use (another back-end?); set VGPU_SOCKET" >&2
    exit 1
fi
# shellcheck disable=SC2086  # BACKEND_CMD may be a command with arguments
$BACKEND_CMD --socket-path "$SOCK" &
BACKEND=$! QEMU=
stop_all() {
    [ -z "$QEMU" ] || kill "$QEMU" 2>/dev/null || true
    kill "$BACKEND" 2>/dev/null || true
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
waited=0
until listening "$SOCK"; do  # QEMU's chardev connects once, without retrying
    if ! kill -0 "$BACKEND" 2>/dev/null; then
        wait "$BACKEND" || status=$?
        echo "run-qemu.sh: the back-end exited (status ${status:-0}) before listening" >&2
        exit 1
    fi
    waited=$((waited + 1))
    if [ "$waited" -gt 600 ]; then
        echo "run-qemu.sh: the back-end did not listen on $SOCK within 30 s" >&2
        exit 1
    fi
    sleep 0.05
done

# 2. QEMU:
#  -object memory-backend-memfd,share=on + -numa  guest RAM the back-end can mmap
#  -chardev socket,path=...                         the vhost-user socket
#  -device vhost-user-gpu-pci,chardev=...           the front-end device (max_outputs=N
#                                                   must match vgpu-backend --max-outputs)
#  -vga none                                        no default VGA besides it (QEMU adds
#                                                   one for a GPU that is not VGA-class)
#  accel=tcg                                        KVM works too where it works
# QEMU runs in the background so that a signal to this script stops QEMU and the
# back-end at once (sh runs traps only between commands); it keeps the terminal as its
# stdin (fd 3: a background command's own stdin would be /dev/null).
exec 3<&0
qemu-system-x86_64 \
    -machine q35,accel="${VGPU_ACCEL:-tcg}" -cpu max -m "$RAM" \
    -object memory-backend-memfd,id=mem,size="$RAM",share=on -numa node,memdev=mem \
    -chardev socket,id=vgpu,path="$SOCK" \
    -device vhost-user-gpu-pci,chardev=vgpu -vga none \
    -display "${VGPU_DISPLAY:-none}" -serial mon:stdio \
    -kernel "$KERNEL" -initrd "$INITRD" -append "console=ttyS0" \
    "$@" <&3 3<&- &
QEMU=$!
status=0
wait "$QEMU" || status=$?
QEMU=
if [ "$status" -ne 0 ] || listening "$SOCK"; then
    exit "$status"  # QEMU failed or never connected: stop_all ends the back-end
fi
# the back-end exits by itself once QEMU has gone: wait for its leak-check verdict
trap - EXIT
wait "$BACKEND"
