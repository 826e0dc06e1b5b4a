"""KfdHostGpu start-up and what it reports: the range limit of each path, refusals while
opening /dev/kfd (open, GET_VERSION, the major version), GPU selection, ``info()`` and
``available_memory()``."""

from __future__ import annotations

import errno
import io
from typing import Any

import pytest

from protocol.wire import decode, layout
from vgpu_backend.hostgpu import kfd
from vgpu_backend.hostgpu import kfd_abi as abi
from vgpu_backend.hostgpu.base import HostGpuError, UserptrPath
from vgpu_backend.hostgpu.kfd import KfdHostGpu, max_ranges
from vgpu_backend.hostgpu.sim_config import SimFault, SimKfdConfig
from vgpu_backend.hostgpu.sim_kfd import SimTransport

from .helpers import MakeGpu, assert_no_new_fds, open_fds

with open("/proc/sys/vm/max_map_count", encoding="ascii") as _f:
    ALIAS_RANGES = int(_f.read()) // 2


class NoKfdNode(SimTransport):
    """``/dev/kfd`` cannot be opened (no permission)."""

    def open(self, path: str) -> int:
        if path == "/dev/kfd":
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return super().open(path)


class KfdMajor(SimTransport):
    """GET_VERSION reports major version ``major`` (minor 19)."""

    def __init__(self, major: int) -> None:
        super().__init__(SimKfdConfig())
        self.major = major

    def ioctl(self, fd: int, request: int, arg: bytearray | None) -> None:
        super().ioctl(fd, request, arg)
        if request == abi.AMDKFD_IOC_GET_VERSION and arg is not None:
            layout(abi.GetVersionArgs).struct.pack_into(arg, 0, self.major, 19)


class NoGpuNodes(SimTransport):
    """A topology with the CPU node only."""

    def list_dir(self, path: str) -> list[str]:
        nodes = super().list_dir(path)
        return ["0"] if path.rstrip("/").endswith("/nodes") else nodes


class MemoryById(SimTransport):
    """AVAILABLE_MEMORY answers a different amount per GPU: ``gpu_id`` MiB."""

    def ioctl(self, fd: int, request: int, arg: bytearray | None) -> None:
        super().ioctl(fd, request, arg)
        if request == abi.AMDKFD_IOC_AVAILABLE_MEMORY and arg is not None:
            gpu_id = decode(abi.GetAvailableMemoryArgs, arg).gpu_id
            layout(abi.GetAvailableMemoryArgs).struct.pack_into(arg, 0, gpu_id << 20,
                                                                 gpu_id, 0)


# --- max_ranges ------------------------------------------------------------------------------


def test_max_ranges_of_each_path() -> None:
    """Batch has no limit of its own, per-range takes the given maximum, alias half of
    ``vm.max_map_count``."""
    assert max_ranges(UserptrPath.BATCH, 7) == 1 << 32
    assert max_ranges(UserptrPath.PER_RANGE, 7) == 7
    assert max_ranges(UserptrPath.ALIAS, 7) == ALIAS_RANGES


@pytest.mark.parametrize("content", [None, "no number\n"])
def test_alias_range_limit_without_a_readable_max_map_count(
        monkeypatch: pytest.MonkeyPatch, content: str | None) -> None:
    """An unreadable or garbled ``vm.max_map_count`` gives alias 32768 ranges."""
    def fake_open(path: str, *args: Any, **kwargs: Any) -> io.StringIO:
        assert path == "/proc/sys/vm/max_map_count"
        if content is None:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return io.StringIO(content)

    monkeypatch.setattr(kfd, "open", fake_open, raising=False)
    assert max_ranges(UserptrPath.ALIAS, 7) == 32768


# --- opening ----------------------------------------------------------------------------------


def test_unknown_isolation_is_refused_before_opening_anything() -> None:
    """``isolation`` other than vm/context is a ValueError, with no fd opened."""
    before = open_fds()
    t = SimTransport()
    with pytest.raises(ValueError, match="isolation must be"):
        KfdHostGpu(t, isolation="process")
    assert t.kernel.open_files() == []
    assert_no_new_fds(before)


