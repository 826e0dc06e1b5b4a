"""Command line: argument validation, ``--print-capabilities``, the listening socket."""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import signal
import socket
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.capsets import (
    DEFAULT_COMPUTE_CAPSET,
    DEFAULT_USERPTR_CAPSET,
    MAX_CAPSET_ID,
    RESERVED_CAPSET_IDS,
)
from protocol.limits import DEFAULT_LIMITS, Limits, cli_fields
from tests.unit.hang_guard import deadline
from vgpu_backend import cli
from vgpu_backend.cli import CAPABILITIES, main, parser
from vgpu_backend.config import (
    BackendConfig,
    ConfigError,
    build_config,
    listening_socket,
    with_limits,
)
from vgpu_backend.device_state import UserptrProtocol
from vgpu_backend.eventloop import EventLoop
from vgpu_backend.log_limit import RepeatLimiter
from vgpu_backend.runtime import Backend, open_host_gpu


@pytest.fixture
def connected_fd() -> Iterator[int]:
    a, b = socket.socketpair()
    yield a.fileno()
    a.close()
    b.close()


def config_from(*argv: str) -> BackendConfig:
    return build_config(parser().parse_args(list(argv)))


def test_defaults(tmp_path: Path) -> None:
    config = build_config(parser().parse_args(["--socket-path", str(tmp_path / "s")]))
    assert config.fd is None and config.socket_path == str(tmp_path / "s")
    assert config.limits == DEFAULT_LIMITS
    device = config.device
    assert (device.max_outputs, device.default_mode, device.edid, device.blob) == (
        1, (1280, 800), True, True)
    assert device.userptr_protocol is UserptrProtocol.V5 and device.compute
    assert config.log_level == "info"
    assert (device.userptr_capset_id, device.compute_capset_id) == (
        DEFAULT_USERPTR_CAPSET, DEFAULT_COMPUTE_CAPSET)
    assert config.host_gpu == {"gpu": "auto", "gpu_ids": None, "isolation": "vm",
                               "userptr_path": "auto",
                               "max_per_range_ranges": DEFAULT_LIMITS.max_per_range_ranges}
    assert config.poll_max_us == 0  # the loop never busy-polls unless asked to


def test_fd_must_be_a_socket(connected_fd: int) -> None:
    config = build_config(parser().parse_args(["--fd", str(connected_fd)]))
    assert config.fd == connected_fd and config.socket_path is None
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(ConfigError, match="not a socket"):
            config_from("--fd", str(read_end))
    finally:
        os.close(read_end)
        os.close(write_end)
    with pytest.raises(ConfigError, match="--fd"):
        config_from("--fd", str(write_end))  # closed now


