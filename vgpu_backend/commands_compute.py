"""Compute contexts: SUBMIT_3D command streams, fences on per-context rings, the compute
capset, and host buffers for the copy path (RESOURCE_CREATE_3D, TRANSFER_*_HOST_3D).

Submissions are decoded and checked on the loop thread, then run off the loop on their
timeline: ring ``ring_idx`` of the context with ``VIRTIO_GPU_FLAG_INFO_RING_IDX``, else
the global timeline.  A fenced submission is answered when its work is done, which is
after everything submitted before it on the same timeline.  A bad stream fails the
submission (ERR_INVALID_PARAMETER); a failure while running is written to the
submission's result blob and, when fenced, answered with an error.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Hashable, Iterable

import numpy as np

from protocol.compute import (
    COMPUTE_CAPSET_MAGIC,
    KERNEL_SIGNATURES,
    STREAM_VERSION,
    CmdResult,
    ComputeCapsetHeader,
    KernelDescriptor,
    MapResource,
    ResultHeader,
    Status,
    decode_stream,
)
from protocol.errors import GuestProtocolError
from protocol.virtio_gpu import (
    CTRL_HDR_SIZE,
    CtrlHdr,
    ResourceCreate3d,
    Submit3d,
    TransferHost3d,
)
from protocol.virtio_gpu_codes import Cmd, CtrlFlag, Resp
from protocol.wire import encode, layout
from vgpu_backend.chains import DescriptorChain
from vgpu_backend.compute.engine import ContextVm, Engine, Mapping, Outcome, ResultTarget
from vgpu_backend.compute.timelines import Timelines
from vgpu_backend.contexts import Context, ContextTable
from vgpu_backend.device_state import (
    OK,
    Capset,
    ChainHandler,
    Deferred,
    DeviceState,
    Handler,
    Reply,
    with_body,
    with_body_and_chain,
)
from vgpu_backend.hostgpu import hostmem
from vgpu_backend.hostgpu.base import HostGpuError, HostRanges
from vgpu_backend.resources import BlobResource, HostBuffer, Resource

__all__ = ["COMPUTE_CAPSET_VERSION", "ComputeCommands", "compute_capset"]

log = logging.getLogger(__name__)

COMPUTE_CAPSET_VERSION = 1
NUM_RINGS = 64
PIPE_BUFFER = 0
ENGINE_SIMULATED = 1
_SUBMIT_SIZE = CTRL_HDR_SIZE + layout(Submit3d).size
_GLOBAL = "global"
_PAGE = 4096


def compute_capset(state: DeviceState) -> Capset:
    """The compute capset: stream version, limits, engine and kernel table."""
    kernels = b"".join(
        encode(KernelDescriptor(int(k), len(sig), sum(int(kind) << (4 * i)
                                                       for i, kind in enumerate(sig))))
        for k, sig in KERNEL_SIGNATURES.items())
    head = ComputeCapsetHeader(
        COMPUTE_CAPSET_MAGIC, COMPUTE_CAPSET_VERSION, layout(ComputeCapsetHeader).size,
        STREAM_VERSION, len(KERNEL_SIGNATURES), state.limits.max_submit_bytes, NUM_RINGS,
        ENGINE_SIMULATED, 0)
    return Capset(state.options.compute_capset_id, COMPUTE_CAPSET_VERSION,
                  encode(head) + kernels)


def _timeline(hdr: CtrlHdr) -> Hashable:
    """The fence timeline of a command: its context's ring, or the global one."""
    if hdr.flags & CtrlFlag.INFO_RING_IDX:
        return (hdr.ctx_id, hdr.ring_idx)
    return _GLOBAL


def _mapping_of(res: Resource) -> Mapping | None:
    """The GPU virtual range a resource can be mapped at, if it has one."""
    if isinstance(res, BlobResource | HostBuffer) and res.gpu_mapping is not None \
            and res.invalidated is None:
        return Mapping(res.resource_id, res.gpu_mapping.gpu_va, res.gpu_mapping.size,
                       res.gpu_mapping.readonly, res.gpu_mapping)
    return None


