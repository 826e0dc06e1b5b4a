"""Configuration of the simulated KFD: its GPUs, its version, its kind of kernel, and
the faults to inject."""

from __future__ import annotations

import os
from dataclasses import dataclass

from vgpu_backend.hostgpu.kfd_abi import IOCTL_NAMES, PAGE_SIZE

__all__ = ["FaultQueue", "SimFault", "SimGpu", "SimKfdConfig", "kerr"]

GiB = 1 << 30


def kerr(err: int, message: str) -> OSError:
    """A simulated ioctl failure: ``errno`` and a kernel-log-like message."""
    return OSError(err, f"{os.strerror(err)} [sim kfd: {message}]")


@dataclass(frozen=True, slots=True)
class SimGpu:
    """One simulated GPU as the topology shows it."""

    node: int
    gpu_id: int
    render_minor: int
    gpuvm_base: int
    #: inclusive, like ``kfd_process_device_apertures.gpuvm_limit``
    gpuvm_limit: int
    vram_bytes: int
    name: str = "gfx1100"
    gfx_target_version: int = 110000


@dataclass(frozen=True, slots=True)
class SimKfdConfig:
    """What the simulated kernel looks like.

    :param gpu_count: GPU nodes in the topology (node 0 is the CPU).
    :param kfd_minor: KFD ioctl minor version (1.x); CREATE_PROCESS needs >= 19.
    :param batch_userptr: the kernel carries the batch-userptr series; ``False`` is a
        "pre-batch" kernel that ignores ``USERPTR_BATCH`` and registers
        ``[mmap_offset, mmap_offset+size)`` as a plain userptr.
    :param vram_bytes: what AVAILABLE_MEMORY reports per GPU.
    :param userptr_limit: system memory that userptr BOs may pin in total
        (``amdgpu_amdkfd_reserve_mem_limit``); ENOMEM beyond it.
    :param gpuvm_base: first GPU VA of GPU 0's GPUVM aperture.
    :param gpuvm_limit: last GPU VA (inclusive) of GPU 0's aperture.
    :param aperture_skew: GPU ``i``'s aperture starts ``i * aperture_skew`` higher
        (exercises the common-range computation of multi-GPU drivers).
    :param first_render_minor: ``drm_render_minor`` of GPU 0 (then +1 per GPU).
    """

    gpu_count: int = 1
    kfd_minor: int = 19
    batch_userptr: bool = True
    vram_bytes: int = 16 * GiB
    userptr_limit: int = 64 * GiB
    gpuvm_base: int = 1 << 32
    gpuvm_limit: int = (1 << 47) - 1
    aperture_skew: int = 0
    first_render_minor: int = 128

    def __post_init__(self) -> None:
        if not 1 <= self.gpu_count <= 64:
            raise ValueError(f"sim gpu_count must be 1..64, not {self.gpu_count}")
        if not 0 <= self.kfd_minor < 1000:
            raise ValueError(f"sim kfd_minor must be 0..999, not {self.kfd_minor}")
        if self.vram_bytes < 0 or self.userptr_limit < 0:
            raise ValueError("sim memory sizes must be >= 0")
        if self.gpuvm_base % PAGE_SIZE or (self.gpuvm_limit + 1) % PAGE_SIZE:
            raise ValueError("sim GPUVM aperture must be page aligned")
        top = self.gpuvm_base + (self.gpu_count - 1) * self.aperture_skew
        if self.aperture_skew < 0 or self.aperture_skew % PAGE_SIZE or top >= self.gpuvm_limit:
            raise ValueError("sim aperture_skew must be a page multiple keeping every "
                             "aperture non-empty")

    def gpus(self) -> tuple[SimGpu, ...]:
        """The GPUs, nodes 1..gpu_count, with deterministic gpu_ids."""
        return tuple(
            SimGpu(node=i + 1, gpu_id=0x5A3C + 0x1111 * i,
                   render_minor=self.first_render_minor + i,
                   gpuvm_base=self.gpuvm_base + i * self.aperture_skew,
                   gpuvm_limit=self.gpuvm_limit, vram_bytes=self.vram_bytes)
            for i in range(self.gpu_count))


@dataclass(slots=True)
class SimFault:
    """Make the next ``count`` calls of one ioctl fail (after ``after`` calls pass).

    :param ioctl: the ioctl name without prefix, e.g. ``"MAP_MEMORY_TO_GPU"``.
    :param errno: the error to return.
    :param device_index: MAP/UNMAP only: fail on this entry of the device array, after
        the earlier entries succeeded (``n_success`` = index).  Without it, MAP/UNMAP
        fail *after* every device was done, like a signal during the final sync
        (``-ERESTARTSYS``); every other ioctl fails before doing anything.
    """

    ioctl: str
    errno: int
    count: int = 1
    after: int = 0
    device_index: int | None = None

    def __post_init__(self) -> None:
        if self.ioctl not in IOCTL_NAMES.values():
            raise ValueError(f"unknown ioctl {self.ioctl!r}; one of "
                             f"{sorted(IOCTL_NAMES.values())}")
        if self.count < 1 or self.after < 0:
            raise ValueError("count must be >= 1 and after >= 0")


class FaultQueue:
    """Pending :class:`SimFault` s, consumed in order per ioctl."""

    def __init__(self) -> None:
        self._faults: list[SimFault] = []

    def add(self, fault: SimFault) -> None:
        """Queue ``fault``."""
        self._faults.append(fault)

    def clear(self) -> None:
        """Drop every pending fault."""
        self._faults.clear()

    def pending(self) -> int:
        """Faults still queued."""
        return len(self._faults)

    def take(self, ioctl: str) -> SimFault | None:
        """The fault that hits this call of ``ioctl``, if any."""
        for fault in self._faults:
            if fault.ioctl != ioctl:
                continue
            if fault.after:
                fault.after -= 1
                return None
            fault.count -= 1
            if fault.count == 0:
                self._faults.remove(fault)
            return fault
        return None
