"""Backend and run(): which host GPU opens, the shutdown leak check, exit statuses."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.unit.hang_guard import deadline
from vgpu_backend.cli import EXIT_LEAK, main, parser
from vgpu_backend.config import BackendConfig, ConfigError, build_config, listening_socket
from vgpu_backend.eventloop import EventLoop
from vgpu_backend.guest_memory import GuestMemory
from vgpu_backend.runtime import Backend, open_fds, open_host_gpu

NO_KFD = pytest.mark.skipif(os.path.exists("/dev/kfd"), reason="this host has /dev/kfd")


def config_from(*argv: str) -> BackendConfig:
    return build_config(parser().parse_args(["--socket-path", "s", *argv]))


@pytest.fixture
def backend() -> Iterator[Backend]:
    """A back-end on the simulated KFD that never got a connection."""
    loop = EventLoop()
    yield Backend(loop, config_from("--gpu", "sim"))
    loop.close()


@pytest.mark.parametrize(("argv", "needs_gpu"), [
    ((), True),
    (("--no-blob",), True),  # userptr off, compute on
    (("--no-compute",), True),  # userptr on, compute off
    (("--no-blob", "--no-compute"), False),
])
def test_a_host_gpu_opens_only_when_something_needs_it(argv: tuple[str, ...],
                                                       needs_gpu: bool) -> None:
    """USERPTR blobs or compute contexts need the host GPU; with neither none opens
    (and --gpu is refused there: it would have no effect)."""
    gpu = open_host_gpu(config_from(*(("--gpu", "sim") if needs_gpu else ()), *argv))
    try:
        assert (gpu is not None) == needs_gpu
    finally:
        if gpu is not None:
            gpu.close()


@pytest.mark.parametrize(("argv", "host_gpu", "compute_off_because"), [
    (("--gpu", "sim"), "host GPU sim (batch path, GPUs 0x", None),
    (("--gpu", "sim", "--kfd-isolation", "context"),
     "host GPU sim (USERPTR unavailable, GPUs 0x", "--kfd-isolation context gives"),
])
def test_the_start_up_lines_say_what_is_served(
        caplog: pytest.LogCaptureFixture, argv: tuple[str, ...], host_gpu: str,
        compute_off_because: str | None) -> None:
    """The offered bits are GET_FEATURES' (with PROTOCOL_FEATURES, bit 30); USERPTR
    unavailable and compute switched off say so, and why."""
    loop = EventLoop()
    with caplog.at_level(logging.INFO, logger="vgpu_backend"):
        backend = Backend(loop, config_from(*argv))
    try:
        features = backend.device.offered_features() | 1 << 30
        assert f"offering virtio features {features:#x}," in caplog.text
        assert host_gpu in caplog.text
        assert "; no busy-polling" in caplog.text
        disabled = [r.getMessage() for r in caplog.records
                    if "compute contexts are disabled" in r.getMessage()]
        if compute_off_because is None:
            assert disabled == []
        else:
            assert len(disabled) == 1 and compute_off_because in disabled[0]
    finally:
        backend.close()
        loop.close()


@pytest.mark.parametrize(("argv", "message"), [
    (("--gpu-ids", "1,2"), "host GPU: --gpu-ids ['0x1', '0x2']: the topology has"),
    (("--sim-pre-batch", "--userptr-host-path", "batch"),
     "host GPU: --userptr-host-path 'batch' requested, but the kernel does not support"),
])
def test_a_host_gpu_that_cannot_open_is_named_by_its_options(argv: tuple[str, ...],
                                                             message: str) -> None:
    """What only the (simulated) kernel can tell is said in the options' names too."""
    with pytest.raises(ConfigError) as info:
        open_host_gpu(config_from("--gpu", "sim", *argv))
    assert str(info.value).startswith(message)


