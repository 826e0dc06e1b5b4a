"""The KFD UAPI (``include/uapi/linux/kfd_ioctl.h``) as data.

Structs are declared once through :mod:`protocol.wire`; ioctl numbers are computed from
``_IOC(dir, 'K', nr, sizeof(struct))`` with the asm-generic encoding (x86-64, arm64).
The batch-userptr structs and flag come from the (unmerged) series "drm/amdkfd: Add
batch userptr allocation support" v3/v4 patch 1/8; ``AMDKFD_IOC_CREATE_PROCESS`` from
"amdkfd: introduce new ioctl AMDKFD_IOC_CREATE_PROCESS" (KFD 1.19).
"""

from __future__ import annotations

from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

from protocol.wire import U32, U64, layout, wire

__all__ = [
    "AMDKFD_IOC_ACQUIRE_VM",
    "AMDKFD_IOC_ALLOC_MEMORY_OF_GPU",
    "AMDKFD_IOC_AVAILABLE_MEMORY",
    "AMDKFD_IOC_CREATE_PROCESS",
    "AMDKFD_IOC_FREE_MEMORY_OF_GPU",
    "AMDKFD_IOC_GET_PROCESS_APERTURES_NEW",
    "AMDKFD_IOC_GET_VERSION",
    "AMDKFD_IOC_MAP_MEMORY_TO_GPU",
    "AMDKFD_IOC_UNMAP_MEMORY_FROM_GPU",
    "IOCTL_NAMES",
    "KFD_CREATE_PROCESS_MIN_MINOR",
    "KFD_IOCTL_MAJOR_VERSION",
    "PAGE_SIZE",
    "RANGE_DTYPE",
    "AcquireVmArgs",
    "AllocMemoryOfGpuArgs",
    "FreeMemoryOfGpuArgs",
    "GetAvailableMemoryArgs",
    "GetProcessAperturesNewArgs",
    "GetVersionArgs",
    "MapMemoryToGpuArgs",
    "ProcessDeviceApertures",
    "UnmapMemoryFromGpuArgs",
    "UserptrRange",
    "UserptrRangesData",
    "UserptrRangesHeader",
    "handle_gpu_id",
    "header_size",
    "ioc",
    "ioc_dir",
    "ioc_nr",
    "ioc_size",
    "ioc_type",
    "make_handle",
    "pack",
]

#: the page size KFD checks ranges against (x86-64 / arm64 4K kernels)
PAGE_SIZE: Final = 4096

KFD_IOCTL_MAJOR_VERSION: Final = 1
#: ``AMDKFD_IOC_CREATE_PROCESS`` appeared in KFD ioctl 1.19
KFD_CREATE_PROCESS_MIN_MINOR: Final = 19

# --- _IOC encoding (include/uapi/asm-generic/ioctl.h) --------------------------------
_IOC_NRBITS: Final = 8
_IOC_TYPEBITS: Final = 8
_IOC_SIZEBITS: Final = 14
_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT: Final = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT: Final = _IOC_SIZESHIFT + _IOC_SIZEBITS
IOC_NONE: Final = 0
IOC_WRITE: Final = 1
IOC_READ: Final = 2
AMDKFD_IOCTL_BASE: Final = ord("K")


def ioc(direction: int, type_: int, nr: int, size: int) -> int:
    """``_IOC(dir, type, nr, size)``."""
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl size {size} does not fit {_IOC_SIZEBITS} bits")
    return ((direction << _IOC_DIRSHIFT) | (size << _IOC_SIZESHIFT)
            | (type_ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT))


def ioc_dir(request: int) -> int:
    """``_IOC_DIR(request)``: IOC_NONE, IOC_WRITE (in), IOC_READ (out) or both."""
    return (request >> _IOC_DIRSHIFT) & 3


def ioc_type(request: int) -> int:
    """``_IOC_TYPE(request)``."""
    return (request >> _IOC_TYPESHIFT) & ((1 << _IOC_TYPEBITS) - 1)


def ioc_nr(request: int) -> int:
    """``_IOC_NR(request)``."""
    return (request >> _IOC_NRSHIFT) & ((1 << _IOC_NRBITS) - 1)


