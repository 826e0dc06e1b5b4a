"""One KFD process as the driver uses it, and the KFD topology.

:class:`KfdProcess` owns a ``/dev/kfd`` descriptor (the primary process, or a secondary
one after ``AMDKFD_IOC_CREATE_PROCESS``), one render node per GPU with its VM acquired,
the GPUVM apertures and a GPU VA allocator over their common range.  Its ioctl helper
re-issues the *same* argument buffer on EINTR/EAGAIN (what libhsakmt's ``kmtIoctl``
does); MAP/UNMAP therefore resume from the ``n_success`` the kernel copied back.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from protocol.wire import decode, layout
from vgpu_backend.hostgpu import kfd_abi as abi
from vgpu_backend.hostgpu.base import HostGpuError
from vgpu_backend.hostgpu.gpuva import GpuVaAllocator
from vgpu_backend.hostgpu.transport import KFD_TOPOLOGY, KfdTransport

__all__ = ["KfdProcess", "TopologyGpu", "UnmapError", "ioctl_error", "read_topology"]

log = logging.getLogger(__name__)

#: attempts of one ioctl that keeps failing with EINTR/EAGAIN before giving up
MAX_ATTEMPTS: Final = 1000
_RETRY_ERRNOS: Final = frozenset({errno.EINTR, errno.EAGAIN})


@dataclass(frozen=True, slots=True)
class TopologyGpu:
    """A GPU node of the KFD topology."""

    node: int
    gpu_id: int
    render_minor: int
    name: str


def read_topology(transport: KfdTransport) -> list[TopologyGpu]:
    """GPU nodes (``gpu_id != 0``) from sysfs, by node number."""
    gpus = []
    try:
        nodes = sorted((n for n in transport.list_dir(KFD_TOPOLOGY) if n.isdigit()), key=int)
        for node in nodes:
            base = f"{KFD_TOPOLOGY}/{node}"
            gpu_id = int(transport.read_text(f"{base}/gpu_id").strip() or 0)
            if gpu_id == 0:
                continue
            props = dict(line.split(maxsplit=1) for line in
                         transport.read_text(f"{base}/properties").splitlines()
                         if len(line.split()) == 2)
            name = transport.read_text(f"{base}/name").strip() \
                if transport.exists(f"{base}/name") else ""
            gpus.append(TopologyGpu(int(node), gpu_id, int(props["drm_render_minor"]), name))
    except (OSError, KeyError, ValueError) as e:
        raise HostGpuError(f"cannot read the KFD topology under {KFD_TOPOLOGY}: {e!r}") from e
    return gpus


class UnmapError(HostGpuError):
    """UNMAP_MEMORY_FROM_GPU failed; ``n_success`` GPUs are unmapped (resume there)."""

    def __init__(self, message: str, errno: int | None, *, n_success: int) -> None:
        super().__init__(message, errno)
        self.n_success = n_success


def ioctl_error(request: int, e: OSError, what: str = "") -> HostGpuError:
    """A failed ioctl as a :class:`HostGpuError` carrying its errno."""
    name = abi.IOCTL_NAMES.get(request, f"{request:#x}")
    err = e.errno if e.errno is not None else 0
    detail = f" ({what})" if what else ""
    return HostGpuError(f"AMDKFD_IOC_{name}{detail} failed: {e.strerror or os.strerror(err)}",
                        err)


class KfdProcess:
    """A KFD process with its GPUs acquired.  See the module docstring.

    :param transport: where the kernel is.
    :param gpus: the GPUs to acquire (the first one allocates BOs).
    :param secondary: call ``CREATE_PROCESS`` on a fresh ``/dev/kfd`` fd.
    :param kfd_fd: an already open ``/dev/kfd`` fd to take over (primary only).
    """

    def __init__(self, transport: KfdTransport, gpus: Sequence[TopologyGpu], *,
                 secondary: bool = False, kfd_fd: int | None = None) -> None:
        if not gpus:
            raise ValueError("a KFD process needs at least one GPU")
        self.transport = transport
        self.gpus = tuple(gpus)
        self.gpu_ids = tuple(g.gpu_id for g in gpus)
        self.secondary = secondary
        self.render_fds: list[int] = []
        self.fd = -1
        #: EINTR/EAGAIN retries so far (tests, logs)
        self.retries = 0
        # the kernel reads this array on every MAP/UNMAP; it must outlive the calls
        self._device_ids = np.array(self.gpu_ids, dtype=np.uint32)
        try:
            self.fd = kfd_fd if kfd_fd is not None else self._open("/dev/kfd")
            if secondary:
                self.ioctl(abi.AMDKFD_IOC_CREATE_PROCESS, None)
            for gpu in self.gpus:
                render_fd = self._open(f"/dev/dri/renderD{gpu.render_minor}")
                self.render_fds.append(render_fd)
                self.ioctl(abi.AMDKFD_IOC_ACQUIRE_VM,
                           abi.pack(abi.AcquireVmArgs(render_fd, gpu.gpu_id)),
                           what=f"GPU {gpu.gpu_id:#x}")
            self.va = self._va_allocator()
        except BaseException:
            self.close()
            raise

    def _open(self, path: str) -> int:
        try:
            return self.transport.open(path)
        except OSError as e:
            raise HostGpuError(f"cannot open {path}: {e}", e.errno) from e

    def ioctl(self, request: int, arg: bytearray | None, *, what: str = "") -> None:
        """Issue an ioctl, re-issuing the same buffer on EINTR/EAGAIN.

        :raise HostGpuError: any other failure, or too many retries.
        """
        for attempt in range(MAX_ATTEMPTS):
            try:
                self.transport.ioctl(self.fd, request, arg)
                return
            except OSError as e:
                if e.errno in _RETRY_ERRNOS and attempt + 1 < MAX_ATTEMPTS:
                    self.retries += 1
                    continue
                raise ioctl_error(request, e, what) from e
        raise AssertionError("unreachable")  # pragma: no cover

    # --- apertures, memory ---------------------------------------------------------------

    def apertures(self) -> dict[int, abi.ProcessDeviceApertures]:
        """GET_PROCESS_APERTURES_NEW: every GPU of the process, by gpu_id."""
        query = abi.pack(abi.GetProcessAperturesNewArgs(0, 0))
        self.ioctl(abi.AMDKFD_IOC_GET_PROCESS_APERTURES_NEW, query, what="count")
        count = decode(abi.GetProcessAperturesNewArgs, query).num_of_nodes
        entry = layout(abi.ProcessDeviceApertures)
        table = np.zeros(max(count, 1), dtype=entry.dtype)
        arg = abi.pack(abi.GetProcessAperturesNewArgs(table.ctypes.data, count))
        self.ioctl(abi.AMDKFD_IOC_GET_PROCESS_APERTURES_NEW, arg)
        filled = decode(abi.GetProcessAperturesNewArgs, arg).num_of_nodes
        raw = table[:filled].tobytes()
        out = [decode(abi.ProcessDeviceApertures, raw, i * entry.size) for i in range(filled)]
        return {a.gpu_id: a for a in out}

    def _va_allocator(self) -> GpuVaAllocator:
        apertures = self.apertures()
        missing = [g for g in self.gpu_ids if g not in apertures]
        if missing:
            raise HostGpuError(f"no GPUVM aperture for GPU(s) {missing}")
        base = max(apertures[g].gpuvm_base for g in self.gpu_ids)
        end = min(apertures[g].gpuvm_limit for g in self.gpu_ids) + 1
        base = -(-base // abi.PAGE_SIZE) * abi.PAGE_SIZE
        end -= end % abi.PAGE_SIZE
        if end <= base:
            raise HostGpuError("the selected GPUs have no GPUVM range in common")
        return GpuVaAllocator(base, end)

    def available_memory(self, gpu_id: int) -> int:
        """AVAILABLE_MEMORY of one GPU, in bytes."""
        arg = abi.pack(abi.GetAvailableMemoryArgs(0, gpu_id))
        self.ioctl(abi.AMDKFD_IOC_AVAILABLE_MEMORY, arg, what=f"GPU {gpu_id:#x}")
        return decode(abi.GetAvailableMemoryArgs, arg).available

    def alloc_userptr(self, va: int, size: int, cpu: int, flags: int) -> tuple[int, int]:
        """ALLOC_MEMORY_OF_GPU on the first GPU; ``(handle, mmap_offset returned)``."""
        arg = abi.pack(abi.AllocMemoryOfGpuArgs(va, size, 0, cpu, self.gpu_ids[0], flags))
        self.ioctl(abi.AMDKFD_IOC_ALLOC_MEMORY_OF_GPU, arg, what=f"{size:#x} bytes at {va:#x}")
        out = decode(abi.AllocMemoryOfGpuArgs, arg)
        return out.handle, out.mmap_offset

    def free(self, handle: int) -> None:
        """FREE_MEMORY_OF_GPU."""
        self.ioctl(abi.AMDKFD_IOC_FREE_MEMORY_OF_GPU,
                   abi.pack(abi.FreeMemoryOfGpuArgs(handle)), what=f"handle {handle:#x}")

    def map(self, handle: int) -> None:
        """MAP_MEMORY_TO_GPU on every GPU of the process.

        EINTR/EAGAIN re-issue the same struct, so the kernel resumes at ``n_success``.
        On a hard failure the devices that succeeded are unmapped again and
        :class:`HostGpuError` is raised: the BO is left allocated and unmapped.
        """
        arg = abi.pack(abi.MapMemoryToGpuArgs(handle, self._device_ids.ctypes.data,
                                              len(self.gpu_ids), 0))
        try:
            self.ioctl(abi.AMDKFD_IOC_MAP_MEMORY_TO_GPU, arg, what=f"handle {handle:#x}")
        except HostGpuError as e:
            done = decode(abi.MapMemoryToGpuArgs, arg).n_success
            if done:
                try:
                    self.unmap(handle, count=done)
                except HostGpuError as undo:
                    raise HostGpuError(f"{e}; unmapping the {done} GPU(s) that succeeded "
                                       f"also failed: {undo}", e.errno) from e
            raise HostGpuError(f"{e} (after {done} of {len(self.gpu_ids)} GPUs; rolled back)",
                               e.errno) from e

    def unmap(self, handle: int, *, count: int | None = None, done: int = 0) -> None:
        """UNMAP_MEMORY_FROM_GPU from the first ``count`` GPUs (default all), skipping
        the first ``done`` (unmapped by an earlier, failed call).

        :raise UnmapError: carrying how many GPUs are unmapped now (``n_success``).
        """
        n = len(self.gpu_ids) if count is None else count
        arg = abi.pack(abi.UnmapMemoryFromGpuArgs(handle, self._device_ids.ctypes.data, n,
                                                  done))
        try:
            self.ioctl(abi.AMDKFD_IOC_UNMAP_MEMORY_FROM_GPU, arg, what=f"handle {handle:#x}")
        except HostGpuError as e:
            progress = decode(abi.UnmapMemoryFromGpuArgs, arg).n_success
            raise UnmapError(f"{e} (unmapped from {progress} of {n} GPUs)", e.errno,
                             n_success=progress) from e

    def close(self) -> None:
        """Close the render nodes and the KFD fd (BOs must be freed before)."""
        fds, self.render_fds = [*self.render_fds, self.fd], []
        self.fd = -1
        for fd in fds:
            if fd < 0:
                continue
            try:
                self.transport.close(fd)
            except OSError as e:  # pragma: no cover - close of our own fd
                log.warning("closing fd %d: %s", fd, e)