def test_dev_kfd_that_cannot_be_opened_carries_the_errno() -> None:
    """A failing open of /dev/kfd is a HostGpuError with the OS errno."""
    with pytest.raises(HostGpuError, match="cannot open /dev/kfd") as exc:
        KfdHostGpu(NoKfdNode())
    assert exc.value.errno == errno.EACCES


def test_failing_get_version_carries_the_errno_and_closes_dev_kfd() -> None:
    """GET_VERSION failing is a HostGpuError with its errno; /dev/kfd is closed again."""
    before = open_fds()
    t = SimTransport()
    t.kernel.inject(SimFault("GET_VERSION", errno.EIO))
    with pytest.raises(HostGpuError, match="GET_VERSION failed") as exc:
        KfdHostGpu(t)
    assert exc.value.errno == errno.EIO
    assert t.kernel.open_files() == []
    assert_no_new_fds(before)


@pytest.mark.parametrize("major", [0, 2])
def test_only_kfd_major_version_1_is_accepted(major: int) -> None:
    """Any major version but 1 is refused at start-up, leaking nothing."""
    before = open_fds()
    t = KfdMajor(major)
    with pytest.raises(HostGpuError, match=rf"KFD ioctl version {major}\.19 is not 1\.x"):
        KfdHostGpu(t)
    assert t.kernel.open_files() == []
    assert_no_new_fds(before)


def test_topology_without_a_gpu_is_refused() -> None:
    """Only the CPU node: a HostGpuError naming the topology, nothing left open."""
    before = open_fds()
    t = NoGpuNodes()
    with pytest.raises(HostGpuError, match="topology has no GPU node"):
        KfdHostGpu(t)
    assert t.kernel.open_files() == []
    assert_no_new_fds(before)


def test_empty_gpu_id_selection_is_refused() -> None:
    """``gpu_ids=()`` selects nothing: ENODEV, nothing left open."""
    t = SimTransport()
    with pytest.raises(HostGpuError, match="empty") as exc:
        KfdHostGpu(t, gpu_ids=())
    assert exc.value.errno == errno.ENODEV
    assert t.kernel.open_files() == []


def test_gpu_ids_keep_the_order_given(make_gpu: MakeGpu) -> None:
    """The selected GPUs are used in the order asked for, not topology order (the
    first one given allocates)."""
    ids = [g.gpu_id for g in SimKfdConfig(gpu_count=3).gpus()]
    wanted = (ids[2], ids[0])
    gpu, _ = make_gpu(SimKfdConfig(gpu_count=3), gpu_ids=wanted)
    assert gpu.info().gpu_ids == wanted
    assert list(gpu.available_memory()) == list(wanted)


# --- info, available_memory ----------------------------------------------------------------


@pytest.mark.parametrize(("sim", "path", "per_range", "ranges", "huge"), [
    (SimKfdConfig(), "auto", 4096, 1 << 32, 1 << 32),                       # batch
    (SimKfdConfig(), "per-range", 100, 100, 100),
    (SimKfdConfig(), "alias", 100, ALIAS_RANGES, ALIAS_RANGES),            # no fallback
    (SimKfdConfig(batch_userptr=False), "auto", 100, ALIAS_RANGES, 100),   # may fall back
    (SimKfdConfig(batch_userptr=False), "auto", 1 << 40, ALIAS_RANGES, ALIAS_RANGES),
], ids=["batch", "per-range", "alias", "auto-alias", "auto-alias-below-per-range"])
def test_info_range_limits(make_gpu: MakeGpu, sim: SimKfdConfig, path: str, per_range: int,
                           ranges: int, huge: int) -> None:
    """``max_ranges`` is the path's limit; on huge pages only auto's alias may fall back
    to per-range, so only it is bounded by the per-range maximum there too."""
    gpu, _ = make_gpu(sim, userptr_path=path, max_per_range_ranges=per_range)
    info = gpu.info()
    assert (info.max_ranges, info.max_ranges_huge_pages) == (ranges, huge)


def test_available_memory_asks_about_each_gpu(make_gpu: MakeGpu) -> None:
    """AVAILABLE_MEMORY is asked for every selected GPU by its own gpu_id."""
    gpu, t = make_gpu(transport=MemoryById(SimKfdConfig(gpu_count=3)))
    assert gpu.available_memory() == {g.gpu_id: g.gpu_id << 20 for g in t.kernel.gpus}