@pytest.mark.parametrize("argv, message", [
    ([], "exactly one"),
    (["--socket-path", "s", "--fd", "0"], "exactly one"),
    (["--socket-path", "s", "--no-blob", "--userptr-protocol", "v5"], "USERPTR blobs need"),
    (["--socket-path", "s", "--no-blob", "--userptr-protocol", "v3"], "USERPTR blobs need"),
    (["--socket-path", "s", "--max-outputs", "0"], "max-outputs"),
    (["--socket-path", "s", "--max-outputs", "17"], "max-outputs"),
    (["--socket-path", "s", "--userptr-capset-id", "0"], "userptr-capset-id"),
    (["--socket-path", "s", "--compute-capset-id", "0x1_0000_0000"], "compute-capset-id"),
    (["--socket-path", "s", "--compute-capset-id", str(MAX_CAPSET_ID + 1)],
     "compute-capset-id"),
    (["--socket-path", "s", "--userptr-capset-id", str(DEFAULT_COMPUTE_CAPSET)],
     "different ids"),
    (["--socket-path", "s", "--default-mode", "1280"], "WIDTHxHEIGHT"),
    (["--socket-path", "s", "--default-mode", "0x800"], "out of range"),
    (["--socket-path", "s", "--default-mode", "16385x10"], "out of range"),
    (["--socket-path", "s", "--default-mode", "1280x0"], "out of range"),
    (["--socket-path", "s", "--default-mode", "10x16385"], "out of range"),
    (["--socket-path", "s", "--default-mode", "1280x800x2"], "WIDTHxHEIGHT"),
    (["--socket-path", "s", "--gpu", "kfd", "--sim-gpus", "2"], "need --gpu sim"),
    (["--socket-path", "s", "--gpu", "kfd", "--sim-kfd-minor", "18"], "need --gpu sim"),
    (["--socket-path", "s", "--gpu", "kfd", "--sim-pre-batch"], "need --gpu sim"),
    (["--socket-path", "s", "--gpu", "kfd", "--sim-fault", "MAP_MEMORY_TO_GPU:EIO"],
     "need --gpu sim"),
    (["--socket-path", "s", "--sim-fault", "MAP_MEMORY_TO_GPU"], "expected IOCTL:ERRNO"),
    (["--socket-path", "s", "--sim-fault", "MAP_MEMORY_TO_GPU:EIO:1:0:0:9"],
     "expected IOCTL:ERRNO"),
    (["--socket-path", "s", "--sim-fault", "MAP_MEMORY_TO_GPU:ENOSUCHERRNO"], "unknown errno"),
    (["--socket-path", "s", "--sim-fault", "MAP_MEMORY_TO_GPU:errorcode"], "unknown errno"),
    (["--socket-path", "s", "--sim-fault", "MAP_MEMORY_TO_GPU:EIO:two"], "are numbers"),
    (["--socket-path", "s", "--max-backing-entries", "0"],
     "^--max-backing-entries must be a positive"),
    (["--socket-path", "s", "--max-userptr-entries", str(1 << 32)],
     "^--max-userptr-entries must fit the 32-bit nr_entries field"),
    (["--socket-path", "s", "--max-submit-bytes", "4G"],
     r"^--max-submit-bytes must fit the compute capset's 32-bit max_submit_bytes .*"
     r"\(at most 4294967295\)$"),
    (["--socket-path", "s", "--max-userptr-bytes", "16777216T"],
     r"^--max-userptr-bytes must fit the userptr capset's 64-bit max_bytes "
     r"\(at most 18446744073709551615\)$"),
    (["--socket-path", "s", "--display-timeout", "-1"], "^--display-timeout must be"),
    (["--socket-path", "s", "--poll-max-us", "-1"],
     r"^--poll-max-us -1: must be 0\.\.1000000 \(0: never poll\)$"),
    (["--socket-path", "s", "--poll-max-us", "1000001"], "^--poll-max-us 1000001: must be"),
    (["--socket-path", "s", "--sim-gpus", "0"], "^--sim-gpus must be 1..64, not 0"),
    (["--socket-path", "s", "--sim-kfd-minor", "-1"], "^--sim-kfd-minor must be"),
    (["--socket-path", "s", "--sim-fault", "FOO:EINTR"],
     "^--sim-fault 'FOO:EINTR': unknown ioctl 'FOO'"),
    (["--socket-path", "s", "--sim-fault", "MAP_MEMORY_TO_GPU:EINTR:0"],
     "^--sim-fault 'MAP_MEMORY_TO_GPU:EINTR:0': count must be"),
    (["--socket-path", "s", "--sim-fault", "MAP_MEMORY_TO_GPU:EINTR:1:0:1"],
     "^--sim-fault: a MAP_MEMORY_TO_GPU fault on device 1: the simulated kernel has 1 GPU"),
    (["--socket-path", "s", "--sim-gpus", "2", "--sim-fault",
      "MAP_MEMORY_TO_GPU:EINTR:1:0:-1"], "fault on device -1"),
    (["--socket-path", "s", "--kfd-isolation", "context", "--userptr-host-path", "batch"],
     "^--userptr-host-path 'batch' with --kfd-isolation 'context'"),
    (["--socket-path", "s", "--gpu-ids", "0"],
     "^--gpu-ids must be non-zero 32-bit KFD GPU ids .* not 0x0$"),
    (["--socket-path", "s", "--gpu-ids", "0x5a3c,0x5a3c"],
     "^--gpu-ids lists a GPU twice: 0x5a3c, 0x5a3c$"),
    (["--socket-path", "s", "--no-blob", "--no-compute", "--gpu", "kfd"],
     "^--gpu: no host GPU is used"),
    (["--socket-path", "s", "--no-blob", "--no-compute", "--sim-kfd-minor", "0"],
     "^--sim-kfd-minor: no host GPU is used"),
    (["--socket-path", "s", "--no-blob", "--no-compute", "--kfd-isolation", "context",
      "--userptr-host-path", "batch"],
     "^--kfd-isolation, --userptr-host-path: no host GPU is used"),
    (["--socket-path", "s", "--userptr-protocol", "off", "--no-compute", "--gpu-ids", "1",
      "--kfd-isolation", "vm", "--sim-pre-batch"],
     "^--gpu-ids, --kfd-isolation, --sim-pre-batch: no host GPU is used"),
    (["--socket-path", "s", "--no-blob", "--no-compute", "--userptr-host-path", "alias",
      "--sim-gpus", "2", "--sim-kfd-minor", "19", "--sim-fault", "MAP_MEMORY_TO_GPU:EIO"],
     "^--userptr-host-path, --sim-gpus, --sim-kfd-minor, --sim-fault: no host GPU"),
])
def test_bad_combinations_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from(*argv)


