"""One KFD process on its own: the topology it is built from, opening and acquiring
(and undoing that on failure), the ioctl retry bound and the error text, the GPU VA
range from the apertures, which GPU allocates, MAP rollback and UNMAP errors, close."""

from __future__ import annotations

import errno
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from protocol.wire import decode, layout
from vgpu_backend.hostgpu import hostmem
from vgpu_backend.hostgpu import kfd_abi as abi
from vgpu_backend.hostgpu.base import HostGpuError
from vgpu_backend.hostgpu.kfd_process import (
    MAX_ATTEMPTS,
    KfdProcess,
    UnmapError,
    ioctl_error,
    read_topology,
)
from vgpu_backend.hostgpu.sim_config import SimFault, SimKfdConfig
from vgpu_backend.hostgpu.sim_kfd import SimTransport
from vgpu_backend.hostgpu.transport import KFD_TOPOLOGY
from vgpu_backend.hostgpu.userptr_paths import USERPTR_FLAGS

from .helpers import PAGE, assert_no_new_fds, open_fds

BASE = SimKfdConfig().gpuvm_base
LIMIT = SimKfdConfig().gpuvm_limit


class Apertures(SimTransport):
    """GET_PROCESS_APERTURES_NEW with edited answers: ``edit`` maps a gpu_id to the
    ``(gpuvm_base, gpuvm_limit)`` reported for it; ``fill_fewer`` makes the filling call
    report one GPU less than asked for (the last one)."""

    def __init__(self, config: SimKfdConfig, edit: dict[int, tuple[int, int]] | None = None,
                 *, fill_fewer: bool = False) -> None:
        super().__init__(config)
        self.edit = edit or {}
        self.fill_fewer = fill_fewer

    def ioctl(self, fd: int, request: int, arg: bytearray | None) -> None:
        if request != abi.AMDKFD_IOC_GET_PROCESS_APERTURES_NEW or arg is None:
            super().ioctl(fd, request, arg)
            return
        query = decode(abi.GetProcessAperturesNewArgs, arg)
        if self.fill_fewer and query.num_of_nodes:
            arg[:] = abi.pack(query._replace(num_of_nodes=query.num_of_nodes - 1))
        super().ioctl(fd, request, arg)
        out = decode(abi.GetProcessAperturesNewArgs, arg)
        if not query.num_of_nodes:
            return
        size = layout(abi.ProcessDeviceApertures).size
        for i in range(out.num_of_nodes):
            entry = hostmem.view(out.kfd_process_device_apertures_ptr + i * size, size)
            aperture = decode(abi.ProcessDeviceApertures, entry.tobytes())
            if aperture.gpu_id in self.edit:
                base, limit = self.edit[aperture.gpu_id]
                entry[:] = list(abi.pack(aperture._replace(gpuvm_base=base,
                                                           gpuvm_limit=limit)))


class Recorder(SimTransport):
    """Records every close; closing ``failing_close`` releases the file and then
    reports EIO (as close(2) may); ``refuse`` paths cannot be opened (EACCES);
    ``interrupt_acquire`` raises KeyboardInterrupt on that ACQUIRE_VM call (0-based)."""

    def __init__(self, config: SimKfdConfig | None = None, *, refuse: str = "",
                 interrupt_acquire: int | None = None) -> None:
        super().__init__(config)
        self.closed: list[int] = []
        self.failing_close = -2
        self.refuse = refuse
        self.interrupt_acquire = interrupt_acquire
        self.acquires = 0

    def open(self, path: str) -> int:
        if path == self.refuse:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return super().open(path)

    def close(self, fd: int) -> None:
        self.closed.append(fd)
        super().close(fd)
        if fd == self.failing_close:
            raise OSError(errno.EIO, "Input/output error")

    def ioctl(self, fd: int, request: int, arg: bytearray | None) -> None:
        if request == abi.AMDKFD_IOC_ACQUIRE_VM:
            self.acquires += 1
            if self.acquires - 1 == self.interrupt_acquire:
                raise KeyboardInterrupt
        super().ioctl(fd, request, arg)


class Sysfs(SimTransport):
    """A topology with one file replaced (``None``: the file does not exist)."""

    def __init__(self, path: str, text: str | None) -> None:
        super().__init__(SimKfdConfig())
        self.path, self.text = path, text

    def exists(self, path: str) -> bool:
        return self.text is not None if path == self.path else super().exists(path)

    def read_text(self, path: str) -> str:
        if path != self.path:
            return super().read_text(path)
        if self.text is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return self.text


