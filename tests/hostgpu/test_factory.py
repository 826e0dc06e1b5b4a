"""HostGpuOptions validation and create_host_gpu's choice."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from protocol.limits import DEFAULT_LIMITS
from vgpu_backend.hostgpu import factory
from vgpu_backend.hostgpu.base import HostGpuError
from vgpu_backend.hostgpu.factory import HostGpuOptions, create_host_gpu
from vgpu_backend.hostgpu.kfd import KfdHostGpu
from vgpu_backend.hostgpu.sim_config import SimFault, SimKfdConfig
from vgpu_backend.hostgpu.sim_kfd import SimTransport
from vgpu_backend.hostgpu.transport import KfdTransport, OsTransport

from .helpers import open_fds

NO_KFD = pytest.mark.skipif(os.path.exists("/dev/kfd"), reason="this host has /dev/kfd")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"gpu": "cuda"}, "gpu must be one of auto, kfd, sim"),
    ({"isolation": "process"}, "isolation must be one of vm, context"),
    ({"userptr_path": "mremap"}, "userptr_path must be one of"),
    ({"gpu_ids": ()}, "gpu_ids is empty"),
    ({"gpu_ids": (0,)}, "node 0 is the CPU"),
    ({"gpu_ids": (5, 5)}, "twice"),
    ({"isolation": "context", "userptr_path": "alias"}, "no host path applies"),
    ({"gpu": "kfd", "sim": SimKfdConfig(gpu_count=2)}, "sim options were given"),
    ({"gpu": "kfd", "sim_gpus": 3}, "sim options were given"),
    ({"sim_gpus": 0}, "gpu_count"),
])
def test_bad_options_are_rejected_early(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HostGpuOptions(**kwargs)


def test_cli_shaped_options() -> None:
    """What ``vgpu_backend.config`` passes: lists and a ``sim_gpus`` count."""
    options = HostGpuOptions(gpu="sim", gpu_ids=[0x5A3C], isolation="vm",
                             userptr_path="auto", sim_gpus=2)
    assert options.gpu_ids == (0x5A3C,)
    assert options.sim.gpu_count == 2
    assert HostGpuOptions(gpu="kfd", sim_gpus=1).sim == SimKfdConfig()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"gpu_count": 0}, "gpu_count"),
    ({"gpuvm_base": 4097}, "page aligned"),
    ({"aperture_skew": 1 << 47, "gpu_count": 2}, "aperture_skew"),
])
def test_bad_sim_options_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SimKfdConfig(**kwargs)


@NO_KFD
def test_kfd_without_dev_kfd_is_refused() -> None:
    with pytest.raises(HostGpuError, match="/dev/kfd does not exist") as exc:
        create_host_gpu(HostGpuOptions(gpu="kfd"))
    assert exc.value.unsupported


@NO_KFD
def test_auto_picks_the_sim_and_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    before = open_fds()
    with caplog.at_level(logging.INFO, logger="vgpu_backend.hostgpu.factory"):
        gpu = create_host_gpu(HostGpuOptions(sim=SimKfdConfig(gpu_count=2)))
    try:
        assert isinstance(gpu, KfdHostGpu)
        [record] = caplog.records
        line = record.getMessage()
        for part in ("backend=sim", "KFD 1.19", "isolation=vm", "path=batch",
                     "batch-probe=supported", "0x5a3c (16384 MiB)", "0x6b4d"):
            assert part in line
        info = gpu.info()
        assert info.backend == "sim" and len(info.gpu_ids) == 2
        assert gpu.available_memory() == {g: 16 << 30 for g in info.gpu_ids}
    finally:
        gpu.close()
    assert open_fds() == before


def test_unknown_gpu_ids_fail_at_open_without_leaks() -> None:
    before = open_fds()
    with pytest.raises(HostGpuError, match="0x1234") as exc:
        create_host_gpu(HostGpuOptions(gpu="sim", gpu_ids=(0x1234,)))
    assert exc.value.errno == errno.ENODEV
    assert open_fds() == before


def test_open_failure_midway_leaks_nothing() -> None:
    """ACQUIRE_VM of the second GPU fails: the first's render fd and /dev/kfd close."""
    before = open_fds()
    t = SimTransport(SimKfdConfig(gpu_count=2))
    t.kernel.inject(SimFault("ACQUIRE_VM", errno.ENOMEM, after=1))
    with pytest.raises(HostGpuError, match="ACQUIRE_VM"):
        create_host_gpu(HostGpuOptions(gpu="sim"), transport=t)
    assert t.kernel.open_files() == []
    assert open_fds() == before


@pytest.mark.parametrize("gpu_id", [1, 0xFFFF_FFFF])
def test_gpu_ids_span_the_32_bit_range(gpu_id: int) -> None:
    """KFD gpu_ids are non-zero u32: 1 and 0xffffffff are valid."""
    assert HostGpuOptions(gpu_ids=[gpu_id]).gpu_ids == (gpu_id,)


def test_a_gpu_id_beyond_32_bits_is_rejected() -> None:
    """1 << 32 does not fit a KFD gpu_id."""
    with pytest.raises(ValueError, match="32-bit"):
        HostGpuOptions(gpu_ids=[1 << 32])


def test_sim_faults_with_gpu_kfd_are_rejected() -> None:
    """Fault injection is a simulator option too: refused with gpu 'kfd'."""
    with pytest.raises(ValueError, match="sim options were given"):
        HostGpuOptions(gpu="kfd", sim_faults=(SimFault("MAP_MEMORY_TO_GPU", errno.EIO),))