@pytest.mark.parametrize("capset_id", sorted(RESERVED_CAPSET_IDS))
@pytest.mark.parametrize("option", ["--userptr-capset-id", "--compute-capset-id"])
def test_reserved_capset_ids_are_refused(option: str, capset_id: int) -> None:
    with pytest.raises(ConfigError, match=option):
        config_from("--socket-path", "s", option, str(capset_id))


def test_no_blob_turns_userptr_off_unless_asked_for() -> None:
    assert config_from("--socket-path", "s", "--no-blob").device.userptr_protocol \
        is UserptrProtocol.OFF
    assert config_from("--socket-path", "s", "--userptr-protocol", "v3").device \
        .userptr_protocol is UserptrProtocol.V3


def test_no_blob_with_userptr_off_is_fine() -> None:
    config = build_config(parser().parse_args(
        ["--socket-path", "s", "--no-blob", "--userptr-protocol", "off", "--no-edid",
         "--default-mode", "1024X768", "--max-outputs", "16", "--no-compute",
         "--log-level", "debug"]))
    assert (config.device.blob, config.device.edid, config.device.compute) == (
        False, False, False)
    assert config.log_level == "debug"
    assert config.device.default_mode == (1024, 768)
    assert config.device.max_outputs == 16


def test_capset_ids_are_taken_as_given() -> None:
    free_id = max(RESERVED_CAPSET_IDS) + 1
    device = config_from("--socket-path", "s", "--userptr-capset-id", hex(free_id),
                         "--compute-capset-id", str(MAX_CAPSET_ID)).device
    assert (device.userptr_capset_id, device.compute_capset_id) == (free_id, MAX_CAPSET_ID)
    device = config_from("--socket-path", "s").device
    assert (device.userptr_capset_id, device.compute_capset_id) == (
        DEFAULT_USERPTR_CAPSET, DEFAULT_COMPUTE_CAPSET)


@pytest.mark.parametrize("argv", [
    ["--no-compute", "--userptr-capset-id", str(DEFAULT_COMPUTE_CAPSET)],
    ["--userptr-protocol", "off", "--compute-capset-id", str(DEFAULT_USERPTR_CAPSET)],
])
def test_one_capset_may_take_the_other_ones_default_id(argv: list[str]) -> None:
    """The ids must differ only when both capsets are published."""
    config_from("--socket-path", "s", *argv)


