"""RESOURCE_CREATE_BLOB success paths (GUEST, HOST3D_GUEST, USERPTR and not) and
RESOURCE_UNREF, observed through compute contexts."""

from __future__ import annotations

import itertools
import zlib

import pytest

from protocol.compute import Kernel, Status, buffer_arg, u64_arg
from protocol.virtio_gpu_codes import BlobFlag, BlobMem, Resp
from tests.userptr.compute_stream import dispatch, map_cmd
from tests.userptr.guest_buffer import scattered_buffer
from tests.userptr.vm import Blob, ComputeContext, Vm


@pytest.fixture
def vm(shared_vm: Vm) -> Vm:
    """The tests of this module share one back-end (each uses its own context)."""
    return shared_vm



def checksum(ctx: ComputeContext, va: int, nbytes: int) -> int:
    """CRC-32 the device computes over ``[va, va+nbytes)`` (must succeed)."""
    done = ctx.run([dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(va), u64_arg(nbytes))])
    done.response.expect(Resp.OK_NODATA)
    return done.results.values()[0]


def guest_crc(vm: Vm, blob: Blob) -> int:
    """CRC-32 of the blob's guest bytes, in entry order."""
    return zlib.crc32(blob.buffer.read(vm.ram))


def test_host3d_guest_userptr_blob_is_usable_in_its_context(vm: Vm) -> None:
    """HOST3D_GUEST + USE_USERPTR in a context: mappable there at once, reads the guest
    pages in entry order."""
    ctx = vm.compute_context()
    blob = ctx.blob(5 * 4096)
    (va,) = ctx.map(blob)
    assert va % 4096 == 0
    assert checksum(ctx, va, blob.buffer.size) == guest_crc(vm, blob)


def test_guest_userptr_blob_needs_ctx_attach(vm: Vm) -> None:
    """A GUEST userptr blob (ctx_id 0) belongs to no context until CTX_ATTACH_RESOURCE."""
    ctx = vm.compute_context()
    blob = vm.userptr_blob(3 * 4096)
    refused = ctx.run([map_cmd(blob.resource_id)])
    refused.response.expect(Resp.ERR_INVALID_PARAMETER)
    assert refused.results.statuses() == [Status.INVALID_RESOURCE]
    vm.attach(ctx.ctx_id, blob.resource_id).expect(Resp.OK_NODATA)
    (va,) = ctx.map(blob)
    assert checksum(ctx, va, blob.buffer.size) == guest_crc(vm, blob)


def test_blobs_get_disjoint_gpu_ranges(vm: Vm) -> None:
    """Several blobs mapped in one context: page-aligned, non-overlapping VA ranges, each
    reading its own pages."""
    ctx = vm.compute_context()
    blobs = [ctx.blob(n * 4096) for n in (1, 3, 2, 7)]
    vas = ctx.map(*blobs)
    spans = sorted(zip(vas, (b.buffer.size for b in blobs), strict=True))
    assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(spans))
    for blob, va in zip(blobs, vas, strict=True):
        assert checksum(ctx, va, blob.buffer.size) == guest_crc(vm, blob)


def test_non_userptr_blobs_have_no_gpu_mapping(vm: Vm) -> None:
    """GUEST and HOST3D_GUEST blobs without USE_USERPTR are created (with entries, and
    with none) but cannot be mapped for compute."""
    ctx = vm.compute_context()
    created = []
    for blob_mem, ctx_id in ((BlobMem.GUEST, 0), (BlobMem.HOST3D_GUEST, ctx.ctx_id)):
        for with_entries in (True, False):
            buf = scattered_buffer(vm.ram, 2 * 4096)
            rid = vm.new_resource_id()
            vm.create_blob(rid, buf.entries if with_entries else [], buf.size,
                           blob_mem=blob_mem, flags=BlobFlag.USE_MAPPABLE, ctx_id=ctx_id
                           ).expect(Resp.OK_NODATA)
            vm.attach(ctx.ctx_id, rid).expect(Resp.OK_NODATA)
            created.append(rid)
    done = ctx.run([map_cmd(rid) for rid in created])
    assert done.results.statuses()[0] == Status.INVALID_RESOURCE
    for rid in created:
        vm.unref(rid).expect(Resp.OK_NODATA)


def test_unref_tears_the_blob_down(vm: Vm) -> None:
    """After RESOURCE_UNREF the id is free, the old GPU VA faults in the context that had
    it mapped, and a second UNREF is INVALID_RESOURCE_ID."""
    ctx = vm.compute_context()
    blob = ctx.blob(2 * 4096)
    (va,) = ctx.map(blob)
    vm.unref(blob.resource_id).expect(Resp.OK_NODATA)
    vm.unref(blob.resource_id).expect(Resp.ERR_INVALID_RESOURCE_ID)
    done = ctx.run([dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(va), u64_arg(4096))])
    done.response.expect(Resp.ERR_UNSPEC)
    assert done.results.status == Status.FAULT
    assert done.results.header.fault_address == va
    again = ctx.run([map_cmd(blob.resource_id)])
    assert again.results.statuses() == [Status.INVALID_RESOURCE]
    reuse = scattered_buffer(vm.ram, 4096)
    vm.create_blob(blob.resource_id, reuse.entries, 4096, blob_mem=BlobMem.GUEST
                   ).expect(Resp.OK_NODATA)


def test_unref_of_unknown_resource(vm: Vm) -> None:
    """RESOURCE_UNREF of an id never created: INVALID_RESOURCE_ID."""
    vm.unref(4242).expect(Resp.ERR_INVALID_RESOURCE_ID)
    vm.still_serving()
