"""Memory ioctls of the simulated KFD: ALLOC/FREE_MEMORY_OF_GPU and
MAP/UNMAP_MEMORY_TO/FROM_GPU.

``ALLOC_MEMORY_OF_GPU`` checks, in this order (``kfd_chardev.c``, the batch series'
``kfd_copy_userptr_ranges()`` and ``amdgpu_amdkfd_gpuvm_alloc_memory_of_gpu*``):

1. ``size == 0``: EINVAL;  USERPTR on a secondary process: EOPNOTSUPP;
2. unknown gpu_id: EINVAL;  GPU not acquired (no ACQUIRE_VM): ENODEV;
3. not USERPTR (the sim models userptr BOs only; BATCH alone lands here): EINVAL;
4. ``mmap_offset == 0``: EINVAL;
5. batch (``USERPTR|USERPTR_BATCH`` on a batch kernel): header unreadable: EFAULT;
   ``num_ranges == 0`` or ``reserved != 0``: EINVAL; list too big for kvmalloc: ENOMEM;
   list unreadable: EFAULT; a range with zero or unaligned start or size: EINVAL;
   sizes not summing to ``size``: EINVAL; AQL_QUEUE_MEM: EINVAL.
   Plain userptr (and *every* USERPTR on a pre-batch kernel, which ignores bit 22):
   the CPU range is ``[mmap_offset, mmap_offset + PAGE_ALIGN(size))``; an unaligned
   ``mmap_offset`` is EINVAL (sim: libhsakmt always aligns);
6. GPU VA or any CPU range inside an SVM range: EADDRINUSE;
7. GPU VA unaligned, outside the GPU's GPUVM aperture, or overlapping another BO of the
   process: EINVAL (the kernel finds overlaps when mapping; the sim already here);
8. userptr memory limit exceeded: ENOMEM;
9. CPU ranges not entirely mapped (writable, for WRITABLE BOs) in this process, per
   ``/proc/self/maps`` or ``PROCMAP_QUERY``: EFAULT (get_user_pages);

then returns a handle ``MAKE_HANDLE(gpu_id, idr)`` and ``mmap_offset`` = 0 for batch, a
non-zero DRM mmap offset otherwise.

MAP/UNMAP: ``n_devices == 0`` or ``n_success > n_devices``: EINVAL; device array
unreadable: EFAULT; handle's GPU unknown: EINVAL, not acquired: ENODEV; unknown handle:
ENOMEM on map (sic), EINVAL on unmap; then per device from ``n_success``: unknown
gpu_id EINVAL, not acquired ENODEV, VA outside that GPU's aperture EINVAL, unmapping a
BO not mapped there EINVAL; ``n_success`` advances after each device.  FREE: unknown
handle EINVAL, still mapped EBUSY.
"""

from __future__ import annotations

import bisect
import errno
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from protocol.wire import decode, layout
from vgpu_backend.hostgpu import kfd_abi as abi
from vgpu_backend.hostgpu.sim_config import SimFault
from vgpu_backend.hostgpu.sim_config import kerr as _kerr
from vgpu_backend.hostgpu.sim_usermem import copy_from_user, first_uncovered
from vgpu_backend.hostgpu.sim_vm import SimBo

if TYPE_CHECKING:
    from vgpu_backend.hostgpu.sim_kfd import SimFile, SimKfd, SimProcess

__all__ = ["MemoryIoctls"]

_I64 = npt.NDArray[np.int64]
_U64 = npt.NDArray[np.uint64]

_PAGE = abi.PAGE_SIZE
_KVMALLOC_MAX = (1 << 31) - 1  # kvmalloc refuses larger allocations
_USER_TOP = 1 << 56  # above any user address (x86-64 5-level paging ends at 2**56)
_DRM_FILE_PAGE_OFFSET = 0x100000000  # DRM mmap offsets start here (in bytes, x86-64)
_DOMAINS = (abi.KFD_IOC_ALLOC_MEM_FLAGS_VRAM | abi.KFD_IOC_ALLOC_MEM_FLAGS_GTT
            | abi.KFD_IOC_ALLOC_MEM_FLAGS_USERPTR | abi.KFD_IOC_ALLOC_MEM_FLAGS_DOORBELL
            | abi.KFD_IOC_ALLOC_MEM_FLAGS_MMIO_REMAP)


