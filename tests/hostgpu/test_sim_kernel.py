"""The simulated KFD's process, file and topology rules (userptr-kfd-uapi.md §3.5, §5)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import numpy as np
import pytest

from protocol.wire import decode, layout
from vgpu_backend.hostgpu import kfd_abi as abi
from vgpu_backend.hostgpu.sim_config import SimFault, SimKfdConfig
from vgpu_backend.hostgpu.sim_kfd import SimTransport
from vgpu_backend.hostgpu.transport import KFD_TOPOLOGY

from .helpers import PAGE, RawKfd

Raw = Callable[..., RawKfd]
USERPTR = abi.KFD_IOC_ALLOC_MEM_FLAGS_USERPTR


def test_get_version(raw_kfd: Raw) -> None:
    raw = raw_kfd(SimKfdConfig(kfd_minor=17))
    err, out = raw.call(abi.AMDKFD_IOC_GET_VERSION, abi.GetVersionArgs())
    assert (err, out.major_version, out.minor_version) == (0, 1, 17)


def _in_child(work: Callable[[], list[int]]) -> list[int]:
    """Run ``work`` in a forked child (a copy of the simulated kernel, another pid);
    its small non-negative results come back over a pipe."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            out = bytes(work())
        except BaseException:  # the parent sees 255 and fails
            out = b"\xff"
        os.write(write_end, out)
        os._exit(0)
    os.close(write_end)
    got = b""
    while chunk := os.read(read_end, 64):
        got += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    return list(got)


def test_fd_only_works_in_the_opening_process(raw_kfd: Raw) -> None:
    """A child (same fd number, copied kernel state, other pid) gets EBADF."""
    raw = raw_kfd()

    def child() -> list[int]:
        try:
            raw.t.ioctl(raw.fd, abi.AMDKFD_IOC_GET_VERSION, abi.pack(abi.GetVersionArgs()))
        except OSError as e:
            return [e.errno or 255]
        return [0]

    assert _in_child(child) == [errno.EBADF]
    assert raw.call(abi.AMDKFD_IOC_GET_VERSION, abi.GetVersionArgs())[0] == 0