def test_a_clean_close_reports_no_leak(backend: Backend,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """Nothing allocated: no leak, the host GPU is closed, the all-clear is logged."""
    with caplog.at_level(logging.INFO, logger="vgpu_backend"):
        backend.close()
    assert backend.leaks == [] and backend.host_gpu is None
    assert "leak check: no host GPU mapping" in caplog.text


LeakMaker = Callable[[Backend, pytest.MonkeyPatch], None]


def _device_mapping(b: Backend, mp: pytest.MonkeyPatch) -> None:
    real_close = b.device.close

    def close() -> None:
        real_close()
        b.device.leaked_mappings = 3
    mp.setattr(b.device, "close", close)


def _queued(b: Backend, mp: pytest.MonkeyPatch) -> None:
    assert b.device.compute is not None
    b.device.compute.queued_bytes = 4096


def _gpu_mapping(b: Backend, mp: pytest.MonkeyPatch) -> None:
    assert b.host_gpu is not None
    mp.setattr(b.host_gpu, "live_mappings", lambda: 2)  # also what device.close() sees


def _region(b: Backend, mp: pytest.MonkeyPatch) -> None:
    mp.setattr(GuestMemory, "regions", property(lambda self: (object(),)))


@pytest.mark.parametrize(("make_leak", "messages"), [
    (_device_mapping, ["3 host GPU mapping(s) outlived their resources"]),
    (_queued, ["4096 bytes of compute submissions still counted as queued"]),
    (_gpu_mapping, ["2 host GPU mapping(s) outlived their resources",
                    "2 host GPU mapping(s)"]),
    (_region, ["1 guest memory region(s)"]),
])
def test_each_kind_of_leak_is_reported(backend: Backend, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture,
                                       make_leak: LeakMaker, messages: list[str]) -> None:
    """Every check of close() reports what it finds, as one error; without a session
    close() still closes the device (which counts the mappings left)."""
    make_leak(backend, monkeypatch)
    with caplog.at_level(logging.INFO, logger="vgpu_backend"):
        backend.close()
    assert backend.leaks == messages
    [record] = [r for r in caplog.records if "leak check" in r.getMessage()]
    assert record.levelno == logging.ERROR
    assert record.getMessage() == "leak check failed: " + "; ".join(messages)


def test_an_fd_left_open_is_a_leak(backend: Backend) -> None:
    """An fd opened after start-up and still open at close() is named in the leaks, and
    only real fds are (not the one that listed /proc/self/fd)."""
    r, w = os.pipe()
    try:
        backend.close()
    finally:
        os.close(r)
        os.close(w)
    [leak] = backend.leaks
    assert re.fullmatch(rf"fds \[{r}, {w}\] \({r}->pipe:\[\d+\], {w}->pipe:\[\d+\]\)", leak)


def test_an_fd_opened_after_the_host_gpu_is_a_leak_even_if_closing_it_frees_it(
        backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """An fd that appeared after the host GPU opened and is still open before the host
    GPU closes counts, even when closing the host GPU frees its number."""
    r, w = os.pipe()
    assert backend.host_gpu is not None
    real_close = backend.host_gpu.close

    def close() -> None:
        os.close(r)
        os.close(w)
        real_close()
    monkeypatch.setattr(backend.host_gpu, "close", close)
    backend.close()
    assert backend.leaks == [f"fds [{r}, {w}] ({r}->?, {w}->?)"]


def test_close_stops_listening(backend: Backend) -> None:
    """Closing before a front-end connected closes the listener and its watch."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    backend.listen(listener)
    fd = listener.fileno()
    assert not listener.getblocking() and fd in backend.loop._readers
    backend.close()
    assert listener.fileno() == -1 and fd not in backend.loop._readers
    assert backend.leaks == []


def test_a_host_gpu_that_keeps_its_fds_is_a_leak(backend: Backend,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """fds the host GPU opened at start-up and did not close on close() are leaks."""
    gpu = backend.host_gpu
    assert gpu is not None
    monkeypatch.setattr(gpu, "close", lambda: None)
    try:
        backend.close()
    finally:
        monkeypatch.undo()
        gpu.close()
    [leak] = backend.leaks
    assert leak.startswith("fds [")


def test_one_connection_is_accepted_then_listening_stops(tmp_path: Path) -> None:
    """The first front-end is served; the listener is closed right after the accept,
    and its socket file goes with it (a launcher waiting for the file cannot mistake
    it for a back-end that still waits)."""
    loop = EventLoop()
    backend = Backend(loop, config_from("--gpu", "sim"))
    path = str(tmp_path / "vgpu.sock")
    listener = listening_socket(path)
    backend.listen(listener, owned_path=path)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    fd = listener.fileno()
    try:
        backend._accept()
        assert backend.session is not None and listener.fileno() == -1
        assert fd not in loop._readers  # the watch went with the listener
        assert not os.path.exists(path), "the socket file outlived the accept"
        backend._accept()  # a late wake-up: nothing happens
        client.close()
        with deadline(10.0):
            loop.run()  # returns when the front-end disconnects
        backend.close()
        assert backend.leaks == []
    finally:
        client.close()
        loop.close()


def test_accept_without_a_pending_connection_waits(backend: Backend) -> None:
    """A spurious wake-up of the listener neither fails nor stops listening."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("")
    listener.listen(1)
    backend.listen(listener)
    backend._accept()
    assert backend.session is None and listener.fileno() != -1
    backend.close()
    assert backend.leaks == []


def test_a_leak_at_shutdown_exits_70(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture,
                                     signals: None) -> None:
    """run() returns EX_SOFTWARE (70) when the leak check finds something."""
    def leaky_listen(self: Backend, listener: socket.socket, owned_path: str | None = None
                     ) -> None:
        real_listen(self, listener, owned_path)
        pipe.extend(os.pipe())
        signal.raise_signal(signal.SIGTERM)

    pipe: list[int] = []
    real_listen = Backend.listen
    monkeypatch.setattr(Backend, "listen", leaky_listen)
    try:
        with deadline(20.0):
            assert main(["--socket-path", str(tmp_path / "vgpu.sock"), "--gpu", "sim"]) \
                == EXIT_LEAK == 70
    finally:
        for fd in pipe:
            os.close(fd)
    assert "leak check failed: fds" in caplog.text


@pytest.mark.parametrize("argv", [
    ["--gpu", "sim", "--gpu-ids", "0x1234"],  # HostGpuError: no such GPU
    pytest.param(["--gpu", "kfd"], marks=NO_KFD),  # HostGpuError: no /dev/kfd
])
def test_a_host_gpu_that_cannot_open_exits_1(tmp_path: Path, argv: list[str],
                                             caplog: pytest.LogCaptureFixture,
                                             signals: None) -> None:
    """Start-up failures of the host GPU are logged and exit 1 (not 2, not a
    traceback), before anything listens, and leave no fd open (the event loop's)."""
    path = tmp_path / "vgpu.sock"
    before = open_fds()
    assert main(["--socket-path", str(path), *argv]) == 1
    assert open_fds() == before
    assert "host GPU:" in caplog.text and not path.exists()


@pytest.mark.parametrize("protocol", ["v3", "v5"])
def test_userptr_asked_for_by_name_needs_a_host_gpu_that_has_it(
        tmp_path: Path, protocol: str, caplog: pytest.LogCaptureFixture,
        signals: None) -> None:
    """Context isolation has no USERPTR (the simulated kernel refuses it on secondary
    processes, as KFD does): an explicit --userptr-protocol is refused at start, exit
    1 with everything closed; left out, the back-end serves without USERPTR."""
    argv = ["--gpu", "sim", "--kfd-isolation", "context"]
    with pytest.raises(ConfigError, match=rf"^--userptr-protocol {protocol}: this host GPU "
                       r"cannot register USERPTR memory \(.*Operation not supported"):
        open_host_gpu(config_from(*argv, "--userptr-protocol", protocol))
    path = tmp_path / "vgpu.sock"
    before = open_fds()
    assert main(["--socket-path", str(path), *argv, "--userptr-protocol", protocol]) == 1
    assert open_fds() == before and not path.exists()
    assert f"--userptr-protocol {protocol}: this host GPU cannot" in caplog.text
    for served in (config_from(*argv), config_from("--gpu", "sim", "--userptr-protocol",
                                                   protocol)):
        gpu = open_host_gpu(served)
        assert gpu is not None
        gpu.close()
    assert not config_from(*argv).userptr_required


def test_a_socket_path_that_cannot_be_bound_exits_1(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture,
                                                    signals: None) -> None:
    """--socket-path in a missing directory: logged, exit 1, everything closed."""
    before = open_fds()
    assert main(["--socket-path", str(tmp_path / "no" / "vgpu.sock"), "--gpu", "sim"]) == 1
    assert open_fds() == before
    assert "--socket-path" in caplog.text


def test_sim_faults_from_the_command_line_reach_the_simulated_kernel(
        caplog: pytest.LogCaptureFixture) -> None:
    """--sim-fault specs become SimFaults that the host GPU arms (and logs)."""
    with caplog.at_level(logging.INFO, logger="vgpu_backend"):
        gpu = open_host_gpu(config_from("--gpu", "sim", "--sim-fault",
                                        "MAP_MEMORY_TO_GPU:EIO:2:1"))
    assert gpu is not None
    gpu.close()
    assert "will inject 1 fault(s): MAP_MEMORY_TO_GPU:EIO" in caplog.text