class ComputeCommands:
    """SUBMIT_3D and the copy-path resources for compute contexts."""

    def __init__(self, state: DeviceState, contexts: ContextTable, engine: Engine) -> None:
        self.s = state
        self.contexts = contexts
        self.engine = engine
        self.timelines = Timelines(state.loop, state.limits.compute_workers)
        self.buffer_bytes = 0
        #: submissions queued and not yet completed, per context (backpressure)
        self._queued: dict[int, int] = {}
        #: stream bytes of every submission queued and not yet completed (a decoded
        #: stream takes several times its size: this is what bounds it)
        self.queued_bytes = 0
        self._room_waiters: dict[int, list[Deferred]] = {}
        #: per context: the sequence number of its latest job on each timeline
        self._last_jobs: dict[int, dict[Hashable, int]] = {}
        contexts.create_hooks.append(self._context_created)
        contexts.detach_hooks.append(self._resource_detached)
        state.destroy_hooks.add(HostBuffer, self._resource_destroyed)
        state.unmap_hooks.add(Resource, self._purge_mappings)
        state.compute_barrier = self._barrier
        state.fence_barrier = self._fence_barrier

    def handlers(self) -> dict[int, Handler]:
        """Command type -> handler."""
        return {
            Cmd.RESOURCE_CREATE_3D: with_body(ResourceCreate3d, self.create_3d),
            Cmd.TRANSFER_TO_HOST_3D: with_body(TransferHost3d, self.transfer_to_host),
            Cmd.TRANSFER_FROM_HOST_3D: with_body(TransferHost3d, self.transfer_from_host),
        }

    def chain_handlers(self) -> dict[int, ChainHandler]:
        """Command type -> handler, for SUBMIT_3D (its command stream follows)."""
        return {Cmd.SUBMIT_3D: with_body_and_chain(Submit3d, self.submit_3d)}

    # --- context state -----------------------------------------------------------

    def _context_created(self, ctx: Context) -> None:
        ctx.engine = ContextVm(ctx.ctx_id)

    def _resource_detached(self, ctx: Context, res: Resource) -> None:
        vm: ContextVm = ctx.engine
        with vm.lock:
            vm.mappings.pop(res.resource_id, None)

    def _purge_mappings(self, res: Resource) -> None:
        """A resource's host GPU mapping goes away: no context may reach its GPU VA any
        more (the VA may be reused for another resource)."""
        for ctx in self.contexts:
            self._resource_detached(ctx, res)

    def _barrier(self, ctx_ids: Iterable[int]) -> Deferred | None:
        """Wait for the jobs submitted so far by the contexts ``ctx_ids`` (a resource or
        context going away); other contexts' work does not hold the queue."""
        targets: dict[Hashable, int] = {}
        for ctx_id in ctx_ids:
            for key, seq in self._last_jobs.get(ctx_id, {}).items():
                targets[key] = max(seq, targets.get(key, 0))
        if not targets or not self.timelines.busy(frozenset(targets)):
            return None
        wait = Deferred(pause=True)
        self.timelines.after_jobs(targets, lambda: wait.resolve(OK))
        return wait

    def _fence_barrier(self, hdr: CtrlHdr) -> Deferred | None:
        """A fence completes after the work submitted before it on its timeline: the
        context's ring with INFO_RING_IDX, else the global timeline."""
        keys = frozenset({_timeline(hdr)})
        if not self.timelines.busy(keys):
            return None
        wait = Deferred(pause=False)
        self.timelines.after_current(keys, lambda: wait.resolve(OK))
        return wait

    def drain(self) -> None:
        """The rings stop (VM stop): finish every job so every fence is answered; if
        that takes too long, cancel the rest."""
        if not self.timelines.drain(self.s.limits.compute_drain_timeout):
            log.error("compute work still running after %.0fs: cancelling it",
                      self.s.limits.compute_drain_timeout)
            self.timelines.stop()

    def wait_running(self) -> None:
        """Guest memory is about to go away: let running jobs finish (queued jobs run
        later against the invalidated page table and fault cleanly)."""
        if not self.timelines.wait_running(self.s.limits.compute_drain_timeout):
            log.error("compute work still running after %.0fs: cancelling it",
                      self.s.limits.compute_drain_timeout)
            self.timelines.stop()

    def stop(self) -> None:
        """Device reset or disconnect: cancel every job; returns when none runs."""
        self.timelines.stop()

    def close(self) -> None:
        """Stop the workers."""
        self.timelines.close()

    # --- SUBMIT_3D -----------------------------------------------------------------

    def submit_3d(self, hdr: CtrlHdr, body: Submit3d, chain: DescriptorChain) -> Reply | Deferred:
        """Check a compute stream and queue it on its timeline."""
        ctx = self.contexts.get(hdr.ctx_id)
        if ctx.capset_id != self.s.options.compute_capset_id:
            raise GuestProtocolError(f"context {ctx.ctx_id} is not a compute context")
        if body.num_in_fences:
            raise GuestProtocolError("in-fences are not supported")
        if body.size > self.s.limits.max_submit_bytes:
            raise GuestProtocolError(f"submission of {body.size} bytes (limit "
                                     f"{self.s.limits.max_submit_bytes})")
        data = chain.read_array(_SUBMIT_SIZE, body.size).tobytes()
        size = len(data)  # counted in queued_bytes until the job is done
        head, commands = decode_stream(data, self.s.limits.max_stream_commands)
        if hdr.flags & CtrlFlag.INFO_RING_IDX and hdr.ring_idx >= NUM_RINGS:
            raise GuestProtocolError(f"ring_idx {hdr.ring_idx}")
        key = _timeline(hdr)
        target = self._result_target(ctx, head.result_resource_id, head.result_offset,
                                     len(commands))
        prepared: dict[int, Mapping] = {}
        for cmd in commands:
            if isinstance(cmd.body, MapResource):
                mapping = self._mappable(ctx, cmd.body.resource_id)
                if mapping is not None:
                    prepared[cmd.index] = mapping
        vm: ContextVm = ctx.engine
        fenced = bool(hdr.flags & CtrlFlag.FENCE)
        deferred = Deferred(pause=False, fallback=lambda: Reply(Resp.ERR_UNSPEC))

        def done(outcome: Outcome | None) -> None:
            self._queued[ctx.ctx_id] -= 1
            self.queued_bytes -= size
            self._make_room(ctx.ctx_id)
            if outcome is None:  # the job raised (already logged) or was cancelled
                deferred.resolve(Reply(Resp.ERR_UNSPEC))
                return
            if outcome.status != Status.OK:
                log.info("context %d: submission stopped at command %d: %s (%s)",
                         ctx.ctx_id, outcome.failed_index, outcome.message,
                         Status(outcome.status).name)
            deferred.resolve(OK if outcome.status == Status.OK else Reply(
                Resp.ERR_INVALID_PARAMETER if outcome.status != Status.FAULT
                else Resp.ERR_UNSPEC))

        self._last_jobs.setdefault(ctx.ctx_id, {})[key] = self.timelines.submit(
            key, lambda cancel: self.engine.run(vm, commands, prepared, target, cancel), done)
        queued = self._queued[ctx.ctx_id] = self._queued.get(ctx.ctx_id, 0) + 1
        self.queued_bytes += size
        if self.queued_bytes > self.s.limits.max_queued_submit_bytes:
            # fenced or not, nothing more is read until this one has run
            deferred.pause = True
            return deferred
        if fenced:
            return deferred
        if queued > self.s.limits.max_queued_submissions:
            # backpressure: hold the queue until this context's backlog shrinks
            room = Deferred(pause=True)
            self._room_waiters.setdefault(ctx.ctx_id, []).append(room)
            return room
        return OK

    def _make_room(self, ctx_id: int) -> None:
        if self._queued.get(ctx_id, 0) <= self.s.limits.max_queued_submissions:
            for room in self._room_waiters.pop(ctx_id, []):
                room.resolve(OK)
        if not self._queued.get(ctx_id):
            self._queued.pop(ctx_id, None)
            self._last_jobs.pop(ctx_id, None)  # all its jobs are delivered

    def _mappable(self, ctx: Context, resource_id: int) -> Mapping | None:
        try:
            res = self.s.resources.get(resource_id)
        except GuestProtocolError:
            return None
        if ctx.ctx_id not in res.contexts:
            return None
        return _mapping_of(res)

    def _result_target(self, ctx: Context, resource_id: int, offset: int,
                       count: int) -> ResultTarget | None:
        if resource_id == 0:
            return None
        mapping = self._mappable(ctx, resource_id)
        size = layout(ResultHeader).size + count * layout(CmdResult).size
        if mapping is None or mapping.readonly or offset + size > mapping.size:
            raise GuestProtocolError(f"result resource {resource_id} at {offset} cannot "
                                     f"take {size} bytes of results")
        return ResultTarget(mapping.gpu_va + offset, size)

    # --- host buffers (the copy path) ----------------------------------------------

    def create_3d(self, hdr: CtrlHdr, body: ResourceCreate3d) -> Reply:
        """A host-owned buffer (target PIPE_BUFFER, width = bytes) mapped on the GPU."""
        self.s.resources.check_new_id(body.resource_id)
        if body.target != PIPE_BUFFER or body.height != 1 or body.depth != 1 or \
                body.array_size != 1 or body.last_level != 0 or body.nr_samples > 1:
            raise GuestProtocolError("only buffers (PIPE_BUFFER, width x 1 x 1) are supported")
        if body.width == 0:
            raise GuestProtocolError("buffer of 0 bytes")
        gpu = self.s.host_gpu
        if gpu is None:
            raise GuestProtocolError("no host GPU", Resp.ERR_UNSPEC)
        mapped = -(-body.width // _PAGE) * _PAGE
        if self.buffer_bytes + mapped > self.s.limits.max_host_buffers:
            raise GuestProtocolError(f"{mapped} more bytes of host buffers exceed "
                                     f"{self.s.limits.max_host_buffers}", Resp.ERR_OUT_OF_MEMORY)
        try:
            addr = hostmem.map_anonymous(mapped)
        except OSError:
            raise GuestProtocolError("host out of memory", Resp.ERR_OUT_OF_MEMORY) from None
        ranges = HostRanges(np.array([addr], np.uint64), np.array([mapped], np.uint64),
                            np.array([-1], np.int32), np.zeros(1, np.uint64))
        try:
            gpu_mapping = gpu.register_userptr(ranges, readonly=False,
                                               context=hdr.ctx_id or None)
        except HostGpuError as err:
            hostmem.unmap(addr, mapped)
            raise GuestProtocolError(f"host GPU: {err}", Resp.ERR_UNSPEC) from None
        self.buffer_bytes += mapped
        res = HostBuffer(body.resource_id, size=body.width, host_addr=addr, mapped_bytes=mapped,
                         gpu_mapping=gpu_mapping)
        self.s.resources.add(res)
        if hdr.ctx_id:  # outside a known context, CTX_ATTACH_RESOURCE links it later
            with contextlib.suppress(GuestProtocolError):
                self.contexts.link(self.contexts.get(hdr.ctx_id), res)
        return OK

    def _resource_destroyed(self, res: Resource) -> None:
        if isinstance(res, HostBuffer) and res.host_addr:
            self._purge_mappings(res)
            if res.gpu_mapping is not None and self.s.host_gpu is not None:
                try:
                    self.s.host_gpu.release(res.gpu_mapping)
                except HostGpuError as err:  # the GPU may still map it: keep the memory
                    log.error("host buffer %d: release failed (%s); its %d bytes stay "
                              "mapped", res.resource_id, err, res.mapped_bytes)
                    res.gpu_mapping = None
                    return
                res.gpu_mapping = None
            hostmem.unmap(res.host_addr, res.mapped_bytes)
            self.buffer_bytes -= res.mapped_bytes
            res.host_addr = 0

    def _transfer_args(self, body: TransferHost3d) -> tuple[HostBuffer, int, int]:
        res = self.s.resources.get(body.resource_id)
        if not isinstance(res, HostBuffer):
            raise GuestProtocolError(f"resource {body.resource_id} is not a host buffer")
        if res.backing is None:
            raise GuestProtocolError(f"buffer {body.resource_id} has no backing",
                                     Resp.ERR_UNSPEC)
        if body.level or body.y or body.z or body.h != 1 or body.d != 1 or \
                body.x + body.w > res.size:
            raise GuestProtocolError(f"transfer box x={body.x} w={body.w} outside a "
                                     f"{res.size}-byte buffer")
        return res, body.x, body.w

    def transfer_to_host(self, hdr: CtrlHdr, body: TransferHost3d) -> Reply | Deferred:
        """Copy guest backing -> host buffer (after compute work that may use it)."""
        res, start, size = self._transfer_args(body)

        def now() -> Reply:
            if res.backing is None or not res.host_addr:
                raise GuestProtocolError("buffer went away", Resp.ERR_UNSPEC)
            res.backing.read_into(body.offset, hostmem.view(res.host_addr + start, size))
            return OK
        return self.s.after_compute(res.contexts, now)

    def transfer_from_host(self, hdr: CtrlHdr, body: TransferHost3d) -> Reply | Deferred:
        """Copy host buffer -> guest backing (after compute work that may write it)."""
        res, start, size = self._transfer_args(body)

        def now() -> Reply:
            if res.backing is None or not res.host_addr:
                raise GuestProtocolError("buffer went away", Resp.ERR_UNSPEC)
            res.backing.write(body.offset, hostmem.view(res.host_addr + start, size))
            return OK
        return self.s.after_compute(res.contexts, now)
