"""Every compute kernel on USERPTR memory inside the VM, checked in the guest's own memory
against numpy; fences (global, and per-context rings with INFO_RING_IDX) complete after
their work."""

from __future__ import annotations

import zlib

import numpy as np
import numpy.typing as npt
import pytest

from guest_tests.guest_helpers import ControlChannel
from guest_tests.userspace.compute import ComputeContext, dispatch
from guest_tests.userspace.gpu import DeviceTimeout, VirtioGpu
from guest_tests.userspace.pinned import PinnedBuffer
from guest_tests.userspace.testing import BufferPool, require_compute
from protocol.compute import (
    CopyCmd,
    FillCmd,
    Kernel,
    Op,
    SignalCmd,
    Status,
    buffer_arg,
    encode_command,
    f32_arg,
    u64_arg,
)
from protocol.virtio_gpu import ResourceUnref
from protocol.virtio_gpu_codes import Cmd, CtrlFlag, Resp

COUNT = 192 * 1024  # float32 per vector: 768 KiB, several host runs with 4 KiB pages


@pytest.fixture(params=[False, True], ids=["4k-pages", "thp"])
def huge(request: pytest.FixtureRequest) -> bool:
    """Buffers of 4 KiB pages (many host runs) or transparent huge pages (few)."""
    return bool(request.param)


def _vectors(pinned: BufferPool, compute: ComputeContext, huge: bool,
             count: int = COUNT, n: int = 3) -> tuple[list[PinnedBuffer], list[int]]:
    buffers = [pinned(4 * count, huge=huge, offset=0 if i % 2 else 16) for i in range(n)]
    rng = np.random.default_rng(11)
    for buffer in buffers:
        buffer.view(np.float32)[:] = rng.standard_normal(count, dtype=np.float32)
    vas = compute.map(*(compute.register(b) for b in buffers))
    return buffers, vas


def test_kernel_capsets_list_every_kernel(gpu: VirtioGpu, vgpu_backend: str) -> None:
    capsets = require_compute(gpu, vgpu_backend)
    assert {k.kernel_id for k in capsets.kernels} == {int(k) for k in Kernel}


def test_fill(pinned: BufferPool, compute: ComputeContext, huge: bool) -> None:
    (dst,), (va,) = _vectors(pinned, compute, huge, n=1)
    result = compute.run([dispatch(Kernel.FILL_U32, buffer_arg(va), u64_arg(COUNT - 8),
                                   u64_arg(0xC0FFEE11), cmd_id=1),
                          encode_command(Op.FILL, FillCmd(va + 4 * (COUNT - 8), 32, 7), 2)])
    assert result.status is Status.OK and result.value(0) == COUNT - 8
    words = dst.view(np.uint32)
    assert (words[:-8] == 0xC0FFEE11).all() and (words[-8:] == 7).all()


def test_copy(pinned: BufferPool, compute: ComputeContext, huge: bool) -> None:
    (a, b), (a_va, b_va) = _vectors(pinned, compute, huge, n=2)
    expected = a.data.copy()
    result = compute.run([dispatch(Kernel.COPY, buffer_arg(b_va), buffer_arg(a_va),
                                   u64_arg(a.size - 100), cmd_id=1),
                          encode_command(Op.COPY, CopyCmd(b_va + a.size - 100,
                                                          a_va + a.size - 100, 100), 2)])
    assert result.status is Status.OK
    assert np.array_equal(b.data, expected)
    overlap = 4096 + 3  # an overlapping forward copy behaves like memmove
    result = compute.run([encode_command(Op.COPY, CopyCmd(a_va + overlap, a_va, 65536), 3)])
    assert result.status is Status.OK
    assert np.array_equal(a.data[overlap:overlap + 65536], expected[:65536])


def test_vadd(pinned: BufferPool, compute: ComputeContext, huge: bool) -> None:
    (c, a, b), (c_va, a_va, b_va) = _vectors(pinned, compute, huge)
    result = compute.run([dispatch(Kernel.VADD_F32, buffer_arg(c_va), buffer_arg(a_va),
                                   buffer_arg(b_va), u64_arg(COUNT))])
    assert result.status is Status.OK
    assert np.array_equal(c.view(np.float32), a.view(np.float32) + b.view(np.float32))


def test_saxpy(pinned: BufferPool, compute: ComputeContext, huge: bool) -> None:
    (y, x), (y_va, x_va) = _vectors(pinned, compute, huge, n=2)
    expected = np.float32(-1.5) * x.view(np.float32) + y.view(np.float32)
    result = compute.run([dispatch(Kernel.SAXPY_F32, buffer_arg(y_va), buffer_arg(x_va),
                                   u64_arg(COUNT), f32_arg(-1.5))])
    assert result.status is Status.OK
    assert np.allclose(y.view(np.float32), expected, rtol=1e-6, atol=1e-6)


