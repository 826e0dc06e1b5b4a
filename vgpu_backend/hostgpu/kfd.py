"""``KfdHostGpu``: the host GPU through AMD KFD ioctls, over any :class:`KfdTransport`.

``--gpu kfd`` is this code over :class:`~vgpu_backend.hostgpu.transport.OsTransport`;
``--gpu sim`` is this code over :class:`~vgpu_backend.hostgpu.sim_kfd.SimTransport`.

Start-up: open ``/dev/kfd``, GET_VERSION (major 1), read the topology, then per
isolation mode (see :class:`KfdHostGpu`) acquire the selected GPUs, read their GPUVM
apertures, and probe what USERPTR can do -- the batch flag is never assumed.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from protocol.limits import DEFAULT_LIMITS
from protocol.wire import decode
from vgpu_backend.hostgpu import kfd_abi as abi
from vgpu_backend.hostgpu.base import (
    GpuMapping,
    GpuMemory,
    HostGpu,
    HostGpuError,
    HostGpuInfo,
    HostRanges,
    UserptrPath,
)
from vgpu_backend.hostgpu.kfd_process import KfdProcess, TopologyGpu, read_topology
from vgpu_backend.hostgpu.transport import KfdTransport
from vgpu_backend.hostgpu.userptr_paths import (
    BatchProbe,
    Registration,
    alias_refusal,
    probe_batch,
    probe_userptr,
    register,
    teardown,
)

__all__ = ["CONTEXT_USERPTR_UNSUPPORTED", "KfdHostGpu"]

log = logging.getLogger(__name__)

#: the message of every USERPTR refusal under context isolation
CONTEXT_USERPTR_UNSUPPORTED = (
    "USERPTR blobs are not available with context isolation: each virtio-gpu context "
    "gets a secondary KFD process (AMDKFD_IOC_CREATE_PROCESS), and the kernel refuses "
    "USERPTR allocations on secondary processes with EOPNOTSUPP; use isolation 'vm' "
    "for USERPTR")

_I64 = npt.NDArray[np.int64]
_MAX_ADDR = 1 << 63


def _validated(ranges: HostRanges) -> tuple[_I64, _I64]:
    n = len(ranges)
    if n == 0:
        raise HostGpuError("empty range list", errno.EINVAL)
    if not (ranges.length.shape == ranges.fd.shape == ranges.file_offset.shape == (n,)):
        raise HostGpuError("HostRanges arrays differ in shape", errno.EINVAL)
    addr = ranges.addr.astype(np.uint64)
    length = ranges.length.astype(np.uint64)
    bad = np.flatnonzero((addr % abi.PAGE_SIZE != 0) | (length % abi.PAGE_SIZE != 0)
                         | (length == 0) | (addr == 0) | (addr >= _MAX_ADDR)
                         | (length >= _MAX_ADDR) | (addr + length >= _MAX_ADDR))
    if bad.size:
        i = int(bad[0])
        raise HostGpuError(f"host range {i} ({int(addr[i]):#x}+{int(length[i]):#x}) is zero, "
                           "not page aligned or beyond user space", errno.EINVAL)
    return addr.astype(np.int64), length.astype(np.int64)


def max_ranges(path: UserptrPath, per_range_max: int) -> int:
    """Most host ranges one buffer may have on ``path``: alias needs a mapping per range
    (half of ``vm.max_map_count``, leaving room for everything else); per-range an
    allocation per range (``per_range_max``); batch has no limit of its own."""
    if path is UserptrPath.ALIAS:
        try:
            with open("/proc/sys/vm/max_map_count", encoding="ascii") as f:
                return int(f.read()) // 2
        except (OSError, ValueError):
            return 32768
    if path is UserptrPath.PER_RANGE:
        return per_range_max
    return 1 << 32


class KfdHostGpu(HostGpu):
    """The host GPU as seen through KFD.

    :param transport: the kernel (real or simulated).
    :param gpu_ids: GPUs to use (default: every GPU of the topology).  Buffers are
        allocated on the first and mapped on all of them at the same GPU VA.
    :param isolation: ``"vm"`` or ``"context"``.
    :param userptr_path: ``"auto"`` (batch when the probe says so, else alias), or
        ``"batch"`` (refuse to start without it), ``"alias"``, ``"per-range"``.
    :param max_per_range_ranges: most host ranges of one buffer on the per-range path
        (chosen, or taken over from alias where aliasing is impossible).

    **Isolation.** ``"vm"``: one (primary) KFD process for the whole VM; every
    USERPTR blob lives in it.  ``"context"``: each virtio-gpu context gets its own
    ``/dev/kfd`` fd turned into a secondary KFD process with
    ``AMDKFD_IOC_CREATE_PROCESS`` (KFD >= 1.19; refused at start-up otherwise), so
    guest programs do not share a GPU VM.  The kernel refuses USERPTR allocations on
    secondary processes with EOPNOTSUPP (checked at start-up by a probe allocation),
    so in this mode ``info().userptr_available`` is False and every
    :meth:`register_userptr` raises ``HostGpuError(..., unsupported=True)`` with
    :data:`CONTEXT_USERPTR_UNSUPPORTED` as its message.
    """

    def __init__(self, transport: KfdTransport, *, gpu_ids: Sequence[int] | None = None,
                 isolation: str = "vm", userptr_path: str = "auto",
                 max_per_range_ranges: int = DEFAULT_LIMITS.max_per_range_ranges) -> None:
        if isolation not in ("vm", "context"):
            raise ValueError(f"isolation must be 'vm' or 'context', not {isolation!r}")
        requested = None if userptr_path == "auto" else UserptrPath(userptr_path)
        self._t = transport
        self._isolation = isolation
        self._per_range_max = max_per_range_ranges
        self._closed = False
        self._control_fd = -1
        self._main: KfdProcess | None = None
        self._contexts: dict[int, KfdProcess] = {}
        self._live: dict[int, GpuMapping] = {}  # id(mapping) -> mapping
        self._leftovers: list[Registration] = []  # torn down by invalidation, failed
        self.batch_probe = BatchProbe(False, "not probed")
        #: why USERPTR is (un)available, from the start-up probe
        self.userptr_detail = "not probed"
        try:
            self._open(gpu_ids, requested)
        except BaseException:
            self.close()
            raise

    # --- start-up ----------------------------------------------------------------------

    def _open(self, gpu_ids: Sequence[int] | None, requested: UserptrPath | None) -> None:
        self._version = self._open_kfd()
        self._gpus = self._select(read_topology(self._t), gpu_ids)
        self._probe(requested)

    def _open_kfd(self) -> tuple[int, int]:
        """Open the control fd and check the KFD ioctl version."""
        try:
            self._control_fd = self._t.open("/dev/kfd")
        except OSError as e:
            raise HostGpuError(f"cannot open /dev/kfd: {e}", e.errno) from e
        arg = abi.pack(abi.GetVersionArgs())
        try:
            self._t.ioctl(self._control_fd, abi.AMDKFD_IOC_GET_VERSION, arg)
        except OSError as e:
            raise HostGpuError(f"AMDKFD_IOC_GET_VERSION failed: {e}", e.errno) from e
        version = decode(abi.GetVersionArgs, arg)
        if version.major_version != abi.KFD_IOCTL_MAJOR_VERSION:
            raise HostGpuError(f"KFD ioctl version {version.major_version}."
                               f"{version.minor_version} is not 1.x")
        if self._isolation == "context" \
                and version.minor_version < abi.KFD_CREATE_PROCESS_MIN_MINOR:
            raise HostGpuError(
                f"isolation 'context' needs AMDKFD_IOC_CREATE_PROCESS (KFD ioctl >= 1."
                f"{abi.KFD_CREATE_PROCESS_MIN_MINOR}); this kernel has KFD 1."
                f"{version.minor_version}", unsupported=True)
        return version.major_version, version.minor_version

    def _probe(self, requested: UserptrPath | None) -> None:
        """Acquire the GPUs (vm) and find out what USERPTR can do; pick the path."""
        if self._isolation == "vm":
            fd, self._control_fd = self._control_fd, -1
            self._main = KfdProcess(self._t, self._gpus, kfd_fd=fd)
            self.batch_probe = probe_batch(self._main)
            self._userptr_available, self.userptr_detail = True, "primary KFD process"
        else:
            probe = KfdProcess(self._t, self._gpus, secondary=True)
            try:
                self._userptr_available, self.userptr_detail = probe_userptr(probe)
            finally:
                probe.close()
            self.batch_probe = BatchProbe(False, "not probed: " + (
                "USERPTR refused on a secondary KFD process" if not self._userptr_available
                else "context isolation"))
        if requested is UserptrPath.BATCH and not self.batch_probe.supported \
                and self._isolation == "vm":
            raise HostGpuError("userptr path 'batch' requested, but the kernel does not "
                               f"support USERPTR_BATCH ({self.batch_probe.detail})",
                               unsupported=True)
        self._path = requested or (UserptrPath.BATCH if self.batch_probe.supported
                                   else UserptrPath.ALIAS)
        self._auto_path = requested is None

    @staticmethod
    def _select(gpus: list[TopologyGpu], wanted: Sequence[int] | None) -> list[TopologyGpu]:
        if not gpus:
            raise HostGpuError("the KFD topology has no GPU node")
        if wanted is None:
            return gpus
        by_id = {g.gpu_id: g for g in gpus}
        unknown = [g for g in wanted if g not in by_id]
        if unknown or not wanted:
            raise HostGpuError(f"gpu_ids {[hex(g) for g in unknown] or 'empty'}: the "
                               f"topology has {[hex(g) for g in by_id]}", errno.ENODEV)
        return [by_id[g] for g in wanted]

    # --- HostGpu -----------------------------------------------------------------------

    def info(self) -> HostGpuInfo:
        ranges = max_ranges(self._path, self._per_range_max)
        falls_back = self._path is UserptrPath.ALIAS and self._auto_path
        return HostGpuInfo(backend=self._t.name, userptr_path=self._path,
                           batch_supported=self.batch_probe.supported,
                           gpu_ids=tuple(g.gpu_id for g in self._gpus),
                           kfd_version=self._version, isolation=self._isolation,
                           userptr_available=self._userptr_available,
                           userptr_detail=self.userptr_detail, max_ranges=ranges,
                           max_ranges_huge_pages=min(ranges, self._per_range_max)
                           if falls_back else ranges)

    def available_memory(self) -> dict[int, int]:
        """AVAILABLE_MEMORY of every selected GPU (vm isolation), by gpu_id."""
        if self._main is None:
            return {}
        return {g: self._main.available_memory(g) for g in self._main.gpu_ids}

    def _process_for(self, context: int | None) -> KfdProcess:
        if self._closed:
            raise HostGpuError("host GPU is closed")
        if self._main is not None:
            return self._main
        if not self._userptr_available or context is None:
            raise HostGpuError(CONTEXT_USERPTR_UNSUPPORTED, errno.EOPNOTSUPP, unsupported=True)
        proc = self._contexts.get(context)
        if proc is None:
            raise HostGpuError(f"context {context} has no KFD process (open_context first)")
        return proc

    def register_userptr(self, ranges: HostRanges, *, readonly: bool,
                         context: int | None = None) -> GpuMapping:
        proc = self._process_for(context)
        starts, sizes = _validated(ranges)
        path = self._path
        if path is UserptrPath.ALIAS and self._auto_path and alias_refusal(ranges):
            path = UserptrPath.PER_RANGE  # nothing to alias (host buffers), or hugetlb
            if len(sizes) > self._per_range_max:  # one alloc+map per range: bounded
                raise HostGpuError(f"{len(sizes)} host ranges exceed the per-range path's "
                                   f"{self._per_range_max} (alias is not possible here)",
                                   errno.ENOMEM)
        total = int(sizes.sum())
        va = proc.va.allocate(total)
        try:
            reg = register(proc, path, ranges, starts=starts, sizes=sizes, va=va,
                           readonly=readonly)
        except HostGpuError as e:
            proc.va.free(va)
            if e.errno == errno.EOPNOTSUPP and proc.secondary:
                raise HostGpuError(CONTEXT_USERPTR_UNSUPPORTED, e.errno,
                                   unsupported=True) from e
            raise
        except BaseException:
            proc.va.free(va)
            raise
        mapping = GpuMapping(gpu_va=va, size=total, readonly=readonly, path=path,
                             gpu_ids=proc.gpu_ids, context=context, private=reg)
        self._live[id(mapping)] = mapping
        return mapping

    def release(self, mapping: GpuMapping) -> None:
        if id(mapping) not in self._live:
            return
        reg: Registration = mapping.private
        mapping.invalidated = True  # nobody may use it from now on, whatever follows
        teardown(reg)  # raises with the mapping still live if the kernel refuses
        del self._live[id(mapping)]

    def invalidate_host_range(self, addr: int, length: int) -> list[GpuMapping]:
        self._t.mmu_notify(addr, length)
        end = addr + length
        hit = [m for m in self._live.values() if m.private.touches(addr, end)]
        for mapping in hit:
            del self._live[id(mapping)]
            mapping.invalidated = True
            try:
                teardown(mapping.private)
            except (HostGpuError, OSError) as e:
                log.error("tearing down invalidated mapping at GPU VA %#x: %s",
                          mapping.gpu_va, e)
                self._leftovers.append(mapping.private)
        return hit

    def open_context(self, context: int) -> None:
        """Context isolation: give ``context`` its own secondary KFD process."""
        if self._closed:
            raise HostGpuError("host GPU is closed")
        if self._isolation != "context":
            return
        if context in self._contexts:
            raise HostGpuError(f"context {context} already has a KFD process")
        self._contexts[context] = KfdProcess(self._t, self._gpus, secondary=True)

    def close_context(self, context: int) -> None:
        """Context isolation: release what the context's own KFD process holds and close
        it.  A release the kernel refuses is logged: its BOs die with the process, and
        :meth:`close` unmaps what is left on the host.  In 'vm' isolation every mapping
        lives in the one KFD process and outlives the context (a blob created in a
        context may stay attached elsewhere)."""
        proc = self._contexts.pop(context, None)
        if proc is None:
            return
        for mapping in [m for m in self._live.values() if m.private.process is proc]:
            try:
                self.release(mapping)
            except (HostGpuError, OSError) as e:
                log.error("releasing mapping at GPU VA %#x of context %d: %s", mapping.gpu_va,
                          context, e)
                del self._live[id(mapping)]
                self._leftovers.append(mapping.private)
        proc.close()  # a secondary process dies with its fd, and its BOs with it
        for reg in self._leftovers:
            if reg.process is proc:
                reg.handles.clear()  # close() finishes the rest (alias, GPU VA)

    def gpu_memory(self, gpu_id: int | None = None) -> GpuMemory | None:
        proc = self._main
        if proc is None:
            return None
        return self._t.gpu_memory(proc.fd, proc.gpu_ids[0] if gpu_id is None else gpu_id)

    def live_mappings(self) -> int:
        return len(self._live)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for context in list(self._contexts):  # its mappings, and refusals to leftovers
            self.close_context(context)
        for mapping in list(self._live.values()):
            try:
                self.release(mapping)
            except (HostGpuError, OSError) as e:
                log.error("releasing mapping at GPU VA %#x on close: %s", mapping.gpu_va, e)
        for reg in self._leftovers:
            try:
                teardown(reg)
            except (HostGpuError, OSError) as e:
                log.error("tearing down leftover mapping at GPU VA %#x: %s", reg.va, e)
        self._leftovers.clear()
        if self._main is not None:
            self._main.close()
            self._main = None
        if self._control_fd >= 0:
            self._t.close(self._control_fd)
            self._control_fd = -1