class _VaIntervals:
    """Disjoint GPU VA intervals of one process's BOs (bisect over sorted starts)."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: dict[int, int] = {}

    def overlaps(self, va: int, end: int) -> bool:
        i = bisect.bisect_right(self._starts, va)
        if i and self._ends[self._starts[i - 1]] > va:
            return True
        return i < len(self._starts) and self._starts[i] < end

    def add(self, va: int, end: int) -> None:
        bisect.insort(self._starts, va)
        self._ends[va] = end

    def remove(self, va: int) -> None:
        del self._starts[bisect.bisect_left(self._starts, va)]
        del self._ends[va]


class MemoryIoctls:
    """ALLOC/FREE/MAP/UNMAP handlers of one :class:`SimKfd`."""

    def __init__(self, kernel: SimKfd) -> None:
        self.k = kernel
        self._va: dict[int, _VaIntervals] = {}  # id(process) -> intervals

    def _intervals(self, proc: SimProcess) -> _VaIntervals:
        return self._va.setdefault(id(proc), _VaIntervals())

    # --- ALLOC -------------------------------------------------------------------------

    def alloc(self, f: SimFile, kdata: bytearray, fault: SimFault | None) -> None:
        self.k.fail_early(fault, "ALLOC_MEMORY_OF_GPU")
        a = decode(abi.AllocMemoryOfGpuArgs, kdata)
        proc = self.k.process_of(f)
        userptr = bool(a.flags & abi.KFD_IOC_ALLOC_MEM_FLAGS_USERPTR)
        if a.size == 0:
            raise _kerr(errno.EINVAL, "size 0")
        if userptr and not proc.primary:
            raise _kerr(errno.EOPNOTSUPP, "USERPTR only on the primary kfd process")
        pdd = proc.pdds.get(a.gpu_id)
        if pdd is None:
            raise _kerr(errno.EINVAL, f"unknown gpu_id {a.gpu_id:#x}")
        if pdd.drm_file is None or pdd.vm is None:
            raise _kerr(errno.ENODEV, f"GPU {a.gpu_id:#x}: no VM (ACQUIRE_VM first)")
        if not a.flags & _DOMAINS or not userptr:
            raise _kerr(errno.EINVAL, f"flags {a.flags:#x}: the sim models USERPTR BOs only")
        if a.mmap_offset == 0:
            raise _kerr(errno.EINVAL, "USERPTR with mmap_offset 0")
        batch = bool(a.flags & abi.KFD_IOC_ALLOC_MEM_FLAGS_USERPTR_BATCH) \
            and self.k.config.batch_userptr
        if batch:
            ustarts, usizes = self._copy_ranges(a.mmap_offset, a.size)
            if a.flags & abi.KFD_IOC_ALLOC_MEM_FLAGS_AQL_QUEUE_MEM:
                raise _kerr(errno.EINVAL, "AQL queue memory cannot be a batch userptr")
            size = a.size
        else:
            if a.mmap_offset % _PAGE:
                raise _kerr(errno.EINVAL, f"userptr {a.mmap_offset:#x} not page aligned")
            size = -(-a.size // _PAGE) * _PAGE
            ustarts = np.array([a.mmap_offset], dtype=np.uint64)
            usizes = np.array([min(size, _USER_TOP)], dtype=np.uint64)
        beyond = np.flatnonzero((ustarts >= _USER_TOP) | (usizes >= _USER_TOP)
                                | (ustarts + usizes > _USER_TOP))
        if beyond.size:  # get_user_pages would fail: not user memory at all
            raise _kerr(errno.EFAULT, f"range {int(beyond[0])} is not user memory")
        starts, sizes = ustarts.astype(np.int64), usizes.astype(np.int64)
        self._check_svm(a.va_addr, size, starts, sizes)
        gpu = pdd.gpu
        va_end = a.va_addr + size
        if a.va_addr % _PAGE or a.va_addr < gpu.gpuvm_base or va_end - 1 > gpu.gpuvm_limit:
            raise _kerr(errno.EINVAL, f"GPU VA {a.va_addr:#x}+{size:#x} not page aligned or "
                                      f"outside [{gpu.gpuvm_base:#x}, {gpu.gpuvm_limit:#x}]")
        intervals = self._intervals(proc)
        if intervals.overlaps(a.va_addr, a.va_addr + size):
            raise _kerr(errno.EINVAL, f"GPU VA {a.va_addr:#x}+{size:#x} in use")
        if self.k.userptr_charged + size > self.k.config.userptr_limit:
            raise _kerr(errno.ENOMEM, "userptr memory limit")
        writable = bool(a.flags & abi.KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE)
        bad = first_uncovered(starts, sizes, write=writable)
        if bad >= 0:
            raise _kerr(errno.EFAULT, f"range {bad}: {int(starts[bad]):#x}+{int(sizes[bad]):#x}"
                                      f" not mapped{' writable' if writable else ''}")
        handle = abi.make_handle(a.gpu_id, proc.next_idr)
        mmap_offset = 0 if batch else _DRM_FILE_PAGE_OFFSET + proc.next_idr * (1 << 24)
        proc.next_idr += 1
        proc.bos[handle] = SimBo(handle=handle, gpu_id=a.gpu_id, va=a.va_addr, size=size,
                                 flags=a.flags, writable=writable, host_starts=starts,
                                 host_sizes=sizes, charged=size, mmap_offset=mmap_offset)
        intervals.add(a.va_addr, a.va_addr + size)
        self.k.userptr_charged += size
        layout(abi.AllocMemoryOfGpuArgs).struct.pack_into(
            kdata, 0, a.va_addr, a.size, handle, mmap_offset, a.gpu_id, a.flags)

    def _copy_ranges(self, ptr: int, total: int) -> tuple[_U64, _U64]:
        """``kfd_copy_userptr_ranges()``: read and validate the batch range list."""
        head = abi.header_size()
        try:
            hdr = decode(abi.UserptrRangesHeader, copy_from_user(ptr, head))
        except OSError as e:
            raise _kerr(errno.EFAULT, "ranges header") from e
        if hdr.num_ranges == 0:
            raise _kerr(errno.EINVAL, "num_ranges 0")
        if hdr.reserved != 0:
            raise _kerr(errno.EINVAL, f"reserved {hdr.reserved:#x} != 0")
        nbytes = hdr.num_ranges * abi.RANGE_DTYPE.itemsize
        if nbytes > _KVMALLOC_MAX:
            raise _kerr(errno.ENOMEM, f"{hdr.num_ranges} ranges")
        try:
            raw = copy_from_user(ptr + head, nbytes)
        except OSError as e:
            raise _kerr(errno.EFAULT, "ranges array") from e
        ranges = np.frombuffer(raw, dtype=abi.RANGE_DTYPE)
        starts = ranges["start"].astype(np.uint64)
        sizes = ranges["size"].astype(np.uint64)
        bad = np.flatnonzero((starts == 0) | (sizes == 0) | (starts % _PAGE != 0)
                             | (sizes % _PAGE != 0))
        if bad.size:
            i = int(bad[0])
            raise _kerr(errno.EINVAL, f"range {i}: {int(starts[i]):#x}+{int(sizes[i]):#x} "
                                      "zero or not page aligned")
        summed = int(sizes.sum(dtype=np.uint64))  # wraps like the kernel's u64 sum
        if summed != total:
            raise _kerr(errno.EINVAL, f"Size mismatch: ranges sum to {summed:#x}, "
                                      f"size {total:#x}")
        return starts, sizes

    def _check_svm(self, va: int, size: int, starts: _I64, sizes: _I64) -> None:
        for s_start, s_size in self.k.svm_ranges:
            s_end = s_start + s_size
            if va < s_end and s_start < va + size:
                raise _kerr(errno.EADDRINUSE, f"GPU VA {va:#x} already allocated by SVM")
            if bool(((starts < s_end) & (starts + sizes > s_start)).any()):
                raise _kerr(errno.EADDRINUSE, "userptr already registered by SVM")

    # --- FREE --------------------------------------------------------------------------

    def free(self, f: SimFile, kdata: bytearray, fault: SimFault | None) -> None:
        self.k.fail_early(fault, "FREE_MEMORY_OF_GPU")
        handle = decode(abi.FreeMemoryOfGpuArgs, kdata).handle
        proc = self.k.process_of(f)
        if abi.handle_gpu_id(handle) not in proc.pdds:
            raise _kerr(errno.EINVAL, f"handle {handle:#x}: unknown GPU")
        bo = proc.bos.get(handle)
        if bo is None:
            raise _kerr(errno.EINVAL, f"unknown handle {handle:#x}")
        if bo.mapped_on:
            raise _kerr(errno.EBUSY, f"BO VA {bo.va:#x} size {bo.size:#x} is still mapped")
        self.drop_bo(proc, bo)

    def drop_bo(self, proc: SimProcess, bo: SimBo) -> None:
        """Unmap ``bo`` everywhere and free it (FREE, or process teardown)."""
        for gpu_id in list(bo.mapped_on):
            vm = proc.pdds[gpu_id].vm
            if vm is not None:
                vm.unmap(bo)
        bo.mapped_on.clear()
        del proc.bos[bo.handle]
        self._intervals(proc).remove(bo.va)
        self.k.userptr_charged -= bo.charged

    # --- MAP / UNMAP -------------------------------------------------------------------

    def map(self, f: SimFile, kdata: bytearray, fault: SimFault | None) -> None:
        self._map_or_unmap(f, kdata, fault, mapping=True)

    def unmap(self, f: SimFile, kdata: bytearray, fault: SimFault | None) -> None:
        self._map_or_unmap(f, kdata, fault, mapping=False)

    def _map_or_unmap(self, f: SimFile, kdata: bytearray, fault: SimFault | None, *,
                      mapping: bool) -> None:
        name = "MAP_MEMORY_TO_GPU" if mapping else "UNMAP_MEMORY_FROM_GPU"
        lay = layout(abi.MapMemoryToGpuArgs)
        a = decode(abi.MapMemoryToGpuArgs, kdata)
        if a.n_devices == 0 or a.n_success > a.n_devices:
            raise _kerr(errno.EINVAL, f"n_devices {a.n_devices}, n_success {a.n_success}")
        try:
            ids = np.frombuffer(copy_from_user(a.device_ids_array_ptr, 4 * a.n_devices),
                                dtype="<u4").tolist()
        except OSError as e:
            raise _kerr(errno.EFAULT, "device_ids_array_ptr") from e
        proc = self.k.process_of(f)
        pdd = proc.pdds.get(abi.handle_gpu_id(a.handle))
        if pdd is None:
            raise _kerr(errno.EINVAL, f"handle {a.handle:#x}: unknown GPU")
        if pdd.vm is None:
            raise _kerr(errno.ENODEV, f"GPU {pdd.gpu.gpu_id:#x} not acquired")
        bo = proc.bos.get(a.handle)
        if bo is None:
            raise _kerr(errno.ENOMEM if mapping else errno.EINVAL,
                        f"unknown handle {a.handle:#x}")
        fail_at = fault.device_index if fault is not None else None
        if fail_at is not None and not a.n_success <= fail_at < a.n_devices:
            fail_at = None
        for i in range(a.n_success, a.n_devices):
            if fault is not None and fail_at == i:
                raise _kerr(fault.errno, f"injected {name} failure on device {i}")
            peer = proc.pdds.get(ids[i])
            if peer is None:
                raise _kerr(errno.EINVAL, f"device {i}: unknown gpu_id {ids[i]:#x}")
            vm = peer.vm
            if vm is None:
                raise _kerr(errno.ENODEV, f"device {i}: GPU {ids[i]:#x} not acquired")
            if mapping:
                if bo.va < vm.base or bo.end - 1 > vm.limit:
                    raise _kerr(errno.EINVAL, f"device {i}: VA {bo.va:#x} outside aperture")
                if not vm.mapped(bo):
                    vm.map(bo)
                    bo.mapped_on.add(ids[i])
            else:
                if not vm.mapped(bo):
                    raise _kerr(errno.EINVAL, f"device {i}: BO not mapped on {ids[i]:#x}")
                vm.unmap(bo)
                bo.mapped_on.discard(ids[i])
            lay.struct.pack_into(kdata, 0, a.handle, a.device_ids_array_ptr, a.n_devices, i + 1)
        if fault is not None and fail_at is None:
            # like a signal during amdgpu_amdkfd_gpuvm_sync_memory(): all devices done
            raise _kerr(fault.errno, f"injected {name} failure after the last device")
