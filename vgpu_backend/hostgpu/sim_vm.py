"""The simulated GPU virtual memory: buffer objects and one GPU's page table.

A :class:`SimBo` is a userptr BO: a GPU VA range backed, in order, by host address
runs.  A :class:`SimGpuVm` is one GPU's VM of one KFD process; mapping a BO there adds
its runs to the page table.  :meth:`SimGpuVm.resolve` answers with host runs (numpy
``searchsorted`` over one flat, sorted run table rebuilt lazily after changes), so the
compute engine reads and writes guest memory in place.

Invalidation works per BO, as in KFD (the MMU notifier marks the whole ``kgd_mem``
invalid and evicts the process's queues): once any CPU range of a BO is invalidated,
every page of it faults until it is freed.  ``resolve`` may run on another thread than
the ioctls; a lock keeps the table consistent, and the runs a caller got stay valid only
until the owner releases or invalidates the mapping.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from vgpu_backend.hostgpu.base import GpuFault, GpuMemory

__all__ = ["SimBo", "SimGpuVm"]

_I64 = npt.NDArray[np.int64]


@dataclass(eq=False)
class SimBo:
    """A userptr buffer object of the simulated kernel.

    ``host_starts``/``host_sizes`` are the CPU ranges in GPU order (one range for a
    plain userptr, the batch list for a batch userptr).
    """

    handle: int
    gpu_id: int
    va: int
    size: int
    flags: int
    writable: bool
    host_starts: _I64
    host_sizes: _I64
    #: bytes charged against the userptr memory limit
    charged: int
    #: mmap_offset returned to user space (0 for batch)
    mmap_offset: int
    #: gpu_ids of the VMs this BO is mapped into
    mapped_on: set[int] = field(default_factory=set)
    #: set by the MMU notifier: the CPU pages behind it went away
    invalid: bool = False
    #: lowest CPU address and one past the highest (a quick filter for the notifier)
    host_lo: int = field(init=False)
    host_hi: int = field(init=False)

    def __post_init__(self) -> None:
        self.host_lo = int(self.host_starts.min())
        self.host_hi = int((self.host_starts + self.host_sizes).max())

    @property
    def end(self) -> int:
        """One past the last GPU VA."""
        return self.va + self.size

    def touches(self, start: int, end: int) -> bool:
        """A CPU range of this BO intersects ``[start, end)``."""
        if self.host_lo >= end or self.host_hi <= start:
            return False
        hit = (self.host_starts < end) & (self.host_starts + self.host_sizes > start)
        return bool(hit.any())


@dataclass
class _RunTable:
    va: _I64
    length: _I64
    host: _I64
    writable: npt.NDArray[np.bool_]
    valid: npt.NDArray[np.bool_]


def _empty_table() -> _RunTable:
    z = np.zeros(0, dtype=np.int64)
    return _RunTable(z, z, z, np.zeros(0, dtype=bool), np.zeros(0, dtype=bool))


class SimGpuVm(GpuMemory):
    """One simulated GPU's page table for one KFD process.

    :param gpu_id: the GPU.
    :param base: first GPU VA of the GPUVM aperture.
    :param limit: last GPU VA of the aperture (inclusive).
    """

    def __init__(self, gpu_id: int, base: int, limit: int) -> None:
        self.gpu_id = gpu_id
        self.base = base
        self.limit = limit
        self._bos: dict[int, SimBo] = {}
        self._table: _RunTable | None = None
        self._lock = threading.Lock()

    # --- kernel side -------------------------------------------------------------------

    def map(self, bo: SimBo) -> None:
        """Add ``bo``'s runs at ``bo.va`` (the caller checked the VA is free)."""
        with self._lock:
            self._bos[bo.handle] = bo
            self._table = None

    def unmap(self, bo: SimBo) -> None:
        """Remove ``bo``'s runs."""
        with self._lock:
            del self._bos[bo.handle]
            self._table = None

    def changed(self) -> None:
        """A mapped BO changed state (e.g. was invalidated)."""
        with self._lock:
            self._table = None

    def mapped(self, bo: SimBo) -> bool:
        """``bo`` is mapped here."""
        return bo.handle in self._bos

    def __len__(self) -> int:
        return len(self._bos)

    def _runs(self) -> _RunTable:
        with self._lock:
            if self._table is None:
                self._table = self._build()
            return self._table

    def _build(self) -> _RunTable:
        bos = sorted(self._bos.values(), key=lambda b: b.va)
        if not bos:
            return _empty_table()
        lengths = [b.host_sizes for b in bos]
        counts = np.array([x.size for x in lengths], dtype=np.int64)
        length = np.concatenate(lengths)
        # GPU VA of every run: its BO's va plus the sizes of the BO's earlier runs
        bo_va = np.repeat(np.array([b.va for b in bos], dtype=np.int64), counts)
        within = np.cumsum(length) - length
        first = np.repeat(np.cumsum(counts) - counts, counts)
        within -= within[first]
        return _RunTable(
            va=bo_va + within,
            length=length,
            host=np.concatenate([b.host_starts for b in bos]),
            writable=np.repeat(np.array([b.writable for b in bos]), counts),
            valid=np.repeat(np.array([not b.invalid for b in bos]), counts),
        )

    # --- GpuMemory ---------------------------------------------------------------------

    def resolve_arrays(self, gpu_va: int, size: int, *, write: bool) -> tuple[_I64, _I64]:
        """:meth:`resolve` as two int64 arrays ``(host_address, length)``."""
        if size < 0:
            raise ValueError(f"negative size {size}")
        if size == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        t = self._runs()
        end = gpu_va + size
        lo = int(np.searchsorted(t.va, gpu_va, side="right")) - 1
        if lo < 0 or int(t.va[lo] + t.length[lo]) <= gpu_va:
            raise GpuFault(f"GPU {self.gpu_id:#x}: VA {gpu_va:#x} is not mapped", gpu_va, write)
        hi = int(np.searchsorted(t.va, end, side="left"))
        va = t.va[lo:hi]
        length = t.length[lo:hi]
        gaps = np.flatnonzero(va[1:] != va[:-1] + length[:-1])
        if gaps.size:
            at = int(va[gaps[0]] + length[gaps[0]])
            raise GpuFault(f"GPU {self.gpu_id:#x}: VA {at:#x} is not mapped", at, write)
        last = va[-1] + length[-1]
        if last < end:
            at = int(last)
            raise GpuFault(f"GPU {self.gpu_id:#x}: VA {at:#x} is not mapped", at, write)
        bad_valid = np.flatnonzero(~t.valid[lo:hi])
        if bad_valid.size:
            at = max(int(va[bad_valid[0]]), gpu_va)
            raise GpuFault(f"GPU {self.gpu_id:#x}: VA {at:#x} was invalidated (its host "
                           "memory went away)", at, write)
        if write:
            bad_ro = np.flatnonzero(~t.writable[lo:hi])
            if bad_ro.size:
                at = max(int(va[bad_ro[0]]), gpu_va)
                raise GpuFault(f"GPU {self.gpu_id:#x}: write to read-only VA {at:#x}",
                               at, write)
        host = t.host[lo:hi].copy()
        length = length.copy()
        head = gpu_va - int(va[0])
        host[0] += head
        length[0] -= head
        length[-1] -= int(last) - end
        # merge runs whose host memory is contiguous
        starts = np.ones(host.size, dtype=bool)
        starts[1:] = host[1:] != host[:-1] + length[:-1]
        idx = np.flatnonzero(starts)
        return host[idx], np.add.reduceat(length, idx)
