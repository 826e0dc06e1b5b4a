"""The host GPU interface the device talks to.

One interface, :class:`HostGpu`.  Its implementation is the KFD driver
(``vgpu_backend.hostgpu.kfd``), which issues real ``AMDKFD_IOC_*`` ioctls through a
:class:`~vgpu_backend.hostgpu.transport.KfdTransport`: the OS transport on a host with
``/dev/kfd``, or the simulated KFD (``vgpu_backend.hostgpu.sim_kfd``), the embedded
default, which enforces the same kernel rules.  The device only ever sees this
module's types.

Life of a USERPTR blob on the host::

    ranges = HostRanges(...)              # guest entries translated to host VAs
    mapping = gpu.register_userptr(ranges, readonly=False, context=None)
    ...                                   # mapping.gpu_va is one contiguous GPU VA
    gpu.release(mapping)                  # unmapped and freed when this returns

Before any host memory that may back a mapping is unmapped, the owner calls
:meth:`HostGpu.invalidate_host_range` (the analogue of an MMU-notifier callback).
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "GpuFault",
    "GpuMapping",
    "GpuMemory",
    "HostGpu",
    "HostGpuError",
    "HostGpuInfo",
    "HostRanges",
    "UserptrPath",
]


class HostGpuError(Exception):
    """A host GPU operation failed (not the guest's fault).

    :param message: what failed.
    :param errno: the kernel errno, when an ioctl failed.
    :param unsupported: the operation can never succeed in this configuration
        (e.g. USERPTR on a secondary KFD process): the device answers the guest with
        an error and logs the reason once.
    """

    def __init__(self, message: str, errno: int | None = None, *,
                 unsupported: bool = False) -> None:
        super().__init__(message)
        self.errno = errno
        self.unsupported = unsupported


class GpuFault(Exception):
    """A GPU access hit an unmapped, invalidated or read-only page.

    :param address: the faulting GPU virtual address.
    :param write: the access was a write.
    """

    def __init__(self, message: str, address: int, write: bool) -> None:
        super().__init__(message)
        self.address = address
        self.write = write


class UserptrPath(enum.Enum):
    """How scattered host ranges become one GPU buffer."""

    #: one ALLOC_MEMORY_OF_GPU with USERPTR|USERPTR_BATCH and the range list
    BATCH = "batch"
    #: map the ranges contiguously into a reserved host VA, then one ordinary USERPTR
    ALIAS = "alias"
    #: one ordinary USERPTR allocation per range, at consecutive GPU VAs
    PER_RANGE = "per-range"


@dataclass(frozen=True, slots=True)
class HostRanges:
    """Host-virtual ranges of one buffer, in buffer order.

    All arrays have the same length.  ``addr`` and ``length`` are page aligned and
    non-zero; ``fd``/``file_offset`` say which file (the guest-RAM memfd) backs each
    range and where, for the alias path.
    """

    addr: npt.NDArray[np.uint64]
    length: npt.NDArray[np.uint64]
    fd: npt.NDArray[np.int32]
    file_offset: npt.NDArray[np.uint64]

    def __len__(self) -> int:
        return int(self.addr.shape[0])

    @property
    def total(self) -> int:
        """Sum of the range lengths."""
        return int(self.length.sum(dtype=np.uint64))


@dataclass(slots=True)
class GpuMapping:
    """One buffer registered with the host GPU and mapped at one GPU VA range."""

    gpu_va: int
    size: int
    readonly: bool
    path: UserptrPath
    gpu_ids: tuple[int, ...]
    context: int | None = None
    #: implementation-private state (handles, alias reservation, ...)
    private: Any = field(default=None, repr=False)
    #: set once the mapping is released or torn down by an invalidation: its GPU VA
    #: range may then belong to another buffer
    invalidated: bool = False


@dataclass(frozen=True, slots=True)
class HostGpuInfo:
    """What the host GPU layer is and can do (for logs and the userptr capset)."""

    #: "kfd" (real /dev/kfd) or "sim" (simulated KFD)
    backend: str
    #: path used for new userptr buffers
    userptr_path: UserptrPath
    #: the kernel accepted a USERPTR_BATCH probe
    batch_supported: bool
    gpu_ids: tuple[int, ...]
    kfd_version: tuple[int, int]
    #: "vm" (one KFD process) or "context" (a secondary KFD process per context)
    isolation: str
    #: USERPTR works in this configuration (False with context isolation)
    userptr_available: bool
    #: what the USERPTR probe found (why it is unavailable, say)
    userptr_detail: str = ""
    #: most host ranges one buffer may have on this path (after coalescing)
    max_ranges: int = 1 << 32
    #: the same for guest RAM on host huge pages (``auto`` takes per-range there when
    #: alias cannot map it)
    max_ranges_huge_pages: int = 1 << 32


class GpuMemory(abc.ABC):
    """GPU-virtual memory as the GPU sees it through its page table (simulated GPUs).

    The compute engine reads and writes guest memory only through this.
    """

    @abc.abstractmethod
    def resolve_arrays(self, gpu_va: int, size: int, *, write: bool) -> tuple[
            npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Host addresses and lengths of the runs backing ``[gpu_va, gpu_va+size)``,
        in order, host-contiguous neighbours merged.

        :raise GpuFault: a page is unmapped, invalidated, or read-only and ``write``.
        """

    def resolve(self, gpu_va: int, size: int, *, write: bool) -> list[tuple[int, int]]:
        """:meth:`resolve_arrays` as a list of ``(address, length)`` pairs."""
        host, length = self.resolve_arrays(gpu_va, size, write=write)
        return list(zip(host.tolist(), length.tolist(), strict=True))


class HostGpu(abc.ABC):
    """The host GPU as the device needs it."""

    @abc.abstractmethod
    def info(self) -> HostGpuInfo:
        """Describe the implementation."""

    @abc.abstractmethod
    def register_userptr(self, ranges: HostRanges, *, readonly: bool,
                         context: int | None = None) -> GpuMapping:
        """Make ``ranges`` one GPU buffer, mapped on every selected GPU.

        Synchronous: when this returns, the GPU page tables are updated.

        :param context: virtio-gpu context id (selects the KFD process in context
            isolation); ``None`` for context-less blobs.
        :raise HostGpuError: the host refused; nothing stays allocated.
        """

    @abc.abstractmethod
    def release(self, mapping: GpuMapping) -> None:
        """Unmap ``mapping`` from every GPU and free it; complete when this returns.

        Idempotent; never raises for a mapping that was already invalidated.
        """

    @abc.abstractmethod
    def invalidate_host_range(self, addr: int, length: int) -> list[GpuMapping]:
        """Host memory ``[addr, addr+length)`` is about to be unmapped: tear down every
        mapping that touches it (marking it ``invalidated``) and return them."""

    def open_context(self, context: int) -> None:  # noqa: B027 - optional hook
        """A virtio-gpu context was created (context isolation opens a KFD process)."""

    def close_context(self, context: int) -> None:  # noqa: B027 - optional hook
        """A virtio-gpu context was destroyed; its mappings were released already."""

    def gpu_memory(self, gpu_id: int | None = None) -> GpuMemory | None:
        """The page-table view of a simulated GPU, or ``None`` on real hardware."""
        return None

    @abc.abstractmethod
    def live_mappings(self) -> int:
        """Number of mappings not yet released (leak checks)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release everything and close every fd."""
