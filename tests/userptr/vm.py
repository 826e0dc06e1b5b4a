"""A simulated VM on our back-end with the guest-side operations the USERPTR and compute
tests need: contexts, blobs over guest pages, compute submissions and their results."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from protocol.compute import encode_stream
from protocol.virtio_gpu_codes import BlobFlag, BlobMem, Cmd, Resp
from tests.frontend import gpu_commands as cmds
from tests.frontend.gpu_commands import GpuResponse
from tests.frontend.gpu_driver import POISON, PreparedCommand
from tests.frontend.guest_ram import GuestRam, Segment
from tests.frontend.session import Session
from tests.userptr import guest_commands as gc
from tests.userptr.compute_stream import SubmissionResults, map_cmd, results_size
from tests.userptr.guest_buffer import GuestBuffer, entry_bytes, scattered_buffer

__all__ = ["Blob", "ComputeContext", "Execution", "Vm"]


@dataclass(slots=True)
class Blob:
    """A blob resource the guest created over ``buffer``."""

    resource_id: int
    buffer: GuestBuffer
    ctx_id: int = 0
    readonly: bool = False


@dataclass(frozen=True, slots=True)
class Execution:
    """A fenced submission: the response and the result record read right after it."""

    response: GpuResponse
    results: SubmissionResults


class Vm:
    """One started :class:`Session` on our back-end."""

    def __init__(self, session: Session) -> None:
        self.s = session
        self._fences = itertools.count(1)
        self._ctx_ids = itertools.count(1)
        self._rng = np.random.default_rng(7)

    @property
    def ram(self) -> GuestRam:
        """Guest RAM."""
        return self.s.ram

    def next_fence(self) -> int:
        """A fresh fence id."""
        return next(self._fences)

    def new_resource_id(self) -> int:
        """A resource id not used before in this VM."""
        return self.s.gpu.new_resource_id()

    def random_bytes(self, nbytes: int) -> bytes:
        """Deterministic pseudo-random bytes."""
        return self._rng.integers(0, 256, nbytes, dtype=np.uint8).tobytes()

    # --- commands ------------------------------------------------------------------------

    def run(self, command: bytes, extra: bytes = b"",
            response_size: int = cmds.NODATA_RESP_SIZE) -> GpuResponse:
        """One command (``extra`` in a second device-readable buffer) and its response."""
        return self.s.gpu.run(command, response_size, extra_out=extra)

    def prepare(self, command: bytes, extra: bytes = b"") -> PreparedCommand:
        """A command laid out for :meth:`submit_all`."""
        return self.s.gpu.prepare(command, cmds.NODATA_RESP_SIZE, extra_out=extra)

    def submit_all(self, commands: Sequence[PreparedCommand]) -> list[GpuResponse]:
        """Queue several commands with one kick; responses in submission order."""
        return self.s.gpu.submit(commands)

    def completion_order(self, commands: Sequence[PreparedCommand], timeout: float = 30.0
                         ) -> list[tuple[int, GpuResponse]]:
        """Queue several commands with one kick; ``(index, response)`` in the order the
        device completed them (its used-ring order)."""
        ctrl = self.s.queues[0]
        for i, prepared in enumerate(commands):
            ctrl.add(prepared.out, [prepared.response] if prepared.response else [], token=i)
        ctrl.submit()
        done = ctrl.wait_used(len(commands), timeout)
        out = []
        for completion in done:
            i = int(completion.token)  # type: ignore[call-overload]
            prepared = commands[i]
            raw = b""
            if prepared.response is not None:
                raw = self.ram.read(prepared.response.gpa, prepared.response.length)
            out.append((i, GpuResponse(raw, completion.length, completion.head)))
        for prepared in commands:
            for alloc in prepared.allocations:
                self.ram.free(alloc.gpa, alloc.length)
        return out

    def still_serving(self) -> None:
        """The device answers the next valid command."""
        self.s.gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)

    # --- contexts ------------------------------------------------------------------------

    def create_context(self, context_init: int = 0) -> int:
        """CTX_CREATE of a fresh id (the default type: compute); returns the id."""
        ctx_id = next(self._ctx_ids)
        self.run(gc.ctx_create(ctx_id, context_init)).expect(Resp.OK_NODATA)
        return ctx_id

    def destroy_context(self, ctx_id: int) -> GpuResponse:
        """CTX_DESTROY."""
        return self.run(gc.ctx_destroy(ctx_id))

    def attach(self, ctx_id: int, resource_id: int) -> GpuResponse:
        """CTX_ATTACH_RESOURCE."""
        return self.run(gc.ctx_resource(Cmd.CTX_ATTACH_RESOURCE, ctx_id, resource_id))

    def detach(self, ctx_id: int, resource_id: int) -> GpuResponse:
        """CTX_DETACH_RESOURCE."""
        return self.run(gc.ctx_resource(Cmd.CTX_DETACH_RESOURCE, ctx_id, resource_id))

    # --- blobs ---------------------------------------------------------------------------

    def create_blob(self, resource_id: int, entries: Sequence[Segment], size: int, *,
                    blob_mem: int = BlobMem.HOST3D_GUEST, flags: int = BlobFlag.USE_USERPTR,
                    ctx_id: int = 0, nr_entries: int | None = None,
                    blob_id: int = 0) -> GpuResponse:
        """RESOURCE_CREATE_BLOB with ``entries`` (``nr_entries`` may lie)."""
        count = len(entries) if nr_entries is None else nr_entries
        return self.run(gc.create_blob(resource_id, blob_mem, flags, count, size,
                                       blob_id=blob_id, ctx_id=ctx_id), entry_bytes(entries))

    def userptr_blob(self, nbytes: int, *, ctx_id: int = 0, buffer: GuestBuffer | None = None,
                     readonly: bool = False, data: bytes | None = None,
                     size: int | None = None) -> Blob:
        """A USERPTR blob over ``buffer`` (default: scattered pages filled with random
        bytes, or ``data``); HOST3D_GUEST in ``ctx_id``, or GUEST without a context."""
        buf = buffer or scattered_buffer(self.ram, nbytes)
        buf.write(self.ram, data if data is not None else self.random_bytes(buf.size))
        rid = self.new_resource_id()
        flags = BlobFlag.USE_USERPTR | (BlobFlag.USERPTR_RDONLY if readonly else 0)
        blob_mem = BlobMem.HOST3D_GUEST if ctx_id else BlobMem.GUEST
        self.create_blob(rid, buf.entries, nbytes if size is None else size,
                         blob_mem=blob_mem, flags=int(flags), ctx_id=ctx_id,
                         blob_id=rid if ctx_id else 0).expect(Resp.OK_NODATA)
        return Blob(rid, buf, ctx_id, readonly)

    def unref(self, resource_id: int) -> GpuResponse:
        """RESOURCE_UNREF."""
        return self.run(cmds.resource_unref(resource_id))

    # --- compute -------------------------------------------------------------------------

    def submit(self, ctx_id: int, commands: Sequence[bytes], *, result: Blob | None = None,
               result_offset: int = 0, fence: bool = True,
               ring_idx: int | None = None) -> GpuResponse:
        """SUBMIT_3D of a stream of encoded commands."""
        return self.run(*self.submit_bytes(ctx_id, commands, result=result,
                                           result_offset=result_offset, fence=fence,
                                           ring_idx=ring_idx))

    def submit_bytes(self, ctx_id: int, commands: Sequence[bytes], *,
                     result: Blob | None = None, result_offset: int = 0, fence: bool = True,
                     ring_idx: int | None = None) -> tuple[bytes, bytes]:
        """(SUBMIT_3D command, stream) for :meth:`run` or :meth:`prepare`."""
        stream = encode_stream(list(commands), result.resource_id if result else 0,
                               result_offset)
        fence_id = self.next_fence() if fence else None
        return gc.submit_3d(ctx_id, len(stream), fence_id=fence_id, ring_idx=ring_idx), stream

    def poison_results(self, result: Blob, count: int, offset: int = 0) -> None:
        """Overwrite the result record's place, so stale results cannot pass."""
        result.buffer.write(self.ram, bytes([POISON]) * results_size(count), offset)

    def results(self, result: Blob, count: int, offset: int = 0) -> SubmissionResults:
        """The result record of a ``count``-command stream."""
        raw = result.buffer.read(self.ram, results_size(count), offset)
        return SubmissionResults.decode(raw, count)

    def compute_context(self, result_bytes: int = 16384, *,
                        regions: Sequence[int] | None = None,
                        buffer: GuestBuffer | None = None) -> ComputeContext:
        """A compute context with a USERPTR result blob in it (over ``buffer``, default
        scattered pages in ``regions``)."""
        ctx_id = self.create_context()
        results = self.userptr_blob(result_bytes, ctx_id=ctx_id, buffer=buffer or
                                    scattered_buffer(self.ram, result_bytes, regions=regions))
        return ComputeContext(self, ctx_id, results)


@dataclass(slots=True)
class ComputeContext:
    """A compute context and the blob its submissions write their results into."""

    vm: Vm
    ctx_id: int
    results: Blob
    cmd_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(100))

    def blob(self, nbytes: int, *, readonly: bool = False, buffer: GuestBuffer | None = None,
             data: bytes | None = None) -> Blob:
        """A USERPTR blob created in this context (see :meth:`Vm.userptr_blob`)."""
        return self.vm.userptr_blob(nbytes, ctx_id=self.ctx_id, readonly=readonly,
                                    buffer=buffer, data=data)

    def run(self, commands: Sequence[bytes], *, ring_idx: int | None = None) -> Execution:
        """A fenced submission with results; the record is read after the response."""
        self.vm.poison_results(self.results, len(commands))
        response = self.vm.submit(self.ctx_id, commands, result=self.results,
                                  ring_idx=ring_idx)
        return Execution(response, self.vm.results(self.results, len(commands)))

    def map(self, *blobs: Blob) -> list[int]:
        """MAP_RESOURCE each blob; returns their GPU VAs."""
        done = self.run([map_cmd(b.resource_id, i) for i, b in enumerate(blobs)])
        done.response.expect(Resp.OK_NODATA)
        return done.results.values()