def ioc_size(request: int) -> int:
    """``_IOC_SIZE(request)``."""
    return (request >> _IOC_SIZESHIFT) & ((1 << _IOC_SIZEBITS) - 1)


# --- structs ---------------------------------------------------------------------------


@wire("struct kfd_ioctl_get_version_args")
class GetVersionArgs(NamedTuple):
    """``struct kfd_ioctl_get_version_args { __u32 major_version; /* from KFD */
    __u32 minor_version; /* from KFD */ };`` (8 bytes)"""

    major_version: U32 = 0
    minor_version: U32 = 0


@wire("struct kfd_ioctl_acquire_vm_args")
class AcquireVmArgs(NamedTuple):
    """``struct kfd_ioctl_acquire_vm_args { __u32 drm_fd; /* to KFD */
    __u32 gpu_id; /* to KFD */ };`` (8 bytes)"""

    drm_fd: U32
    gpu_id: U32


@wire("struct kfd_ioctl_alloc_memory_of_gpu_args")
class AllocMemoryOfGpuArgs(NamedTuple):
    """``struct kfd_ioctl_alloc_memory_of_gpu_args { __u64 va_addr; /* to KFD */
    __u64 size; /* to KFD */ __u64 handle; /* from KFD */
    __u64 mmap_offset; /* to KFD (userptr), from KFD (mmap offset) */
    __u32 gpu_id; /* to KFD */ __u32 flags; };`` (40 bytes)

    With ``USERPTR|USERPTR_BATCH``, ``size`` is the sum of the ranges and
    ``mmap_offset`` points to a ``struct kfd_ioctl_userptr_ranges_data``; the kernel
    writes 0 back into ``mmap_offset``.
    """

    va_addr: U64
    size: U64
    handle: U64
    mmap_offset: U64
    gpu_id: U32
    flags: U32


@wire("struct kfd_ioctl_free_memory_of_gpu_args")
class FreeMemoryOfGpuArgs(NamedTuple):
    """``struct kfd_ioctl_free_memory_of_gpu_args { __u64 handle; /* to KFD */ };``"""

    handle: U64


@wire("struct kfd_ioctl_map_memory_to_gpu_args")
class MapMemoryToGpuArgs(NamedTuple):
    """``struct kfd_ioctl_map_memory_to_gpu_args { __u64 handle; /* to KFD */
    __u64 device_ids_array_ptr; /* to KFD */ __u32 n_devices; /* to KFD */
    __u32 n_success; /* to/from KFD */ };`` (24 bytes)"""

    handle: U64
    device_ids_array_ptr: U64
    n_devices: U32
    n_success: U32


@wire("struct kfd_ioctl_unmap_memory_from_gpu_args")
class UnmapMemoryFromGpuArgs(NamedTuple):
    """``struct kfd_ioctl_unmap_memory_from_gpu_args { __u64 handle; /* to KFD */
    __u64 device_ids_array_ptr; /* to KFD */ __u32 n_devices; /* to KFD */
    __u32 n_success; /* to/from KFD */ };`` (24 bytes)"""

    handle: U64
    device_ids_array_ptr: U64
    n_devices: U32
    n_success: U32


@wire("struct kfd_ioctl_get_process_apertures_new_args")
class GetProcessAperturesNewArgs(NamedTuple):
    """``struct kfd_ioctl_get_process_apertures_new_args {
    __u64 kfd_process_device_apertures_ptr; /* user pointer to a
    kfd_process_device_apertures array */ __u32 num_of_nodes; /* in: capacity, 0 = query
    count; out: filled */ __u32 pad; };`` (16 bytes)"""

    kfd_process_device_apertures_ptr: U64
    num_of_nodes: U32
    pad: U32 = 0


@wire("struct kfd_process_device_apertures")
class ProcessDeviceApertures(NamedTuple):
    """``struct kfd_process_device_apertures { __u64 lds_base; __u64 lds_limit;
    __u64 scratch_base; __u64 scratch_limit; __u64 gpuvm_base; __u64 gpuvm_limit;
    __u32 gpu_id; __u32 pad; };`` (56 bytes; ``*_limit`` are inclusive)"""

    lds_base: U64
    lds_limit: U64
    scratch_base: U64
    scratch_limit: U64
    gpuvm_base: U64
    gpuvm_limit: U64
    gpu_id: U32
    pad: U32 = 0


