"""The simulated KFD kernel, at the ioctl level, on the same struct bytes as the kernel.

:class:`SimKfd` keeps kernel state: open files, KFD processes (one primary per host
process, one secondary per fd after ``CREATE_PROCESS``), per-GPU process device data
with the acquired render node and its :class:`~vgpu_backend.hostgpu.sim_vm.SimGpuVm`,
and userptr BOs.  :class:`SimTransport` puts device nodes and a
sysfs topology in front of it.  Memory ioctls live in ``sim_memory``, the page
table in ``sim_vm``.

Rules enforced here (``kfd_chardev.c`` / ``kfd_process.c``):

* an fd works only in the process that opened it: ``EBADF`` elsewhere;
* request type not 'K', or a number the sim does not implement: ``ENOTTY``;
  ``CREATE_PROCESS`` on a KFD older than 1.19: ``ENOTTY`` (it did not exist);
* the argument is copied in for ``_IOC_WRITE`` and back for ``_IOC_READ`` -- also
  when the ioctl fails;
* ``ACQUIRE_VM``: unknown gpu_id, an fd that is not a render node of that GPU, or a
  render node already acquired by another KFD process: ``EINVAL``; the same render fd
  again: 0; a different one: ``EBUSY``;
* ``CREATE_PROCESS``: only on an fd that still holds the primary process (once per fd),
  ``EINVAL`` otherwise;
* ``GET_PROCESS_APERTURES_NEW``: ``num_of_nodes`` 0 asks for the count; the array is
  written with ``copy_to_user`` (``EFAULT``);
* ``AVAILABLE_MEMORY``: unknown gpu_id: ``EINVAL``.

The primary process outlives its fds (as in the kernel, it dies with the mm); a
secondary process dies when its fd is closed, freeing its BOs.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Final

from protocol.wire import decode, layout
from vgpu_backend.hostgpu import kfd_abi as abi
from vgpu_backend.hostgpu.base import GpuMemory
from vgpu_backend.hostgpu.sim_config import FaultQueue, SimFault, SimGpu, SimKfdConfig, kerr
from vgpu_backend.hostgpu.sim_memory import MemoryIoctls
from vgpu_backend.hostgpu.sim_usermem import copy_to_user
from vgpu_backend.hostgpu.sim_vm import SimBo, SimGpuVm
from vgpu_backend.hostgpu.transport import KfdTransport

__all__ = ["SimFault", "SimKfd", "SimKfdConfig", "SimProcess", "SimTransport"]

#: ``KFD_CONTEXT_ID_PRIMARY``
CONTEXT_ID_PRIMARY: Final = 0xFFFF


@dataclass(eq=False)
class SimFile:
    """An open file of the simulated kernel (``/dev/kfd`` or a render node)."""

    fd: int
    pid: int
    kind: str
    process: SimProcess | None = None
    gpu: SimGpu | None = None
    #: render node: the KFD process whose VM it became (ACQUIRE_VM)
    owner: SimProcess | None = None
    closed: bool = False


@dataclass(eq=False)
class SimPdd:
    """``kfd_process_device``: one GPU as one KFD process sees it."""

    gpu: SimGpu
    drm_file: SimFile | None = None
    vm: SimGpuVm | None = None


@dataclass(eq=False)
class SimProcess:
    """``kfd_process``: primary (one per host process) or secondary."""

    pid: int
    context_id: int
    pdds: dict[int, SimPdd]
    bos: dict[int, SimBo] = field(default_factory=dict)
    next_idr: int = 1
    alive: bool = True

    @property
    def primary(self) -> bool:
        """The process is the mm's primary KFD process."""
        return self.context_id == CONTEXT_ID_PRIMARY


