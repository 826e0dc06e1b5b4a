"""qemu/run-qemu.sh, the documented launcher: the real back-end, a fake QEMU that
connects to the socket the way QEMU's chardev does (once, without retrying)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "qemu" / "run-qemu.sh"
BACKEND = f"{sys.executable} -m vgpu_backend --no-blob --no-compute --log-level warning"

FAKE_QEMU = f"""#!{sys.executable}
import json, os, socket, sys, time
argv = sys.argv[1:]
chardev = dict(kv.split("=", 1) for kv in argv[argv.index("-chardev") + 1].split(",")
               if "=" in kv)
result = {{"argv": argv, "connected": False, "pid": os.getpid()}}
if os.environ.get("FAKE_QEMU_STDIN"):
    result["stdin"] = sys.stdin.read()
try:
    if os.environ.get("FAKE_QEMU_CONNECT", "1") != "1":
        raise OSError("told not to connect")
    client = socket.socket(socket.AF_UNIX)
    client.connect(chardev["path"])
    result["connected"] = True
    client.close()
except OSError as error:
    result["connected"] = str(error)
with open(os.environ["FAKE_QEMU_RECORD"] + ".tmp", "w") as out:
    json.dump(result, out)
os.rename(os.environ["FAKE_QEMU_RECORD"] + ".tmp", os.environ["FAKE_QEMU_RECORD"])
time.sleep(float(os.environ.get("FAKE_QEMU_SLEEP", "0")))
sys.exit(int(os.environ.get("FAKE_QEMU_EXIT", "0")))
"""

PID_WRAPPER = """#!/bin/sh
echo $$ > "$BACKEND_PID_FILE"
exec {backend} "$@"
"""


class Launch:
    """run-qemu.sh in a scratch directory with the fake QEMU first on PATH."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.sock = tmp_path / "vgpu.sock"
        self.record = tmp_path / "qemu.json"
        self.pid_file = tmp_path / "backend.pid"
        for name in ("vmlinux", "initrd.img"):  # only checked to be readable
            (tmp_path / name).write_bytes(b"")
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        qemu = bin_dir / "qemu-system-x86_64"
        qemu.write_text(FAKE_QEMU)
        qemu.chmod(0o755)
        wrapper = bin_dir / "backend-with-pid"
        wrapper.write_text(PID_WRAPPER.format(backend=BACKEND))
        wrapper.chmod(0o755)
        self.env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                    "VGPU_SOCKET": str(self.sock), "FAKE_QEMU_RECORD": str(self.record),
                    "VGPU_BACKEND_CMD": str(wrapper), "BACKEND_PID_FILE": str(self.pid_file),
                    "PYTHONPATH": os.pathsep.join(
                        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}

    def argv(self) -> list[str]:
        return ["sh", str(SCRIPT), "vmlinux", "initrd.img", "-name", "t"]

    def run(self, stdin: str = "", **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(), env={**self.env, **env}, cwd=self.tmp,
                              input=stdin, capture_output=True, text=True, timeout=60,
                              check=False)

    def qemu(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.record.read_text())
        return result

    def backend_gone(self) -> bool:
        return _gone(int(self.pid_file.read_text()))


