"""The compute engine in process: a context over the simulated GPU's page table, whose
blobs are scattered pages of a host arena (no back-end process, no guest)."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import numpy.typing as npt

from protocol.compute import decode_stream, encode_stream
from vgpu_backend.compute.buffers import PAGE, Buffer
from vgpu_backend.compute.engine import ContextVm, Engine, Mapping, Outcome, ResultTarget
from vgpu_backend.hostgpu import hostmem
from vgpu_backend.hostgpu.base import GpuMapping, UserptrPath
from vgpu_backend.hostgpu.sim_vm import SimBo, SimGpuVm

__all__ = ["PAGE", "EngineScene"]

U8 = npt.NDArray[np.uint8]
GPU_ID = 0x1002
#: VA left unmapped after each blob (so a range running past a blob faults)
GUARD = 16 * PAGE


class EngineScene:
    """One context of an :class:`Engine` over a fresh arena of ``pages`` host pages:
    blobs take arena pages in a shuffled order, at increasing GPU VAs with an unmapped
    gap after each.  :meth:`close` unmaps the arena."""

    def __init__(self, pages: int = 64, *, seed: int = 0, job_timeout: float = float("inf"),
                 max_staging: int = 1 << 62) -> None:
        self.pages = pages
        self.base = hostmem.map_anonymous(pages * PAGE)
        self.arena: U8 = hostmem.view(self.base, pages * PAGE)
        rng = np.random.default_rng(seed)
        self.arena[:] = rng.integers(0, 256, pages * PAGE, dtype=np.uint8)
        self.free = [int(p) for p in rng.permutation(pages)]
        self.table = SimGpuVm(GPU_ID, 0, (1 << 47) - 1)
        self.vm = ContextVm(1)
        self.engine = Engine(self.table, job_timeout=job_timeout, max_staging=max_staging)
        self._ids = itertools.count(1)
        self._next_va = 0x10_0000

    def close(self) -> None:
        """Unmap the arena (no view of it may be used afterwards)."""
        hostmem.unmap(self.base, self.pages * PAGE)

    def blob(self, pages: int, *, readonly: bool = False, mapped: bool = True,
             host_pages: list[int] | None = None, guard: bool = True) -> Mapping:
        """A blob of ``pages`` arena pages (the next free ones, or ``host_pages``) in the
        page table, and (``mapped``) in the context's mappings; with ``guard`` an
        unmapped gap follows it, else the next blob starts right after it."""
        if host_pages is None:
            host_pages, self.free = self.free[:pages], self.free[pages:]
        assert len(host_pages) == pages, "the arena is too small"
        handle, va, size = next(self._ids), self._next_va, pages * PAGE
        self._next_va += size + (GUARD if guard else 0)
        starts = self.base + np.array(host_pages, dtype=np.int64) * PAGE
        self.table.map(SimBo(handle=handle, gpu_id=GPU_ID, va=va, size=size, flags=0,
                             writable=not readonly, host_starts=starts,
                             host_sizes=np.full(pages, PAGE, dtype=np.int64), charged=0,
                             mmap_offset=0))
        mapping = Mapping(handle, va, size, readonly,
                          GpuMapping(va, size, readonly, UserptrPath.BATCH, (GPU_ID,)))
        if mapped:
            with self.vm.lock:
                self.vm.mappings[handle] = mapping
        return mapping

    def buffer(self, va: int, nbytes: int) -> Buffer:
        """The bytes at ``[va, va + nbytes)`` through the page table."""
        return Buffer(va, nbytes, *self.table.resolve_arrays(va, nbytes, write=False))

    def read(self, va: int, nbytes: int) -> bytes:
        """Bytes at a GPU VA."""
        return self.buffer(va, nbytes).gather().tobytes()

    def write(self, va: int, data: bytes) -> None:
        """Store bytes at a GPU VA."""
        self.buffer(va, len(data)).scatter(np.frombuffer(data, np.uint8))

    def run(self, commands: list[bytes], *, target: ResultTarget | None = None,
            prepared: dict[int, Mapping] | None = None,
            cancel: threading.Event | None = None) -> Outcome:
        """Decode a stream of ``commands`` and run it in the context."""
        _, decoded = decode_stream(encode_stream(commands))
        return self.engine.run(self.vm, decoded, prepared or {}, target, cancel)
