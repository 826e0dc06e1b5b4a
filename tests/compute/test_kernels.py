"""DISPATCH of every kernel on scattered USERPTR blobs; the results in guest memory (and
in the result record) against numpy."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import numpy.typing as npt
import pytest

from protocol.compute import Kernel, Status, buffer_arg, f32_arg, u64_arg
from protocol.virtio_gpu_codes import Resp
from tests.userptr.compute_stream import dispatch
from tests.userptr.guest_buffer import GuestBuffer, contiguous_buffer, scattered_buffer
from tests.userptr.vm import Blob, ComputeContext, Vm

F32 = np.float32
RNG = np.random.default_rng(2024)


@pytest.fixture
def vm(shared_vm: Vm) -> Vm:
    """The tests of this module share one back-end (each uses its own context)."""
    return shared_vm


def array_blob(ctx: ComputeContext, values: npt.NDArray[np.generic], *, lead: int = 0,
               contiguous: bool = False) -> tuple[Blob, int]:
    """A blob holding ``values`` after ``lead`` bytes of random filler; the blob and the
    GPU VA of the first value."""
    nbytes = lead + values.nbytes
    buffer = contiguous_buffer(ctx.vm.ram, nbytes) if contiguous else None
    data = ctx.vm.random_bytes(lead) + values.tobytes()
    blob = ctx.blob(nbytes, buffer=buffer, data=data + ctx.vm.random_bytes(-nbytes % 4096))
    (va,) = ctx.map(blob)
    return blob, va + lead


def read_f32(vm: Vm, blob: Blob, count: int, lead: int = 0) -> npt.NDArray[np.float32]:
    """``count`` float32 at byte ``lead`` of the blob."""
    return np.frombuffer(blob.buffer.read(vm.ram, 4 * count, lead), F32)


def run_ok(ctx: ComputeContext, command: bytes) -> int:
    """Run one command; it must succeed; its result value."""
    done = ctx.run([command])
    done.response.expect(Resp.OK_NODATA)
    assert done.results.statuses() == [Status.OK]
    return done.results.values()[0]


def test_fill_u32(vm: Vm) -> None:
    """FILL_U32 stores ``count`` words of ``value``; the words around are untouched."""
    ctx = vm.compute_context()
    blob, va = array_blob(ctx, np.zeros(3000, np.uint32), lead=12)
    before = np.frombuffer(blob.buffer.read(vm.ram), np.uint32).copy()
    assert run_ok(ctx, dispatch(Kernel.FILL_U32, buffer_arg(va + 40), u64_arg(2500),
                                u64_arg(0xCAFEF00D))) == 2500
    want = before.copy()
    want[3 + 10:3 + 10 + 2500] = 0xCAFEF00D
    assert np.array_equal(np.frombuffer(blob.buffer.read(vm.ram), np.uint32), want)


@pytest.mark.parametrize(("dst", "src"), [(0, 5001), (3, 1), (1, 3)])
def test_copy_kernel(vm: Vm, dst: int, src: int) -> None:
    """The COPY kernel is memmove, also overlapping and at odd byte offsets."""
    ctx = vm.compute_context()
    blob, va = array_blob(ctx, RNG.integers(0, 256, 12000, dtype=np.uint8))
    before = bytearray(blob.buffer.read(vm.ram))
    size = 6000
    assert run_ok(ctx, dispatch(Kernel.COPY, buffer_arg(va + dst), buffer_arg(va + src),
                                u64_arg(size))) == size
    before[dst:dst + size] = bytes(before[src:src + size])
    assert blob.buffer.read(vm.ram) == bytes(before)


def test_copy_between_blobs_over_the_same_pages(vm: Vm) -> None:
    """Two blobs over one guest buffer of scattered pages, the destination's starting a
    page later and mapped below the source's: COPY is still memmove in GPU virtual
    space (a walk in VA order would overwrite source pages before reading them)."""
    ctx = vm.compute_context()
    pages, page = 600, 4096  # more than one 2 MiB block
    guest = scattered_buffer(vm.ram, (pages + 1) * page)
    later = ctx.blob(pages * page, buffer=GuestBuffer(guest.entries[1:]))
    earlier = ctx.blob(pages * page, buffer=GuestBuffer(guest.entries[:-1]))
    va_later, va_earlier = ctx.map(later, earlier)
    assert va_later < va_earlier
    before = guest.read(vm.ram)
    assert run_ok(ctx, dispatch(Kernel.COPY, buffer_arg(va_later), buffer_arg(va_earlier),
                                u64_arg(pages * page))) == pages * page
    assert guest.read(vm.ram) == before[:page] + before[:pages * page]


def test_vadd_f32(vm: Vm) -> None:
    """dst = a + b, with the three operands in different blobs at different offsets."""
    ctx = vm.compute_context()
    n = 5000
    a, b = RNG.standard_normal(n).astype(F32), RNG.standard_normal(n).astype(F32)
    blob_a, va_a = array_blob(ctx, a, lead=4)
    _, va_b = array_blob(ctx, b, lead=2048)
    out, va_out = array_blob(ctx, np.zeros(n, F32), lead=100)
    assert run_ok(ctx, dispatch(Kernel.VADD_F32, buffer_arg(va_out), buffer_arg(va_a),
                                buffer_arg(va_b), u64_arg(n))) == n
    assert np.array_equal(read_f32(vm, out, n, 100), a + b)
    assert np.array_equal(read_f32(vm, blob_a, n, 4), a)


@pytest.mark.parametrize("alpha", [2.5, -0.125, 0.0])
def test_saxpy_f32(vm: Vm, alpha: float) -> None:
    """y = a*x + y in float32."""
    ctx = vm.compute_context()
    n = 4099
    x, y = RNG.standard_normal(n).astype(F32), RNG.standard_normal(n).astype(F32)
    _, va_x = array_blob(ctx, x, lead=8)
    blob_y, va_y = array_blob(ctx, y)
    assert run_ok(ctx, dispatch(Kernel.SAXPY_F32, buffer_arg(va_y), buffer_arg(va_x),
                                u64_arg(n), f32_arg(alpha))) == n
    np.testing.assert_allclose(read_f32(vm, blob_y, n), F32(alpha) * x + y, rtol=1e-6,
                               atol=1e-6)


def test_reduce_sum_f32(vm: Vm) -> None:
    """The sum (float64 in the result value, float32 at ``out``)."""
    ctx = vm.compute_context()
    n = 10000
    x = RNG.uniform(-1, 1, n).astype(F32)
    _, va_x = array_blob(ctx, x, lead=4)
    out, va_out = array_blob(ctx, np.full(1, 99, F32), lead=16)
    bits = run_ok(ctx, dispatch(Kernel.REDUCE_SUM_F32, buffer_arg(va_x), u64_arg(n),
                                buffer_arg(va_out)))
    total = struct.unpack("<d", struct.pack("<Q", bits))[0]
    assert total == pytest.approx(float(np.sum(x, dtype=np.float64)), rel=1e-9, abs=1e-9)
    assert read_f32(vm, out, 1, 16)[0] == F32(total)


@pytest.mark.parametrize("contiguous", [False, True], ids=["scattered", "contiguous"])
def test_matmul_f32(vm: Vm, contiguous: bool) -> None:
    """c[m,n] = a[m,k] @ b[k,n], operands spanning pages (staged) or single runs."""
    ctx = vm.compute_context()
    m, n, k = 37, 29, 53
    a = RNG.standard_normal((m, k)).astype(F32)
    b = RNG.standard_normal((k, n)).astype(F32)
    _, va_a = array_blob(ctx, a, contiguous=contiguous)
    _, va_b = array_blob(ctx, b, lead=4, contiguous=contiguous)
    c_blob, va_c = array_blob(ctx, np.zeros(m * n, F32), lead=8, contiguous=contiguous)
    assert run_ok(ctx, dispatch(Kernel.MATMUL_F32, buffer_arg(va_c), buffer_arg(va_a),
                                buffer_arg(va_b), u64_arg(m), u64_arg(n), u64_arg(k))) == m * n
    got = read_f32(vm, c_blob, m * n, 8).reshape(m, n)
    np.testing.assert_allclose(got, a @ b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("start", "size"), [(0, 1), (1, 4095), (777, 3 * 4096 + 5)])
def test_checksum_crc32(vm: Vm, start: int, size: int) -> None:
    """CRC-32 (zlib's) of any byte range, unaligned included."""
    ctx = vm.compute_context()
    blob, va = array_blob(ctx, RNG.integers(0, 256, 4 * 4096, dtype=np.uint8))
    crc = run_ok(ctx, dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(va + start), u64_arg(size)))
    assert crc == zlib.crc32(blob.buffer.read(vm.ram, size, start))