@pytest.mark.parametrize("feature_off, options", [
    (["--no-compute"], ["--compute-capset-id", "30"]),
    (["--no-compute"], ["--compute-workers", "4", "--compute-job-timeout", "5"]),
    (["--no-compute"], ["--max-submit-bytes", "64k"]),
    (["--no-compute"], ["--max-host-buffers", "1G"]),
    (["--no-compute"], ["--max-compute-staging", "1G"]),
    (["--no-compute"], ["--max-queued-submit-bytes", "1G"]),
    (["--no-blob"], ["--userptr-capset-id", "30"]),
    (["--no-blob"], ["--max-blob-bytes", "1G"]),
    (["--userptr-protocol", "off"], ["--max-userptr-bytes", "1G"]),
    (["--userptr-protocol", "off"], ["--max-userptr-entries", "100"]),
    (["--userptr-protocol", "off"], ["--userptr-capset-id", "30"]),
    (["--no-blob", "--no-compute"], ["--max-contexts", "8", "--max-per-range-ranges", "9"]),
])
def test_options_of_a_feature_that_is_off_are_refused(feature_off: list[str],
                                                      options: list[str]) -> None:
    """They would do nothing: the operator hears so at start-up instead."""
    given = ", ".join(option for option in options if option.startswith("--"))
    with pytest.raises(ConfigError, match=f"^{given}: .* off .*nothing"):
        config_from("--socket-path", "s", *feature_off, *options)
    config_from("--socket-path", "s", *options)  # with the feature on, they are fine


@pytest.mark.parametrize("machine", ["aarch64", "riscv64", "ppc64le", "i686", ""])
def test_hosts_without_x86_store_order_are_refused(monkeypatch: pytest.MonkeyPatch,
                                                   machine: str) -> None:
    """A used entry must be visible before its index: CPython has no fence for it."""
    monkeypatch.setattr("platform.machine", lambda: machine)
    with pytest.raises(ConfigError, match="runs on x86-64 only"):
        config_from("--socket-path", "s")
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    config_from("--socket-path", "s")


def test_a_socket_path_longer_than_sun_path_is_refused() -> None:
    """108 bytes with the NUL (struct sockaddr_un); found before anything starts."""
    config_from("--socket-path", "/" + "s" * 106)
    with pytest.raises(ConfigError, match="longer than a unix socket address"):
        config_from("--socket-path", "/" + "s" * 107)
    with pytest.raises(ConfigError, match="longer than"):  # bytes, not characters
        config_from("--socket-path", "/" + "\u00e9" * 54)


def test_abbreviated_options_are_not_taken(capsys: pytest.CaptureFixture[str]) -> None:
    """A launcher's abbreviation would change meaning when an option is added."""
    with pytest.raises(SystemExit) as info:
        parser().parse_args(["--sock", "s"])
    assert info.value.code == 2


def test_the_largest_default_mode() -> None:
    """Width and height may both be ``max_dimension``."""
    largest = DEFAULT_LIMITS.max_dimension
    assert config_from("--socket-path", "s", "--default-mode", f"{largest}x{largest}"
                       ).device.default_mode == (largest, largest)


@pytest.mark.parametrize("value", [0, 1, 500, 1_000_000])
def test_the_polling_limit_is_taken_as_given(value: int) -> None:
    assert config_from("--socket-path", "s", "--poll-max-us", str(value)).poll_max_us == value


def test_host_gpu_options_are_passed_on() -> None:
    """Every host-GPU and simulator option lands in ``host_gpu``; a --sim-fault is parsed
    into SimFault's keywords (COUNT, AFTER, DEVICE in that order; the errno as a
    number)."""
    config = config_from(
        "--socket-path", "s", "--gpu", "sim", "--gpu-ids", "0x5a3c,0x6b4d",
        "--kfd-isolation", "vm", "--userptr-host-path", "alias", "--sim-gpus", "2",
        "--sim-kfd-minor", "18", "--sim-pre-batch", "--sim-fault", "MAP_MEMORY_TO_GPU:EINTR",
        "--sim-fault", "UNMAP_MEMORY_FROM_GPU:EIO:2:3:1")
    assert config.host_gpu == {
        "gpu": "sim", "gpu_ids": [0x5A3C, 0x6B4D], "isolation": "vm",
        "userptr_path": "alias", "max_per_range_ranges": DEFAULT_LIMITS.max_per_range_ranges,
        "sim": {"gpu_count": 2, "kfd_minor": 18, "batch_userptr": False},
        "sim_faults": [{"ioctl": "MAP_MEMORY_TO_GPU", "errno": errno.EINTR},
                       {"ioctl": "UNMAP_MEMORY_FROM_GPU", "errno": errno.EIO, "count": 2,
                        "after": 3, "device_index": 1}]}


