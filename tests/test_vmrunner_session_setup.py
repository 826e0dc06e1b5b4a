"""The VM runner's session set-up without a VM: the layout each mode boots, time limits,
the guest environment script and its pytest-timeout probe, artifacts per mode, the
demo's log streaming and SIGTERM handling (scripts/vmrunner/session.py, commands.py)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from vmrunner import commands, demo, session
from vmrunner.artifacts import GuestArtifacts
from vmrunner.backend import REPO_ROOT, BackendSpec
from vmrunner.control import GuestEvent
from vmrunner.errors import HarnessError
from vmrunner.kernel import GuestKernel
from vmrunner.qemu import USERSPACE_GPU_PCI, Share
from vmrunner.session import GUEST_ROOT_MOUNT, PhaseClock, SessionOptions, VmSession


def _session(tmp_path: Path, **options: Any) -> VmSession:
    """A session of a custom back-end (``options`` override), its work dir removed."""
    settings = SessionOptions(mode="test", backend=BackendSpec("custom", ("x",), None),
                              results_dir=tmp_path / "results")
    image = tmp_path / "vmlinux"
    artifacts = GuestArtifacts(GuestKernel("r", "v", image, image, tmp_path, ()),
                               tmp_path / "initrd", tmp_path / "root.ext4", ())
    vm = VmSession(replace(settings, **options), artifacts, PhaseClock())
    shutil.rmtree(vm.workdir)
    return vm


# --- the per-test timeout the guest init decides on ------------------------------------

def _guest_env(tmp_path: Path, args: list[str], per_test_timeout: float) -> Path:
    vm = _session(tmp_path, backend=BackendSpec("ours", ("x",), None))
    vm.write_guest_env(args, per_test_timeout)
    return tmp_path / "results" / "guest-env.sh"


def _source(script: Path, probe_status: int, record: Path) -> list[str]:
    """Source `script` as the guest init does, with `chroot` replaced by a recorder."""
    shell = (f'chroot() {{ printf "%s\\n" "$@" > {record}; return {probe_status}; }}\n'
             f'. {script}\necho "VGPU_BACKEND=$VGPU_BACKEND"\nprintf "arg:%s\\n" "$@"\n')
    out = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


@pytest.mark.parametrize("plugin", [True, False], ids=["plugin", "no-plugin"])
def test_the_guest_passes_a_per_test_timeout_only_with_the_plugin(
        tmp_path: Path, plugin: bool) -> None:
    script = _guest_env(tmp_path, ["-k", "smoke and not slow", "-x"], 300.0)
    record = tmp_path / "probe-argv"
    lines = _source(script, 0 if plugin else 1, record)
    args = [line.removeprefix("arg:") for line in lines if line.startswith("arg:")]
    assert "VGPU_BACKEND=ours" in lines
    if plugin:
        assert args == ["--timeout=300", "-k", "smoke and not slow", "-x"]
        assert "vgpu-init: per-test timeout 300 s (pytest-timeout)" in lines
    else:
        assert args == ["-k", "smoke and not slow", "-x"]
        assert any("no pytest-timeout in the guest root" in line for line in lines)
    probe = record.read_text().splitlines()
    assert probe[0] == GUEST_ROOT_MOUNT and "python3" in probe


def test_the_guest_probe_finds_the_plugin_only_where_it_is(tmp_path: Path) -> None:
    """The probe's Python, run on the host with and without a pytest_timeout module."""
    script = _guest_env(tmp_path, [], 120.0)
    record = tmp_path / "probe-argv"
    _source(script, 0, record)
    probe = record.read_text().splitlines()
    code = probe[probe.index("-c") + 1]
    with_plugin, without = tmp_path / "with", tmp_path / "without"
    with_plugin.mkdir()
    without.mkdir()
    (with_plugin / "pytest_timeout.py").write_text("raise SystemExit('must not be imported')\n")
    for path, status in ((with_plugin, 0), (without, 1)):
        done = subprocess.run([sys.executable, "-S", "-c", code], check=False,
                              env={"PYTHONPATH": str(path)})
        assert done.returncode == status, path


def test_no_per_test_timeout_leaves_the_arguments_alone(tmp_path: Path) -> None:
    script = _guest_env(tmp_path, ["--size-mib=64"], 0.0)
    assert "chroot" not in script.read_text()
    lines = _source(script, 0, tmp_path / "probe-argv")
    assert [line for line in lines if line.startswith("arg:")] == ["arg:--size-mib=64"]


# --- SIGTERM -----------------------------------------------------------------------------