def test_pipeline_in_one_stream(vm: Vm) -> None:
    """Several kernels in one stream, each using the previous one's output."""
    ctx = vm.compute_context()
    n = 2048
    x = RNG.standard_normal(n).astype(F32)
    _, va_x = array_blob(ctx, x)
    y_blob, va_y = array_blob(ctx, np.zeros(n, F32))
    s_blob, va_s = array_blob(ctx, np.zeros(1, F32))
    done = ctx.run([
        dispatch(Kernel.FILL_U32, buffer_arg(va_y), u64_arg(n), u64_arg(0x3F800000)),  # 1.0
        dispatch(Kernel.SAXPY_F32, buffer_arg(va_y), buffer_arg(va_x), u64_arg(n),
                 f32_arg(3.0)),
        dispatch(Kernel.VADD_F32, buffer_arg(va_y), buffer_arg(va_y), buffer_arg(va_x),
                 u64_arg(n)),
        dispatch(Kernel.REDUCE_SUM_F32, buffer_arg(va_y), u64_arg(n), buffer_arg(va_s)),
    ])
    done.response.expect(Resp.OK_NODATA)
    want = (F32(3.0) * x + F32(1.0)) + x
    np.testing.assert_allclose(read_f32(vm, y_blob, n), want, rtol=1e-6, atol=1e-6)
    assert read_f32(vm, s_blob, 1)[0] == pytest.approx(float(np.sum(want, dtype=np.float64)),
                                                       rel=1e-5)
