#!/usr/bin/env python3
"""``vgpu-backend`` with its control queue's CREATE_2D/UNREF batches answered by the floor.

The same process as ``vgpu-backend`` (options, vhost-user session, event loop, kick and
call eventfds, display socket), except that a kick finding a batch of 64 chains, each
one INDIRECT descriptor, has it answered by :func:`benchkit.floor_loop.serve_batch`:
no checks and no device layers.  Everything else goes to the real device.  It serves
``bench_2d.py``'s throughput phase only: what any Python back-end could reach end to
end on this machine, wake-ups included.  Not for guests: it trusts the ring blindly.
Exits 1 when it answered no batch itself (the measurement would be the device's).
It finds the ring's arrays on every such kick (about 7 us, a few percent of a batch's
CPU): views kept across kicks would keep guest memory mapped after QEMU removes it.

    python3 scripts/benchkit/floor_backend.py --socket-path PATH [vgpu-backend options]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

from benchkit.floor_loop import Ring, serve_batch  # noqa: E402
from protocol.virtqueue import (  # noqa: E402
    DescFlag,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from vgpu_backend.cli import main  # noqa: E402
from vgpu_backend.device import CONTROL_QUEUE, VirtioGpuDevice  # noqa: E402
from vgpu_backend.virtqueue import Virtqueue  # noqa: E402

BATCH = 64
_INDIRECT = int(DescFlag.INDIRECT)
_device_process = VirtioGpuDevice._process
_images: dict[int, np.ndarray] = {}
_answered = [0]  # batches the floor answered itself


def _ring(device: VirtioGpuDevice, queue: Virtqueue) -> tuple[np.ndarray, Ring] | None:
    """Guest RAM and the queue's ring as arrays, when all of it lies in a region at
    guest-physical 0 (guest-physical addresses are then offsets into it)."""
    if queue.addr is None or not device.state.memory.regions:
        return None
    region = device.state.memory.regions[0]
    memory = device.state.memory
    sizes = (desc_table_size(queue.num), avail_ring_size(queue.num),
             used_ring_size(queue.num))
    offsets = []
    for qva, size in zip(queue.addr, sizes, strict=True):
        found, offset = memory.qva_to_region(qva, size)
        if found is not region or region.gpa != 0:
            return None
        offsets.append(offset)
    desc, avail, used = offsets
    return region.array, Ring.over(region.array, queue.num, desc, avail, used)


def _process(device: VirtioGpuDevice, index: int) -> None:
    queue = device.queues[index]
    found = _ring(device, queue) if index == CONTROL_QUEUE and queue.ready and \
        queue.pending() == BATCH else None
    if found is not None:
        ram, ring = found
        heads = ring.heads(queue.last_avail, BATCH)
        if (ring.desc["flags"][heads] == _INDIRECT).all():
            serve_batch(ram, ring, heads, queue.used_idx, _images)
            queue.last_avail = (queue.last_avail + BATCH) & 0xFFFF
            queue.used_idx = (queue.used_idx + BATCH) & 0xFFFF
            if queue.event_idx:
                ring.avail_event[0] = queue.last_avail
            queue.notify()
            _answered[0] += 1
            return
    _device_process(device, index)


if __name__ == "__main__":
    setattr(VirtioGpuDevice, "_process", _process)  # noqa: B010 (mypy: a method)
    status = main()
    if status == 0 and not _answered[0]:
        print("floor_backend: no batch was answered by the floor", file=sys.stderr)
        status = 1
    sys.exit(status)
