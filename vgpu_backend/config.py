"""Back-end configuration, built from the command line and checked before anything runs.

:func:`build_config` rejects bad option combinations early with a :class:`ConfigError`
(exit status 2), as QEMU's back-end conventions ask: a back-end that cannot provide
what was requested must fail at start-up.
"""

from __future__ import annotations

import argparse
import errno as errno_module
import os
import platform
import re
import socket
import stat
from dataclasses import dataclass, field, replace
from typing import Any

from protocol.capsets import (
    DEFAULT_COMPUTE_CAPSET,
    DEFAULT_USERPTR_CAPSET,
    MAX_CAPSET_ID,
    RESERVED_CAPSET_IDS,
)
from protocol.limits import Limits, cli_fields
from vgpu_backend.device_state import DeviceOptions, UserptrProtocol

__all__ = ["MAX_POLL_US", "BackendConfig", "ConfigError", "build_config", "host_gpu_error"]

#: the longest busy-poll an operator may ask for (1 s: past it, a CPU is simply taken)
MAX_POLL_US = 1_000_000


class ConfigError(Exception):
    """The options cannot work together (or with this machine)."""


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """Everything the back-end needs to start."""

    socket_path: str | None
    fd: int | None
    log_level: str
    device: DeviceOptions
    limits: Limits
    #: options for the host GPU layer (see ``vgpu_backend.hostgpu.factory``)
    host_gpu: dict[str, Any] = field(default_factory=dict)
    #: the event loop's longest busy-poll before it sleeps, in microseconds (0: never)
    poll_max_us: int = 0
    #: USERPTR was asked for by name (``--userptr-protocol v3|v5``): a host GPU that
    #: cannot register USERPTR memory is refused at start instead of answering every
    #: USERPTR blob with an error
    userptr_required: bool = False


def _mode(text: str, max_dimension: int) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--default-mode {text!r}: expected WIDTHxHEIGHT") from None
    if not (1 <= width <= max_dimension and 1 <= height <= max_dimension):
        raise ConfigError(f"--default-mode {text}: out of range (1..{max_dimension})")
    return width, height


def _sim_fault(spec: str) -> dict[str, Any]:
    """``IOCTL:ERRNO[:COUNT[:AFTER[:DEVICE]]]`` -> SimFault keyword arguments."""
    parts = spec.split(":")
    if not 2 <= len(parts) <= 5:
        raise ConfigError(f"--sim-fault {spec!r}: expected IOCTL:ERRNO[:COUNT[:AFTER[:DEVICE]]]")
    code = getattr(errno_module, parts[1], None)
    if not isinstance(code, int):
        raise ConfigError(f"--sim-fault {spec!r}: unknown errno {parts[1]!r}")
    try:
        numbers = [int(p) for p in parts[2:]]
    except ValueError:
        raise ConfigError(f"--sim-fault {spec!r}: COUNT, AFTER and DEVICE are numbers") from None
    fault: dict[str, Any] = {"ioctl": parts[0], "errno": code}
    for key, value in zip(("count", "after", "device_index"), numbers, strict=False):
        fault[key] = value
    from vgpu_backend.hostgpu.sim_config import SimFault
    try:
        SimFault(**fault)
    except ValueError as err:
        raise ConfigError(f"--sim-fault {spec!r}: {err}") from None
    return fault


#: how HostGpuOptions and the simulator name what the options set
_HOST_GPU_NAMES = {"sim gpu_count": "--sim-gpus", "sim kfd_minor": "--sim-kfd-minor",
                   "gpu_ids": "--gpu-ids", "userptr_path": "--userptr-host-path",
                   "isolation": "--kfd-isolation", "sim options": "--sim-* options",
                   "sim_faults": "--sim-fault", "gpu": "--gpu",
                   "userptr path": "--userptr-host-path"}


#: options that only act on one feature (argparse destinations), refused without it
_FEATURE_OPTIONS = {
    "compute": ("compute is off (--no-compute)", (
        "compute_capset_id", "compute_workers", "compute_job_timeout", "max_submit_bytes",
        "max_host_buffers", "max_compute_staging", "max_queued_submit_bytes")),
    "userptr": ("USERPTR is off (--userptr-protocol off, or --no-blob)", (
        "userptr_capset_id", "max_userptr_entries", "max_userptr_bytes")),
    "blob": ("blob resources are off (--no-blob)", ("max_blob_bytes",)),
    # the host-GPU options, and limits of the host GPU and of contexts
    "userptr_or_compute": ("no host GPU is used and no context type exists (USERPTR is "
                           "off and compute is off)", (
        "gpu", "gpu_ids", "kfd_isolation", "userptr_host_path", "sim_gpus", "sim_kfd_minor",
        "sim_fault", "sim_pre_batch", "max_contexts", "max_per_range_ranges")),
}
#: the SUN_PATH size of struct sockaddr_un, with its terminating NUL
_SUN_PATH = 108


def _option(dest: str) -> str:
    """The option that sets argparse destination ``dest``."""
    return "--" + next((limit.option for limit in cli_fields() if limit.name == dest),
                       dest.replace("_", "-"))


