"""HostGpuOptions validation and create_host_gpu's choice."""

from __future__ import annotations

import errno
import logging
import os
from typing import Any

import pytest

from vgpu_backend.hostgpu.base import HostGpuError
from vgpu_backend.hostgpu.factory import HostGpuOptions, create_host_gpu
from vgpu_backend.hostgpu.kfd import KfdHostGpu
from vgpu_backend.hostgpu.sim_config import SimFault, SimKfdConfig
from vgpu_backend.hostgpu.sim_kfd import SimTransport

from .helpers import open_fds

NO_KFD = pytest.mark.skipif(os.path.exists("/dev/kfd"), reason="this host has /dev/kfd")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"gpu": "cuda"}, "gpu must be one of auto, kfd, sim"),
    ({"isolation": "process"}, "isolation must be one of vm, context"),
    ({"userptr_path": "mremap"}, "userptr_path must be one of"),
    ({"gpu_ids": ()}, "gpu_ids is empty"),
    ({"gpu_ids": (0,)}, "node 0 is the CPU"),
    ({"gpu_ids": (5, 5)}, "twice"),
    ({"isolation": "context", "userptr_path": "alias"}, "no userptr path applies"),
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