class SimKfd:
    """The simulated KFD kernel (see the module docstring for its rules)."""

    def __init__(self, config: SimKfdConfig | None = None) -> None:
        self.config = config or SimKfdConfig()
        self.gpus = self.config.gpus()
        self.faults = FaultQueue()
        self.files: dict[int, SimFile] = {}
        self.processes: list[SimProcess] = []
        #: (start, size) ranges registered through SVM: allocations hitting them get
        #: EADDRINUSE (GPU VA and, for USERPTR, every CPU range)
        self.svm_ranges: list[tuple[int, int]] = []
        #: bytes pinned by userptr BOs, against ``config.userptr_limit``
        self.userptr_charged = 0
        self._next_context = 0
        self._memory = MemoryIoctls(self)
        self._handlers = {
            abi.AMDKFD_IOC_GET_VERSION: self._get_version,
            abi.AMDKFD_IOC_ACQUIRE_VM: self._acquire_vm,
            abi.AMDKFD_IOC_GET_PROCESS_APERTURES_NEW: self._get_apertures,
            abi.AMDKFD_IOC_AVAILABLE_MEMORY: self._available_memory,
            abi.AMDKFD_IOC_CREATE_PROCESS: self._create_process,
            abi.AMDKFD_IOC_ALLOC_MEMORY_OF_GPU: self._memory.alloc,
            abi.AMDKFD_IOC_FREE_MEMORY_OF_GPU: self._memory.free,
            abi.AMDKFD_IOC_MAP_MEMORY_TO_GPU: self._memory.map,
            abi.AMDKFD_IOC_UNMAP_MEMORY_FROM_GPU: self._memory.unmap,
        }
        self._by_nr = {abi.ioc_nr(req): req for req in self._handlers}

    # --- test hooks ----------------------------------------------------------------

    def inject(self, fault: SimFault) -> None:
        """Queue a fault for an upcoming ioctl."""
        self.faults.add(fault)

    def live_bos(self) -> int:
        """BOs still allocated in this host process's live KFD processes."""
        pid = os.getpid()
        return sum(len(p.bos) for p in self.processes if p.alive and p.pid == pid)

    def open_files(self) -> list[int]:
        """Fds of this host process still open on the simulated kernel."""
        pid = os.getpid()
        return sorted(fd for fd, f in self.files.items() if f.pid == pid)

    # --- files -----------------------------------------------------------------------

    def open_kfd(self, fd: int) -> None:
        """``kfd_open``: the fd holds the mm's primary process (created on first open)."""
        pid = os.getpid()
        primary = next((p for p in self.processes
                        if p.alive and p.pid == pid and p.primary), None)
        if primary is None:
            primary = self._new_process(pid, CONTEXT_ID_PRIMARY)
        self.files[fd] = SimFile(fd=fd, pid=pid, kind="kfd", process=primary)

    def open_render(self, fd: int, gpu: SimGpu) -> None:
        """A render node was opened: a fresh DRM file with its own VM."""
        self.files[fd] = SimFile(fd=fd, pid=os.getpid(), kind="render", gpu=gpu)

    def release(self, fd: int) -> None:
        """The last reference to ``fd`` went away (``close``)."""
        f = self.files.pop(fd)
        f.closed = True
        if f.kind == "kfd" and f.process is not None and not f.process.primary:
            self._destroy(f.process)

    def _new_process(self, pid: int, context_id: int) -> SimProcess:
        proc = SimProcess(pid=pid, context_id=context_id,
                          pdds={g.gpu_id: SimPdd(g) for g in self.gpus})
        self.processes.append(proc)
        return proc

    def _destroy(self, proc: SimProcess) -> None:
        for bo in list(proc.bos.values()):
            self._memory.drop_bo(proc, bo)
        for pdd in proc.pdds.values():
            if pdd.drm_file is not None:
                pdd.drm_file.owner = None
        proc.alive = False
        self.processes.remove(proc)

    # --- MMU notifier ------------------------------------------------------------------

    def mmu_invalidate(self, start: int, length: int) -> int:
        """CPU memory ``[start, start+length)`` is going away: invalidate every userptr
        BO of this host process touching it (the whole BO faults from then on until it
        is freed); return how many were hit."""
        pid = os.getpid()
        end = start + length
        hit = 0
        for proc in self.processes:
            if proc.pid != pid:
                continue
            for bo in proc.bos.values():
                if not bo.invalid and bo.touches(start, end):
                    bo.invalid = True
                    hit += 1
                    for gpu_id in bo.mapped_on:
                        vm = proc.pdds[gpu_id].vm
                        if vm is not None:
                            vm.changed()
        return hit

    def vm_of(self, kfd_fd: int, gpu_id: int) -> SimGpuVm | None:
        """The VM of ``gpu_id`` in the KFD process behind ``kfd_fd``."""
        f = self.files.get(kfd_fd)
        if f is None or f.process is None or gpu_id not in f.process.pdds:
            return None
        return f.process.pdds[gpu_id].vm

    # --- dispatch ----------------------------------------------------------------------

    def ioctl(self, fd: int, request: int, arg: bytearray | None) -> None:
        """``kfd_ioctl()``: check the caller, copy in, run, copy back (even on error)."""
        f = self.files.get(fd)
        if f is None:
            raise kerr(errno.EBADF, f"fd {fd} is not open on the simulated kernel")
        if f.kind != "kfd":
            raise kerr(errno.ENOTTY, f"{request:#x} on a render node")
        if f.pid != os.getpid():
            raise kerr(errno.EBADF, "Using KFD FD in wrong process")
        kernel_cmd = self._by_nr.get(abi.ioc_nr(request)) \
            if abi.ioc_type(request) == abi.AMDKFD_IOCTL_BASE else None
        if kernel_cmd is None or (kernel_cmd == abi.AMDKFD_IOC_CREATE_PROCESS
                                  and self.config.kfd_minor < abi.KFD_CREATE_PROCESS_MIN_MINOR):
            raise kerr(errno.ENOTTY, f"no ioctl {request:#x}")
        usize = abi.ioc_size(request)
        have = 0 if arg is None else len(arg)
        if usize > have:
            raise kerr(errno.EFAULT, f"argument of {have} bytes, request says {usize}")
        kdata = bytearray(max(usize, abi.ioc_size(kernel_cmd)))
        direction = abi.ioc_dir(kernel_cmd)
        if arg is not None and direction & abi.IOC_WRITE:
            kdata[:usize] = arg[:usize]
        fault = self.faults.take(abi.IOCTL_NAMES[kernel_cmd])
        try:
            self._handlers[kernel_cmd](f, kdata, fault)
        finally:
            if arg is not None and direction & abi.IOC_READ:
                arg[:usize] = kdata[:usize]

    @staticmethod
    def fail_early(fault: SimFault | None, name: str) -> None:
        """An injected fault that hits before the ioctl does anything."""
        if fault is not None:
            raise kerr(fault.errno, f"injected {name} failure")

    def process_of(self, f: SimFile) -> SimProcess:
        """The KFD process behind a /dev/kfd file."""
        if f.process is None or not f.process.alive:  # pragma: no cover - invariant
            raise kerr(errno.EINVAL, "no process")
        return f.process

    # --- small ioctls ------------------------------------------------------------------

    def _get_version(self, f: SimFile, kdata: bytearray, fault: SimFault | None) -> None:
        self.fail_early(fault, "GET_VERSION")
        layout(abi.GetVersionArgs).struct.pack_into(
            kdata, 0, abi.KFD_IOCTL_MAJOR_VERSION, self.config.kfd_minor)

    def _acquire_vm(self, f: SimFile, kdata: bytearray, fault: SimFault | None) -> None:
        self.fail_early(fault, "ACQUIRE_VM")
        args = decode(abi.AcquireVmArgs, kdata)
        proc = self.process_of(f)
        drm = self.files.get(args.drm_fd)
        if drm is None or drm.pid != f.pid or drm.kind != "render":
            raise kerr(errno.EINVAL, f"drm_fd {args.drm_fd} is not a render node")
        pdd = proc.pdds.get(args.gpu_id)
        if pdd is None:
            raise kerr(errno.EINVAL, f"unknown gpu_id {args.gpu_id:#x}")
        if pdd.drm_file is not None:
            if pdd.drm_file is drm:
                return
            raise kerr(errno.EBUSY, f"GPU {args.gpu_id:#x} already has a VM")
        if drm.gpu is not pdd.gpu:
            raise kerr(errno.EINVAL, f"render node {drm.gpu and drm.gpu.render_minor} is "
                                     f"not GPU {args.gpu_id:#x}")
        if drm.owner is not None:
            raise kerr(errno.EINVAL, "VM already acquired by another KFD process")
        drm.owner = proc
        pdd.drm_file = drm
        pdd.vm = SimGpuVm(pdd.gpu.gpu_id, pdd.gpu.gpuvm_base, pdd.gpu.gpuvm_limit)

    def _get_apertures(self, f: SimFile, kdata: bytearray, fault: SimFault | None) -> None:
        self.fail_early(fault, "GET_PROCESS_APERTURES_NEW")
        args = decode(abi.GetProcessAperturesNewArgs, kdata)
        proc = self.process_of(f)
        pdds = list(proc.pdds.values())
        lay = layout(abi.GetProcessAperturesNewArgs)
        if args.num_of_nodes == 0:
            lay.struct.pack_into(kdata, 0, args.kfd_process_device_apertures_ptr,
                                 len(pdds), 0)
            return
        filled = pdds[:args.num_of_nodes]
        entry = layout(abi.ProcessDeviceApertures)
        out = bytearray(entry.size * len(filled))
        for i, pdd in enumerate(filled):
            g = pdd.gpu
            lds = (g.node + 1) << 48
            entry.struct.pack_into(out, i * entry.size, lds, lds + 0xFFFFFFFF,
                                   lds + (1 << 32), lds + (1 << 32) + 0xFFFFFFFF,
                                   g.gpuvm_base, g.gpuvm_limit, g.gpu_id, 0)
        lay.struct.pack_into(kdata, 0, args.kfd_process_device_apertures_ptr, len(filled), 0)
        try:
            copy_to_user(args.kfd_process_device_apertures_ptr, bytes(out))
        except OSError as e:
            raise kerr(errno.EFAULT, "apertures array") from e

    def _available_memory(self, f: SimFile, kdata: bytearray, fault: SimFault | None) -> None:
        self.fail_early(fault, "AVAILABLE_MEMORY")
        args = decode(abi.GetAvailableMemoryArgs, kdata)
        pdd = self.process_of(f).pdds.get(args.gpu_id)
        if pdd is None:
            raise kerr(errno.EINVAL, f"unknown gpu_id {args.gpu_id:#x}")
        layout(abi.GetAvailableMemoryArgs).struct.pack_into(
            kdata, 0, pdd.gpu.vram_bytes, args.gpu_id, 0)

    def _create_process(self, f: SimFile, kdata: bytearray, fault: SimFault | None) -> None:
        self.fail_early(fault, "CREATE_PROCESS")
        proc = self.process_of(f)
        if not proc.primary:
            raise kerr(errno.EINVAL, "Each FD owns only one kfd_process")
        self._next_context += 1
        f.process = self._new_process(f.pid, self._next_context)