def _gone(pid: int, timeout: float = 10.0) -> bool:
    """The process ``pid`` ends within ``timeout`` (a zombie counts as ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rpartition(")")[2].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_qemu_connects_to_a_listening_back_end(tmp_path: Path) -> None:
    launch = Launch(tmp_path)
    done = launch.run()
    assert done.returncode == 0, done.stderr
    qemu = launch.qemu()
    assert qemu["connected"] is True
    argv = qemu["argv"]
    assert argv[argv.index("-device") + 1] == "vhost-user-gpu-pci,chardev=vgpu"
    assert argv[argv.index("-vga") + 1] == "none"
    assert argv[-2:] == ["-name", "t"]
    assert "id=mem,size=2G,share=on" in " ".join(argv)
    assert not launch.sock.exists() and launch.backend_gone()


def test_a_socket_file_left_by_a_killed_back_end_does_not_fool_it(tmp_path: Path) -> None:
    """QEMU would be refused if it connected before the new back-end listens."""
    launch = Launch(tmp_path)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(launch.sock))
    stale.close()  # the file stays, nothing listens
    done = launch.run()
    assert done.returncode == 0, done.stderr
    assert launch.qemu()["connected"] is True


def test_a_socket_in_use_is_left_alone(tmp_path: Path) -> None:
    launch = Launch(tmp_path)
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(launch.sock))
    other.listen(1)
    try:
        done = launch.run()
        assert done.returncode == 1
        assert "is in use" in done.stderr
        assert not launch.record.exists() and not launch.pid_file.exists()
        other.setblocking(False)
        with pytest.raises(BlockingIOError):
            other.accept()
    finally:
        other.close()


@pytest.mark.parametrize("backend", ["false", "vgpu-backend-not-installed"])
def test_a_back_end_that_does_not_start_stops_the_launch(tmp_path: Path, backend: str) -> None:
    launch = Launch(tmp_path)
    done = launch.run(VGPU_BACKEND_CMD=backend)
    assert done.returncode == 1
    assert "the back-end exited (status 1" in done.stderr or \
        "the back-end exited (status 127" in done.stderr
    assert not launch.record.exists()


@pytest.mark.parametrize("missing", ["vmlinux", "initrd.img"])
def test_a_missing_kernel_or_initrd_stops_the_launch_first(tmp_path: Path,
                                                           missing: str) -> None:
    launch = Launch(tmp_path)
    (tmp_path / missing).unlink()
    done = launch.run()
    assert done.returncode == 1 and f"cannot read {missing}" in done.stderr
    assert not launch.pid_file.exists() and not launch.record.exists()  # nothing started


def test_a_qemu_that_fails_to_start_does_not_leave_the_back_end_waiting(
        tmp_path: Path) -> None:
    launch = Launch(tmp_path)
    done = launch.run(FAKE_QEMU_EXIT="1", FAKE_QEMU_CONNECT="0")
    assert done.returncode == 1
    assert launch.qemu()["connected"] == "told not to connect"
    assert launch.backend_gone()
    assert not launch.sock.exists()  # its SIGTERM handler removed the file


def test_a_qemu_that_exits_without_connecting_stops_the_back_end(tmp_path: Path) -> None:
    """``run-qemu.sh K I -version``: QEMU exits 0 without a connection."""
    launch = Launch(tmp_path)
    done = launch.run(FAKE_QEMU_CONNECT="0")
    assert done.returncode == 0, done.stderr
    assert launch.backend_gone() and not launch.sock.exists()


def test_qemu_keeps_the_terminal_as_its_stdin(tmp_path: Path) -> None:
    """-serial mon:stdio: a background command's stdin would be /dev/null."""
    launch = Launch(tmp_path)
    done = launch.run(stdin="typed into the console\n", FAKE_QEMU_STDIN="1")
    assert done.returncode == 0, done.stderr
    assert launch.qemu()["stdin"] == "typed into the console\n"


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_the_script_stops_qemu_and_the_back_end(
        tmp_path: Path, signum: signal.Signals, status: int) -> None:
    launch = Launch(tmp_path)
    script = subprocess.Popen(launch.argv(), env={**launch.env, "FAKE_QEMU_SLEEP": "60"},
                              cwd=tmp_path, stdin=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not launch.record.exists():
            assert time.monotonic() < deadline and script.poll() is None, "QEMU never ran"
            time.sleep(0.05)
        script.send_signal(signum)
        assert script.wait(timeout=10) == status
    finally:
        script.kill()
        script.wait()
        assert script.stderr is not None
        script.stderr.close()
    assert _gone(launch.qemu()["pid"]) and launch.backend_gone()


def test_the_libvirt_snippet_is_well_formed_and_asks_for_what_the_back_end_needs() -> None:
    """An XML comment may not contain "--" (option names): libvirt would refuse it."""
    domain = ElementTree.parse(REPO / "qemu" / "libvirt-domain.xml").getroot()
    assert domain.find("memoryBacking/source").get("type") == "memfd"  # type: ignore[union-attr]
    assert domain.find("memoryBacking/access").get("mode") == "shared"  # type: ignore[union-attr]
    assert domain.find("devices/video/driver").get("name") == "vhostuser"  # type: ignore[union-attr]
    assert domain.find("devices/video/model").get("heads") == "1"  # type: ignore[union-attr]


def test_the_vhost_user_descriptor_names_a_gpu_back_end() -> None:
    """QEMU's docs/interop/vhost-user.json: type "gpu" and a binary path.  libvirt takes
    the first "gpu" descriptor in file-name order, and QEMU's own back-end ships as
    50-qemu-gpu.json: ours must sort before it."""
    [path] = (REPO / "qemu").glob("*.json")
    descriptor = json.loads(path.read_text())
    assert descriptor["type"] == "gpu"
    assert Path(descriptor["binary"]).is_absolute()
    assert set(descriptor) <= {"description", "type", "binary", "tags"}
    assert sorted([path.name, "50-qemu-gpu.json"])[0] == path.name