@wire("struct kfd_ioctl_get_available_memory_args")
class GetAvailableMemoryArgs(NamedTuple):
    """``struct kfd_ioctl_get_available_memory_args { __u64 available; /* from KFD */
    __u32 gpu_id; /* to KFD */ __u32 pad; };`` (16 bytes)"""

    available: U64
    gpu_id: U32
    pad: U32 = 0


@wire("struct kfd_ioctl_userptr_range")
class UserptrRange(NamedTuple):
    """``struct kfd_ioctl_userptr_range { __u64 start; /* CPU VA, page aligned */
    __u64 size; /* page aligned, non-zero */ };`` (16 bytes, batch series)"""

    start: U64
    size: U64


@wire("struct kfd_ioctl_userptr_ranges_data")
class UserptrRangesHeader(NamedTuple):
    """``struct kfd_ioctl_userptr_ranges_data { __u32 num_ranges; __u32 reserved;
    /* must be 0 */ struct kfd_ioctl_userptr_range ranges[]; };`` -- the fixed 8-byte
    header; the ``ranges`` flexible array follows (see :class:`UserptrRangesData`)."""

    num_ranges: U32
    reserved: U32 = 0


# --- ioctl numbers ---------------------------------------------------------------------


def _iow(nr: int, record: type[tuple[object, ...]]) -> int:
    return ioc(IOC_WRITE, AMDKFD_IOCTL_BASE, nr, layout(record).size)


def _ior(nr: int, record: type[tuple[object, ...]]) -> int:
    return ioc(IOC_READ, AMDKFD_IOCTL_BASE, nr, layout(record).size)


def _iowr(nr: int, record: type[tuple[object, ...]]) -> int:
    return ioc(IOC_READ | IOC_WRITE, AMDKFD_IOCTL_BASE, nr, layout(record).size)


AMDKFD_IOC_GET_VERSION: Final = _ior(0x01, GetVersionArgs)
AMDKFD_IOC_GET_PROCESS_APERTURES_NEW: Final = _iowr(0x14, GetProcessAperturesNewArgs)
AMDKFD_IOC_ACQUIRE_VM: Final = _iow(0x15, AcquireVmArgs)
AMDKFD_IOC_ALLOC_MEMORY_OF_GPU: Final = _iowr(0x16, AllocMemoryOfGpuArgs)
AMDKFD_IOC_FREE_MEMORY_OF_GPU: Final = _iow(0x17, FreeMemoryOfGpuArgs)
AMDKFD_IOC_MAP_MEMORY_TO_GPU: Final = _iowr(0x18, MapMemoryToGpuArgs)
AMDKFD_IOC_UNMAP_MEMORY_FROM_GPU: Final = _iowr(0x19, UnmapMemoryFromGpuArgs)
AMDKFD_IOC_AVAILABLE_MEMORY: Final = _iowr(0x23, GetAvailableMemoryArgs)
#: ``AMDKFD_IO(0x27)``: no argument (pass 0)
AMDKFD_IOC_CREATE_PROCESS: Final = ioc(IOC_NONE, AMDKFD_IOCTL_BASE, 0x27, 0)

#: request -> name, for messages
IOCTL_NAMES: Final[dict[int, str]] = {
    AMDKFD_IOC_GET_VERSION: "GET_VERSION",
    AMDKFD_IOC_GET_PROCESS_APERTURES_NEW: "GET_PROCESS_APERTURES_NEW",
    AMDKFD_IOC_ACQUIRE_VM: "ACQUIRE_VM",
    AMDKFD_IOC_ALLOC_MEMORY_OF_GPU: "ALLOC_MEMORY_OF_GPU",
    AMDKFD_IOC_FREE_MEMORY_OF_GPU: "FREE_MEMORY_OF_GPU",
    AMDKFD_IOC_MAP_MEMORY_TO_GPU: "MAP_MEMORY_TO_GPU",
    AMDKFD_IOC_UNMAP_MEMORY_FROM_GPU: "UNMAP_MEMORY_FROM_GPU",
    AMDKFD_IOC_AVAILABLE_MEMORY: "AVAILABLE_MEMORY",
    AMDKFD_IOC_CREATE_PROCESS: "CREATE_PROCESS",
}