_SYSFS_ROOTS: Final = ("/sys/devices/virtual/kfd/kfd/topology", "/sys/class/kfd/kfd/topology")
_RENDER_PREFIX: Final = "/dev/dri/renderD"


class SimTransport(KfdTransport):
    """A :class:`KfdTransport` onto a :class:`SimKfd`: ``/dev/kfd``, render nodes
    ``/dev/dri/renderD<minor>`` and the sysfs topology
    (``.../topology/nodes/<N>/{gpu_id,name,properties}``, node 0 the CPU).

    Every open file is backed by a real descriptor (``/dev/null``), so fd numbers are
    unique and fd-leak checks through ``/proc/self/fd`` see the simulated files too.
    """

    name = "sim"

    def __init__(self, kernel: SimKfd | SimKfdConfig | None = None) -> None:
        self.kernel = kernel if isinstance(kernel, SimKfd) else SimKfd(kernel)

    # --- device nodes ------------------------------------------------------------------

    def _render_gpu(self, path: str) -> SimGpu | None:
        if not path.startswith(_RENDER_PREFIX):
            return None
        minor = path[len(_RENDER_PREFIX):]
        return next((g for g in self.kernel.gpus if minor.isdigit()
                     and g.render_minor == int(minor)), None)

    def open(self, path: str) -> int:
        gpu = self._render_gpu(path)
        if path != "/dev/kfd" and gpu is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        if gpu is None:
            self.kernel.open_kfd(fd)
        else:
            self.kernel.open_render(fd, gpu)
        return fd

    def close(self, fd: int) -> None:
        if fd not in self.kernel.files:
            raise OSError(errno.EBADF, f"fd {fd} is not a simulated KFD file")
        self.kernel.release(fd)
        os.close(fd)

    def ioctl(self, fd: int, request: int, arg: bytearray | None) -> None:
        self.kernel.ioctl(fd, request, arg)

    def mmu_notify(self, addr: int, length: int) -> None:
        self.kernel.mmu_invalidate(addr, length)

    def gpu_memory(self, kfd_fd: int, gpu_id: int) -> GpuMemory | None:
        return self.kernel.vm_of(kfd_fd, gpu_id)

    # --- sysfs -------------------------------------------------------------------------

    def _sysfs(self, path: str) -> list[str] | str | None:
        """A directory listing, a file's text, or None."""
        path = path.rstrip("/")
        if path in ("/dev/kfd", "/dev/dri") or self._render_gpu(path) is not None:
            return "" if path != "/dev/dri" else \
                [f"renderD{g.render_minor}" for g in self.kernel.gpus]
        root = next((r for r in _SYSFS_ROOTS if path == r or path.startswith(r + "/")), None)
        if root is None:
            return None
        parts = path[len(root):].strip("/").split("/") if path != root else []
        if not parts:
            return ["generation_id", "nodes", "system_properties"]
        if parts == ["generation_id"]:
            return "1\n"
        if parts == ["system_properties"]:
            return "platform_oem 0\nplatform_id 0\nplatform_rev 0\n"
        if parts[0] != "nodes":
            return None
        nodes = [None, *self.kernel.gpus]
        if len(parts) == 1:
            return [str(i) for i in range(len(nodes))]
        if not parts[1].isdigit() or int(parts[1]) >= len(nodes):
            return None
        gpu = nodes[int(parts[1])]
        files = {"gpu_id": f"{gpu.gpu_id if gpu else 0}\n",
                 "name": f"{gpu.name if gpu else ''}\n",
                 "properties": _properties(gpu)}
        if len(parts) == 2:
            return sorted(files)
        return files.get(parts[2]) if len(parts) == 3 else None

    def exists(self, path: str) -> bool:
        return self._sysfs(path) is not None

    def read_text(self, path: str) -> str:
        got = self._sysfs(path)
        if not isinstance(got, str):
            err = errno.EISDIR if got is not None else errno.ENOENT
            raise OSError(err, os.strerror(err), path)
        return got

    def list_dir(self, path: str) -> list[str]:
        got = self._sysfs(path)
        if not isinstance(got, list):
            err = errno.ENOTDIR if got is not None else errno.ENOENT
            raise OSError(err, os.strerror(err), path)
        return got


def _properties(gpu: SimGpu | None) -> str:
    """A node's ``properties`` file, in the kernel's "name value" lines."""
    if gpu is None:
        props = {"cpu_cores_count": 2, "simd_count": 0, "mem_banks_count": 1,
                 "gfx_target_version": 0, "drm_render_minor": 0, "vendor_id": 0,
                 "device_id": 0}
    else:
        props = {"cpu_cores_count": 0, "simd_count": 192, "mem_banks_count": 1,
                 "gfx_target_version": gpu.gfx_target_version,
                 "drm_render_minor": gpu.render_minor, "vendor_id": 4098,
                 "device_id": 29772, "local_mem_size": gpu.vram_bytes}
    return "".join(f"{k} {v}\n" for k, v in props.items())
