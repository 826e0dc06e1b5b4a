#!/bin/sh
# A documented QEMU command line for vgpu-backend (QEMU >= 10.0; 7.2 refuses vhost-user
# without KVM).  Usage:  qemu/run-qemu.sh KERNEL INITRD [EXTRA QEMU ARGS...]
#
# The back-end listens on a unix socket; QEMU connects to it with a socket chardev.
# Guest RAM must be a shareable fd-backed object (memfd, share=on) so the back-end can
# map it: the guest's pages ARE the GPU buffers for USERPTR blobs.
set -eu
KERNEL=${1:?usage: run-qemu.sh KERNEL INITRD [QEMU ARGS...]}
INITRD=${2:?usage: run-qemu.sh KERNEL INITRD [QEMU ARGS...]}
shift 2
SOCK=${VGPU_SOCKET:-/tmp/vgpu-backend.sock}
RAM=${VGPU_RAM:-2G}

# 1. the back-end (exits 0 when QEMU disconnects)
vgpu-backend --socket-path "$SOCK" &
BACKEND=$!
while [ ! -S "$SOCK" ]; do sleep 0.05; done

# 2. QEMU:
#  -object memory-backend-memfd,share=on + -numa  guest RAM the back-end can mmap
#  -chardev socket,path=...                         the vhost-user socket
#  -device vhost-user-gpu-pci,chardev=...           the front-end device (max_outputs=N
#                                                   must match vgpu-backend --max-outputs)
#  accel=tcg                                         KVM works too where it works
exec qemu-system-x86_64 \
    -machine q35,accel="${VGPU_ACCEL:-tcg}" -cpu max -m "$RAM" \
    -object memory-backend-memfd,id=mem,size="$RAM",share=on -numa node,memdev=mem \
    -chardev socket,id=vgpu,path="$SOCK" \
    -device vhost-user-gpu-pci,chardev=vgpu \
    -display "${VGPU_DISPLAY:-none}" -serial mon:stdio \
    -kernel "$KERNEL" -initrd "$INITRD" -append "console=ttyS0" \
    "$@"
# (the back-end, $BACKEND, exits by itself when QEMU goes away)
