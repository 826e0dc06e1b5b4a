"""Guest memory that appears and goes while the VM runs (a pc-dimm, ACPI hotplug).

QEMU hands the new memory to the back-end as ADD_MEM_REG, and takes it back with
REM_MEM_REG, while the rings are live.  A USERPTR buffer placed in the new memory is
read by the host GPU byte for byte; after the memory is gone the device serves on.
The host runner plugs and unplugs the DIMM when the guest asks
(scripts/vmrunner/memhotplug.py).
"""

from __future__ import annotations

import errno
import time
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import pytest

from guest_tests.guest_helpers import ControlChannel
from guest_tests.userspace.compute import ComputeContext, RunResult, dispatch
from guest_tests.userspace.gpu import VirtioGpu
from guest_tests.userspace.pinned import PinnedBuffer
from protocol.compute import Kernel, Status, buffer_arg, u64_arg
from protocol.virtio_gpu import ResourceUnref
from protocol.virtio_gpu_codes import Cmd, Resp

MEMORY = Path("/sys/devices/system/memory")
DIMM_MIB = 256
BUFFER_BYTES = 16 << 20


def memory_blocks(addr: int, size: int) -> list[Path]:
    """The sysfs memory blocks of ``[addr, addr + size)``."""
    block = int((MEMORY / "block_size_bytes").read_text(), 16)
    return [MEMORY / f"memory{index}" for index in range(addr // block, (addr + size) // block)]


def offline(blocks: list[Path], timeout: float = 20.0) -> None:
    """Offline every block (its pages migrate away), retrying while busy."""
    deadline = time.monotonic() + timeout
    for block in blocks:
        while (block / "state").read_text().strip() != "offline":
            try:
                (block / "state").write_text("offline")
            except OSError as error:
                if error.errno not in (errno.EBUSY, errno.EAGAIN) or \
                        time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def online_movable(blocks: list[Path]) -> None:
    """Online every block into ZONE_MOVABLE (offlining it first if the kernel onlined
    it into another zone by itself)."""
    for block in blocks:
        state = (block / "state").read_text().strip()
        if state == "online" and (block / "valid_zones").read_text().strip() == "Movable":
            continue
        if state == "online":
            offline([block])
        (block / "state").write_text("online_movable")
        assert (block / "valid_zones").read_text().strip() == "Movable"


def plug(channel: ControlChannel) -> tuple[str, int, int]:
    """Ask the host for a DIMM; its id, guest-physical address and size, once the guest
    kernel has added its memory blocks."""
    reply = channel.request(f"hotplug-memory size={DIMM_MIB}")
    assert reply.startswith("ok "), f"host hotplug failed: {reply}"
    fields = dict(word.split("=", 1) for word in reply.split()[1:])
    dimm, addr, size = fields["id"], int(fields["addr"], 16), int(fields["size"])
    deadline = time.monotonic() + 20
    while not all(block.exists() for block in memory_blocks(addr, size)):
        assert time.monotonic() < deadline, "the guest kernel did not add the DIMM's memory"
        time.sleep(0.1)
    return dimm, addr, size


@contextmanager
def hotplugged_dimm(channel: ControlChannel) -> Iterator[tuple[int, int]]:
    """A DIMM's (address, size), plugged and onlined into ZONE_MOVABLE for the block;
    then offlined (its pages migrate away) and unplugged, also when the block fails."""
    if not MEMORY.exists():
        pytest.skip("the guest kernel has no memory hotplug (/sys/devices/system/memory)")
    dimm, addr, size = plug(channel)
    blocks = memory_blocks(addr, size)
    try:
        try:
            online_movable(blocks)
            yield addr, size
        finally:
            offline(blocks)
    finally:
        reply = channel.request(f"unplug-memory id={dimm}")
    assert reply == "ok", f"host unplug failed: {reply}"


def gpu_crc(compute: ComputeContext, va: int, size: int) -> RunResult:
    """The host GPU's CRC-32 of ``size`` bytes at GPU address ``va``."""
    return compute.run([dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(va), u64_arg(size),
                                 cmd_id=1)])


def test_a_userptr_buffer_in_hotplugged_memory(
        gpu: VirtioGpu, compute: ComputeContext, control_channel: ControlChannel) -> None:
    # pinned after the DIMM is online: user pages come from the highest zone first, the
    # DIMM's ZONE_MOVABLE; the buffer goes before the DIMM is offlined
    with hotplugged_dimm(control_channel) as (addr, size), \
            PinnedBuffer(BUFFER_BYTES) as buffer:
        inside = np.count_nonzero((buffer.phys >= addr) & (buffer.phys < addr + size))
        assert inside == buffer.phys.shape[0], \
            f"only {inside} of {buffer.phys.shape[0]} pages landed in the DIMM"
        buffer.data[:] = np.random.default_rng(21).integers(0, 256, buffer.size,
                                                            dtype=np.uint8)
        blob = compute.register(buffer)
        (va,) = compute.map(blob)
        result = gpu_crc(compute, va, buffer.size)
        assert result.status is Status.OK, result.header
        assert result.value(0) == zlib.crc32(buffer.data.tobytes())
        gpu.unref(blob.resource_id)
    # the device serves on without the region, on the memory it had before
    assert gpu.command(Cmd.RESOURCE_UNREF, ResourceUnref(0xFE11D1)).name == \
        Resp.ERR_INVALID_RESOURCE_ID.name
    with PinnedBuffer(1 << 20) as buffer:
        buffer.data[:] = 7
        blob = compute.register(buffer)
        (va,) = compute.map(blob)
        assert gpu_crc(compute, va, buffer.size).value(0) == zlib.crc32(buffer.data.tobytes())
        gpu.unref(blob.resource_id)


def test_a_userptr_blob_whose_memory_is_unplugged_is_torn_down(
        gpu: VirtioGpu, compute: ComputeContext, control_channel: ControlChannel) -> None:
    """A guest that lets its memory go from under a live blob (a kernel pin would keep
    it; userspace's mlock lets offlining migrate the pages): at REM_MEM_REG the device
    drops the host mapping, and the old GPU address faults instead of reading memory
    the host may have reused."""
    with ExitStack() as outliving_the_dimm:
        with hotplugged_dimm(control_channel) as (addr, size):
            buffer = outliving_the_dimm.enter_context(PinnedBuffer(1 << 20))
            assert np.all((buffer.phys >= addr) & (buffer.phys < addr + size))
            blob = compute.register(buffer)
            (va,) = compute.map(blob)
            assert gpu_crc(compute, va, buffer.size).status is Status.OK
        late = gpu_crc(compute, va, buffer.size)  # the locked pages migrated away
        assert late.status is Status.FAULT and late.header.fault_address == va
        assert gpu.unref(blob.resource_id).name == Resp.OK_NODATA.name