def _refuse_unused_options(args: argparse.Namespace, on: dict[str, bool]) -> None:
    """An option that sets something of a feature that is off would do nothing: refuse
    it rather than let an operator believe it acts."""
    for feature, (why, dests) in _FEATURE_OPTIONS.items():
        given = [_option(dest) for dest in dests
                 if (value := getattr(args, dest)) is not None and value is not False
                 and value != []]  # store_true and append options: False, []
        if given and not on[feature]:
            raise ConfigError(f"{', '.join(given)}: {why}, so "
                              f"{'it does' if len(given) == 1 else 'they do'} nothing")


def _with_option_names(message: str, names: dict[str, str]) -> str:
    """``message`` with internal field names replaced by the options that set them."""
    pattern = "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
    return re.sub(rf"(?<![\w-])({pattern})(?![\w-])", lambda m: names[m.group(1)], message)


def host_gpu_error(err: Exception) -> ConfigError:
    """A host GPU that cannot open as configured, in the options' names."""
    return ConfigError(f"host GPU: {_with_option_names(str(err), _HOST_GPU_NAMES)}")


def _host_gpu_options(args: argparse.Namespace, max_per_range_ranges: int) -> dict[str, Any]:
    """The keywords of ``hostgpu.factory.HostGpuOptions``, checked by building it now
    (what only the kernel can tell is checked when the host GPU opens)."""
    host_gpu: dict[str, Any] = {"gpu": args.gpu or "auto", "gpu_ids": args.gpu_ids,
                                "isolation": args.kfd_isolation or "vm",
                                "userptr_path": args.userptr_host_path or "auto",
                                "max_per_range_ranges": max_per_range_ranges}
    sim: dict[str, Any] = {}
    if args.sim_gpus is not None:
        sim["gpu_count"] = args.sim_gpus
    if args.sim_kfd_minor is not None:
        sim["kfd_minor"] = args.sim_kfd_minor
    if args.sim_pre_batch:
        sim["batch_userptr"] = False
    faults = [_sim_fault(spec) for spec in args.sim_fault]
    if faults:
        host_gpu["sim_faults"] = faults
    if (sim or faults) and args.gpu == "kfd":
        raise ConfigError("--sim-* options need --gpu sim (or auto without /dev/kfd)")
    if sim:
        host_gpu["sim"] = sim
    from vgpu_backend.hostgpu.factory import host_gpu_options
    try:
        host_gpu_options(host_gpu)
    except ValueError as err:
        raise ConfigError(_with_option_names(str(err), _HOST_GPU_NAMES)) from None
    return host_gpu


def _check_inherited_socket(fd: int) -> None:
    """``--fd`` must be a unix stream socket (connected, or listening)."""
    sock = socket.socket(fileno=fd)
    try:
        family, kind = sock.family, sock.type
        if family != socket.AF_UNIX or kind != socket.SOCK_STREAM:
            raise ConfigError(f"--fd {fd}: not a unix stream socket ("
                              f"{getattr(family, 'name', family)}, {getattr(kind, 'name', kind)})")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            try:
                sock.getpeername()  # an unnamed peer ('') is a peer
            except OSError:  # ENOTCONN
                raise ConfigError(f"--fd {fd}: a unix socket neither connected nor "
                                  "listening") from None
    finally:
        sock.detach()  # the fd stays open for the back-end


#: hosts whose store order makes a used entry visible before its index (CPython has
#: no store fence)
_TSO_MACHINES = ("x86_64", "amd64")


