"""Every numeric limit of the device, in one place.

Each field documents itself; fields with a ``cli`` name in their metadata get a
command-line override (``vgpu-backend --help`` lists them).  Every guest-controlled
count or size is checked against these and against the bytes actually present before
anything is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["DEFAULT_LIMITS", "Limits", "cli_fields"]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


def _limit(default: int | float, doc: str, cli: str | None = None) -> Any:
    return field(default=default, metadata={"doc": doc, "cli": cli})


@dataclass(frozen=True, slots=True)
class Limits:
    """Device limits.  Construct with keyword overrides; all fields are validated."""

    # --- virtio-gpu commands -------------------------------------------------------
    max_backing_entries: int = _limit(
        16384, "max entries in one RESOURCE_ATTACH_BACKING (QEMU's cap)", "max-backing-entries")
    max_userptr_entries: int = _limit(
        1 << 20, "max entries in one USERPTR RESOURCE_CREATE_BLOB", "max-userptr-entries")
    max_userptr_bytes: int = _limit(
        16 * GiB, "max size of one USERPTR blob", "max-userptr-bytes")
    max_blob_bytes: int = _limit(
        4 * GiB, "max size of one non-userptr blob resource", "max-blob-bytes")
    max_hostmem: int = _limit(
        256 * MiB, "host memory budget for 2D resource images (QEMU's max_hostmem)",
        "max-hostmem")
    max_host_buffers: int = _limit(
        4 * GiB, "host memory for compute buffers (RESOURCE_CREATE_3D, the copy path)",
        "max-host-buffers")
    max_resources: int = _limit(65536, "max live resources", "max-resources")
    max_dimension: int = _limit(16384, "max width or height of a 2D resource")
    max_scanouts: int = _limit(16, "VIRTIO_GPU_MAX_SCANOUTS")
    max_contexts: int = _limit(256, "max live virtio-gpu contexts", "max-contexts")
    max_submit_bytes: int = _limit(1 * MiB, "max SUBMIT_3D command-stream size",
                                   "max-submit-bytes")
    max_stream_commands: int = _limit(4096, "max commands in one compute stream")
    compute_workers: int = _limit(2, "threads running compute jobs", "compute-workers")
    max_queued_submissions: int = _limit(
        64, "unfenced SUBMIT_3D queued per context before the queue waits")
    compute_job_timeout: float = _limit(
        60.0, "seconds one SUBMIT_3D may run on the simulated GPU before it is aborted "
        "(as a GPU's job timeout)", "compute-job-timeout")
    max_compute_staging: int = _limit(
        1 * GiB, "bytes of engine scratch one MATMUL operand that is not one host run may "
        "be staged in", "max-compute-staging")
    max_queued_submit_bytes: int = _limit(
        16 * MiB, "SUBMIT_3D stream bytes queued on all timelines; beyond, the queue waits "
        "for the submission that went over", "max-queued-submit-bytes")
    compute_drain_timeout: float = _limit(
        10.0, "seconds to wait for compute jobs when rings stop or memory goes away, "
        "before cancelling them")
    max_capset_bytes: int = _limit(64 * KiB, "max size of a capset we publish")
    # --- host GPU --------------------------------------------------------------------
    max_per_range_ranges: int = _limit(
        4096, "max host ranges of one USERPTR buffer on the per-range host path (an "
        "allocation and a map ioctl per range, on the event loop)", "max-per-range-ranges")
    # --- virtqueues --------------------------------------------------------------
    max_queue_size: int = _limit(32768, "max split virtqueue size (virtio limit)")
    max_indirect_descriptors: int = _limit(
        32768, "max descriptors in one INDIRECT table (a chain is also <= queue size)")
    # --- vhost-user control plane --------------------------------------------------
    max_vhost_payload: int = _limit(4096, "max vhost-user request payload")
    max_fds_per_message: int = _limit(8, "max fds per vhost-user message (QEMU's limit)")
    max_mem_slots: int = _limit(32, "memory slots reported by GET_MAX_MEM_SLOTS")
    # --- display socket ------------------------------------------------------------
    max_display_reply: int = _limit(4096, "max payload of a display-socket reply")
    display_reply_timeout: float = _limit(
        2.0, "seconds to wait for QEMU on the display socket before falling back",
        "display-timeout")
    display_queue_bytes: int = _limit(
        64 * MiB, "display output queued before frame updates are coalesced")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"limit {f.name} must be a positive number, not {value!r}")
        if self.max_backing_entries > (1 << 32) - 1 or self.max_userptr_entries > (1 << 32) - 1:
            raise ValueError("entry limits must fit the 32-bit nr_entries field")
        if self.max_scanouts > 16:
            raise ValueError("max_scanouts cannot exceed VIRTIO_GPU_MAX_SCANOUTS (16)")


def cli_fields() -> list[tuple[str, str, str, type[int] | type[float]]]:
    """``(field name, cli option, help, type)`` for every overridable limit."""
    out: list[tuple[str, str, str, type[int] | type[float]]] = []
    for f in fields(Limits):
        cli = f.metadata.get("cli")
        if cli:
            kind: type[int] | type[float] = float if isinstance(f.default, float) else int
            out.append((f.name, str(cli), f"{f.metadata['doc']} (default {f.default})", kind))
    return out


DEFAULT_LIMITS = Limits()