def test_reduce_sum(pinned: BufferPool, compute: ComputeContext, huge: bool) -> None:
    (x, out), (x_va, out_va) = _vectors(pinned, compute, huge, n=2)
    result = compute.run([dispatch(Kernel.REDUCE_SUM_F32, buffer_arg(x_va), u64_arg(COUNT),
                                   buffer_arg(out_va))])
    expected = float(np.sum(x.view(np.float32), dtype=np.float64))
    assert result.status is Status.OK
    assert result.float_value(0) == pytest.approx(expected, rel=1e-9, abs=1e-6)
    assert out.view(np.float32)[0] == pytest.approx(np.float32(expected), rel=1e-6, abs=1e-4)


def test_matmul(pinned: BufferPool, compute: ComputeContext, huge: bool) -> None:
    m, n, k = 96, 80, 112
    a, b, c = pinned(4 * m * k, huge=huge), pinned(4 * k * n, huge=huge), pinned(4 * m * n)
    rng = np.random.default_rng(5)
    left = a.view(np.float32).reshape(m, k)
    right = b.view(np.float32).reshape(k, n)
    left[:] = rng.standard_normal((m, k), dtype=np.float32)
    right[:] = rng.standard_normal((k, n), dtype=np.float32)
    a_va, b_va, c_va = compute.map(*(compute.register(x) for x in (a, b, c)))
    result = compute.run([dispatch(Kernel.MATMUL_F32, buffer_arg(c_va), buffer_arg(a_va),
                                   buffer_arg(b_va), u64_arg(m), u64_arg(n), u64_arg(k))])
    assert result.status is Status.OK and result.value(0) == m * n
    product = c.view(np.float32).reshape(m, n)
    assert np.allclose(product, left @ right, rtol=1e-4, atol=1e-4)


def test_checksum(pinned: BufferPool, compute: ComputeContext, huge: bool) -> None:
    (x,), (va,) = _vectors(pinned, compute, huge, n=1)
    x.data[12345] ^= 0xFF
    result = compute.run([dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(va + 3),
                                   u64_arg(x.size - 3))])
    assert result.status is Status.OK
    assert result.value(0) == zlib.crc32(x.data[3:].tobytes())


def test_faults_name_their_address(pinned: BufferPool, compute: ComputeContext) -> None:
    (x,), (va,) = _vectors(pinned, compute, False, count=1024, n=1)
    beyond = va + x.size + 4096 * 64  # not mapped in this context
    result = compute.run([dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(va), u64_arg(16)),
                          dispatch(Kernel.FILL_U32, buffer_arg(beyond), u64_arg(4),
                                   u64_arg(0))])
    assert (result.status, result.header.failed_index) == (Status.FAULT, 1)
    assert result.header.fault_address == beyond and result.header.completed == 1
    result = compute.run([encode_command(Op.FILL, FillCmd(va + 2, 8, 0), 1)])
    assert result.status is Status.INVALID_ARGUMENT  # FILL needs 4-byte alignment
    assert result.response.name == Resp.ERR_INVALID_PARAMETER.name


# --- fences -------------------------------------------------------------------------------


def _long_work(pinned: BufferPool, compute: ComputeContext, size: int = 384,
               repeat: int = 16) -> tuple[list[bytes], PinnedBuffer, npt.NDArray[np.float32]]:
    """Matrix products that keep the host engine busy, and the expected last product."""
    a, c = pinned(4 * size * size, huge=True), pinned(4 * size * size, huge=True)
    matrix = a.view(np.float32).reshape(size, size)
    matrix[:] = np.random.default_rng(9).standard_normal((size, size), dtype=np.float32) / 16
    a_va, c_va = compute.map(compute.register(a), compute.register(c))
    product = dispatch(Kernel.MATMUL_F32, buffer_arg(c_va), buffer_arg(a_va), buffer_arg(a_va),
                       u64_arg(size), u64_arg(size), u64_arg(size))
    return [product] * repeat, c, matrix @ matrix


def test_a_fenced_submission_completes_after_its_work(gpu: VirtioGpu, pinned: BufferPool,
                                                      compute: ComputeContext) -> None:
    work, c, expected = _long_work(pinned, compute)
    flag = pinned(4096)
    (flag_va,) = compute.map(compute.register(flag))
    work.append(encode_command(Op.SIGNAL, SignalCmd(flag_va, 0x5EED), 99))
    pending = compute.start(work)  # fenced, global timeline
    response = gpu.wait(pending)
    assert flag.view(np.uint64)[0] == 0x5EED  # already there when the fence is answered
    assert np.allclose(c.view(np.float32).reshape(expected.shape), expected, atol=1e-3)
    assert response.name == Resp.OK_NODATA.name
    assert response.flags & CtrlFlag.FENCE and not response.flags & CtrlFlag.INFO_RING_IDX
    assert response.fence_id == compute.last_fence_id and response.ctx_id == compute.ctx_id