def test_sigterm_ends_a_run_with_status_143() -> None:
    def interrupted(signum: int, frame: object) -> None:
        raise AssertionError("SIGTERM reached the default handling")

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        async def run() -> int:
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(5)
            return 0

        started = time.monotonic()
        assert commands._run(run()) == 128 + signal.SIGTERM
        assert time.monotonic() - started < 2
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- the session's pure parts -----------------------------------------------------------

def test_the_layout_follows_the_mode_root_and_gpus(tmp_path: Path) -> None:
    results = tmp_path / "results"
    test = _session(tmp_path, second_gpu=True).layout()
    assert test.shares == (Share("results", results, False), Share("project", REPO_ROOT, True),
                           Share("hostroot", Path("/"), True))
    assert len(test.gpu_sockets) == 2 and f"vgpu.userspace_pci={USERSPACE_GPU_PCI}" in test.cmdline
    demo_image = _session(tmp_path, mode="demo", guest_root="image").layout()
    assert demo_image.shares == test.shares[:2] and demo_image.root_image == tmp_path / "root.ext4"
    assert len(demo_image.gpu_sockets) == 1 and "userspace_pci" not in demo_image.cmdline
    console = _session(tmp_path, mode="console").layout()
    assert console.shares == () and console.root_image is None
    assert "vgpu.mode=console" in console.cmdline
    assert console.gpu_device == "vhost-user-gpu-pci"
    assert _session(tmp_path, gpu_device="vhost-user-vga").layout().gpu_device == \
        "vhost-user-vga"


def test_expect_stops_at_a_guest_error_and_skips_other_events(tmp_path: Path) -> None:
    vm = _session(tmp_path)

    async def scenario() -> tuple[GuestEvent, str]:
        for event in (GuestEvent("modules"), GuestEvent("init", {"now": "1"}),
                      GuestEvent("error", text="cannot mount /dev/vda")):
            vm.events.put_nowait(event)
        init = await vm.expect("init", 5)
        with pytest.raises(HarnessError) as error:
            await vm.expect("pytest-start", 5)
        return init, str(error.value)

    init, error = asyncio.run(asyncio.wait_for(scenario(), 3))
    assert init.fields == {"now": "1"}
    assert error.startswith("guest init failed: cannot mount /dev/vda\n")


def test_time_limits_are_capped_by_the_overall_timeout(tmp_path: Path) -> None:
    vm = _session(tmp_path, timeout=10.0)
    assert 9.0 < vm.remaining(60.0) <= 10.0 and vm.remaining(2.0) == 2.0
    vm.deadline = time.monotonic() - 1
    assert vm.remaining(60.0) == 0.0


def test_artifacts_for_the_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    kinds: list[str] = []
    image = tmp_path / "vmlinux"
    artifacts = GuestArtifacts(GuestKernel("r", "v", image, image, tmp_path, ()),
                               tmp_path / "initrd", None, ())

    def prepare(root_kind: str, kernel_package: str | None = None) -> GuestArtifacts:
        kinds.append(root_kind)
        return artifacts

    monkeypatch.setattr(commands, "prepare_artifacts", prepare)
    for mode in ("test", "demo", "console"):
        options = SessionOptions(mode=mode, backend=BackendSpec("ours", ("x",), None),
                                 results_dir=tmp_path, guest_root="image")
        assert commands._prepare(options, PhaseClock(), None) is artifacts
    assert kinds == ["image", "image", "none"]
    assert "built: nothing, all cached" in capsys.readouterr().out


def test_the_demo_output_is_streamed_from_its_start_to_its_end(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "serial.log"
    log.write_bytes(b"[ 1.0] booting\r\nvgpu-init: event pytest-start\r\nsaxpy: ok\r\n"
                    b"matmul: ok\nvgpu-init: event pytest-exit rc=0\nreboot: Power down\n")
    asyncio.run(asyncio.wait_for(demo._stream_demo(log), 2))
    assert capsys.readouterr().out == "guest| saxpy: ok\nguest| matmul: ok\n"


def test_host_facts_name_the_gpu_our_backend_picks(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    kfd = tmp_path / "kfd"
    monkeypatch.setattr(session, "KFD_DEVICE", kfd)
    ours = _session(tmp_path, backend=BackendSpec("ours", ("x",), None))
    assert ours.host_facts() == {"backend": "ours", "host_gpu": "sim", "heads": "1"}
    kfd.touch()
    assert ours.host_facts() == {"backend": "ours", "host_gpu": "kfd", "heads": "1"}
    assert _session(tmp_path, heads=2).host_facts() == {
        "backend": "custom", "host_gpu": "unknown", "heads": "2"}
