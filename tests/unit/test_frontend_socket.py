"""The socket to QEMU: --socket-path (in use, stale, removed when done) and --fd (what
kind of socket it must be; connected or listening)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.unit.hang_guard import deadline
from vgpu_backend import cli
from vgpu_backend.cli import main, parser
from vgpu_backend.config import ConfigError, build_config, listening_socket
from vgpu_backend.eventloop import EventLoop
from vgpu_backend.runtime import Backend


def test_a_path_something_listens_on_is_refused_and_kept(tmp_path: Path) -> None:
    """Another back-end waiting for QEMU keeps its socket: no probe connection reaches
    it (it would take the probe for QEMU), and the file stays."""
    path = str(tmp_path / "vgpu.sock")
    first = listening_socket(path)
    try:
        with pytest.raises(ConfigError, match="in use"):
            listening_socket(path)
        first.setblocking(False)
        with pytest.raises(BlockingIOError):
            first.accept()  # nobody connected to look
        with pytest.raises(ConfigError, match="in use"):  # also by a relative path
            cwd = os.getcwd()
            os.chdir(tmp_path)
            try:
                listening_socket("vgpu.sock")
            finally:
                os.chdir(cwd)
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(path)  # still the first one's
        probe.close()
    finally:
        first.close()


def test_a_socket_in_use_is_recognised_under_another_name(tmp_path: Path) -> None:
    """The same file through a symlinked directory (as /var/run and /run)."""
    real = tmp_path / "run"
    real.mkdir()
    (tmp_path / "var-run").symlink_to(real)
    first = listening_socket(str(real / "vgpu.sock"))
    try:
        with pytest.raises(ConfigError, match="in use"):
            listening_socket(str(tmp_path / "var-run" / "vgpu.sock"))
        assert (real / "vgpu.sock").is_socket()
    finally:
        first.close()


def test_a_path_too_long_for_a_unix_socket_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="AF_UNIX path too long"):
        listening_socket(str(tmp_path / ("x" * 120)))


def test_a_directory_is_not_a_socket(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        listening_socket(str(tmp_path))
    assert tmp_path.is_dir()


@pytest.mark.parametrize("replaced", [False, True])
def test_the_socket_file_goes_when_the_back_end_stops_unless_replaced(
        tmp_path: Path, replaced: bool) -> None:
    """Stopped before QEMU came: its own file goes; a file someone put there since
    (another back-end's) stays."""
    path = tmp_path / "vgpu.sock"
    loop = EventLoop()
    backend = Backend(loop, build_config(parser().parse_args(
        ["--socket-path", str(path), "--no-blob", "--no-compute"])))
    backend.listen(listening_socket(str(path)), owned_path=str(path))
    other = None
    if replaced:
        path.unlink()
        other = socket.socket(socket.AF_UNIX)
        other.bind(str(path))
    backend.close()
    loop.close()
    assert path.exists() == replaced
    if other is not None:
        other.close()


def main_exits_0(argv: list[str], *, meanwhile: Callable[[], None], after: float) -> None:
    """``main(argv)`` returns 0 (within 20 s) while ``meanwhile`` runs ``after`` seconds
    into it, on another thread."""
    timer = threading.Timer(after, meanwhile)
    timer.start()
    try:
        with deadline(20.0):
            assert main(argv) == 0
    finally:
        timer.cancel()


def test_main_removes_its_socket_file_on_sigterm(tmp_path: Path, signals: None) -> None:
    path = tmp_path / "vgpu.sock"
    main_exits_0(["--socket-path", str(path), "--no-blob", "--no-compute"],
                 meanwhile=lambda: os.kill(os.getpid(), signal.SIGTERM), after=0.5)
    assert not path.exists()


def test_a_bad_socket_path_fails_before_the_host_gpu_opens(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        signals: None) -> None:
    opened: list[object] = []
    monkeypatch.setattr(cli, "Backend", lambda *args: opened.append(args))
    with caplog.at_level(logging.INFO):
        assert main(["--socket-path", str(tmp_path / "missing" / "s")]) == 1
    assert opened == []
    assert f"--socket-path {tmp_path}/missing/s: no directory {tmp_path}/missing" in caplog.text


@pytest.mark.parametrize("family, kind", [
    (socket.AF_INET, socket.SOCK_DGRAM),
    (socket.AF_INET, socket.SOCK_STREAM),
    (socket.AF_UNIX, socket.SOCK_DGRAM),
])
def test_fd_must_be_a_unix_stream_socket(family: socket.AddressFamily,
                                         kind: socket.SocketKind) -> None:
    sock = socket.socket(family, kind)
    try:
        with pytest.raises(ConfigError, match=rf"--fd {sock.fileno()}: not a unix stream "
                                              rf"socket \({family.name}, {kind.name}\)"):
            build_config(parser().parse_args(["--fd", str(sock.fileno())]))
        sock.getsockname()  # the check left it open
    finally:
        sock.close()


@pytest.mark.parametrize("bound", [False, True])
def test_fd_of_a_socket_neither_connected_nor_listening_is_refused(
        tmp_path: Path, bound: bool) -> None:
    """A unix stream socket with no peer and no listen() (bound or not): there is no
    QEMU to serve, so start-up refuses it (it used to log EINVAL and exit 0)."""
    sock = socket.socket(socket.AF_UNIX)
    try:
        if bound:
            sock.bind(str(tmp_path / "lonely.sock"))
        with pytest.raises(ConfigError, match=rf"^--fd {sock.fileno()}: a unix socket "
                                              "neither connected nor listening$"):
            build_config(parser().parse_args(["--fd", str(sock.fileno())]))
        sock.getsockname()  # the check left it open
    finally:
        sock.close()


@pytest.mark.parametrize("argv, message", [
    (["--fd", str(10 ** 12)], rf"^--fd {10 ** 12}: "),  # beyond a C int: OverflowError
    (["--fd", str(-(10 ** 12))], rf"^--fd {-(10 ** 12)}: "),
    (["--socket-path", ""], "^--socket-path is empty$"),  # would bind an abstract address
])
def test_impossible_socket_options_are_config_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(parser().parse_args(argv))


def test_an_inherited_listening_socket_is_accepted_on(tmp_path: Path, signals: None) -> None:
    """--fd of a listening socket (socket activation): one front-end is accepted and
    served; the socket file is the launcher's and stays."""
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    fd = os.dup(listener.fileno())
    listener.close()

    def front_end() -> None:
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))
        client.close()  # a front-end that goes away: the back-end exits 0

    main_exits_0(["--fd", str(fd), "--no-blob", "--no-compute"], meanwhile=front_end,
                 after=0.3)
    assert path.is_socket()
    with pytest.raises(OSError):
        os.fstat(fd)  # served and closed


def test_an_inherited_connected_socket_is_served(signals: None,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """--fd of a connected socket (libvirt): served at once, and said so; the back-end
    exits 0 when the front-end goes away."""
    ours, theirs = socket.socketpair()
    fd = ours.detach()
    with caplog.at_level(logging.INFO, logger="vgpu_backend"):
        main_exits_0(["--fd", str(fd), "--no-blob", "--no-compute"],
                     meanwhile=theirs.close, after=0.3)
    assert f"serving the connected socket --fd {fd}" in caplog.text
    with pytest.raises(OSError):
        os.fstat(fd)  # served and closed


@pytest.mark.parametrize("option", ["--userptr-capset-id", "--compute-capset-id",
                                    "--gpu-ids"])
def test_integer_options_say_what_they_expect(option: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parser().parse_args(["--socket-path", "s", option, "0x10,abc"])
    assert info.value.code == 2
    assert f"argument {option}: not an integer (decimal or 0x...): " in \
        capsys.readouterr().err
