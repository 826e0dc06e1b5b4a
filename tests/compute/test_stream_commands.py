"""The stream commands: MAP_RESOURCE (the GPU VA), UNMAP_RESOURCE, FILL, COPY (with
overlaps, like memmove), SIGNAL; results per command in the result record."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from protocol.compute import Status
from protocol.virtio_gpu_codes import Resp
from tests.userptr.compute_stream import (
    copy_cmd,
    fill_cmd,
    map_cmd,
    results_size,
    signal_cmd,
    unmap_cmd,
)
from tests.userptr.vm import ComputeContext, Vm

PAGE = 4096
NOT_RUN_YET = 0xFFFFFFFF  # failed_index when nothing failed


@pytest.fixture
def vm(shared_vm: Vm) -> Vm:
    """The tests of this module share one back-end (each uses its own context)."""
    return shared_vm


def test_map_returns_the_gpu_va(vm: Vm) -> None:
    """MAP_RESOURCE's value is the VA the blob's first byte is at; mapping again gives
    the same VA; cmd_ids are echoed; the header counts completed commands."""
    ctx = vm.compute_context()
    a, b = ctx.blob(3 * PAGE), ctx.blob(PAGE)
    done = ctx.run([map_cmd(a.resource_id, 11), map_cmd(b.resource_id, 12),
                    map_cmd(a.resource_id, 13)])
    done.response.expect(Resp.OK_NODATA)
    head = done.results.header
    assert (head.status, head.failed_index, head.completed) == (Status.OK, NOT_RUN_YET, 3)
    assert [c.cmd_id for c in done.results.commands] == [11, 12, 13]
    va_a, va_b, again = done.results.values()
    assert again == va_a != va_b
    signalled = ctx.run([signal_cmd(va_a, 0x1122334455667788), signal_cmd(va_b + 8, 7)])
    assert signalled.results.values() == [0x1122334455667788, 7]
    assert a.buffer.read(vm.ram, 8) == struct.pack("<Q", 0x1122334455667788)
    assert b.buffer.read(vm.ram, 8, 8) == struct.pack("<Q", 7)


def test_unmap(vm: Vm) -> None:
    """After UNMAP_RESOURCE the VA faults; a second UNMAP is INVALID_RESOURCE; MAP again
    makes it usable."""
    ctx = vm.compute_context()
    blob = ctx.blob(PAGE)
    (va,) = ctx.map(blob)
    ctx.run([unmap_cmd(blob.resource_id)]).response.expect(Resp.OK_NODATA)
    before = blob.buffer.read(vm.ram)
    done = ctx.run([fill_cmd(va, 64, 0xAB)])
    done.response.expect(Resp.ERR_UNSPEC)
    assert done.results.status == Status.FAULT
    assert done.results.header.fault_address == va
    assert blob.buffer.read(vm.ram) == before
    twice = ctx.run([unmap_cmd(blob.resource_id)])
    twice.response.expect(Resp.ERR_INVALID_PARAMETER)
    assert twice.results.statuses() == [Status.INVALID_RESOURCE]
    assert ctx.map(blob) == [va]
    ctx.run([fill_cmd(va, 64, 0xAB)]).response.expect(Resp.OK_NODATA)
    assert blob.buffer.read(vm.ram, 64) == struct.pack("<I", 0xAB) * 16


def test_fill_across_pages(vm: Vm) -> None:
    """FILL of bytes spanning scattered pages stores the 32-bit pattern there only."""
    ctx = vm.compute_context()
    blob = ctx.blob(4 * PAGE)
    (va,) = ctx.map(blob)
    before = np.frombuffer(blob.buffer.read(vm.ram), np.uint8).copy()
    start, size = PAGE - 12, 2 * PAGE + 40
    done = ctx.run([fill_cmd(va + start, size, 0xDEADBEEF)])
    done.response.expect(Resp.OK_NODATA)
    assert done.results.values() == [size]
    want = before.copy()
    want[start:start + size] = np.frombuffer(struct.pack("<I", 0xDEADBEEF) * (size // 4),
                                             np.uint8)
    assert np.array_equal(np.frombuffer(blob.buffer.read(vm.ram), np.uint8), want)


def memmove_model(data: bytes, dst: int, src: int, size: int) -> bytes:
    """What memmove(dst, src, size) leaves in ``data``."""
    out = bytearray(data)
    out[dst:dst + size] = data[src:src + size]
    return bytes(out)


@pytest.mark.parametrize(("dst", "src", "size"), [
    (100, 3000, 5000),        # disjoint, unaligned
    (PAGE + 1, 1, 2 * PAGE),  # overlapping, dst above src (copied backwards)
    (7, 2 * PAGE - 5, 2 * PAGE),  # overlapping, dst below src
    (513, 512, 3 * PAGE),     # one byte apart
    (64, 64, PAGE),           # onto itself
])
def test_copy_within_a_blob(vm: Vm, dst: int, src: int, size: int) -> None:
    """COPY inside one scattered blob behaves like memmove, overlaps included."""
    ctx = vm.compute_context()
    blob = ctx.blob(5 * PAGE)
    (va,) = ctx.map(blob)
    before = blob.buffer.read(vm.ram)
    done = ctx.run([copy_cmd(va + dst, va + src, size)])
    done.response.expect(Resp.OK_NODATA)
    assert done.results.values() == [size]
    assert blob.buffer.read(vm.ram) == memmove_model(before, dst, src, size)


def test_copy_between_blobs(vm: Vm) -> None:
    """COPY from one blob into another at unaligned offsets."""
    ctx = vm.compute_context()
    src, dst = ctx.blob(3 * PAGE), ctx.blob(2 * PAGE)
    va_src, va_dst = ctx.map(src, dst)
    dst_before = dst.buffer.read(vm.ram)
    ctx.run([copy_cmd(va_dst + 3, va_src + 1001, 6000)]).response.expect(Resp.OK_NODATA)
    want = bytearray(dst_before)
    want[3:6003] = src.buffer.read(vm.ram, 6000, 1001)
    assert dst.buffer.read(vm.ram) == bytes(want)


def run_in_order(ctx: ComputeContext, va: int) -> list[Status]:
    """FILL, COPY and SIGNAL over the same bytes: later commands see earlier ones."""
    done = ctx.run([fill_cmd(va, 16, 0x01010101, 1), copy_cmd(va + 16, va, 16, 2),
                    signal_cmd(va + 8, 0xFFFF, 3), copy_cmd(va + 32, va + 8, 8, 4)])
    done.response.expect(Resp.OK_NODATA)
    return done.results.statuses()


def test_commands_run_in_order(vm: Vm) -> None:
    """Each command sees the effects of the ones before it in the stream."""
    ctx = vm.compute_context()
    blob = ctx.blob(PAGE)
    (va,) = ctx.map(blob)
    assert run_in_order(ctx, va) == [Status.OK] * 4
    got = blob.buffer.read(vm.ram, 40)
    assert got == b"\1" * 8 + struct.pack("<Q", 0xFFFF) + b"\1" * 16 + struct.pack("<Q", 0xFFFF)


def test_results_at_an_offset_up_to_the_blob_end(vm: Vm) -> None:
    """``result_offset`` places the record: one ending exactly at the result blob's end
    is accepted and written there; the bytes before it stay as they were."""
    ctx = vm.compute_context()
    data = ctx.blob(PAGE)
    (va,) = ctx.map(data)
    size = ctx.results.buffer.size
    offset = size - results_size(2)
    vm.poison_results(ctx.results, 2, offset)
    before = ctx.results.buffer.read(vm.ram, offset)
    vm.submit(ctx.ctx_id, [signal_cmd(va, 5), signal_cmd(va + 8, 6)], result=ctx.results,
              result_offset=offset).expect(Resp.OK_NODATA)
    got = vm.results(ctx.results, 2, offset)
    assert (got.status, got.header.completed, got.values()) == (Status.OK, 2, [5, 6])
    assert ctx.results.buffer.read(vm.ram, offset) == before
