#!/usr/bin/env python3
"""Benchmark: the device's own command processing, in process, without IPC.

Lays out a control queue in memfd guest RAM (INDIRECT chains, as Linux builds them),
then times ``VirtioGpuDevice.process()`` over batches of 64 commands: the cost of
popping, decoding, executing, answering and pushing, with no socket, eventfd wake-up
or scheduler in the measurement (those dominate ``bench_2d.py`` on a loaded machine).
The device is configured as ``vgpu-backend`` configures it from the same options
(default: every feature on, the simulated host GPU).

In the same run it splits that cost: the command handlers alone (called straight
with the decoded commands), and a bare loop over the same ring and commands that does
only the work with no checks, no error handling and no layers -- the floor of CPython
for these bytes, not a device.  A last measurement does the bare loop's work with the
ring side vectorised (numpy over the batch's heads, descriptors, headers, answers and
used entries; only the images stay a Python loop): the other way to spend less
Python per command.

    python3 scripts/bench_device.py [--batches 2000] [-- BACKEND-OPTIONS...]
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchkit.floor_loop import Ring, serve_batch

from protocol.vhost_user import MemRegion
from protocol.virtio_gpu import CTRL_HDR_SIZE, CtrlHdr, ResourceCreate2d, ResourceUnref
from protocol.virtio_gpu_codes import Cmd, Format, Resp
from protocol.virtqueue import DescFlag, VirtqDesc, VirtqUsedElem
from protocol.wire import decode, encode, layout
from vgpu_backend.cli import parser as backend_parser
from vgpu_backend.config import BackendConfig, ConfigError, build_config
from vgpu_backend.device import VirtioGpuDevice
from vgpu_backend.eventloop import EventLoop
from vgpu_backend.guest_memory import GuestMemory
from vgpu_backend.runtime import open_host_gpu
from vgpu_backend.virtqueue import Virtqueue

RAM = 64 << 20
QSIZE = 256
DESC, AVAIL, USED = 0x10000, 0x11000, 0x12000  # guest-physical ring addresses
TABLES, CMDS = 0x20000, 0x40000
UADDR = 0x7F00_0000_0000
BATCH = 64
WARM_UP = 50  # untimed runs before each measurement


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
    batch = create_unref_batch()
    memory, device, avail_idx, loop = build(batch, config)
    queue = device.queues[0]
    ram = memory.regions[0].array
    republish = republisher(memory, queue, avail_idx)
    per_batch = median_seconds(lambda: device.process(0), args.batches, prepare=republish)
    resp = int.from_bytes(bytes(ram[CMDS + 128:CMDS + 132]), "little")
    if resp != Resp.OK_NODATA or device.internal_errors:
        raise SystemExit(f"unexpected response {resp:#x}")
    handlers = time_handlers(device, batch, args.batches)
    bare = time_bare_loop(memory, args.batches)
    vectorised = time_vectorised_loop(memory, args.batches)
    print(f"in-process CREATE_2D+UNREF, 64 per batch: {per_batch * 1e6:.1f} us per batch, "
          f"{per_batch / BATCH * 1e6:.2f} us per command, {BATCH / per_batch:,.0f} commands/s")
    print(f"  command handlers alone:       {handlers / BATCH * 1e6:.2f} us per command")
    print(f"  queue path (the rest):        {(per_batch - handlers) / BATCH * 1e6:.2f} us "
          "per command (pop, decode, answer, push)")
    print(f"  bare loop, no checks (floor): {bare / BATCH * 1e6:.2f} us per command "
          f"({per_batch / bare:.1f}x less than the device)")
    print(f"  same, ring side in numpy:     {vectorised / BATCH * 1e6:.2f} us per command "
          f"({vectorised / bare:.2f}x the bare loop)")
    device.close()
    memory.clear()
    if device.state.host_gpu is not None:
        device.state.host_gpu.close()
    loop.close()
    return 0


def create_unref_batch() -> list[bytes]:
    """The 64 commands: RESOURCE_CREATE_2D and RESOURCE_UNREF of 32 64x64 images."""
    batch = []
    for i in range(32):
        batch.append(encode(CtrlHdr(Cmd.RESOURCE_CREATE_2D)) + encode(
            ResourceCreate2d(5000 + i, Format.B8G8R8X8_UNORM, 64, 64)))
        batch.append(encode(CtrlHdr(Cmd.RESOURCE_UNREF)) + encode(ResourceUnref(5000 + i)))
    return batch


def republisher(memory: GuestMemory, queue: Virtqueue,
                avail_idx: np.ndarray) -> Callable[[], None]:
    """What makes the same 64 heads available again (the ring index wraps; the table
    stays in place)."""
    ring = memory.regions[0].array[AVAIL + 4:AVAIL + 4 + 2 * QSIZE].view("<u2")
    heads = np.arange(BATCH, dtype=np.uint16)

    def republish() -> None:  # one array store: not a cost to count with the device's
        ring[(queue.last_avail + heads) % QSIZE] = heads
        avail_idx[0] = (queue.last_avail + BATCH) & 0xFFFF
    return republish


def handler_run(device: VirtioGpuDevice, batch: list[bytes]) -> Callable[[], None]:
    """What runs the device's own handlers on ``batch`` once (decoded headers in hand,
    no ring)."""
    table = device.commands_2d.handlers()
    work = []
    for command in batch:
        hdr = decode(CtrlHdr, command[:CTRL_HDR_SIZE])
        work.append((table[hdr.type], hdr, command))

    def run() -> None:
        for handler, hdr, command in work:
            handler(hdr, command)
    return run


def median_seconds(run: Callable[[], object], batches: int,
                   prepare: Callable[[], object] | None = None) -> float:
    """Median seconds of ``run()`` over ``batches`` calls after WARM_UP untimed ones;
    ``prepare()``, if given, runs before each call, untimed."""
    times = []
    for n in range(batches + WARM_UP):
        if prepare is not None:
            prepare()
        start = time.perf_counter()
        run()
        if n >= WARM_UP:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def time_handlers(device: VirtioGpuDevice, batch: list[bytes], batches: int) -> float:
    """Median seconds for the device's own handlers to run ``batch`` (decoded header
    in hand, no ring): what the commands cost without the queue path."""
    seconds = median_seconds(handler_run(device, batch), batches)
    table = device.commands_2d.handlers()
    answers = set()
    for command in batch:
        hdr = decode(CtrlHdr, command[:CTRL_HDR_SIZE])
        answers.add(getattr(table[hdr.type](hdr, command), "resp", None))
    if answers != {Resp.OK_NODATA}:
        raise SystemExit(f"handlers: unexpected answers {answers}")
    return seconds


def prepare_loop(memory: GuestMemory) -> None:
    """Set the rings up for a loop measurement: avail slot i holds head i (descriptor i
    holds command i); the answers and the used ring are cleared (what the device wrote:
    :func:`check_loop` must see the loop's own)."""
    view = memory.regions[0].view
    struct.pack_into(f"<{BATCH}H", view, AVAIL + 4, *range(BATCH))
    for i in range(BATCH):
        view[CMDS + 256 * i + 128:CMDS + 256 * i + 128 + CTRL_HDR_SIZE] = bytes(CTRL_HDR_SIZE)
    view[USED:USED + 4 + 8 * BATCH] = bytes(4 + 8 * BATCH)


def check_loop(memory: GuestMemory, name: str, images: dict[int, np.ndarray]) -> None:
    """Exit unless the loop answered every command OK, dropped every image and pushed
    every head in order with a header's length."""
    view = memory.regions[0].view
    answers = {struct.unpack_from("<I", view, CMDS + 256 * i + 128)[0] for i in range(BATCH)}
    used = struct.unpack_from(f"<2H{2 * BATCH}I", view, USED)
    if answers != {Resp.OK_NODATA} or images or used[1] != BATCH or \
            used[2::2] != tuple(range(BATCH)) or set(used[3::2]) != {CTRL_HDR_SIZE}:
        raise SystemExit(f"{name}: answers {answers}, used ring {used[:6]}...")


def time_bare_loop(memory: GuestMemory, batches: int) -> float:
    """Median seconds for the least Python that does this batch's work on the same
    rings: read each head's INDIRECT pair and command, create or drop a 64x64 image in
    a dict, write the response and the used entry.  No checks of any kind."""
    view = memory.regions[0].view
    # the project's wire structs; two descriptors in one call, as the device's fast path
    unpack_desc = layout(VirtqDesc).struct.unpack_from
    unpack_pair = struct.Struct("<QIHHQIHH").unpack_from
    hdr, create = layout(CtrlHdr).struct, layout(ResourceCreate2d).struct.unpack_from
    unref = layout(ResourceUnref).struct.unpack_from
    used_elem = layout(VirtqUsedElem).struct.pack_into
    heads = struct.Struct(f"<{BATCH}H")
    images: dict[int, np.ndarray] = {}
    resp_ok, resp_bad = int(Resp.OK_NODATA), int(Resp.ERR_INVALID_RESOURCE_ID)
    prepare_loop(memory)

    def batch() -> None:
        for used, head in enumerate(heads.unpack_from(view, AVAIL + 4)):
            table = unpack_desc(view, DESC + 16 * head)[0]
            cmd_at, cmd_len, _, _, resp_at, _, _, _ = unpack_pair(view, table)
            data = view[cmd_at:cmd_at + min(cmd_len, 128)].tobytes()
            if hdr.unpack_from(data)[0] == Cmd.RESOURCE_CREATE_2D:
                rid, _fmt, width, height = create(data, CTRL_HDR_SIZE)
                images[rid] = np.zeros((height, width * 4), np.uint8)
                resp = resp_ok
            else:
                resp = resp_ok if images.pop(unref(data, CTRL_HDR_SIZE)[0], None) \
                    is not None else resp_bad
            hdr.pack_into(view, resp_at, resp, 0, 0, 0, 0, b"")
            used_elem(view, USED + 4 + 8 * used, head, CTRL_HDR_SIZE)
        struct.pack_into("<H", view, USED + 2, BATCH)

    seconds = median_seconds(batch, batches)
    check_loop(memory, "bare loop", images)
    return seconds


def time_vectorised_loop(memory: GuestMemory, batches: int) -> float:
    """Median seconds for the bare loop's work with the ring side as whole-batch numpy
    operations (``benchkit.floor_loop``, also ``bench_2d.py``'s ``floor`` back-end):
    the images are the only per-command Python.  No checks."""
    ram = memory.regions[0].array
    ring = Ring.over(ram, QSIZE, DESC, AVAIL, USED)
    images: dict[int, np.ndarray] = {}
    prepare_loop(memory)
    seconds = median_seconds(lambda: serve_batch(ram, ring, ring.heads(0, BATCH), 0, images),
                             batches)
    check_loop(memory, "vectorised loop", images)
    return seconds


if __name__ == "__main__":
    sys.exit(main())
