"""Back-end configuration, built from the command line and checked before anything runs.

:func:`build_config` rejects bad option combinations early with a :class:`ConfigError`
(exit status 2), as QEMU's back-end conventions ask: a back-end that cannot provide
what was requested must fail at start-up.
"""

from __future__ import annotations

import argparse
import errno as errno_module
import os
import socket
import stat
from dataclasses import dataclass, field, replace
from typing import Any

from protocol.capsets import MAX_CAPSET_ID, RESERVED_CAPSET_IDS
from protocol.limits import Limits, cli_fields
from vgpu_backend.device_state import DeviceOptions, UserptrProtocol

__all__ = ["BackendConfig", "ConfigError", "build_config"]


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
    return fault


def build_config(args: argparse.Namespace) -> BackendConfig:
    """Validate parsed arguments into a :class:`BackendConfig`."""
    if (args.socket_path is None) == (args.fd is None):
        raise ConfigError("exactly one of --socket-path and --fd is required")
    if args.fd is not None:
        try:
            mode = os.fstat(args.fd).st_mode
        except OSError as err:
            raise ConfigError(f"--fd {args.fd}: {err}") from None
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"--fd {args.fd} is not a socket")
    overrides = {limit.name: getattr(args, limit.name) for limit in cli_fields()
                 if getattr(args, limit.name) is not None}
    try:
        limits = Limits(**overrides)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    protocol = UserptrProtocol(args.userptr_protocol or ("v5" if args.blob else "off"))
    if protocol is not UserptrProtocol.OFF and not args.blob:
        raise ConfigError(f"--userptr-protocol {protocol.value}: USERPTR blobs need blob "
                          "resources (drop --no-blob)")
    if not 1 <= args.max_outputs <= limits.max_scanouts:
        raise ConfigError(f"--max-outputs must be 1..{limits.max_scanouts}")
    for name in ("userptr_capset_id", "compute_capset_id"):
        value = getattr(args, name)
        if value in RESERVED_CAPSET_IDS or not 1 <= value <= MAX_CAPSET_ID:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: must be 10..63 (1-9 "
                              "are taken by other capsets; Linux rejects ids above 63)")
    if args.userptr_capset_id == args.compute_capset_id:
        raise ConfigError("the userptr and compute capsets need different ids")
    device = DeviceOptions(
        max_outputs=args.max_outputs, default_mode=_mode(args.default_mode, limits.max_dimension),
        edid=args.edid, blob=args.blob, userptr_protocol=protocol,
        userptr_capset_id=args.userptr_capset_id, compute=args.compute,
        compute_capset_id=args.compute_capset_id)
    host_gpu: dict[str, Any] = {"gpu": args.gpu, "gpu_ids": args.gpu_ids,
                                "isolation": args.kfd_isolation,
                                "userptr_path": args.userptr_host_path,
                                "max_per_range_ranges": limits.max_per_range_ranges}
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
    return BackendConfig(args.socket_path, args.fd, args.log_level, device, limits, host_gpu)


def with_limits(config: BackendConfig, **overrides: Any) -> BackendConfig:
    """A copy of ``config`` with some limits changed (tests)."""
    return replace(config, limits=replace(config.limits, **overrides))


def listening_socket(path: str) -> socket.socket:
    """A unix stream socket listening on ``path`` (a stale socket file is replaced)."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(1)
    except OSError as err:
        sock.close()
        raise ConfigError(f"--socket-path {path}: {err}") from None
    return sock
