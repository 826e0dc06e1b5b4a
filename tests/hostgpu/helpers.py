"""Helpers for the host GPU tests: real guest RAM (a memfd mapped shared), raw ioctls
on the simulated kernel, leak probes."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from protocol.wire import decode
from vgpu_backend.hostgpu import hostmem
from vgpu_backend.hostgpu import kfd_abi as abi
from vgpu_backend.hostgpu.base import HostRanges
from vgpu_backend.hostgpu.kfd import KfdHostGpu
from vgpu_backend.hostgpu.sim_kfd import SimTransport

PAGE = abi.PAGE_SIZE


def open_fds() -> set[str]:
    """This process's open descriptors (as ``/proc/self/fd`` lists them)."""
    return set(os.listdir("/proc/self/fd"))


def assert_no_new_fds(before: set[str]) -> None:
    """No descriptor opened since ``before`` is still open (descriptors other threads of
    the test process closed meanwhile, e.g. an earlier module's sessions, are no leak)."""
    left = open_fds() - before
    assert not left, f"descriptors left open: {sorted(left, key=int)}"


def maps_lines(needle: str) -> int:
    """Mappings in ``/proc/self/maps`` whose line contains ``needle``."""
    with open("/proc/self/maps") as f:
        return sum(needle in line for line in f)


class GuestRam:
    """A memfd of ``pages`` pages mapped shared, filled with random bytes."""

    def __init__(self, pages: int, name: str) -> None:
        self.name = name
        self.size = pages * PAGE
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.base = hostmem.map_file(self.size, self.fd)
        self.mem = hostmem.view(self.base, self.size)
        self.mem[:] = np.random.default_rng(7).integers(0, 256, self.size, dtype=np.uint8)

    def ranges(self, pages: Sequence[int], counts: Sequence[int] | None = None) -> HostRanges:
        """Ranges starting at the given page numbers, ``counts`` pages long (default 1)."""
        starts = np.asarray(pages, dtype=np.uint64) * PAGE
        lengths = np.asarray(counts if counts is not None else [1] * len(pages),
                             dtype=np.uint64) * PAGE
        return HostRanges(addr=starts + np.uint64(self.base), length=lengths,
                          fd=np.full(len(pages), self.fd, dtype=np.int32),
                          file_offset=starts)

    def file_bytes(self, ranges: HostRanges) -> bytes:
        """The memfd's bytes behind ``ranges``, read with ``pread`` (not the mapping)."""
        return b"".join(os.pread(self.fd, int(n), int(off))
                        for off, n in zip(ranges.file_offset, ranges.length, strict=True))

    def close(self) -> None:
        hostmem.unmap(self.base, self.size)
        os.close(self.fd)




def fail_unmap_once(monkeypatch: pytest.MonkeyPatch, addr: int) -> None:
    """The next ``hostmem.unmap`` of ``addr`` fails with EINVAL (and unmaps nothing)."""
    real: Callable[[int, int], None] = hostmem.unmap
    armed = [True]

    def unmap(at: int, length: int) -> None:
        if at == addr and armed[0]:
            armed[0] = False
            raise OSError(errno.EINVAL, f"munmap({at:#x}): injected failure")
        real(at, length)

    monkeypatch.setattr(hostmem, "unmap", unmap)


def read_runs(runs: list[tuple[int, int]]) -> bytes:
    """The bytes of host runs, through zero-copy views."""
    return b"".join(hostmem.view(a, n).tobytes() for a, n in runs)


# --- host GPUs with leak checks ------------------------------------------------------------

MakeGpu = Callable[..., tuple[KfdHostGpu, SimTransport]]




# --- raw ioctls on the simulated kernel ------------------------------------------------------


class RawKfd:
    """A /dev/kfd fd on a :class:`SimTransport`, for driving the kernel directly."""

    def __init__(self, transport: SimTransport) -> None:
        self.t = transport
        self.fd = transport.open("/dev/kfd")
        self.render: dict[int, int] = {}
        self.gpus = transport.kernel.gpus

    def call(self, request: int, record: tuple[Any, ...]) -> tuple[int, Any]:
        """Issue ``request`` with ``record``; ``(errno or 0, record copied back)``."""
        buf = abi.pack(record)
        err = 0
        try:
            self.t.ioctl(self.fd, request, buf)
        except OSError as e:
            err = e.errno or -1
        return err, decode(type(record), buf)

    def acquire(self, index: int = 0) -> int:
        gpu = self.gpus[index]
        fd = self.t.open(f"/dev/dri/renderD{gpu.render_minor}")
        self.render[gpu.gpu_id] = fd
        err, _ = self.call(abi.AMDKFD_IOC_ACQUIRE_VM, abi.AcquireVmArgs(fd, gpu.gpu_id))
        assert err == 0
        return gpu.gpu_id

    def alloc(self, va: int, size: int, ptr: int, flags: int, gpu_id: int | None = None
              ) -> tuple[int, abi.AllocMemoryOfGpuArgs]:
        gid = self.gpus[0].gpu_id if gpu_id is None else gpu_id
        return self.call(abi.AMDKFD_IOC_ALLOC_MEMORY_OF_GPU,
                         abi.AllocMemoryOfGpuArgs(va, size, 0, ptr, gid, flags))

    def map(self, handle: int, ids: Sequence[int], n_success: int = 0, *, unmap: bool = False
            ) -> tuple[int, abi.MapMemoryToGpuArgs]:
        self._ids = np.array(ids, dtype=np.uint32)
        request = abi.AMDKFD_IOC_UNMAP_MEMORY_FROM_GPU if unmap \
            else abi.AMDKFD_IOC_MAP_MEMORY_TO_GPU
        return self.call(request, abi.MapMemoryToGpuArgs(
            handle, self._ids.ctypes.data, len(ids), n_success))

    def free(self, handle: int) -> int:
        return self.call(abi.AMDKFD_IOC_FREE_MEMORY_OF_GPU, abi.FreeMemoryOfGpuArgs(handle))[0]

    def close(self) -> None:
        for fd in self.render.values():
            self.t.close(fd)
        self.t.close(self.fd)




def ranges_data(starts: Sequence[int], sizes: Sequence[int], reserved: int = 0
                ) -> abi.UserptrRangesData:
    return abi.UserptrRangesData(np.asarray(starts, dtype=np.uint64),
                                 np.asarray(sizes, dtype=np.uint64), reserved=reserved)


def u64(values: Sequence[int]) -> npt.NDArray[np.uint64]:
    return np.asarray(values, dtype=np.uint64)


__all__ = ["PAGE", "GuestRam", "MakeGpu", "RawKfd", "fail_unmap_once", "maps_lines", "open_fds",
           "ranges_data", "read_runs", "u64"]
