"""USERPTR blobs made of this test program's own memory, through the userspace driver.

Zero copy is proven through a compute context: what the guest writes into its buffer is
what the host engine reads (CRC-32, sums), what the host engine writes appears in the
guest buffer at once, with no transfer command in between, and a blob that names one
guest page twice has one memory behind both of its GPU pages (no copy could do that).
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

from guest_tests.guest_helpers import GuestEnvironment
from guest_tests.userspace.compute import ComputeContext, dispatch
from guest_tests.userspace.gpu import VirtioGpu
from guest_tests.userspace.pinned import MAX_SEGMENT, PinnedBuffer
from guest_tests.userspace.testing import (
    BufferPool,
    require_userptr,
)
from protocol.capsets import (
    DEFAULT_USERPTR_CAPSET,
    USERPTR_CAPSET_MAGIC,
    USERPTR_CAPSET_VERSION,
    HostBackend,
    HostPath,
    UserptrCapFlag,
    UserptrCapset,
)
from protocol.compute import (
    CopyCmd,
    FillCmd,
    Kernel,
    MapResource,
    Op,
    Status,
    buffer_arg,
    encode_command,
    f32_arg,
    u64_arg,
)
from protocol.virtio_gpu_codes import BlobFlag, BlobMem, Resp
from protocol.wire import layout


def test_userptr_capset_reports_what_the_host_does(gpu: VirtioGpu, vgpu_backend: str,
                                                   guest_env: GuestEnvironment) -> None:
    capsets = require_userptr(gpu, vgpu_backend)
    cap = capsets.userptr
    assert cap is not None and capsets.userptr_id == DEFAULT_USERPTR_CAPSET
    infos = [gpu.capset_info(index) for index in range(gpu.num_capsets)]
    (info,) = [i for i in infos if i.capset_id == DEFAULT_USERPTR_CAPSET]
    assert (info.capset_max_version, info.capset_max_size) == \
        (USERPTR_CAPSET_VERSION, len(capsets.raw[DEFAULT_USERPTR_CAPSET]))
    assert (cap.magic, cap.version) == (USERPTR_CAPSET_MAGIC, USERPTR_CAPSET_VERSION)
    assert cap.size == layout(UserptrCapset).size
    assert cap.protocol == 5  # guest series v5: no feature bit, userptr with blob
    flags = UserptrCapFlag(cap.flags)
    for needed in (UserptrCapFlag.AVAILABLE, UserptrCapFlag.RDONLY, UserptrCapFlag.ZERO_COPY,
                   UserptrCapFlag.CONTEXT_MAP):
        assert needed in flags, f"{needed.name} missing from {flags!r}"
    assert HostPath(cap.host_path) in (HostPath.BATCH, HostPath.ALIAS, HostPath.PER_RANGE)
    assert (HostPath(cap.host_path) is HostPath.BATCH) == \
        (UserptrCapFlag.BATCH_SUPPORTED in flags)
    assert HostBackend(cap.host_backend) in (HostBackend.KFD, HostBackend.SIM)
    if guest_env.host_facts().get("host_gpu") == "sim":  # our defaults, no /dev/kfd
        assert HostBackend(cap.host_backend) is HostBackend.SIM
        assert HostPath(cap.host_path) is HostPath.BATCH  # the simulated kernel has it
        assert cap.num_gpus == 1
    assert cap.page_size == os.sysconf("SC_PAGE_SIZE") == 4096
    assert cap.max_entries > 16384  # beyond QEMU's sg cap: a 1 GiB buffer fits uncoalesced
    assert cap.max_bytes >= 1 << 30
    assert cap.num_gpus >= 1 and cap.kfd_version >= 1 << 16
    assert cap.blob_mem_mask == (1 << BlobMem.GUEST) | (1 << BlobMem.HOST3D_GUEST)


@pytest.mark.parametrize("huge", [False, True], ids=["4k-pages", "thp"])
def test_pinned_pages_become_coalesced_entries(pinned: BufferPool, huge: bool) -> None:
    if huge and not PinnedBuffer.thp_enabled():
        pytest.skip("transparent huge pages are off in this guest ([never])")
    buffer = pinned(4 << 20, huge=huge)
    addr, length = buffer.entries()
    assert int(length.sum()) == buffer.span
    assert not ((addr | length) % 4096).any() and (length <= MAX_SEGMENT).all()
    pages = np.concatenate([a + np.arange(n // 4096, dtype=np.uint64) * np.uint64(4096)
                            for a, n in zip(addr.tolist(), length.tolist(), strict=True)])
    assert np.array_equal(pages, buffer.phys)  # the entries describe exactly these pages
    ends = addr[:-1] + length[:-1]
    assert not (ends == addr[1:]).any(), "adjacent entries were not merged"
    if huge:  # each 2 MiB THP is 512 contiguous pages
        assert addr.shape[0] <= buffer.span // (2 << 20), f"{addr.shape[0]} entries"


@pytest.mark.parametrize("blob_mem", [BlobMem.GUEST, BlobMem.HOST3D_GUEST],
                         ids=["guest", "host3d-guest"])
@pytest.mark.parametrize("readonly", [False, True], ids=["rw", "rdonly"])
def test_userptr_blob_is_created_and_unreferenced(gpu: VirtioGpu, pinned: BufferPool,
                                                  compute: ComputeContext, blob_mem: BlobMem,
                                                  readonly: bool) -> None:
    buffer = pinned(3 * 4096 + 5, offset=0x123)  # unaligned start and size: four pages
    assert buffer.span == 4 * 4096
    ctx_id = compute.ctx_id if blob_mem is BlobMem.HOST3D_GUEST else 0
    flags = BlobFlag.USE_USERPTR | (BlobFlag.USERPTR_RDONLY if readonly else 0)
    resource_id = gpu.new_resource_id()
    entries = buffer.entry_bytes()
    created = gpu.create_blob(resource_id, blob_mem, int(flags), buffer.size, entries,
                              ctx_id=ctx_id, blob_id=1 if ctx_id else 0)
    assert created.name == Resp.OK_NODATA.name
    again = gpu.create_blob(resource_id, blob_mem, int(flags), buffer.size, entries,
                            ctx_id=ctx_id)
    assert again.name == Resp.ERR_INVALID_RESOURCE_ID.name
    assert gpu.unref(resource_id).name == Resp.OK_NODATA.name
    assert gpu.unref(resource_id).name == Resp.ERR_INVALID_RESOURCE_ID.name
    assert buffer.moved() == 0


def test_guest_writes_are_what_the_host_reads(gpu: VirtioGpu, pinned: BufferPool,
                                              compute: ComputeContext) -> None:
    buffer = pinned(2 << 20)
    floats = buffer.view(np.float32)
    floats[:] = np.random.default_rng(1).standard_normal(floats.shape[0], dtype=np.float32)
    blob = compute.register(buffer)
    out = pinned(4096)
    out_blob = compute.register(out)
    va, out_va = compute.map(blob, out_blob)

    def host_crc_and_sum() -> tuple[int, float, float]:
        result = compute.run([
            dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(va), u64_arg(buffer.size), cmd_id=1),
            dispatch(Kernel.REDUCE_SUM_F32, buffer_arg(va), u64_arg(floats.shape[0]),
                     buffer_arg(out_va), cmd_id=2)])
        assert result.status is Status.OK, result.header
        return result.value(0), result.float_value(1), float(out.view(np.float32, 1)[0])

    crc, total, stored = host_crc_and_sum()
    assert crc == zlib.crc32(buffer.data.tobytes())
    expected = float(np.sum(floats, dtype=np.float64))
    assert total == pytest.approx(expected, rel=1e-9, abs=1e-6)
    assert stored == pytest.approx(np.float32(expected), rel=1e-6)

    floats[1000:2000] = 42.5  # the guest writes; no command tells the device
    crc, total, _ = host_crc_and_sum()
    assert crc == zlib.crc32(buffer.data.tobytes())
    assert total == pytest.approx(float(np.sum(floats, dtype=np.float64)), rel=1e-9, abs=1e-6)
    assert buffer.moved() == 0


def test_host_writes_appear_in_guest_memory(gpu: VirtioGpu, pinned: BufferPool,
                                            compute: ComputeContext) -> None:
    count = 256 * 1024
    x, y, z = pinned(4 * count), pinned(4 * count, huge=True), pinned(4 * count, offset=64)
    rng = np.random.default_rng(2)
    xs, ys = x.view(np.float32), y.view(np.float32)
    xs[:] = rng.standard_normal(count, dtype=np.float32)
    ys[:] = rng.standard_normal(count, dtype=np.float32)
    y_before = ys.copy()
    x_va, y_va, z_va = compute.map(compute.register(x), compute.register(y), compute.register(z))

    result = compute.run([encode_command(Op.FILL, FillCmd(z_va, 4 * count, 0xA5A5A5A5), 1)])
    assert result.status is Status.OK
    assert (z.view(np.uint32) == 0xA5A5A5A5).all()

    result = compute.run([encode_command(Op.COPY, CopyCmd(z_va, x_va, 4 * count), 2)])
    assert result.status is Status.OK
    assert np.array_equal(z.data, x.data)

    result = compute.run([dispatch(Kernel.SAXPY_F32, buffer_arg(y_va), buffer_arg(x_va),
                                   u64_arg(count), f32_arg(3.0), cmd_id=3)])
    assert result.status is Status.OK
    expected = y_before + np.float32(3.0) * xs
    assert np.allclose(ys, expected, rtol=1e-6, atol=1e-6)
    assert x.moved() == y.moved() == z.moved() == 0


def test_one_guest_page_twice_is_one_memory(gpu: VirtioGpu, pinned: BufferPool,
                                            compute: ComputeContext) -> None:
    """Zero copy, shown without trusting any counter: a blob whose two entries are the
    same guest page.  In one submission the engine fills the blob's first page and
    checksums its second, and the second already holds the fill; afterwards the guest
    sees it in its page.  A device that copied the pages into host memory (per blob or
    per submission) would hold two separate pages and checksum the old bytes."""
    page = pinned(4096)
    page.data[:] = 0
    entry = page.entry_bytes()
    assert len(entry) == 16, "one page, one entry"
    rid = gpu.new_resource_id()
    gpu.create_blob(rid, BlobMem.HOST3D_GUEST, BlobFlag.USE_USERPTR, 8192, entry * 2,
                    ctx_id=compute.ctx_id, blob_id=rid).expect(Resp.OK_NODATA)
    try:
        mapped = compute.run([encode_command(Op.MAP_RESOURCE, MapResource(rid), 1)])
        assert mapped.status is Status.OK
        va = mapped.value(0)
        result = compute.run([
            encode_command(Op.FILL, FillCmd(va, 4096, 0x5A5A5A5A), 2),
            dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(va + 4096), u64_arg(4096), cmd_id=3)])
        assert result.status is Status.OK
        assert result.value(1) == zlib.crc32(b"\x5a" * 4096), \
            "the second GPU page is not the first one's memory"
        assert (page.data == 0x5A).all(), "the guest page did not receive the fill"
    finally:
        gpu.unref(rid).expect(Resp.OK_NODATA)


def test_rdonly_userptr_faults_on_host_write_and_stays_untouched(
        pinned: BufferPool, compute: ComputeContext) -> None:
    source, target = pinned(64 * 1024), pinned(64 * 1024)
    source.data[:] = np.random.default_rng(3).integers(0, 256, source.size, dtype=np.uint8)
    before = source.data.copy()
    src_va, dst_va = compute.map(compute.register(source, readonly=True),
                                 compute.register(target))

    result = compute.run([dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(src_va),
                                   u64_arg(source.size), cmd_id=1),
                          encode_command(Op.COPY, CopyCmd(dst_va, src_va, source.size), 2)])
    assert result.status is Status.OK  # reading a read-only blob is fine
    assert result.value(0) == zlib.crc32(before.tobytes())
    assert np.array_equal(target.data, before)

    fault_va = src_va + 8192
    result = compute.run([encode_command(Op.FILL, FillCmd(fault_va, 4096, 0xDEADBEEF), 7),
                          encode_command(Op.FILL, FillCmd(dst_va, 4096, 0), 8)])
    assert result.response.name == Resp.ERR_UNSPEC.name  # a fenced submission that faulted
    assert result.status is Status.FAULT
    assert (result.header.failed_index, result.header.completed) == (0, 0)
    assert result.header.fault_address == fault_va
    assert [(c.cmd_id, Status(c.status)) for c in result.commands] == \
        [(7, Status.FAULT), (8, Status.NOT_RUN)]
    assert np.array_equal(source.data, before), "the read-only buffer was written"
    assert np.array_equal(target.data, before), "a command after the fault ran"


def test_guest_blob_attached_to_a_context(gpu: VirtioGpu, pinned: BufferPool,
                                          compute: ComputeContext) -> None:
    buffer = pinned(40000, offset=0x300)
    buffer.data[:] = np.arange(buffer.size, dtype=np.uint32).astype(np.uint8)
    blob = gpu.register_userptr(buffer)  # blob_mem GUEST, ctx 0
    assert blob.blob_mem is BlobMem.GUEST
    with pytest.raises(RuntimeError, match="MAP_RESOURCE failed"):
        compute.map(blob)  # not attached to the context yet
    assert gpu.attach(compute.ctx_id, blob.resource_id).name == Resp.OK_NODATA.name
    (va,) = compute.map(blob)
    result = compute.run([dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(va), u64_arg(buffer.size))])
    assert result.value(0) == zlib.crc32(buffer.data.tobytes())


def test_unref_stops_host_access(gpu: VirtioGpu, pinned: BufferPool,
                                 compute: ComputeContext) -> None:
    buffer = pinned(8192)
    blob = compute.register(buffer)
    (va,) = compute.map(blob)
    assert gpu.unref(blob.resource_id).name == Resp.OK_NODATA.name
    buffer.data[:] = 7
    result = compute.run([encode_command(Op.FILL, FillCmd(va, 4096, 0), 1)])
    assert result.status is Status.FAULT and result.header.fault_address == va
    assert (buffer.data == 7).all()


@pytest.mark.parametrize("huge", [False, True], ids=["4k-pages", "thp"])
def test_large_userptr_round_trip(gpu: VirtioGpu, pinned: BufferPool,
                                  compute: ComputeContext, huge: bool) -> None:
    buffer = pinned(24 << 20, huge=huge)
    words = buffer.view(np.uint32)
    words[:] = np.arange(words.shape[0], dtype=np.uint32) * np.uint32(2654435761)
    expected_crc = zlib.crc32(buffer.data.tobytes())
    blob = compute.register(buffer)
    (va,) = compute.map(blob)
    result = compute.run([dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(va), u64_arg(buffer.size)),
                          dispatch(Kernel.FILL_U32, buffer_arg(va + 4096), u64_arg(1024),
                                   u64_arg(0x01020304))])
    assert result.status is Status.OK
    assert result.value(0) == expected_crc  # computed before the fill ran
    assert (words[1024:2048] == 0x01020304).all()
    assert words[2048] == (2048 * 2654435761) & 0xFFFFFFFF and words[1023] != 0x01020304
    print(f"\n{buffer.size >> 20} MiB ({'THP' if huge else '4 KiB pages'}): "
          f"{blob.entries} entries for {buffer.span // 4096} pages")


def test_pinned_buffer_rejects_bad_geometry() -> None:
    with pytest.raises(ValueError, match="in-page offset"):
        PinnedBuffer(4096, offset=4096)
    with pytest.raises(ValueError, match="size"):
        PinnedBuffer(0)