def test_another_process_has_its_own_kfd_process_and_memory(raw_kfd: Raw) -> None:
    """A second host process (fork) opening /dev/kfd gets its own primary KFD process:
    it sees none of the first one's BOs or fds, cannot acquire a VM through the first
    one's render node, and its MMU notifications never touch the first one's BOs."""
    raw = raw_kfd()
    gpu_id = raw.acquire()
    buf = np.zeros(4 * PAGE, np.uint8)
    ptr = -(-buf.ctypes.data // PAGE) * PAGE  # a whole page inside buf
    err, out = raw.alloc(raw.gpus[0].gpuvm_base, PAGE, ptr, USERPTR)
    assert err == 0
    kernel = raw.t.kernel
    parent_fds = kernel.open_files()

    def child() -> list[int]:
        results = [kernel.live_bos(), len(kernel.open_files())]
        own = RawKfd(raw.t)
        results.append(int(own.fd in parent_fds))
        results.append(int(kernel.files[own.fd].process is kernel.files[raw.fd].process))
        results.append(own.call(abi.AMDKFD_IOC_ACQUIRE_VM,  # the parent's render fd
                                abi.AcquireVmArgs(raw.render[gpu_id], gpu_id))[0])
        results.append(kernel.mmu_invalidate(ptr, PAGE))  # the parent's BO's pages
        own.acquire()  # its own render node works, and its own BO is hit
        err, _ = own.alloc(raw.gpus[0].gpuvm_base, PAGE, ptr, USERPTR)
        results += [err, kernel.live_bos(), kernel.mmu_invalidate(ptr, PAGE)]
        return results

    assert _in_child(child) == [0, 0, 0, 0, errno.EINVAL, 0, 0, 1, 1]
    # nothing the child did reached this process's copy of the kernel
    assert kernel.live_bos() == 1 and kernel.open_files() == parent_fds
    assert kernel.mmu_invalidate(ptr, PAGE) == 1
    assert raw.free(out.handle) == 0


def test_unknown_ioctls_are_enotty(raw_kfd: Raw) -> None:
    raw = raw_kfd(SimKfdConfig(kfd_minor=18))
    buf = bytearray(8)
    for request in (abi.ioc(abi.IOC_READ, ord("K"), 0x7E, 8),   # beyond COMMAND_END
                    abi.ioc(abi.IOC_READ, ord("d"), 0x01, 8),   # not 'K'
                    abi.AMDKFD_IOC_CREATE_PROCESS):             # KFD 1.18 has no 0x27
        with pytest.raises(OSError) as exc:
            raw.t.ioctl(raw.fd, request, buf)
        assert exc.value.errno == errno.ENOTTY
    render = raw.t.open(f"/dev/dri/renderD{raw.gpus[0].render_minor}")
    with pytest.raises(OSError) as exc:
        raw.t.ioctl(render, abi.AMDKFD_IOC_GET_VERSION, buf)
    assert exc.value.errno == errno.ENOTTY
    raw.t.close(render)
    with pytest.raises(OSError) as exc:
        raw.t.ioctl(render, abi.AMDKFD_IOC_GET_VERSION, buf)
    assert exc.value.errno == errno.EBADF


def test_short_argument_is_efault(raw_kfd: Raw) -> None:
    raw = raw_kfd()
    with pytest.raises(OSError) as exc:
        raw.t.ioctl(raw.fd, abi.AMDKFD_IOC_ALLOC_MEMORY_OF_GPU, bytearray(16))
    assert exc.value.errno == errno.EFAULT


def test_acquire_vm_rules(raw_kfd: Raw) -> None:
    raw = raw_kfd(SimKfdConfig(gpu_count=2))
    g0, g1 = raw.gpus
    r0 = raw.t.open(f"/dev/dri/renderD{g0.render_minor}")
    r0b = raw.t.open(f"/dev/dri/renderD{g0.render_minor}")
    r1 = raw.t.open(f"/dev/dri/renderD{g1.render_minor}")
    raw.render.update({1: r0b, 2: r1, g0.gpu_id: r0})
    acquire = abi.AMDKFD_IOC_ACQUIRE_VM
    assert raw.call(acquire, abi.AcquireVmArgs(r0, 0xDEAD))[0] == errno.EINVAL   # gpu_id
    assert raw.call(acquire, abi.AcquireVmArgs(raw.fd, g0.gpu_id))[0] == errno.EINVAL  # not DRM
    assert raw.call(acquire, abi.AcquireVmArgs(r1, g0.gpu_id))[0] == errno.EINVAL  # other GPU
    assert raw.call(acquire, abi.AcquireVmArgs(9999, g0.gpu_id))[0] == errno.EINVAL  # no fd
    assert raw.call(acquire, abi.AcquireVmArgs(r0, g0.gpu_id))[0] == 0
    assert raw.call(acquire, abi.AcquireVmArgs(r0, g0.gpu_id))[0] == 0          # same again
    assert raw.call(acquire, abi.AcquireVmArgs(r0b, g0.gpu_id))[0] == errno.EBUSY
    # r0's VM belongs to the primary process now: a secondary process cannot take it
    other = RawKfd(raw.t)
    try:
        assert other.call(abi.AMDKFD_IOC_CREATE_PROCESS, abi.GetVersionArgs())[0] == 0
        assert other.call(acquire, abi.AcquireVmArgs(r0, g0.gpu_id))[0] == errno.EINVAL
    finally:
        other.close()


def test_alloc_needs_acquire_vm(raw_kfd: Raw) -> None:
    raw = raw_kfd()
    base = raw.gpus[0].gpuvm_base
    buf = np.zeros(PAGE * 2, dtype=np.uint8)
    ptr = (buf.ctypes.data + PAGE - 1) // PAGE * PAGE
    assert raw.alloc(base, PAGE, ptr, USERPTR)[0] == errno.ENODEV
    raw.acquire()
    err, out = raw.alloc(base, PAGE, ptr, USERPTR)
    assert err == 0
    assert raw.free(out.handle) == 0


def test_apertures(raw_kfd: Raw) -> None:
    raw = raw_kfd(SimKfdConfig(gpu_count=3, aperture_skew=1 << 30))
    request = abi.AMDKFD_IOC_GET_PROCESS_APERTURES_NEW
    err, out = raw.call(request, abi.GetProcessAperturesNewArgs(0, 0))
    assert (err, out.num_of_nodes) == (0, 3)
    entry = layout(abi.ProcessDeviceApertures)
    table = np.zeros(2, dtype=entry.dtype)
    err, out = raw.call(request, abi.GetProcessAperturesNewArgs(table.ctypes.data, 2))
    assert (err, out.num_of_nodes) == (0, 2)
    got = [decode(abi.ProcessDeviceApertures, table.tobytes(), i * entry.size) for i in (0, 1)]
    assert [a.gpu_id for a in got] == [g.gpu_id for g in raw.gpus[:2]]
    assert got[1].gpuvm_base == raw.gpus[0].gpuvm_base + (1 << 30)
    assert all(a.gpuvm_limit == (1 << 47) - 1 for a in got)
    err, _ = raw.call(request, abi.GetProcessAperturesNewArgs(PAGE, 3))  # unmapped pointer
    assert err == errno.EFAULT


def test_available_memory(raw_kfd: Raw) -> None:
    raw = raw_kfd(SimKfdConfig(vram_bytes=3 << 30))
    request = abi.AMDKFD_IOC_AVAILABLE_MEMORY
    err, out = raw.call(request, abi.GetAvailableMemoryArgs(0, raw.gpus[0].gpu_id))
    assert (err, out.available) == (0, 3 << 30)
    assert raw.call(request, abi.GetAvailableMemoryArgs(0, 1))[0] == errno.EINVAL


def test_create_process_once_per_fd_and_no_userptr(raw_kfd: Raw) -> None:
    raw = raw_kfd(SimKfdConfig(kfd_minor=19))
    kernel = raw.t.kernel
    assert raw.call(abi.AMDKFD_IOC_CREATE_PROCESS, abi.GetVersionArgs())[0] == 0
    with pytest.raises(OSError) as exc:
        raw.t.ioctl(raw.fd, abi.AMDKFD_IOC_CREATE_PROCESS, None)
    assert exc.value.errno == errno.EINVAL
    assert len(kernel.processes) == 2  # the primary (from open) and the secondary
    raw.acquire()
    buf = np.zeros(PAGE * 2, dtype=np.uint8)
    ptr = (buf.ctypes.data + PAGE - 1) // PAGE * PAGE
    base = raw.gpus[0].gpuvm_base
    assert raw.alloc(base, PAGE, ptr, USERPTR)[0] == errno.EOPNOTSUPP
    assert raw.alloc(base, PAGE, ptr, USERPTR | abi.KFD_IOC_ALLOC_MEM_FLAGS_USERPTR_BATCH
                     )[0] == errno.EOPNOTSUPP
    secondary = kernel.files[raw.fd].process
    raw.close()
    raw.render.clear()
    raw.fd = raw.t.open("/dev/kfd")  # the fixture closes this one
    assert secondary not in kernel.processes  # a secondary process dies with its fd
    assert len(kernel.processes) == 1


def test_primary_outlives_its_fds(raw_kfd: Raw) -> None:
    raw = raw_kfd()
    raw.acquire()
    kernel = raw.t.kernel
    primary = kernel.files[raw.fd].process
    raw.close()
    raw.render.clear()
    raw.fd = raw.t.open("/dev/kfd")
    assert kernel.files[raw.fd].process is primary
    # its pdd still holds the old (closed) render file: a new one is EBUSY
    fd = raw.t.open(f"/dev/dri/renderD{raw.gpus[0].render_minor}")
    raw.render[0] = fd
    err, _ = raw.call(abi.AMDKFD_IOC_ACQUIRE_VM, abi.AcquireVmArgs(fd, raw.gpus[0].gpu_id))
    assert err == errno.EBUSY


def test_injected_faults_hit_the_next_calls(raw_kfd: Raw) -> None:
    raw = raw_kfd()
    raw.t.kernel.inject(SimFault("GET_VERSION", errno.EAGAIN, count=2, after=1))
    results = [raw.call(abi.AMDKFD_IOC_GET_VERSION, abi.GetVersionArgs())[0] for _ in range(4)]
    assert results == [0, errno.EAGAIN, errno.EAGAIN, 0]
    assert raw.t.kernel.faults.pending() == 0
    with pytest.raises(ValueError, match="unknown ioctl"):
        SimFault("NOPE", errno.EIO)


def test_sysfs_topology() -> None:
    t = SimTransport(SimKfdConfig(gpu_count=2, first_render_minor=130))
    assert t.list_dir(KFD_TOPOLOGY) == ["0", "1", "2"]
    assert t.read_text(f"{KFD_TOPOLOGY}/0/gpu_id") == "0\n"
    gpu_ids = [int(t.read_text(f"{KFD_TOPOLOGY}/{n}/gpu_id")) for n in (1, 2)]
    assert gpu_ids == [g.gpu_id for g in t.kernel.gpus]
    props = t.read_text(f"{KFD_TOPOLOGY}/2/properties")
    assert "drm_render_minor 131\n" in props
    assert t.read_text("/sys/class/kfd/kfd/topology/nodes/1/gpu_id") == f"{gpu_ids[0]}\n"
    assert t.exists("/dev/kfd") and t.exists("/dev/dri/renderD130")
    assert not t.exists("/dev/dri/renderD129") and not t.exists(f"{KFD_TOPOLOGY}/3")
    with pytest.raises(OSError) as exc:
        t.read_text(f"{KFD_TOPOLOGY}/1")
    assert exc.value.errno == errno.EISDIR
    with pytest.raises(FileNotFoundError):
        t.open("/dev/dri/renderD129")


def test_a_shorter_struct_from_older_user_space_is_zero_extended(raw_kfd: Raw) -> None:
    """The kernel copies ``_IOC_SIZE(request)`` bytes each way around its own, larger
    struct: GET_VERSION with a 4-byte argument gets just the major version."""
    raw = raw_kfd()
    request = abi.ioc(abi.IOC_READ, abi.AMDKFD_IOCTL_BASE,
                      abi.ioc_nr(abi.AMDKFD_IOC_GET_VERSION), 4)
    buf = bytearray(b"\xff" * 6)
    raw.t.ioctl(raw.fd, request, buf)
    assert buf == abi.KFD_IOCTL_MAJOR_VERSION.to_bytes(4, "little") + b"\xff\xff"


def test_a_dying_secondary_process_releases_its_render_vms(raw_kfd: Raw) -> None:
    raw = raw_kfd(SimKfdConfig(kfd_minor=19))
    gpu = raw.gpus[0]
    render = raw.t.open(f"/dev/dri/renderD{gpu.render_minor}")
    raw.render[gpu.gpu_id] = render  # the fixture closes it
    secondary = RawKfd(raw.t)
    assert secondary.call(abi.AMDKFD_IOC_CREATE_PROCESS, abi.GetVersionArgs())[0] == 0
    acquire = abi.AcquireVmArgs(render, gpu.gpu_id)
    assert secondary.call(abi.AMDKFD_IOC_ACQUIRE_VM, acquire)[0] == 0
    assert raw.call(abi.AMDKFD_IOC_ACQUIRE_VM, acquire)[0] == errno.EINVAL  # taken
    secondary.close()
    assert raw.call(abi.AMDKFD_IOC_ACQUIRE_VM, acquire)[0] == 0
