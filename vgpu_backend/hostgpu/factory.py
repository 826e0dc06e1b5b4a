"""Choose and build the host GPU from options validated up front.

``HostGpuOptions`` rejects bad combinations when it is built (like a config builder);
what can only be known from the kernel (KFD version for context isolation, batch
support for ``userptr_path='batch'``, ``/dev/kfd`` presence) is checked by
:func:`create_host_gpu` before anything is used.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

from protocol.limits import DEFAULT_LIMITS
from vgpu_backend.hostgpu.base import HostGpu, HostGpuError
from vgpu_backend.hostgpu.kfd import KfdHostGpu
from vgpu_backend.hostgpu.sim_config import SimFault, SimKfdConfig
from vgpu_backend.hostgpu.sim_kfd import SimTransport
from vgpu_backend.hostgpu.transport import KfdTransport, OsTransport

__all__ = ["GPU_CHOICES", "ISOLATION_CHOICES", "PATH_CHOICES", "HostGpuOptions",
           "create_host_gpu", "host_gpu_options"]

log = logging.getLogger(__name__)

GPU_CHOICES: Final = ("auto", "kfd", "sim")
ISOLATION_CHOICES: Final = ("vm", "context")
PATH_CHOICES: Final = ("auto", "batch", "alias", "per-range")
KFD_DEVICE: Final = "/dev/kfd"


@dataclass(frozen=True, slots=True)
class HostGpuOptions:
    """How to reach the host GPU.

    :param gpu: ``auto`` (``kfd`` if /dev/kfd exists, else ``sim``), ``kfd``, ``sim``.
    :param gpu_ids: KFD gpu_ids to use (default all); buffers map on every one.
    :param isolation: ``vm`` (one KFD process) or ``context`` (a secondary KFD process
        per virtio-gpu context; no USERPTR, see :class:`KfdHostGpu`).
    :param userptr_path: ``auto``, ``batch``, ``alias`` or ``per-range``.
    :param sim: the simulated kernel (``gpu`` sim, or auto without /dev/kfd).
    :param sim_gpus: shorthand for ``sim.gpu_count`` (the ``--sim-gpus`` option).
    :param max_per_range_ranges: see :class:`KfdHostGpu`.
    """

    gpu: str = "auto"
    gpu_ids: Sequence[int] | None = None
    isolation: str = "vm"
    userptr_path: str = "auto"
    sim: SimKfdConfig = field(default_factory=SimKfdConfig)
    sim_gpus: int | None = None
    #: faults the simulated kernel injects, armed after the start-up probes
    sim_faults: tuple[SimFault, ...] = ()
    max_per_range_ranges: int = DEFAULT_LIMITS.max_per_range_ranges

    def __post_init__(self) -> None:
        if self.gpu_ids is not None:
            object.__setattr__(self, "gpu_ids", tuple(self.gpu_ids))
        if self.sim_gpus is not None and self.sim_gpus != self.sim.gpu_count:
            object.__setattr__(self, "sim", replace(self.sim, gpu_count=self.sim_gpus))
        for name, value, choices in (("gpu", self.gpu, GPU_CHOICES),
                                     ("isolation", self.isolation, ISOLATION_CHOICES),
                                     ("userptr_path", self.userptr_path, PATH_CHOICES)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
        if self.gpu_ids is not None:
            if not self.gpu_ids:
                raise ValueError("gpu_ids is empty; leave it unset to use every GPU")
            listed = ", ".join(hex(g) for g in self.gpu_ids)
            if any(not 0 < g < 1 << 32 for g in self.gpu_ids):
                raise ValueError(f"gpu_ids must be non-zero 32-bit KFD GPU ids (node 0 is "
                                 f"the CPU), not {listed}")
            if len(set(self.gpu_ids)) != len(self.gpu_ids):
                raise ValueError(f"gpu_ids lists a GPU twice: {listed}")
        if self.isolation == "context" and self.userptr_path != "auto":
            raise ValueError(f"userptr_path {self.userptr_path!r} with isolation 'context': "
                             "USERPTR is unavailable on secondary KFD processes, so no "
                             "host path applies")
        if self.gpu == "kfd" and (self.sim != SimKfdConfig() or self.sim_faults):
            raise ValueError("sim options were given with gpu 'kfd'")
        for fault in self.sim_faults:
            if fault.device_index is not None and \
                    not 0 <= fault.device_index < self.sim.gpu_count:
                raise ValueError(f"sim_faults: a {fault.ioctl} fault on device "
                                 f"{fault.device_index}: "
                                 f"the simulated kernel has {self.sim.gpu_count} GPU(s)")


def host_gpu_options(keywords: dict[str, Any]) -> HostGpuOptions:
    """:class:`HostGpuOptions` from plain keywords (``sim`` and ``sim_faults`` as dicts
    of :class:`SimKfdConfig` and :class:`SimFault` keywords, as the configuration keeps
    them: a SimFault counts down as it fires, so each host GPU gets new ones).

    :raise ValueError: the options contradict each other or are out of range.
    """
    options = dict(keywords)
    if "sim" in options:
        options["sim"] = SimKfdConfig(**options["sim"])
    if "sim_faults" in options:
        options["sim_faults"] = tuple(SimFault(**f) for f in options["sim_faults"])
    return HostGpuOptions(**options)


def _transport(options: HostGpuOptions) -> KfdTransport:
    gpu = options.gpu
    if gpu == "auto":
        gpu = "kfd" if os.path.exists(KFD_DEVICE) else "sim"
        if gpu == "kfd" and options.sim != SimKfdConfig():
            log.warning("gpu 'auto' found %s: the sim options are ignored", KFD_DEVICE)
    if gpu == "kfd":
        if not os.path.exists(KFD_DEVICE):
            raise HostGpuError(f"gpu 'kfd': {KFD_DEVICE} does not exist (no amdgpu/KFD "
                               "driver on this host?); use gpu 'sim' or 'auto'",
                               unsupported=True)
        return OsTransport()
    return SimTransport(options.sim)


def create_host_gpu(options: HostGpuOptions | None = None, *,
                    transport: KfdTransport | None = None) -> HostGpu:
    """Build the host GPU ``options`` describe and log one line saying what it is.

    :param transport: use this transport instead of the one ``options.gpu`` picks
        (tests pass a :class:`SimTransport` they keep a handle on).
    :raise HostGpuError: the host cannot provide it (missing /dev/kfd, KFD too old for
        context isolation, batch requested on a pre-batch kernel, unknown gpu_ids).
    """
    options = options or HostGpuOptions()
    transport = transport or _transport(options)
    if options.sim_faults and not isinstance(transport, SimTransport):
        # refused before anything opens: the GPU built below would stay open
        raise HostGpuError("fault injection needs the simulated KFD", unsupported=True)
    gpu = KfdHostGpu(transport, gpu_ids=options.gpu_ids,
                     isolation=options.isolation, userptr_path=options.userptr_path,
                     max_per_range_ranges=options.max_per_range_ranges)
    if options.sim_faults and isinstance(transport, SimTransport):
        for fault in options.sim_faults:
            transport.kernel.inject(fault)
        log.warning("simulated KFD will inject %d fault(s): %s", len(options.sim_faults),
                    ", ".join(f"{f.ioctl}:{errno.errorcode.get(f.errno, f.errno)}"
                              for f in options.sim_faults))
    info = gpu.info()
    memory = gpu.available_memory()
    log.info("host GPU: backend=%s KFD %d.%d isolation=%s userptr=%s path=%s "
             "batch-probe=%s (%s) GPUs=%s",
             info.backend, *info.kfd_version, info.isolation,
             "available" if info.userptr_available
             else f"unavailable ({info.userptr_detail})",
             info.userptr_path.value if info.userptr_available else "n/a",
             "supported" if info.batch_supported else "unsupported",
             gpu.batch_probe.detail,
             ", ".join(f"{g:#x}" + (f" ({memory[g] >> 20} MiB)" if g in memory else "")
                       for g in info.gpu_ids))
    return gpu
