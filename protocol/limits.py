"""Every numeric limit of the device, in one place.

Each field documents itself; fields with a ``cli`` name in their metadata get a
command-line override (``vgpu-backend --help`` lists them).  Every guest-controlled
count or size is checked against these and against the bytes actually present before
anything is allocated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import Any, NamedTuple

__all__ = ["DEFAULT_LIMITS", "CliLimit", "Limits", "cli_fields", "format_size", "parse_count",
           "parse_seconds", "parse_size"]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

_UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)


def _limit(default: int | float, doc: str, cli: str | None = None, *,
           unit: str = "count") -> Any:
    """A limit field; ``unit`` is "count", "bytes" or "seconds"."""
    return field(default=default, metadata={"doc": doc, "cli": cli, "unit": unit})


def parse_size(text: str) -> int:
    """A byte count as an operator writes it, with QEMU's binary suffixes: ``4096``,
    ``256M``, ``16G``, ``1.5GiB``, ``64k``.  ValueError unless it is a whole number of
    bytes."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a size: {text!r} (a number of bytes, or with K, M, G, T)")
    number, unit = match.groups()
    size = Decimal(number) * _UNITS[unit.upper()]
    if size != size.to_integral_value():
        raise ValueError(f"not a whole number of bytes: {text!r}")
    return int(size)


def parse_count(text: str) -> int:
    """A whole number, as an operator writes it.  ValueError saying so otherwise."""
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"not a whole number: {text!r}") from None


def parse_seconds(text: str) -> float:
    """A number of seconds, as an operator writes it.  ValueError saying so otherwise."""
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"not a number of seconds: {text!r}") from None


def format_size(size: int) -> str:
    """``size`` in the largest binary unit that divides it: ``16 GiB``, ``4096``."""
    for suffix, unit in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {suffix}"
    return str(size)


#: limits that travel in a wire field: its width, and what it is
_WIRE_FIELDS = {
    "max_backing_entries": (32, "the 32-bit nr_entries field"),
    "max_userptr_entries": (32, "the 32-bit nr_entries field"),
    "max_userptr_bytes": (64, "the userptr capset's 64-bit max_bytes"),
    "max_submit_bytes": (32, "the compute capset's 32-bit max_submit_bytes (SUBMIT_3D's "
                             "size is 32-bit too)"),
}