def test_the_sim_options_reach_the_simulated_kernel() -> None:
    """--sim-gpus, --sim-kfd-minor and --sim-pre-batch shape the host GPU that opens."""
    config = config_from("--socket-path", "s", "--gpu", "sim", "--sim-gpus", "3",
                         "--sim-kfd-minor", "18", "--sim-pre-batch")
    gpu = open_host_gpu(config)
    assert gpu is not None
    try:
        info = gpu.info()
        assert (len(info.gpu_ids), info.kfd_version, info.batch_supported) == (
            3, (1, 18), False)
    finally:
        gpu.close()


def test_every_limit_option_overrides_its_limit() -> None:
    argv = ["--socket-path", "s"]
    expected = {}
    for limit in cli_fields():
        value = getattr(DEFAULT_LIMITS, limit.name) + 1
        argv += [f"--{limit.option}", str(value)]
        expected[limit.name] = value
    config = build_config(parser().parse_args(argv))
    assert {name: getattr(config.limits, name) for name in expected} == expected
    shrunk = with_limits(config, max_resources=3)
    assert shrunk.limits.max_resources == 3 and config.limits.max_resources != 3


def test_size_limits_take_binary_suffixes(capsys: pytest.CaptureFixture[str]) -> None:
    config = config_from("--socket-path", "s", "--max-hostmem", "1G", "--max-blob-bytes",
                         "512MiB", "--max-submit-bytes", "65536", "--display-timeout", "0.5")
    assert (config.limits.max_hostmem, config.limits.max_blob_bytes,
            config.limits.max_submit_bytes, config.limits.display_reply_timeout) == (
        1 << 30, 512 << 20, 65536, 0.5)
    for option, value, why in (("--max-hostmem", "1.5x", "not a size: '1.5x'"),
                               ("--max-hostmem", "0.3K", "not a whole number of bytes"),
                               ("--max-resources", "1.5", "not a whole number: '1.5'"),
                               ("--display-timeout", "soon", "not a number of seconds")):
        with pytest.raises(SystemExit) as info:
            parser().parse_args(["--socket-path", "s", option, value])
        assert info.value.code == 2
        assert f"argument {option}: {why}" in capsys.readouterr().err
    assert main(["--socket-path", "s", "--display-timeout", "inf"]) == 2
    assert "positive, finite" in capsys.readouterr().err


def test_the_per_range_limit_reaches_the_host_gpu() -> None:
    """A host-GPU limit is not only parsed: the host GPU enforces the option's value."""
    config = config_from("--socket-path", "s", "--gpu", "sim", "--userptr-host-path",
                         "per-range", "--max-per-range-ranges", "8")
    gpu = open_host_gpu(config)
    assert gpu is not None
    try:
        assert gpu.info().max_ranges == 8
    finally:
        gpu.close()


def test_print_capabilities_ignores_other_options(capsys: pytest.CaptureFixture[str]) -> None:
    """QEMU's convention: other options and arguments are ignored (also unknown ones)."""
    assert main(["--bogus", "--print-capabilities", "--socket-path", "a", "--fd", "99",
                 "--max-outputs", "99", "extra"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {"type": "gpu", "features": []} == CAPABILITIES


def test_bad_options_exit_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--socket-path", "s", "--max-outputs", "0"]) == 2
    assert "vgpu-backend: --max-outputs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--gpu", "nonsense"])
    assert info.value.code == 2


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == "vgpu-backend 0.1.0"


def test_help_lists_the_limit_options() -> None:
    text = parser().format_help()
    for limit in cli_fields():
        assert f"--{limit.option} {limit.metavar}" in text


def test_listening_socket_replaces_a_stale_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "vgpu.sock")
    first = listening_socket(path)
    first.close()  # the socket file stays behind
    second = listening_socket(path)
    try:
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        client.close()
    finally:
        second.close()