# --- KFD_IOC_ALLOC_MEM_FLAGS_* -----------------------------------------------------------
KFD_IOC_ALLOC_MEM_FLAGS_VRAM: Final = 1 << 0
KFD_IOC_ALLOC_MEM_FLAGS_GTT: Final = 1 << 1
KFD_IOC_ALLOC_MEM_FLAGS_USERPTR: Final = 1 << 2
KFD_IOC_ALLOC_MEM_FLAGS_DOORBELL: Final = 1 << 3
KFD_IOC_ALLOC_MEM_FLAGS_MMIO_REMAP: Final = 1 << 4
#: proposed only (batch series v3/v4); a kernel without the series ignores it
KFD_IOC_ALLOC_MEM_FLAGS_USERPTR_BATCH: Final = 1 << 22
KFD_IOC_ALLOC_MEM_FLAGS_CONTIGUOUS: Final = 1 << 23
KFD_IOC_ALLOC_MEM_FLAGS_EXT_COHERENT: Final = 1 << 24
KFD_IOC_ALLOC_MEM_FLAGS_UNCACHED: Final = 1 << 25
KFD_IOC_ALLOC_MEM_FLAGS_COHERENT: Final = 1 << 26
KFD_IOC_ALLOC_MEM_FLAGS_AQL_QUEUE_MEM: Final = 1 << 27
KFD_IOC_ALLOC_MEM_FLAGS_NO_SUBSTITUTE: Final = 1 << 28
KFD_IOC_ALLOC_MEM_FLAGS_PUBLIC: Final = 1 << 29
KFD_IOC_ALLOC_MEM_FLAGS_EXECUTABLE: Final = 1 << 30
KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE: Final = 1 << 31

# --- handles ---------------------------------------------------------------------------


def make_handle(gpu_id: int, idr_handle: int) -> int:
    """``MAKE_HANDLE(gpu_id, idr_handle)``: the handle is tied to the allocating GPU."""
    return ((gpu_id & 0xFFFFFFFF) << 32) | (idr_handle & 0xFFFFFFFF)


def handle_gpu_id(handle: int) -> int:
    """``GET_GPU_ID(handle)``."""
    return (handle >> 32) & 0xFFFFFFFF


# --- batch range list ------------------------------------------------------------------

_HEADER: Final = layout(UserptrRangesHeader)
RANGE_DTYPE: Final = layout(UserptrRange).dtype


class UserptrRangesData:
    """A ``struct kfd_ioctl_userptr_ranges_data`` in process memory, built with numpy.

    ``address`` is the real address to put in ``mmap_offset``; keep this object alive
    until the ioctl returns.
    """

    __slots__ = ("buffer", "ranges")

    def __init__(self, starts: npt.NDArray[np.uint64], sizes: npt.NDArray[np.uint64],
                 *, reserved: int = 0) -> None:
        count = int(starts.shape[0])
        if sizes.shape != starts.shape:
            raise ValueError("starts and sizes differ in length")
        if count >= 1 << 32:
            raise ValueError(f"{count} ranges do not fit num_ranges (u32)")
        # uint64 backing keeps the header and every range 8-byte aligned
        words = np.zeros(1 + 2 * count, dtype=np.uint64)
        self.buffer: npt.NDArray[np.uint8] = words.view(np.uint8)
        _HEADER.struct.pack_into(self.buffer.data, 0, count, reserved)
        self.ranges: npt.NDArray[np.void] = self.buffer[_HEADER.size:].view(RANGE_DTYPE)
        self.ranges["start"] = starts
        self.ranges["size"] = sizes

    @property
    def address(self) -> int:
        """Address of the header in this process."""
        return int(self.buffer.ctypes.data)

    @property
    def nbytes(self) -> int:
        """Header plus ranges, in bytes."""
        return int(self.buffer.nbytes)

    def __len__(self) -> int:
        return int(self.ranges.shape[0])


def pack(record: tuple[object, ...]) -> bytearray:
    """A wire record as a mutable ioctl argument buffer."""
    lay = layout(type(record))
    buf = bytearray(lay.size)
    lay.struct.pack_into(buf, 0, *record)
    return buf


def header_size() -> int:
    """Size of the fixed ``kfd_ioctl_userptr_ranges_data`` header."""
    return _HEADER.size