@dataclass(frozen=True, slots=True)
class Limits:
    """Device limits.  Construct with keyword overrides; all fields are validated."""

    # --- virtio-gpu commands -------------------------------------------------------
    max_backing_entries: int = _limit(
        16384, "max entries in one RESOURCE_ATTACH_BACKING (QEMU's cap)", "max-backing-entries")
    max_userptr_entries: int = _limit(
        1 << 20, "max entries in one USERPTR RESOURCE_CREATE_BLOB", "max-userptr-entries")
    max_userptr_bytes: int = _limit(
        16 * GiB, "max size of one USERPTR blob", "max-userptr-bytes", unit="bytes")
    max_blob_bytes: int = _limit(
        4 * GiB, "max size of one non-userptr blob resource", "max-blob-bytes", unit="bytes")
    max_hostmem: int = _limit(
        256 * MiB, "host memory budget for 2D resource images (QEMU's max_hostmem)",
        "max-hostmem", unit="bytes")
    max_host_buffers: int = _limit(
        4 * GiB, "host memory for compute buffers (RESOURCE_CREATE_3D, the copy path)",
        "max-host-buffers", unit="bytes")
    max_resources: int = _limit(65536, "max live resources", "max-resources")
    max_dimension: int = _limit(16384, "max width or height of a 2D resource")
    max_scanouts: int = _limit(16, "VIRTIO_GPU_MAX_SCANOUTS")
    max_contexts: int = _limit(256, "max live virtio-gpu contexts", "max-contexts")
    max_submit_bytes: int = _limit(1 * MiB, "max SUBMIT_3D command-stream size",
                                   "max-submit-bytes", unit="bytes")
    max_stream_commands: int = _limit(4096, "max commands in one compute stream")
    compute_workers: int = _limit(2, "threads running compute jobs", "compute-workers")
    max_queued_submissions: int = _limit(
        64, "unfenced SUBMIT_3D queued per context before the queue waits")
    compute_job_timeout: float = _limit(
        60.0, "seconds one SUBMIT_3D may run on the simulated GPU before it is aborted "
        "(as a GPU's job timeout)", "compute-job-timeout", unit="seconds")
    max_compute_staging: int = _limit(
        1 * GiB, "bytes of engine scratch one MATMUL operand that is not one host run, or "
        "a COPY source sharing memory with its destination under other GPU VAs, may be "
        "staged in", "max-compute-staging", unit="bytes")
    max_queued_submit_bytes: int = _limit(
        16 * MiB, "SUBMIT_3D stream bytes queued on all timelines; beyond, the queue waits "
        "for the submission that went over", "max-queued-submit-bytes", unit="bytes")
    compute_drain_timeout: float = _limit(
        10.0, "seconds to wait for compute jobs when rings stop or memory goes away, "
        "before cancelling them", unit="seconds")
    max_capset_bytes: int = _limit(64 * KiB, "max size of a capset we publish", unit="bytes")
    # --- host GPU --------------------------------------------------------------------
    max_per_range_ranges: int = _limit(
        4096, "max host ranges of one USERPTR buffer on the per-range host path (an "
        "allocation and a map ioctl per range, on the event loop)", "max-per-range-ranges")
    # --- virtqueues --------------------------------------------------------------
    max_queue_size: int = _limit(32768, "max split virtqueue size (virtio limit)")
    max_indirect_descriptors: int = _limit(
        32768, "max descriptors in one INDIRECT table (a chain is also <= queue size)")
    # --- vhost-user control plane --------------------------------------------------
    max_vhost_payload: int = _limit(4096, "max vhost-user request payload", unit="bytes")
    max_fds_per_message: int = _limit(8, "max fds per vhost-user message (QEMU's limit)")
    max_mem_slots: int = _limit(32, "memory slots reported by GET_MAX_MEM_SLOTS")
    # --- display socket ------------------------------------------------------------
    max_display_reply: int = _limit(4096, "max payload of a display-socket reply", unit="bytes")
    display_reply_timeout: float = _limit(
        2.0, "seconds to wait for QEMU on the display socket before falling back",
        "display-timeout", unit="seconds")
    display_queue_bytes: int = _limit(
        64 * MiB, "display output queued before frame updates are coalesced", unit="bytes")
    # --- logging ---------------------------------------------------------------------
    log_rate: int = _limit(
        20, "log lines a second one line of code may write, on average, after a burst of "
        "a few seconds' worth (a guest repeating a bad command); the rest are counted, "
        "not written; --log-level debug writes all", "log-rate")
    log_burst_seconds: float = _limit(
        5.0, "seconds' worth of --log-rate lines one line of code may write at once",
        unit="seconds")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or not 0 < value < math.inf:
                raise ValueError(f"limit {f.name} must be a positive, finite number, not {value!r}")
        if self.log_rate * self.log_burst_seconds < 1:
            raise ValueError("limit log_rate times log_burst_seconds must be at least 1 "
                             "(a burst of less than one line drops every line)")
        for name, (bits, where) in _WIRE_FIELDS.items():
            if getattr(self, name) > (1 << bits) - 1:
                raise ValueError(f"limit {name} must fit {where} (at most {(1 << bits) - 1})")
        if self.max_scanouts > 16:
            raise ValueError("limit max_scanouts cannot exceed VIRTIO_GPU_MAX_SCANOUTS (16)")


class CliLimit(NamedTuple):
    """A limit with a command-line option."""

    name: str  #: the Limits field
    option: str  #: the option, without its leading ``--``
    help: str  #: what it limits, and its default
    #: the option's value to the field's (ValueError with a message for the operator)
    parse: Callable[[str], int | float]
    metavar: str  #: N, BYTES or SECONDS


def cli_fields() -> list[CliLimit]:
    """Every limit an operator may override, in declaration order."""
    out = []
    for f in fields(Limits):
        cli, unit = f.metadata.get("cli"), f.metadata["unit"]
        if not cli:
            continue
        value = getattr(DEFAULT_LIMITS, f.name)
        parse: Callable[[str], int | float]
        if unit == "bytes":
            parse, default, metavar = parse_size, format_size(value), "BYTES"
        elif unit == "seconds":
            parse, default, metavar = parse_seconds, f"{value:g} s", "SECONDS"
        else:
            parse, default, metavar = parse_count, str(value), "N"
        out.append(CliLimit(f.name, str(cli), f"{f.metadata['doc']} (default {default})",
                            parse, metavar))
    return out


DEFAULT_LIMITS = Limits()