def test_listening_socket_does_not_remove_other_files(tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("keep me")
    with pytest.raises(ConfigError, match="--socket-path"):
        listening_socket(str(path))
    assert path.read_text() == "keep me"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_sigterm_before_the_loop_runs_still_ends_the_back_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: signal.Signals) -> None:
    """SIGTERM (or SIGINT) between installing the handlers and starting the loop (the
    start-up window) is not lost: the back-end shuts down instead of serving on."""
    def signalled_while_starting(self: Backend, listener: socket.socket,
                                 owned_path: str | None = None) -> None:
        real_listen(self, listener, owned_path)
        signal.raise_signal(signum)

    real_listen = Backend.listen
    monkeypatch.setattr(Backend, "listen", signalled_while_starting)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with deadline(20.0):
            assert main(["--socket-path", str(tmp_path / "vgpu.sock")]) == 0
    finally:
        for installed, handler in handlers.items():
            signal.signal(installed, handler)



def test_the_log_options_set_level_and_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    """main() configures logging with --log-level and --log-rate before running."""
    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(cli, "_configure_logging",
                        lambda level, limits: calls.append((level, limits.log_rate)))
    monkeypatch.setattr(cli, "run", lambda config: 0)
    assert main(["--socket-path", "s", "--log-level", "warning", "--log-rate", "3"]) == 0
    assert main(["--socket-path", "s"]) == 0
    assert calls == [("warning", 3), ("info", 20)]


@pytest.mark.parametrize("level", ["debug", "info", "error"])
def test_logging_goes_to_stderr_at_the_chosen_level(monkeypatch: pytest.MonkeyPatch,
                                                    level: str) -> None:
    """The root logger gets the level and one stderr handler (stdout stays clean),
    rate-limited per line of code except at debug."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    limiter = cli._configure_logging(level, Limits(log_rate=7, log_burst_seconds=2))
    [handler] = root.handlers
    assert root.level == getattr(logging, level.upper())
    assert isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr
    if level == "debug":
        assert limiter is None and handler.filters == []
    else:
        assert isinstance(limiter, RepeatLimiter) and handler.filters == [limiter]
        assert (limiter.rate, limiter.burst) == (7, 14)


def test_logging_set_up_by_the_host_program_is_left_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With handlers already on the root logger (main() called in process), nothing is
    added to them."""
    root = logging.getLogger()
    theirs = logging.NullHandler()
    monkeypatch.setattr(root, "handlers", [theirs])
    monkeypatch.setattr(root, "level", root.level)
    assert cli._configure_logging("info", Limits(log_rate=7)) is None
    assert root.handlers == [theirs] and theirs.filters == []


def test_suppressed_lines_are_reported_when_main_returns(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """main() has the limiter name what it still holds back once run() returns."""
    limiter = RepeatLimiter(1, clock=lambda: 0.0)  # a burst of 5, never refilled
    monkeypatch.setattr(cli, "_configure_logging", lambda level, limits: limiter)

    def run(config: object) -> int:
        for _ in range(10):
            limiter.filter(logging.makeLogRecord({"msg": "again %d", "args": (1,),
                                                  "name": "x", "lineno": 3,
                                                  "levelno": logging.INFO}))
        return 0

    monkeypatch.setattr(cli, "run", run)
    with caplog.at_level(logging.INFO, logger="vgpu_backend"):
        assert main(["--socket-path", "s"]) == 0
    assert "5 from x:3 (last: 'again 1')" in caplog.text


def test_a_failed_bind_closes_its_socket(tmp_path: Path) -> None:
    """The socket of a --socket-path that cannot be bound is closed, not left to the
    garbage collector (which would warn about it)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ConfigError, match="--socket-path"):
            listening_socket(str(tmp_path / "no" / "vgpu.sock"))
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_the_event_loop_gets_the_polling_limit(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    """``--poll-max-us`` reaches the loop (in seconds); the run then fails early on a
    socket path in a missing directory."""
    made: list[float] = []

    class RecordingLoop(EventLoop):
        def __init__(self, poll_max: float = 0.0) -> None:
            made.append(poll_max)
            super().__init__(poll_max)

    monkeypatch.setattr(cli, "EventLoop", RecordingLoop)
    path = str(tmp_path / "missing" / "s")
    assert cli.run(config_from("--socket-path", path, "--poll-max-us", "250",
                               "--gpu", "sim")) == 1
    assert made == [pytest.approx(250e-6)]
