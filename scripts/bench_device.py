#!/usr/bin/env python3
"""Benchmark: the device's own command processing, in process, without IPC.

Lays out a control queue in memfd guest RAM (INDIRECT chains, as Linux builds them),
then times ``VirtioGpuDevice.process()`` over batches of 64 commands: the cost of
popping, decoding, executing, answering and pushing, with no socket, eventfd wake-up
or scheduler in the measurement (those dominate ``bench_2d.py`` on a loaded machine).
The device is configured as ``vgpu-backend`` configures it from the same options
(default: every feature on, the simulated host GPU).

    python3 scripts/bench_device.py [--batches 2000] [-- BACKEND-OPTIONS...]
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol.vhost_user import MemRegion
from protocol.virtio_gpu import CtrlHdr, ResourceCreate2d, ResourceUnref
from protocol.virtio_gpu_codes import Cmd, Format, Resp
from protocol.virtqueue import DescFlag
from protocol.wire import encode
from vgpu_backend.cli import parser as backend_parser
from vgpu_backend.config import BackendConfig, ConfigError, build_config
from vgpu_backend.device import VirtioGpuDevice
from vgpu_backend.eventloop import EventLoop
from vgpu_backend.guest_memory import GuestMemory
from vgpu_backend.runtime import open_host_gpu

RAM = 64 << 20
QSIZE = 256
DESC, AVAIL, USED = 0x10000, 0x11000, 0x12000  # guest-physical ring addresses
TABLES, CMDS = 0x20000, 0x40000
UADDR = 0x7F00_0000_0000


def build(batch: list[bytes], config: BackendConfig
          ) -> tuple[GuestMemory, VirtioGpuDevice, np.ndarray, EventLoop]:
    """A device whose control queue holds ``batch`` as INDIRECT chains."""
    fd = os.memfd_create("bench-ram")
    os.ftruncate(fd, RAM)
    memory = GuestMemory()
    memory.add(MemRegion(0, RAM, UADDR, 0), fd, 8)
    ram = memory.regions[0].array
    loop = EventLoop()
    device = VirtioGpuDevice(loop, memory, config.limits, config.device,
                             open_host_gpu(config))
    for i, command in enumerate(batch):
        cmd_at, resp_at, table_at = CMDS + i * 256, CMDS + i * 256 + 128, TABLES + i * 32
        ram[cmd_at:cmd_at + len(command)] = np.frombuffer(command, np.uint8)
        table = struct.pack("<QIHHQIHH", cmd_at, len(command), DescFlag.NEXT, 1,
                            resp_at, 24, DescFlag.WRITE, 0)
        ram[table_at:table_at + 32] = np.frombuffer(table, np.uint8)
        ram[DESC + 16 * i:DESC + 16 * i + 16] = np.frombuffer(
            struct.pack("<QIHH", table_at, 32, DescFlag.INDIRECT, 0), np.uint8)
        ram[AVAIL + 4 + 2 * i:AVAIL + 6 + 2 * i] = np.frombuffer(struct.pack("<H", i), np.uint8)
    queue = device.queues[0]
    queue.set_num(QSIZE)
    queue.set_addr(UADDR + DESC, UADDR + USED, UADDR + AVAIL)
    queue.set_base(0)
    queue.started = queue.enabled = True
    avail_idx = ram[AVAIL + 2:AVAIL + 4].view("<u2")
    return memory, device, avail_idx, loop


def main() -> int:
    """Run and print commands per second."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("backend_options", nargs="*", metavar="BACKEND-OPTIONS",
                    help="vgpu-backend options (after --), e.g. --no-compute")
    args = ap.parse_args()
    try:
        config = build_config(backend_parser().parse_args(
            ["--socket-path", "unused", *args.backend_options]))
    except ConfigError as err:
        raise SystemExit(f"bench_device: {err}") from None
    batch = []
    for i in range(32):
        batch.append(encode(CtrlHdr(Cmd.RESOURCE_CREATE_2D)) + encode(
            ResourceCreate2d(5000 + i, Format.B8G8R8X8_UNORM, 64, 64)))
        batch.append(encode(CtrlHdr(Cmd.RESOURCE_UNREF)) + encode(ResourceUnref(5000 + i)))
    memory, device, avail_idx, loop = build(batch, config)
    queue = device.queues[0]
    ram = memory.regions[0].array
    times = []
    for n in range(args.batches + 50):
        # republish the same 64 heads (the ring index wraps; the table stays in place)
        for i in range(64):
            slot = (queue.last_avail + i) % QSIZE
            ram[AVAIL + 4 + 2 * slot:AVAIL + 6 + 2 * slot] = np.frombuffer(
                struct.pack("<H", i), np.uint8)
        avail_idx[0] = (queue.last_avail + 64) & 0xFFFF
        start = time.perf_counter()
        device.process(0)
        if n >= 50:
            times.append(time.perf_counter() - start)
    resp = int.from_bytes(bytes(ram[CMDS + 128:CMDS + 132]), "little")
    if resp != Resp.OK_NODATA or device.internal_errors:
        raise SystemExit(f"unexpected response {resp:#x}")
    per_batch = float(np.median(times))
    print(f"in-process CREATE_2D+UNREF, 64 per batch: {per_batch * 1e6:.1f} us per batch, "
          f"{per_batch / 64 * 1e6:.2f} us per command, {64 / per_batch:,.0f} commands/s")
    device.close()
    memory.clear()
    if device.state.host_gpu is not None:
        device.state.host_gpu.close()
    loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