def test_the_defaults() -> None:
    """auto GPU, every GPU, one KFD process for the VM, auto userptr path, the default
    per-range limit, one simulated GPU."""
    options = HostGpuOptions()
    assert (options.gpu, options.gpu_ids, options.isolation, options.userptr_path,
            options.max_per_range_ranges, options.sim, options.sim_faults) == (
        "auto", None, "vm", "auto", DEFAULT_LIMITS.max_per_range_ranges, SimKfdConfig(), ())


def test_the_default_path_falls_back_on_a_pre_batch_kernel(
        caplog: pytest.LogCaptureFixture) -> None:
    """Default options on a kernel without the batch series: userptr via the alias
    path (logged), not a refusal."""
    with caplog.at_level(logging.INFO, logger="vgpu_backend.hostgpu.factory"):
        gpu = create_host_gpu(HostGpuOptions(gpu="sim",
                                             sim=SimKfdConfig(batch_userptr=False)))
    try:
        assert gpu.info().userptr_path.value == "alias"
        [record] = caplog.records
        assert "userptr=available path=alias batch-probe=unsupported" in record.getMessage()
    finally:
        gpu.close()


def test_context_isolation_logs_userptr_unavailable(
        caplog: pytest.LogCaptureFixture) -> None:
    """With context isolation the log line says why USERPTR is unavailable, no path."""
    with caplog.at_level(logging.INFO, logger="vgpu_backend.hostgpu.factory"):
        gpu = create_host_gpu(HostGpuOptions(gpu="sim", isolation="context"))
    try:
        [record] = caplog.records
        assert "userptr=unavailable (" in record.getMessage()
        assert "path=n/a" in record.getMessage()
    finally:
        gpu.close()


class _NotSimTransport(KfdTransport):
    """Forwards to a simulated kernel without being a SimTransport (like /dev/kfd)."""

    name = "proxy"

    def __init__(self, sim: SimTransport) -> None:
        self.sim = sim

    def open(self, path: str) -> int:
        return self.sim.open(path)

    def close(self, fd: int) -> None:
        self.sim.close(fd)

    def ioctl(self, fd: int, request: int, arg: bytearray | None) -> None:
        self.sim.ioctl(fd, request, arg)

    def exists(self, path: str) -> bool:
        return self.sim.exists(path)

    def read_text(self, path: str) -> str:
        return self.sim.read_text(path)

    def list_dir(self, path: str) -> list[str]:
        return self.sim.list_dir(path)


def test_faults_need_the_simulated_kfd_and_nothing_stays_open() -> None:
    """sim_faults on another transport are refused before the GPU is opened (no KFD
    file left open)."""
    sim = SimTransport()
    with pytest.raises(HostGpuError, match="needs the simulated KFD") as exc:
        create_host_gpu(HostGpuOptions(sim_faults=(SimFault("MAP_MEMORY_TO_GPU", errno.EIO),)),
                        transport=_NotSimTransport(sim))
    assert exc.value.unsupported
    assert sim.kernel.open_files() == []


def test_faults_are_armed_and_logged_as_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Each fault reaches the simulated kernel; one warning names them (errno by name)."""
    t = SimTransport()
    faults = (SimFault("MAP_MEMORY_TO_GPU", errno.EIO), SimFault("ALLOC_MEMORY_OF_GPU", 999))
    with caplog.at_level(logging.INFO, logger="vgpu_backend.hostgpu.factory"):
        gpu = create_host_gpu(HostGpuOptions(gpu="sim", sim_faults=faults), transport=t)
    try:
        [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert warning.getMessage().endswith(
            "2 fault(s): MAP_MEMORY_TO_GPU:EIO, ALLOC_MEMORY_OF_GPU:999")
        assert list(t.kernel.faults._faults) == list(faults)
    finally:
        gpu.close()


@pytest.fixture
def fake_dev_kfd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the factory believe /dev/kfd exists."""
    kfd = tmp_path / "kfd"
    kfd.touch()
    monkeypatch.setattr(factory, "KFD_DEVICE", str(kfd))


@pytest.mark.parametrize("gpu", ["auto", "kfd"])
def test_with_dev_kfd_auto_and_kfd_use_the_kernel(fake_dev_kfd: None, gpu: str) -> None:
    """When /dev/kfd exists, auto and kfd pick the real kernel's transport."""
    assert isinstance(factory._transport(HostGpuOptions(gpu=gpu)), OsTransport)


@NO_KFD
def test_without_dev_kfd_auto_uses_the_simulator() -> None:
    """auto without /dev/kfd: the simulated kernel, configured by ``sim``."""
    t = factory._transport(HostGpuOptions(sim=SimKfdConfig(gpu_count=3)))
    assert isinstance(t, SimTransport) and t.kernel.config.gpu_count == 3


def test_auto_warns_that_sim_options_are_ignored_with_dev_kfd(
        fake_dev_kfd: None, caplog: pytest.LogCaptureFixture) -> None:
    """auto finding /dev/kfd says the sim options it was given do not apply."""
    with caplog.at_level(logging.INFO, logger="vgpu_backend.hostgpu.factory"):
        factory._transport(HostGpuOptions(sim_gpus=2))
        factory._transport(HostGpuOptions())
    [record] = caplog.records
    assert record.levelno == logging.WARNING and "sim options are ignored" in record.message


def test_no_options_means_the_default_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """create_host_gpu() picks its transport from the default (auto) options."""
    seen: list[HostGpuOptions] = []

    def transport(options: HostGpuOptions) -> KfdTransport:
        seen.append(options)
        return SimTransport()
    monkeypatch.setattr(factory, "_transport", transport)
    create_host_gpu().close()
    assert seen == [HostGpuOptions()]
