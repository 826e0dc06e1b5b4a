"""The VM runner's failure paths without a VM: a fake qemu-system-x86_64 on PATH and a fake
back-end play hanging guests, early exits and dying back-ends against the real runner
(scripts/vmrunner/commands.py and session.py)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from vmrunner import commands, session
from vmrunner.artifacts import GuestArtifacts
from vmrunner.backend import BackendSpec
from vmrunner.errors import EXIT_HARNESS_ERROR, EXIT_TIMEOUT
from vmrunner.kernel import GuestKernel
from vmrunner.session import GUEST_ROOT_MOUNT, PhaseClock, SessionOptions, VmSession

GUARD = 20.0  # a runner that ignores its own limits fails here instead of hanging pytest

# Plays QEMU: answers -version, then (FAKE_QEMU_SCENARIO) connects to the back-ends and the
# control socket, serves QMP's greeting and negotiation, sends guest events and hangs or exits.
# Like a real guest it takes a moment to boot: a QEMU gone right after the negotiation would
# make the runner's QMP connect fail instead of the phase under test.
FAKE_QEMU = r'''
import json, os, socket, sys, time

args = sys.argv[1:]
if args == ["-version"]:
    print(os.environ.get("FAKE_QEMU_VERSION", "QEMU emulator version 10.0.2 (fake)"))
    sys.exit(0)
scenario = os.environ["FAKE_QEMU_SCENARIO"]
with open(os.environ["FAKE_PIDS"], "a") as pids:
    pids.write(f"{os.getpid()}\n")
options = {}
for flag, value in zip(args, args[1:]):
    if flag in ("-chardev", "-fsdev"):
        fields = dict(word.split("=", 1) for word in value.split(",")[1:] if "=" in word)
        options[fields["id"]] = fields
print("fake qemu: started", flush=True)
if scenario == "exit-at-once":
    print("qemu-system-x86_64: -device vhost-user-gpu-pci: fake realize failure", flush=True)
    sys.exit(1)
gpus = []
for name in sorted(key for key in options if key.startswith("vgpu")):
    gpu = socket.socket(socket.AF_UNIX)
    gpu.connect(options[name]["path"])
    gpus.append(gpu)
qmp = socket.socket(socket.AF_UNIX)
qmp.bind(options["qmp"]["path"])
qmp.listen(1)
control = socket.socket(socket.AF_UNIX)
control.connect(options["control"]["path"])
monitor, _ = qmp.accept()
monitor.sendall(json.dumps({"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2},
                                                "package": ""}, "capabilities": []}}).encode()
                + b"\r\n")
received = b""
while True:  # QMP messages are bare JSON objects: no newline ends them
    received += monitor.recv(4096)
    try:
        request = json.loads(received)
        break
    except ValueError:
        continue
assert request["execute"] == "qmp_capabilities", request
monitor.sendall(json.dumps({"return": {}, **({"id": request["id"]} if "id" in request else {})})
                .encode() + b"\r\n")

def event(line):
    control.sendall(f"event {line}\n".encode())

time.sleep(0.5)
if scenario == "hang-before-init":
    time.sleep(3600)
event("init start=0.5 modules=1.0 now=1.1")
if scenario == "exit-after-init":  # the back-ends see the disconnect (and exit) first
    for gpu in gpus:
        gpu.close()
    time.sleep(0.3)
    print("qemu-system-x86_64: fake: guest crashed", flush=True)
    sys.exit(1)
if scenario == "hang-after-init":
    time.sleep(3600)
event("pytest-start now=2")
if scenario == "hang-in-tests":
    time.sleep(3600)
results = options["fs-results"]["path"]
with open(os.path.join(results, "exit-code"), "w") as out:
    out.write("0\n")
event("pytest-exit rc=0 now=3")
monitor.settimeout(10)
while monitor.recv(4096):  # the runner disconnects QMP first, then waits for the exit
    pass
for gpu in gpus:
    gpu.close()
sys.exit(0)
'''

# Plays a back-end: `fake_backend.py MODE --socket-path S`.
FAKE_BACKEND = r'''
import os, socket, sys, time

mode, path = sys.argv[1], sys.argv[3]
with open(os.environ["FAKE_PIDS"], "a") as pids:
    pids.write(f"{os.getpid()}\n")
if mode == "die-at-once":
    print("fake back-end: cannot open the render node", flush=True)
    sys.exit(2)
server = socket.socket(socket.AF_UNIX)
server.bind(path)
if mode == "never-listen":
    time.sleep(3600)
server.listen(1)
peer, _ = server.accept()
if mode == "die-after-connect":
    time.sleep(0.3)
    print("fake back-end: vring 0 is corrupt, giving up", flush=True)
    sys.exit(3)
while peer.recv(4096):  # serve: exit 0 once QEMU disconnects
    pass
sys.exit(0)
'''


@dataclass
class Played:
    """What one run of the runner against the fakes gave."""

    code: int
    elapsed: float
    err: str


@dataclass
class FakeVm:
    """The fakes' paths and what a run printed."""

    root: Path
    backend_script: Path
    pids: Path
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture[str]

    def play(self, scenario: str, backend_mode: str = "serve", **limits: float) -> Played:
        """Run the `test` command with the fake QEMU playing ``scenario`` and the fake
        back-end in ``backend_mode``; ``limits`` are SessionOptions time limits."""
        self.monkeypatch.setenv("FAKE_QEMU_SCENARIO", scenario)
        code, elapsed = self.run(self.options(backend_mode, **limits))
        return Played(code, elapsed, self.capsys.readouterr().err)

    def options(self, backend_mode: str = "serve", boot_timeout: float = 10.0,
                timeout: float = 15.0) -> SessionOptions:
        backend = BackendSpec("custom", (sys.executable, str(self.backend_script),
                                         backend_mode, "--socket-path", "{socket}"), None)
        return SessionOptions(mode="test", backend=backend, results_dir=self.root / "results",
                              boot_timeout=boot_timeout, timeout=timeout, shutdown_timeout=3.0)

    def run(self, options: SessionOptions) -> tuple[int, float]:
        """Run the `test` command's session; its exit code and how long it took."""
        image = self.root / "vmlinux"
        guest_kernel = GuestKernel("6.1.0-0-amd64", "0", image, image, self.root, ())
        artifacts = GuestArtifacts(guest_kernel, self.root / "initrd", None, ())
        started = time.monotonic()
        code = asyncio.run(asyncio.wait_for(
            commands._test(options, artifacts, PhaseClock(), []), GUARD))
        return code, time.monotonic() - started

    def leftovers(self) -> list[int]:
        """Fake processes still alive (the runner must reap every child)."""
        alive = []
        for pid in map(int, self.pids.read_text().split()):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            alive.append(pid)
        return alive