MakeProcess = Callable[..., KfdProcess]


@pytest.fixture
def make_process() -> Iterator[MakeProcess]:
    """Build KFD processes over the topology (``order`` picks and orders its GPUs);
    at the end close them and check that no file is left open."""
    before = open_fds()
    made: list[tuple[KfdProcess, SimTransport]] = []

    def make(transport: SimTransport, order: tuple[int, ...] | None = None,
             **kwargs: bool) -> KfdProcess:
        gpus = read_topology(transport)
        proc = KfdProcess(transport, gpus if order is None else [gpus[i] for i in order],
                          **kwargs)
        made.append((proc, transport))
        return proc

    yield make
    for proc, transport in made:
        proc.close()
        assert transport.kernel.open_files() == []
    assert_no_new_fds(before)


# --- topology ------------------------------------------------------------------------------


def test_topology_is_in_numeric_node_order() -> None:
    """Nodes sort as numbers: node 10 comes after node 9, not after node 1."""
    t = SimTransport(SimKfdConfig(gpu_count=11))
    gpus = read_topology(t)
    assert [g.node for g in gpus] == list(range(1, 12))
    assert [g.gpu_id for g in gpus] == [g.gpu_id for g in t.kernel.gpus]
    assert [g.render_minor for g in gpus] == list(range(128, 139))


def test_topology_names() -> None:
    """A node's name comes from its ``name`` file; without the file it is empty."""
    assert [g.name for g in read_topology(SimTransport())] == ["gfx1100"]
    missing = Sysfs(f"{KFD_TOPOLOGY}/1/name", None)
    assert [g.name for g in read_topology(missing)] == [""]


@pytest.mark.parametrize(("file", "text"), [
    ("properties", "simd_count 192\n"),     # no drm_render_minor: KeyError
    ("gpu_id", "0x5a3c\n"),                 # not a decimal number: ValueError
    ("gpu_id", None),                       # unreadable: OSError
], ids=["no-render-minor", "bad-gpu-id", "no-gpu-id"])
def test_unreadable_topology_is_a_host_gpu_error(file: str, text: str | None) -> None:
    """Whatever is wrong with a node's files, read_topology raises HostGpuError."""
    with pytest.raises(HostGpuError, match="cannot read the KFD topology"):
        read_topology(Sysfs(f"{KFD_TOPOLOGY}/1/{file}", text))


# --- opening ---------------------------------------------------------------------------------


def test_a_process_needs_a_gpu() -> None:
    """No GPU: ValueError before anything is opened."""
    t = Recorder()
    with pytest.raises(ValueError, match="at least one GPU"):
        KfdProcess(t, [])
    assert t.kernel.open_files() == [] and t.closed == []


def test_render_node_that_cannot_be_opened_carries_the_errno() -> None:
    """A render node failing to open is a HostGpuError naming it, with the OS errno;
    /dev/kfd is closed again."""
    before = open_fds()
    t = Recorder(refuse="/dev/dri/renderD128")
    with pytest.raises(HostGpuError, match="cannot open /dev/dri/renderD128") as exc:
        KfdProcess(t, read_topology(t))
    assert exc.value.errno == errno.EACCES
    assert t.kernel.open_files() == []
    assert_no_new_fds(before)


def test_dev_kfd_that_cannot_be_opened_closes_nothing() -> None:
    """Nothing was opened, so nothing is closed (no close of fd -1 or 0)."""
    t = Recorder(refuse="/dev/kfd")
    with pytest.raises(HostGpuError, match="cannot open /dev/kfd") as exc:
        KfdProcess(t, read_topology(t), secondary=True)
    assert exc.value.errno == errno.EACCES
    assert t.closed == []


def test_interrupt_while_acquiring_closes_everything() -> None:
    """A signal (KeyboardInterrupt) during the second GPU's ACQUIRE_VM closes both
    render nodes and /dev/kfd."""
    before = open_fds()
    t = Recorder(SimKfdConfig(gpu_count=2), interrupt_acquire=1)
    with pytest.raises(KeyboardInterrupt):
        KfdProcess(t, read_topology(t))
    assert len(t.closed) == 3
    assert t.kernel.open_files() == []
    assert_no_new_fds(before)


# --- ioctls ----------------------------------------------------------------------------------


