"""Host GPU back-ends: the interface (``base``), the KFD driver (``kfd``) over the OS
or the simulated KFD (``sim_kfd``), and the factory that picks one (``factory``)."""

from vgpu_backend.hostgpu.base import (
    GpuFault,
    GpuMapping,
    GpuMemory,
    HostGpu,
    HostGpuError,
    HostGpuInfo,
    HostRanges,
    UserptrPath,
)

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