@pytest.fixture
def fake_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture[str]) -> Iterator[FakeVm]:
    """A fake qemu-system-x86_64 first on PATH and a fake back-end script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    qemu = bin_dir / "qemu-system-x86_64"
    qemu.write_text(f"#!{sys.executable}\n{FAKE_QEMU}")
    qemu.chmod(0o755)
    backend = tmp_path / "fake_backend.py"
    backend.write_text(FAKE_BACKEND)
    pids = tmp_path / "pids"
    pids.touch()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_PIDS", str(pids))
    fake = FakeVm(tmp_path, backend, pids, monkeypatch, capsys)
    yield fake
    for pid in fake.leftovers():  # only if a test failed: leave nothing running
        os.kill(pid, 9)


def test_the_fakes_pass_a_run_that_goes_well(fake_vm: FakeVm) -> None:
    """The positive control: every failure test below differs from this in one thing."""
    run = fake_vm.play("pass")
    assert run.code == 0, run.err
    assert fake_vm.leftovers() == []
    assert "qemu-system-x86_64 -machine q35,accel=tcg" in \
        (fake_vm.root / "results" / "qemu-command.txt").read_text().replace(
            str(fake_vm.root / "bin") + "/", "")


def test_a_guest_that_never_starts_times_out_within_the_boot_limit(fake_vm: FakeVm) -> None:
    run = fake_vm.play("hang-before-init", boot_timeout=2.0)
    assert run.code == EXIT_TIMEOUT, run.err
    assert "guest sent no 'init' within 2 s (time limit)" in run.err
    assert "fake qemu: started" in run.err  # the diagnostics carry the qemu.log tail
    assert run.elapsed < 2.0 + 6.0
    assert fake_vm.leftovers() == []


def test_a_hanging_test_run_ends_at_the_overall_timeout(fake_vm: FakeVm) -> None:
    run = fake_vm.play("hang-in-tests", timeout=3.0)
    assert run.code == EXIT_TIMEOUT, run.err
    assert "guest sent no 'pytest-exit'" in run.err and "(overall timeout)" in run.err
    assert run.elapsed < 3.0 + 6.0
    assert fake_vm.leftovers() == []


def test_qemu_exiting_early_is_a_harness_error_with_its_log(fake_vm: FakeVm) -> None:
    run = fake_vm.play("exit-after-init")
    assert run.code == EXIT_HARNESS_ERROR, run.err
    # QEMU's exit is named first, although its back-end's exit (0) was reported before it
    assert run.err.startswith("vm: ERROR: QEMU exited with status 1; back-end 0 (custom) "
                              "exited with status 0")
    assert "while waiting for the guest's '" in run.err
    assert "fake: guest crashed" in run.err
    assert run.elapsed < 8.0  # not the 10 s boot limit: the exit is noticed at once
    assert fake_vm.leftovers() == []


def test_qemu_exiting_before_qmp_is_a_harness_error(fake_vm: FakeVm) -> None:
    run = fake_vm.play("exit-at-once")
    assert run.code == EXIT_HARNESS_ERROR, run.err
    assert "QEMU exited before its QMP monitor answered" in run.err
    assert "fake realize failure" in run.err
    assert run.elapsed < 8.0
    assert fake_vm.leftovers() == []


def test_a_dying_backend_is_a_harness_error_naming_it(fake_vm: FakeVm) -> None:
    run = fake_vm.play("hang-after-init", "die-after-connect")
    assert run.code == EXIT_HARNESS_ERROR, run.err
    assert "back-end 0 (custom) exited with status 3 while waiting for the guest's '" \
        in run.err
    assert "vring 0 is corrupt" in run.err  # the back-end log's tail
    assert run.elapsed < 8.0
    assert fake_vm.leftovers() == []


def test_a_backend_that_dies_before_listening_stops_the_run(fake_vm: FakeVm) -> None:
    run = fake_vm.play("pass", "die-at-once")
    assert run.code == EXIT_HARNESS_ERROR, run.err
    assert "back-end 0 (custom) exited with status 2 before listening on" in run.err
    assert "cannot open the render node" in run.err
    assert not (fake_vm.root / "results" / "qemu-command.txt").exists()  # QEMU never ran


def test_a_backend_that_never_listens_times_out(fake_vm: FakeVm,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session, "BACKEND_LISTEN_TIMEOUT", 1.0)
    run = fake_vm.play("pass", "never-listen")
    assert run.code == EXIT_TIMEOUT, run.err
    assert "back-end 0 (custom) did not listen on" in run.err
    assert run.elapsed < 1.0 + 8.0
    assert fake_vm.leftovers() == []


def test_a_too_old_qemu_stops_the_run_before_booting(fake_vm: FakeVm,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QEMU_VERSION", "QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg)")
    run = fake_vm.play("pass")
    assert run.code == EXIT_HARNESS_ERROR, run.err
    assert "is QEMU 7.2.19" in run.err and "scripts/setup-host.sh" in run.err
    assert fake_vm.leftovers() == []


# --- the per-test timeout the guest init decides on ------------------------------------

def _guest_env(tmp_path: Path, args: list[str], per_test_timeout: float) -> Path:
    options = SessionOptions(mode="test", backend=BackendSpec("ours", ("x",), None),
                             results_dir=tmp_path / "results")
    image = tmp_path / "vmlinux"
    artifacts = GuestArtifacts(GuestKernel("r", "v", image, image, tmp_path, ()), image, None,
                               ())
    vm = VmSession(options, artifacts, PhaseClock())
    try:
        vm.write_guest_env(args, per_test_timeout)
    finally:
        shutil.rmtree(vm.workdir)
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