def test_ioctl_error_text_and_errno() -> None:
    """The message names the ioctl (or its number) and what it was about."""
    e = ioctl_error(abi.AMDKFD_IOC_FREE_MEMORY_OF_GPU, OSError(errno.EIO, "boom"), "handle 0x5")
    assert str(e) == "AMDKFD_IOC_FREE_MEMORY_OF_GPU (handle 0x5) failed: boom"
    assert e.errno == errno.EIO
    e = ioctl_error(0x1234, OSError(errno.EINVAL, None))
    assert str(e) == f"AMDKFD_IOC_0x1234 failed: {os.strerror(errno.EINVAL)}"
    assert e.errno == errno.EINVAL


def test_a_failing_acquire_names_its_gpu() -> None:
    """ACQUIRE_VM failing on the second GPU says which GPU it was."""
    t = SimTransport(SimKfdConfig(gpu_count=2))
    t.kernel.inject(SimFault("ACQUIRE_VM", errno.ENOMEM, after=1))
    second = t.kernel.gpus[1].gpu_id
    with pytest.raises(HostGpuError, match=rf"ACQUIRE_VM \(GPU {second:#x}\) failed"):
        KfdProcess(t, read_topology(t))
    assert t.kernel.open_files() == []


def test_an_ioctl_interrupted_just_under_the_limit_succeeds(make_process: MakeProcess) -> None:
    """MAX_ATTEMPTS - 1 EINTRs in a row are retried (the limit is generous: a burst of
    signals is no failure); the next attempt succeeds."""
    assert MAX_ATTEMPTS >= 100
    t = SimTransport()
    proc = make_process(t)
    t.kernel.inject(SimFault("AVAILABLE_MEMORY", errno.EINTR, count=MAX_ATTEMPTS - 1))
    assert proc.available_memory(proc.gpu_ids[0]) == t.kernel.config.vram_bytes
    assert proc.retries == MAX_ATTEMPTS - 1


# --- apertures and the GPU VA range ----------------------------------------------------------


def test_va_range_is_the_common_part_of_the_apertures(make_process: MakeProcess) -> None:
    """The allocator covers the highest base to the lowest (inclusive) limit + 1."""
    proc = make_process(SimTransport())
    assert (proc.va.base, proc.va.end) == (BASE, LIMIT + 1)
    sim = SimKfdConfig(gpu_count=3, aperture_skew=1 << 30)
    ids = [g.gpu_id for g in sim.gpus()]
    t = Apertures(sim, {ids[1]: (BASE + (1 << 30), LIMIT - (1 << 40))})
    proc = make_process(t)
    assert (proc.va.base, proc.va.end) == (BASE + (2 << 30), LIMIT + 1 - (1 << 40))
    assert proc.apertures()[ids[2]].gpuvm_base == BASE + (2 << 30)


def test_unaligned_apertures_are_rounded_inwards(make_process: MakeProcess) -> None:
    """A base inside a page starts at the next page; a limit inside a page ends the
    range at that page's start."""
    sim = SimKfdConfig()
    gpu_id = sim.gpus()[0].gpu_id
    proc = make_process(Apertures(sim, {gpu_id: (BASE + 0x10, BASE + 9 * PAGE + 0x7)}))
    assert (proc.va.base, proc.va.end) == (BASE + PAGE, BASE + 9 * PAGE)


@pytest.mark.parametrize("gap", [0, PAGE], ids=["touching", "apart"])
def test_apertures_without_common_range_are_refused(gap: int) -> None:
    """GPUs whose apertures do not overlap (by a whole page) cannot share a buffer's
    GPU VA: HostGpuError, and everything opened is closed."""
    before = open_fds()
    sim = SimKfdConfig(gpu_count=2)
    first, second = (g.gpu_id for g in sim.gpus())
    t = Apertures(sim, {first: (BASE, BASE + PAGE - 1 + 0x10),
                        second: (BASE + PAGE + gap, LIMIT)})
    with pytest.raises(HostGpuError, match="no GPUVM range in common"):
        KfdProcess(t, read_topology(t))
    assert t.kernel.open_files() == []
    assert_no_new_fds(before)


def test_a_gpu_without_an_aperture_is_refused() -> None:
    """The kernel reports no aperture for a selected GPU: HostGpuError naming it."""
    t = Apertures(SimKfdConfig(gpu_count=2), fill_fewer=True)
    missing = t.kernel.gpus[1].gpu_id
    with pytest.raises(HostGpuError, match=rf"no GPUVM aperture for GPU\(s\) \[{missing}\]"):
        KfdProcess(t, read_topology(t))
    assert t.kernel.open_files() == []