def test_a_fenced_command_waits_for_earlier_global_work(gpu: VirtioGpu, pinned: BufferPool,
                                                        compute: ComputeContext) -> None:
    work, c, expected = _long_work(pinned, compute)
    compute.start(work, fenced=False)  # answered at once; the work runs on
    fence = gpu.new_fence()
    response = gpu.command(Cmd.RESOURCE_UNREF, ResourceUnref(0xFE11CE), fence_id=fence)
    assert response.name == Resp.ERR_INVALID_RESOURCE_ID.name and response.fence_id == fence
    header, _ = compute.results(len(work))
    assert Status(header.status) is Status.OK and header.completed == len(work)
    assert np.allclose(c.view(np.float32).reshape(expected.shape), expected, atol=1e-3)


def test_ring_fences_complete_in_order_per_ring(gpu: VirtioGpu, pinned: BufferPool,
                                                compute: ComputeContext) -> None:
    work, c, expected = _long_work(pinned, compute)
    flags = pinned(4096)
    (flag_va,) = compute.map(compute.register(flags))
    slot = 1024  # result records of the second ring's streams go here
    compute.start(work, ring_idx=3, fenced=False)
    signal = [encode_command(Op.SIGNAL, SignalCmd(flag_va, 33), 1)]
    behind = compute.start(signal, ring_idx=3)  # same ring: after the long work
    other = compute.start([encode_command(Op.SIGNAL, SignalCmd(flag_va + 8, 44), 2)],
                          ring_idx=5, result_offset=slot)
    done = compute.finish(behind, 1)
    assert done.response.ring_idx == 3
    assert done.response.flags & CtrlFlag.INFO_RING_IDX and done.response.flags & CtrlFlag.FENCE
    assert flags.view(np.uint64)[0] == 33
    assert np.allclose(c.view(np.float32).reshape(expected.shape), expected, atol=1e-3)
    header, _ = compute.results(len(work))  # overwritten by `behind`: 1 command completed
    assert header.completed == 1
    finished = compute.finish(other, 1, result_offset=slot)
    assert finished.response.ring_idx == 5 and finished.status is Status.OK
    assert flags.view(np.uint64)[1] == 44


def test_a_reset_with_work_in_flight_drops_it_and_serves_again(
        gpu: VirtioGpu, pinned: BufferPool, compute: ComputeContext) -> None:
    work, _, _ = _long_work(pinned, compute)
    abandoned = compute.start(work)  # a test that dies here leaves this in the ring
    gpu.reinitialize()  # what recovery does: the device finishes or drops it, then resets
    with pytest.raises(DeviceTimeout, match="reset"):
        gpu.wait(abandoned, timeout=5.0)
    assert gpu.inflight == 0
    assert gpu.command(Cmd.RESOURCE_UNREF, ResourceUnref(0xFE11CF)).name == \
        Resp.ERR_INVALID_RESOURCE_ID.name
    assert not gpu.userptrs  # the reset dropped every blob; the pool just frees the pages


def test_work_in_flight_at_vm_stop_completes_after_cont(
        gpu: VirtioGpu, pinned: BufferPool, compute: ComputeContext,
        control_channel: ControlChannel) -> None:
    """VM stop takes the rings back while compute work runs (the device finishes it and
    answers first); after cont the fence arrives, the results are right and the ring
    serves on from where it stopped."""
    # seconds of host work: far longer than the pause request takes to reach QMP
    work, c, expected = _long_work(pinned, compute, repeat=240)
    pending = compute.start(work)  # fenced: answered once the work is done
    gpu.poll()
    assert pending.written is None, "the work ended before the VM stopped: make it longer"
    control_channel.pause_vm()
    response = gpu.wait(pending)
    assert response.name == Resp.OK_NODATA.name and response.fence_id == compute.last_fence_id
    assert np.allclose(c.view(np.float32).reshape(expected.shape), expected, atol=1e-3)
    header, _ = compute.results(len(work))
    assert Status(header.status) is Status.OK and header.completed == len(work)
    assert gpu.command(Cmd.RESOURCE_UNREF, ResourceUnref(0xFE11D0)).name == \
        Resp.ERR_INVALID_RESOURCE_ID.name