def build_config(args: argparse.Namespace) -> BackendConfig:
    """Validate parsed arguments into a :class:`BackendConfig`."""
    if platform.machine().lower() not in _TSO_MACHINES:
        raise ConfigError(f"this is a {platform.machine() or 'unknown'} host: vgpu-backend "
                          "runs on x86-64 only (its virtqueues rely on x86's store order)")
    if (args.socket_path is None) == (args.fd is None):
        raise ConfigError("exactly one of --socket-path and --fd is required")
    if args.socket_path == "":
        raise ConfigError("--socket-path is empty")
    if args.socket_path is not None and len(os.fsencode(args.socket_path)) >= _SUN_PATH:
        raise ConfigError(f"--socket-path {args.socket_path}: longer than a unix socket "
                          f"address takes ({_SUN_PATH - 1} bytes)")
    if args.fd is not None:
        try:
            mode = os.fstat(args.fd).st_mode
        except (OSError, OverflowError) as err:  # OverflowError: beyond a C int
            raise ConfigError(f"--fd {args.fd}: {err}") from None
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"--fd {args.fd} is not a socket")
        _check_inherited_socket(args.fd)
    overrides = {limit.name: getattr(args, limit.name) for limit in cli_fields()
                 if getattr(args, limit.name) is not None}
    try:
        limits = Limits(**overrides)
    except ValueError as err:
        raise ConfigError(_with_option_names(str(err), {
            f"limit {limit.name}": f"--{limit.option}" for limit in cli_fields()})) from None
    protocol = UserptrProtocol(args.userptr_protocol or ("v5" if args.blob else "off"))
    if protocol is not UserptrProtocol.OFF and not args.blob:
        raise ConfigError(f"--userptr-protocol {protocol.value}: USERPTR blobs need blob "
                          "resources (drop --no-blob)")
    if not 1 <= args.max_outputs <= limits.max_scanouts:
        raise ConfigError(f"--max-outputs must be 1..{limits.max_scanouts}")
    userptr = protocol is not UserptrProtocol.OFF
    _refuse_unused_options(args, {"compute": args.compute, "blob": args.blob,
                                  "userptr": userptr, "userptr_or_compute": userptr
                                  or args.compute})
    capset_ids = {"userptr_capset_id": DEFAULT_USERPTR_CAPSET,
                  "compute_capset_id": DEFAULT_COMPUTE_CAPSET}
    for name in capset_ids:
        value = getattr(args, name)
        if value is None:
            continue
        if value in RESERVED_CAPSET_IDS or not 1 <= value <= MAX_CAPSET_ID:
            raise ConfigError(f"{_option(name)} {value}: must be 10..63 (1-9 "
                              "are taken by other capsets; Linux rejects ids above 63)")
        capset_ids[name] = value
    if args.compute and protocol is not UserptrProtocol.OFF and \
            capset_ids["userptr_capset_id"] == capset_ids["compute_capset_id"]:
        raise ConfigError(f"--userptr-capset-id and --compute-capset-id: both capsets are "
                          f"published, and need different ids (not both "
                          f"{capset_ids['compute_capset_id']})")
    device = DeviceOptions(
        max_outputs=args.max_outputs, default_mode=_mode(args.default_mode, limits.max_dimension),
        edid=args.edid, blob=args.blob, userptr_protocol=protocol,
        userptr_capset_id=capset_ids["userptr_capset_id"], compute=args.compute,
        compute_capset_id=capset_ids["compute_capset_id"])
    host_gpu = _host_gpu_options(args, limits.max_per_range_ranges)
    if not 0 <= args.poll_max_us <= MAX_POLL_US:
        raise ConfigError(f"--poll-max-us {args.poll_max_us}: must be 0..{MAX_POLL_US} "
                          "(0: never poll)")
    return BackendConfig(args.socket_path, args.fd, args.log_level, device, limits, host_gpu,
                         args.poll_max_us, userptr_required=args.userptr_protocol is not None
                         and protocol is not UserptrProtocol.OFF)


def with_limits(config: BackendConfig, **overrides: Any) -> BackendConfig:
    """A copy of ``config`` with some limits changed (tests)."""
    return replace(config, limits=replace(config.limits, **overrides))


def check_socket_path(path: str) -> bool:
    """Whether a socket file is at ``path`` that nothing listens on any more (left by a
    back-end that is gone: :func:`listening_socket` replaces it).

    :raise ConfigError: the directory is missing, or something other than a socket is
        there, or something listens on it (e.g. another back-end).
    """
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise ConfigError(f"--socket-path {path}: no directory {directory}")
    try:
        target = os.stat(path)
    except FileNotFoundError:
        return False
    except OSError as err:
        raise ConfigError(f"--socket-path {path}: {err.strerror or err}") from None
    if not stat.S_ISSOCK(target.st_mode):
        raise ConfigError(f"--socket-path {path}: exists and is not a socket")
    if _someone_listens_on(target):
        raise ConfigError(f"--socket-path {path}: in use (a process listens on it, "
                          "e.g. another back-end)")
    return True


def _someone_listens_on(target: os.stat_result) -> bool:
    """A listening unix socket is bound to the socket file ``target`` (compared by file
    identity: the same file may be reached by other names, e.g. /var/run and /run)."""
    for bound in _listening_unix_paths():
        if bound.startswith("@"):  # abstract: no file
            continue
        try:
            other = os.stat(bound)
        except OSError:  # gone, or relative to another process's directory
            continue
        if (other.st_dev, other.st_ino) == (target.st_dev, target.st_ino):
            return True
    return False


def listening_socket(path: str) -> socket.socket:
    """A unix stream socket listening on ``path`` (see :func:`check_socket_path`)."""
    if check_socket_path(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(1)
    except OSError as err:
        sock.close()
        raise ConfigError(f"--socket-path {path}: {err.strerror or err}") from None
    return sock


def _listening_unix_paths() -> set[str]:
    """The paths listening unix sockets of this network namespace are bound to, as they
    were bound (``/proc/net/unix``; a probe connection would be taken for QEMU by a
    back-end that waits for it)."""
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as table:
            lines = table.read().splitlines()[1:]
    except OSError:
        return set()
    paths = set()
    for line in lines:  # Num RefCount Protocol Flags Type St Inode Path
        fields = line.split(None, 7)
        if len(fields) == 8 and int(fields[3], 16) & _SO_ACCEPTCON:
            paths.add(fields[7])
    return paths


#: ``__SO_ACCEPTCON`` in /proc/net/unix's Flags: the socket listens
_SO_ACCEPTCON = 1 << 16