def test_apertures_are_the_ones_the_kernel_filled(make_process: MakeProcess) -> None:
    """apertures() lists exactly the entries the kernel filled in, by gpu_id (none for
    a GPU reported at the count query and gone by the filling call)."""
    t = Apertures(SimKfdConfig(gpu_count=2), fill_fewer=True)
    proc = make_process(t, order=(0,))
    first = t.kernel.gpus[0]
    got = proc.apertures()
    assert list(got) == [first.gpu_id]
    assert (got[first.gpu_id].gpuvm_base, got[first.gpu_id].gpuvm_limit) == (
        first.gpuvm_base, first.gpuvm_limit)


# --- memory ----------------------------------------------------------------------------------


@pytest.fixture
def page() -> Iterator[int]:
    """One page of anonymous host memory."""
    addr = hostmem.map_anonymous(PAGE)
    yield addr
    hostmem.unmap(addr, PAGE)


def test_the_first_gpu_given_allocates(make_process: MakeProcess, page: int) -> None:
    """BOs are allocated on the first GPU of the process, not topology order."""
    t = SimTransport(SimKfdConfig(gpu_count=2))
    proc = make_process(t, order=(1, 0))
    handle, _ = proc.alloc_userptr(proc.va.allocate(PAGE), PAGE, page, USERPTR_FLAGS)
    assert abi.handle_gpu_id(handle) == t.kernel.gpus[1].gpu_id
    proc.free(handle)


def test_failed_rollback_of_a_map_is_reported(make_process: MakeProcess, page: int) -> None:
    """MAP fails on GPU 1 and unmapping GPU 0 again fails too: one HostGpuError with
    the MAP's errno that tells both; GPU 0 is then still mapped."""
    t = SimTransport(SimKfdConfig(gpu_count=2))
    proc = make_process(t)
    handle, _ = proc.alloc_userptr(proc.va.allocate(PAGE), PAGE, page, USERPTR_FLAGS)
    t.kernel.inject(SimFault("MAP_MEMORY_TO_GPU", errno.ENOMEM, device_index=1))
    t.kernel.inject(SimFault("UNMAP_MEMORY_FROM_GPU", errno.EIO, device_index=0))
    with pytest.raises(HostGpuError, match=r"unmapping the 1 GPU.*also failed") as exc:
        proc.map(handle)
    assert exc.value.errno == errno.ENOMEM
    assert "UNMAP_MEMORY_FROM_GPU" in str(exc.value)
    proc.unmap(handle, count=1)
    proc.free(handle)


def test_unmap_error_carries_errno_and_progress(make_process: MakeProcess, page: int) -> None:
    """An UNMAP failing on GPU 1 is an UnmapError with its errno and n_success 1;
    resuming there finishes it."""
    t = SimTransport(SimKfdConfig(gpu_count=2))
    proc = make_process(t)
    handle, _ = proc.alloc_userptr(proc.va.allocate(PAGE), PAGE, page, USERPTR_FLAGS)
    proc.map(handle)
    t.kernel.inject(SimFault("UNMAP_MEMORY_FROM_GPU", errno.EIO, device_index=1))
    with pytest.raises(UnmapError, match="unmapped from 1 of 2 GPUs") as exc:
        proc.unmap(handle)
    assert (exc.value.errno, exc.value.n_success) == (errno.EIO, 1)
    proc.unmap(handle, done=1)
    proc.free(handle)


# --- close -----------------------------------------------------------------------------------


def test_close_twice_closes_each_fd_once() -> None:
    """close() forgets the fds it closed: a second close() closes nothing (the numbers
    may belong to someone else by then)."""
    t = Recorder(SimKfdConfig(gpu_count=2))
    proc = KfdProcess(t, read_topology(t), secondary=True)
    fds = [*proc.render_fds, proc.fd]
    proc.close()
    proc.close()
    assert Counter(t.closed) == Counter(fds) and len(set(fds)) == 3
    assert proc.fd == -1 and proc.render_fds == []
    assert t.kernel.open_files() == []


def test_close_goes_on_past_a_failing_close(caplog: pytest.LogCaptureFixture) -> None:
    """A close() that fails is logged; the remaining fds are closed all the same."""
    t = Recorder(SimKfdConfig(gpu_count=2))
    proc = KfdProcess(t, read_topology(t))
    t.failing_close = proc.render_fds[0]
    with caplog.at_level(logging.WARNING, logger="vgpu_backend.hostgpu.kfd_process"):
        proc.close()
    assert f"closing fd {t.failing_close}" in caplog.text
    assert len(t.closed) == 3
    assert t.kernel.open_files() == []
