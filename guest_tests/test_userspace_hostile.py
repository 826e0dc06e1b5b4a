"""Hostile commands from inside the guest: the device answers the specific error and keeps
serving; a corrupt ring stops only that ring, and a device reset brings it back."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from guest_tests.userspace.dma import DmaBuffer
from guest_tests.userspace.gpu import CONTROL_QUEUE, DeviceTimeout, VirtioGpu, command_header
from guest_tests.userspace.pinned import MAX_SEGMENT, encode_entries
from guest_tests.userspace.testing import (
    BufferPool,
    require_compute,
    require_userptr,
    skip_unless_ours,
)
from protocol.virtio_gpu import CtxCreate, CtxResource, ResourceUnref, Submit3d
from protocol.virtio_gpu_codes import BlobFlag, BlobMem, Cmd, Resp
from protocol.virtqueue import DescFlag, VirtqDesc
from protocol.wire import encode

OUTSIDE_RAM = 1 << 40  # far above the 2 GiB guest
USERPTR = int(BlobFlag.USE_USERPTR)
NEXT, WRITE, INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)
RING_NOT_FATAL = ("QEMU's C back-end exits on a bad descriptor (libvhost-user vu_panic -> "
                  "vg_panic: exit(1)), which would end the VM run")


def assert_still_serving(gpu: VirtioGpu, pinned: BufferPool) -> None:
    """A valid USERPTR blob can be created and unreferenced."""
    blob = gpu.register_userptr(pinned(4096))
    assert gpu.unref(blob.resource_id).name == Resp.OK_NODATA.name


def _bad_entries(page: int) -> dict[str, tuple[list[tuple[int, int]], int]]:
    """Entry lists (addr, length) and blob sizes the device must refuse."""
    return {
        "zero-length": ([(page, 0)], 4096),
        "unaligned-address": ([(page + 8, 4096)], 4096),
        "unaligned-length": ([(page, 4100)], 4100),
        "outside-guest-ram": ([(OUTSIDE_RAM, 4096)], 4096),
        "wrapping": ([(2**64 - 4096, 8192)], 8192),
        "fewer-bytes-than-size": ([(page, 4096)], 8192),
        "no-entries": ([], 4096),
    }


@pytest.mark.parametrize("case", list(_bad_entries(0)))
def test_bad_userptr_entries_are_refused(gpu: VirtioGpu, pinned: BufferPool, case: str) -> None:
    page = int(pinned(4096).phys[0])
    pairs, size = _bad_entries(page)[case]
    entries = encode_entries([a for a, _ in pairs], [n for _, n in pairs])
    response = gpu.create_blob(gpu.new_resource_id(), BlobMem.GUEST, USERPTR, size, entries)
    assert response.name == Resp.ERR_INVALID_PARAMETER.name
    assert_still_serving(gpu, pinned)


@pytest.mark.parametrize("nr_entries", [2, 1 << 20, 0xFFFF_FFFF])
def test_entry_count_is_checked_against_the_bytes_present(gpu: VirtioGpu, pinned: BufferPool,
                                                          nr_entries: int) -> None:
    buffer = pinned(4096)
    response = gpu.create_blob(gpu.new_resource_id(), BlobMem.GUEST, USERPTR, 4096,
                               buffer.entry_bytes(), nr_entries=nr_entries)
    assert response.name == Resp.ERR_INVALID_PARAMETER.name
    assert_still_serving(gpu, pinned)


def test_entries_claiming_more_than_max_bytes_are_out_of_memory(
        gpu: VirtioGpu, pinned: BufferPool, vgpu_backend: str) -> None:
    capset = require_userptr(gpu, vgpu_backend).userptr
    assert capset is not None
    count = capset.max_bytes // MAX_SEGMENT + 1  # a few 4 GiB entries, all the same pages
    page = int(pinned(4096).phys[0])
    entries = encode_entries([page] * count, [MAX_SEGMENT] * count)
    response = gpu.create_blob(gpu.new_resource_id(), BlobMem.GUEST, USERPTR,
                               count * MAX_SEGMENT, entries)
    assert response.name == Resp.ERR_OUT_OF_MEMORY.name
    assert_still_serving(gpu, pinned)


BlobCase = Callable[[VirtioGpu, int], tuple[int, int, int, int, int]]
#: case -> (resource_id, blob_mem, blob_flags, size, ctx_id) from (gpu, an id in use)
BAD_BLOBS: dict[str, tuple[BlobCase, Resp]] = {
    "resource-id-0": (lambda g, used: (0, BlobMem.GUEST, USERPTR, 4096, 0),
                      Resp.ERR_INVALID_RESOURCE_ID),
    "resource-id-in-use": (lambda g, used: (used, BlobMem.GUEST, USERPTR, 4096, 0),
                           Resp.ERR_INVALID_RESOURCE_ID),
    "unknown-context": (lambda g, used: (g.new_resource_id(), BlobMem.HOST3D_GUEST,
                                            USERPTR, 4096, 0xBAD0), Resp.ERR_INVALID_CONTEXT_ID),
    "rdonly-without-userptr": (lambda g, used: (g.new_resource_id(), BlobMem.GUEST,
                                                   int(BlobFlag.USERPTR_RDONLY), 4096, 0),
                               Resp.ERR_INVALID_PARAMETER),
    "userptr-with-host3d": (lambda g, used: (g.new_resource_id(), BlobMem.HOST3D, USERPTR,
                                                4096, 0), Resp.ERR_INVALID_PARAMETER),
    "unknown-flag": (lambda g, used: (g.new_resource_id(), BlobMem.GUEST, USERPTR | 0x20,
                                         4096, 0), Resp.ERR_INVALID_PARAMETER),
    "unknown-blob-mem": (lambda g, used: (g.new_resource_id(), 9, USERPTR, 4096, 0),
                         Resp.ERR_INVALID_PARAMETER),
    "size-0": (lambda g, used: (g.new_resource_id(), BlobMem.GUEST, USERPTR, 0, 0),
               Resp.ERR_INVALID_PARAMETER),
}


@pytest.mark.parametrize("case", list(BAD_BLOBS))
def test_bad_blob_parameters_get_their_error(gpu: VirtioGpu, pinned: BufferPool,
                                             case: str) -> None:
    in_use = gpu.register_userptr(pinned(4096))
    buffer = pinned(4096)
    build, expected = BAD_BLOBS[case]
    resource_id, blob_mem, flags, size, ctx_id = build(gpu, in_use.resource_id)
    response = gpu.create_blob(resource_id, blob_mem, flags, size, buffer.entry_bytes(),
                               ctx_id=ctx_id)
    assert response.name == expected.name
    assert gpu.unref(in_use.resource_id).name == Resp.OK_NODATA.name
    assert_still_serving(gpu, pinned)


def test_unknown_ids_and_commands_get_their_error(gpu: VirtioGpu) -> None:
    assert gpu.command(Cmd.RESOURCE_UNREF, ResourceUnref(0xBAD1)).name == \
        Resp.ERR_INVALID_RESOURCE_ID.name
    assert gpu.call(command_header(0x0999)).name == Resp.ERR_UNSPEC.name


def test_bad_context_commands_get_their_error(gpu: VirtioGpu, pinned: BufferPool,
                                              vgpu_backend: str) -> None:
    capsets = require_compute(gpu, vgpu_backend)
    ctx_id = gpu.create_context("hostile", capsets.compute_id or 0)
    name = b"x".ljust(64, b"\0")
    cases = [
        (Cmd.CTX_CREATE, CtxCreate(1, 0, name), 0, Resp.ERR_INVALID_CONTEXT_ID),
        (Cmd.CTX_CREATE, CtxCreate(1, 0, name), ctx_id, Resp.ERR_INVALID_CONTEXT_ID),
        (Cmd.CTX_CREATE, CtxCreate(1, 77, name), gpu.new_context_id(),
         Resp.ERR_INVALID_PARAMETER),
        (Cmd.CTX_CREATE, CtxCreate(65, 0, name), gpu.new_context_id(),
         Resp.ERR_INVALID_PARAMETER),
        (Cmd.CTX_ATTACH_RESOURCE, CtxResource(0xBAD2), ctx_id, Resp.ERR_INVALID_RESOURCE_ID),
        (Cmd.CTX_ATTACH_RESOURCE, CtxResource(1), 0xBAD3, Resp.ERR_INVALID_CONTEXT_ID),
        (Cmd.CTX_DESTROY, None, 0xBAD4, Resp.ERR_INVALID_CONTEXT_ID),
        (Cmd.SUBMIT_3D, Submit3d(0), 0xBAD5, Resp.ERR_INVALID_CONTEXT_ID),
    ]
    for cmd, body, ctx, expected in cases:
        assert gpu.command(cmd, body, ctx_id=ctx).name == expected.name, (cmd.name, body)
    garbage = b"\x01" * 64
    submit = command_header(Cmd.SUBMIT_3D, ctx_id=ctx_id)
    assert gpu.call(submit + encode(Submit3d(len(garbage))), garbage).name == \
        Resp.ERR_INVALID_PARAMETER.name  # not a compute stream
    assert gpu.call(submit + encode(Submit3d(4096)), garbage).name == \
        Resp.ERR_INVALID_PARAMETER.name  # claims more bytes than the chain holds
    assert gpu.call(command_header(Cmd.RESOURCE_CREATE_BLOB)).name == \
        Resp.ERR_INVALID_PARAMETER.name  # a header without its body
    assert gpu.call(b"\0" * 8).name == Resp.ERR_INVALID_PARAMETER.name  # not even a header
    assert gpu.destroy_context(ctx_id).name == Resp.OK_NODATA.name
    assert_still_serving(gpu, pinned)


# --- broken descriptor chains ---------------------------------------------------------------


def _dma(gpu: VirtioGpu, data: bytes, size: int = 0) -> DmaBuffer:
    arena = gpu.arena
    assert arena is not None
    buffer = arena.allocate(max(len(data), size, 1))
    buffer.write(data)
    return buffer


def _unref_command() -> bytes:
    return command_header(Cmd.RESOURCE_UNREF) + encode(ResourceUnref(0xBAD6))


def assert_answers(gpu: VirtioGpu) -> None:
    """A valid command on the control queue gets its (error) response."""
    assert gpu.call(_unref_command()).name == Resp.ERR_INVALID_RESOURCE_ID.name


def test_a_readable_buffer_outside_guest_ram_is_an_error(gpu: VirtioGpu,
                                                         vgpu_backend: str) -> None:
    skip_unless_ours(vgpu_backend, RING_NOT_FATAL)
    command, response = _dma(gpu, _unref_command()), _dma(gpu, b"", 64)
    ring = gpu.rings[CONTROL_QUEUE]
    d0, d1, d2 = ring.take(3)
    ring.write(d0, command.phys, command.size, NEXT, d1)
    ring.write(d1, OUTSIDE_RAM, 16, NEXT, d2)
    ring.write(d2, response.phys, 64, WRITE, 0)
    ring.adopt(d0, [d0, d1, d2])
    answer = gpu.wait(gpu.publish(CONTROL_QUEUE, d0, [command, response], response))
    assert answer.name == Resp.ERR_INVALID_PARAMETER.name
    assert_answers(gpu)


def test_readable_after_writable_is_an_error(gpu: VirtioGpu, vgpu_backend: str) -> None:
    skip_unless_ours(vgpu_backend, RING_NOT_FATAL)
    command, response = _dma(gpu, _unref_command()), _dma(gpu, b"", 64)
    ring = gpu.rings[CONTROL_QUEUE]
    d0, d1, d2 = ring.take(3)
    ring.write(d0, command.phys, command.size, NEXT, d1)
    ring.write(d1, response.phys, 64, WRITE | NEXT, d2)
    ring.write(d2, command.phys, command.size, 0, 0)
    ring.adopt(d0, [d0, d1, d2])
    answer = gpu.wait(gpu.publish(CONTROL_QUEUE, d0, [command, response], response))
    assert answer.name == Resp.ERR_INVALID_PARAMETER.name
    assert_answers(gpu)


def test_a_response_buffer_outside_guest_ram_gets_no_bytes(gpu: VirtioGpu,
                                                           vgpu_backend: str) -> None:
    skip_unless_ours(vgpu_backend, RING_NOT_FATAL)
    command = _dma(gpu, _unref_command())
    ring = gpu.rings[CONTROL_QUEUE]
    d0, d1 = ring.take(2)
    ring.write(d0, command.phys, command.size, NEXT, d1)
    ring.write(d1, OUTSIDE_RAM, 64, WRITE, 0)
    ring.adopt(d0, [d0, d1])
    answer = gpu.wait(gpu.publish(CONTROL_QUEUE, d0, [command], None))
    assert answer.written == 0
    assert_answers(gpu)


def _corrupt(gpu: VirtioGpu, case: str) -> None:
    """Publish one ring-fatal chain of kind ``case``."""
    ring = gpu.rings[CONTROL_QUEUE]
    if case == "avail-index-jump":
        ring.publish_index(ring.next_avail + ring.size + 1)
        return
    command, response = _dma(gpu, _unref_command()), _dma(gpu, b"", 64)
    table = _dma(gpu, b"", 64)
    keep = [command, response, table]  # freed when the reset drops the request
    d0, d1 = ring.take(2)
    ring.adopt(d0, [d0, d1])
    head = d0
    if case == "loop":
        ring.write(d0, command.phys, command.size, NEXT, d1)
        ring.write(d1, response.phys, 64, WRITE | NEXT, d0)
    elif case == "next-out-of-range":
        ring.write(d0, command.phys, command.size, NEXT, ring.size + 5)
    elif case == "head-out-of-range":
        head = ring.size + 3
    elif case == "indirect-bad-length":
        ring.write(d0, table.phys, 24, INDIRECT, 0)
    elif case == "indirect-outside-ram":
        ring.write(d0, OUTSIDE_RAM, 32, INDIRECT, 0)
    elif case == "indirect-nested":
        table.write(encode(VirtqDesc(table.phys, 32, INDIRECT, 0)) + bytes(16))
        ring.write(d0, table.phys, 32, INDIRECT, 0)
    elif case == "indirect-with-next":
        table.write(encode(VirtqDesc(command.phys, command.size, 0, 0)))
        ring.write(d0, table.phys, 16, INDIRECT | NEXT, d1)
        ring.write(d1, response.phys, 64, WRITE, 0)
    else:  # pragma: no cover - a typo in the parameter list
        raise ValueError(case)
    gpu.publish(CONTROL_QUEUE, head, keep, response)


@pytest.mark.parametrize("case", ["loop", "next-out-of-range", "head-out-of-range",
                                  "avail-index-jump", "indirect-bad-length",
                                  "indirect-outside-ram", "indirect-nested",
                                  "indirect-with-next"])
def test_a_corrupt_ring_stops_until_the_device_is_reset(gpu: VirtioGpu, vgpu_backend: str,
                                                        case: str) -> None:
    skip_unless_ours(vgpu_backend, RING_NOT_FATAL)
    used_before = gpu.rings[CONTROL_QUEUE].used_index
    _corrupt(gpu, case)
    behind = gpu.submit(_unref_command())  # a valid request queued behind the bad one
    with pytest.raises(DeviceTimeout):
        gpu.wait(behind, timeout=3.0)
    assert gpu.rings[CONTROL_QUEUE].used_index == used_before  # nothing was answered
    gpu.reinitialize()
    assert_answers(gpu)
