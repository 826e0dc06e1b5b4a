"""The VM runner's failure paths without a VM: a fake qemu-system-x86_64 on PATH and a fake
back-end play hanging guests, early exits and dying back-ends against the real runner
(scripts/vmrunner/commands.py and session.py)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from vmrunner import commands, demo, errors, session
from vmrunner.artifacts import GuestArtifacts
from vmrunner.backend import BackendSpec
from vmrunner.errors import EXIT_HARNESS_ERROR, EXIT_TIMEOUT
from vmrunner.kernel import GuestKernel
from vmrunner.session import PhaseClock, SessionOptions

GUARD = 20.0  # a runner that ignores its own limits fails here instead of hanging pytest


# Plays QEMU: answers -version, then (FAKE_QEMU_SCENARIO) connects to the back-ends and the
# control socket, serves QMP's greeting and negotiation, sends guest events and hangs or exits.
# Like a real guest it takes a moment to boot: a QEMU gone right after the negotiation would
# make the runner's QMP connect fail instead of the phase under test.
FAKE_QEMU = r'''
import json, os, select, socket, sys, time

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
if scenario == "no-qmp":  # stuck realizing a device: the monitor never comes up
    time.sleep(3600)
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
if scenario.startswith("console"):  # console-check: the guest asks, the host screendumps
    if scenario == "console-fail":
        control.sendall(b"console-ready xres=640 yres=480 stride=2560 bpp=32 rows=30 "
                        b"cols=80 x0=352 y0=384\n")
    pending, reply = b"", b""
    while scenario == "console-fail" and not reply.endswith(b"\n"):
        ready, _, _ = select.select([monitor, control], [], [], 10)
        if control in ready:
            reply += control.recv(4096)
        if monitor in ready:
            pending += monitor.recv(4096)
            while pending.strip():
                try:
                    message, end = json.JSONDecoder().raw_decode(pending.decode().lstrip())
                except ValueError:
                    break
                pending = pending.decode().lstrip()[end:].encode()
                with open(message["arguments"]["filename"], "wb") as dump:  # a black screen
                    dump.write(b"P6 640 480 255\n" + bytes(640 * 480 * 3))
                monitor.sendall(json.dumps({"return": {}, "id": message["id"]}).encode()
                                + b"\r\n")
    print(f"fake qemu: console-ready reply {reply!r}", flush=True)
    event("poweroff now=2")
    monitor.settimeout(10)
    while monitor.recv(4096):
        pass
    for gpu in gpus:
        gpu.close()
    sys.exit(0)
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
rc = os.environ.get("FAKE_GUEST_RC", "0")
if scenario != "no-exit-file":
    with open(os.path.join(options["fs-results"]["path"], "exit-code"), "w") as out:
        out.write(f"{rc}\n")
with open(options["serial0"]["path"], "w") as serial:
    serial.write(f"booting\nvgpu-init: event pytest-start\nFAKE TEST OUTPUT\n"
                 f"vgpu-init: event pytest-exit rc={rc}\nreboot: Power down\n")
event(f"pytest-exit rc={rc} now=3")
monitor.settimeout(10)
while monitor.recv(4096):  # the runner disconnects QMP first, then waits for the exit
    pass
for gpu in gpus:
    gpu.close()
sys.exit(int(os.environ.get("FAKE_QEMU_STATUS", "0")))
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
if mode == "exit-1-on-disconnect":
    print("fake back-end: leaked 3 resources", flush=True)
    sys.exit(1)
sys.exit(0)
'''


@dataclass
class Played:
    """What one run of the runner against the fakes gave."""

    code: int
    elapsed: float
    err: str
    out: str = ""


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
        captured = self.capsys.readouterr()
        return Played(code, elapsed, captured.err, captured.out)

    def options(self, backend_mode: str = "serve", boot_timeout: float = 10.0,
                timeout: float = 15.0) -> SessionOptions:
        backend = BackendSpec("custom", (sys.executable, str(self.backend_script),
                                         backend_mode, "--socket-path", "{socket}"), None)
        return SessionOptions(mode="test", backend=backend, results_dir=self.root / "results",
                              boot_timeout=boot_timeout, timeout=timeout, shutdown_timeout=3.0)

    def run(self, options: SessionOptions) -> tuple[int, float]:
        """Run the `test` (or, in mode "console", `console-check`) command's session; its
        exit code and how long it took."""
        image = self.root / "vmlinux"
        guest_kernel = GuestKernel("6.1.0-0-amd64", "0", image, image, self.root, ())
        artifacts = GuestArtifacts(guest_kernel, self.root / "initrd", None, ())
        started = time.monotonic()
        command = commands._console_check(options, artifacts, PhaseClock(), None) \
            if options.mode == "console" else commands._test(options, artifacts, PhaseClock(), [])
        code = asyncio.run(asyncio.wait_for(command, GUARD))
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


def test_a_qemu_whose_monitor_never_answers_times_out_within_the_boot_limit(
        fake_vm: FakeVm) -> None:
    run = fake_vm.play("no-qmp", boot_timeout=0.5)
    assert run.code == EXIT_TIMEOUT, run.err
    assert "QEMU's QMP monitor did not answer within 0 s (stuck realizing a device?)" in run.err
    assert run.elapsed < 0.5 + 5.0  # not the 30 s QMP limit nor the 15 s overall one
    assert fake_vm.leftovers() == []


def test_runaway_qemu_output_stops_the_run(fake_vm: FakeVm,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session, "LOG_LIMITS", {"qemu.log": 10})  # "fake qemu: started"
    monkeypatch.setattr(session, "EXIT_RACE_GRACE", 0.05)  # QEMU runs on: do not wait for it
    run = fake_vm.play("hang-after-init")
    assert run.code == EXIT_HARNESS_ERROR, run.err
    assert "qemu.log grew past 0 MiB (runaway output" in run.err
    assert run.elapsed < 8.0  # not the 10 s boot limit
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


# --- what the guest's exit code and the processes' exits make of a run -----------------

def test_the_guests_pytest_status_is_the_runs_status(fake_vm: FakeVm) -> None:
    fake_vm.monkeypatch.setenv("FAKE_GUEST_RC", "1")
    run = fake_vm.play("pass")
    assert run.code == 1, run.err
    assert "--- guest pytest output" in run.out and "FAKE TEST OUTPUT" in run.out
    assert "Power down" not in run.out  # only the part between pytest's start and exit
    assert fake_vm.leftovers() == []


def test_a_failed_run_shown_on_the_console_does_not_repeat_its_output(fake_vm: FakeVm) -> None:
    fake_vm.monkeypatch.setenv("FAKE_GUEST_RC", "2")
    fake_vm.monkeypatch.setenv("FAKE_QEMU_SCENARIO", "pass")
    code, _ = fake_vm.run(replace(fake_vm.options(), show_console=True))
    assert code == 2
    assert "--- guest pytest output" not in fake_vm.capsys.readouterr().out


def test_kernel_trouble_is_listed_up_to_the_limit(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    serial = tmp_path / "serial.log"
    commands.print_kernel_trouble(serial)  # no log, nothing to say
    serial.write_text("[ 0.1] Linux version 6.1\n" + "".join(
        f"[ {n}.0] BUG: soft lockup - CPU#0 stuck for {n}s!\n" for n in range(25)))
    commands.print_kernel_trouble(serial)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"vm: the guest kernel reported (25 lines, see {serial}):"
    assert lines[1:] == [f"  [ {n}.0] BUG: soft lockup - CPU#0 stuck for {n}s!"
                         for n in range(20)]


def test_a_stale_exit_code_file_is_not_a_result(fake_vm: FakeVm) -> None:
    results = fake_vm.root / "results"
    results.mkdir()
    (results / "exit-code").write_text("0\n")  # from an earlier run
    run = fake_vm.play("no-exit-file")
    assert run.code == EXIT_HARNESS_ERROR, run.err
    assert "the guest wrote no" in run.err


def test_a_backend_failing_at_disconnect_fails_a_passing_run(fake_vm: FakeVm) -> None:
    run = fake_vm.play("pass", "exit-1-on-disconnect")
    assert run.code == EXIT_HARNESS_ERROR, run.err
    assert "back-end 0 (custom) exited with status 1 after QEMU disconnected" in run.err
    assert "leaked 3 resources" in run.err


def test_qemu_failing_at_shutdown_fails_a_passing_run(fake_vm: FakeVm) -> None:
    fake_vm.monkeypatch.setenv("FAKE_QEMU_STATUS", "1")
    run = fake_vm.play("pass")
    assert run.code == EXIT_HARNESS_ERROR, run.err
    assert "vm: ERROR: QEMU exited with status 1\n--- qemu.log ---" in run.err


def _run_demo(fake_vm: FakeVm, screenshot: Path | None = None) -> int:
    """Run the `demo` command against the fakes (they play the demo passing)."""
    image = fake_vm.root / "vmlinux"
    artifacts = GuestArtifacts(GuestKernel("6.1.0-0-amd64", "0", image, image, fake_vm.root, ()),
                               fake_vm.root / "initrd", None, ())
    fake_vm.monkeypatch.setattr(demo, "_prepare", lambda *args: artifacts)
    fake_vm.monkeypatch.setenv("FAKE_QEMU_SCENARIO", "pass")
    return demo.run_demo(replace(fake_vm.options(), mode="demo"), [], screenshot=screenshot)


def test_the_demo_without_its_screenshot_is_a_harness_error(fake_vm: FakeVm) -> None:
    assert _run_demo(fake_vm, fake_vm.root / "shot.png") == EXIT_HARNESS_ERROR
    captured = fake_vm.capsys.readouterr()
    assert "vm: demo PASSED" in captured.out and "the guest took no screenshot" in captured.err


def test_a_demo_whose_qemu_fails_at_shutdown_is_a_harness_error(fake_vm: FakeVm) -> None:
    fake_vm.monkeypatch.setenv("FAKE_QEMU_STATUS", "1")
    assert _run_demo(fake_vm) == EXIT_HARNESS_ERROR
    captured = fake_vm.capsys.readouterr()
    assert "vm: demo PASSED" in captured.out and "QEMU exited with status 1" in captured.err


def test_a_wrong_console_fails_console_check(fake_vm: FakeVm,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commands, "CONSOLE_SETTLE_TIMEOUT", 0.0)
    monkeypatch.setenv("FAKE_QEMU_SCENARIO", "console-fail")
    code, _ = fake_vm.run(replace(fake_vm.options(), mode="console"))
    err = fake_vm.capsys.readouterr().err
    assert code == errors.EXIT_CONSOLE_CHECK_FAILED, err
    assert "vm: console check FAILED after 1 screendump(s):" in err
    assert "non-black pixels" not in err and "pattern: 16384 of 16384 pixels differ" in err
    qemu_log = (fake_vm.root / "results" / "qemu.log").read_text()
    assert "console-ready reply b'ok fail " in qemu_log
    assert (fake_vm.root / "results" / "screendumps" / "console.png").exists()
    assert fake_vm.leftovers() == []


def test_a_guest_that_never_asks_for_the_console_check_fails_it(
        fake_vm: FakeVm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QEMU_SCENARIO", "console-silent")
    code, _ = fake_vm.run(replace(fake_vm.options(), mode="console"))
    assert code == EXIT_HARNESS_ERROR
    assert "the guest never asked for the console check" in fake_vm.capsys.readouterr().err
