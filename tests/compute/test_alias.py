"""Contiguous views of scattered guest-RAM pages (``vgpu_backend.compute.alias``): the
same memory, not a copy, and MATMUL on them stages nothing."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from vgpu_backend.compute.alias import MIN_ALIAS_RUN, aliased
from vgpu_backend.compute.buffers import Buffer
from vgpu_backend.compute.kernels import KernelStats, matmul_f32

RUN = MIN_ALIAS_RUN
I64 = npt.NDArray[np.int64]


class FileRam:
    """A memfd mapped once, like guest RAM; runs handed out in shuffled order."""

    def __init__(self, runs: int) -> None:
        self.fd = os.memfd_create("alias-test")
        os.ftruncate(self.fd, runs * RUN)
        self.map = mmap.mmap(self.fd, runs * RUN)
        self.array = np.frombuffer(self.map, np.uint8)
        self.base = int(self.array.ctypes.data)
        self.free = list(np.random.default_rng(3).permutation(runs))

    def file_of(self, addr: I64, length: I64) -> tuple[npt.NDArray[np.int32], I64] | None:
        if ((addr < self.base) | (addr + length > self.base + len(self.array))).any():
            return None
        return np.full(addr.shape, self.fd, np.int32), addr - self.base

    def buffer(self, va: int, nbytes: int, *, file_backed: bool = True) -> Buffer:
        count = -(-nbytes // RUN)
        taken, self.free = self.free[:count], self.free[count:]
        addr = self.base + np.array(taken, dtype=np.int64) * RUN
        length = np.full(count, RUN, dtype=np.int64)
        length[-1] = nbytes - RUN * (count - 1)
        return Buffer(va, nbytes, addr, length, self.file_of if file_backed else None)

    def close(self) -> None:
        del self.array
        self.map.close()
        os.close(self.fd)


@pytest.fixture
def ram() -> Iterator[FileRam]:
    ram = FileRam(64)
    yield ram
    ram.close()


def test_a_view_is_the_memory_itself(ram: FileRam) -> None:
    buf = ram.buffer(0x10000, 4 * RUN)
    data = np.random.default_rng(1).integers(0, 256, buf.nbytes, dtype=np.uint8)
    buf.scatter(data)
    with buf.contiguous(writable=True) as view:
        assert view is not None and np.array_equal(view, data)
        view[:RUN] = 7  # writes land in the scattered pages
        data[:RUN] = 7
        assert np.array_equal(buf.gather(), data)
    buf.move(RUN, np.full(16, 9, np.uint8), into_buffer=True)  # and the other way
    with buf.contiguous(writable=False) as view:
        assert view is not None and (view[RUN:RUN + 16] == 9).all()


def test_no_view_where_it_cannot_or_should_not_be(ram: FileRam) -> None:
    with ram.buffer(0x10000, RUN + 4096, file_backed=False).contiguous(writable=False) as v:
        assert v is None  # not file-backed
    small = ram.buffer(0x90000, 2 * RUN)
    odd = Buffer(small.va, RUN, small.addr + 4096, np.full(2, RUN // 2, np.int64),
                 ram.file_of)
    with odd.contiguous(writable=False) as v:
        assert v is None  # runs shorter than MIN_ALIAS_RUN: cheaper to stage
    addr = np.array([ram.base + 100, ram.base + 8 * RUN], np.int64)
    with aliased(addr, np.full(2, RUN, np.int64), ram.file_of, writable=False) as v:
        assert v is None  # a run starting inside a page cannot be mapped


def test_matmul_reads_aliased_inputs_without_staging(ram: FileRam) -> None:
    """a and b are read through views; c is written through its own runs (staged
    block by block here, its runs being shorter than a row block)."""
    m = n = k = 512  # 1 MiB per matrix: four runs each
    rng = np.random.default_rng(2)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    abuf, bbuf, cbuf = (ram.buffer(va, 4 * m * n) for va in (0x100000, 0x300000, 0x500000))
    abuf.scatter(a.view(np.uint8).reshape(-1))
    bbuf.scatter(b.view(np.uint8).reshape(-1))
    stats = KernelStats()
    matmul_f32(cbuf, abuf, bbuf, m, n, k, stats)
    np.testing.assert_allclose(cbuf.gather().view(np.float32).reshape(m, n), a @ b,
                               rtol=1e-4, atol=1e-3)
    assert stats.staged_bytes == cbuf.nbytes


def test_a_buffer_may_start_and_end_inside_a_page(ram: FileRam) -> None:
    """Page-structured runs: the first starts inside a page, the last ends inside one;
    the view covers exactly the buffer's bytes."""
    addr = ram.base + np.array([8 * RUN + 100, 3 * RUN, 20 * RUN], np.int64)
    length = np.array([RUN - 100, 2 * RUN, 1000], np.int64)
    buf = Buffer(0x10000, int(length.sum()), addr, length, ram.file_of)
    data = np.random.default_rng(4).integers(0, 256, buf.nbytes, dtype=np.uint8)
    buf.scatter(data)
    with buf.contiguous(writable=True) as view:
        assert view is not None and view.shape == (buf.nbytes,)
        assert np.array_equal(view, data)
        view[-10:] = 1
    assert (buf.gather()[-10:] == 1).all()


def test_read_only_views_refuse_writes(ram: FileRam) -> None:
    buf = ram.buffer(0x10000, 2 * RUN)
    with buf.contiguous(writable=False) as view:
        assert view is not None
        with pytest.raises(ValueError, match="read-only"):
            view[0] = 1


def file_mappings() -> int:
    """Mappings of the test's memfd in this process."""
    return Path("/proc/self/maps").read_text().count("memfd:alias-test")


def test_a_failed_mapping_leaves_nothing_behind(ram: FileRam,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The second run cannot be mapped: no view, and no page of the file stays mapped
    (the failed run's range may stay reserved: it might no longer be ours to unmap)."""
    from vgpu_backend.hostgpu import hostmem
    calls: list[int] = []
    real = hostmem.map_file_fixed

    def failing(addr: int, length: int, fd: int, offset: int, **kw: bool) -> None:
        calls.append(addr)
        if len(calls) == 2:
            raise OSError(22, "refused")
        real(addr, length, fd, offset, **kw)

    before = file_mappings()
    monkeypatch.setattr(hostmem, "map_file_fixed", failing)
    with ram.buffer(0x10000, 3 * RUN).contiguous(writable=False) as view:
        assert view is None
    assert len(calls) == 2
    assert file_mappings() == before == 1
