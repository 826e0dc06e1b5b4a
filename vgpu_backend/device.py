"""The virtio-gpu device: features, config space, and command processing on both queues.

Queue processing drains every available chain per kick.  Each command runs inside one
error boundary: a :class:`GuestProtocolError` becomes the error response it names; a
corrupt ring stops that ring only.  Replies that need the display socket are
:class:`Deferred` and hold the control queue until they resolve (or time out), which
keeps responses and fences in submission order.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import replace

from protocol.errors import GuestProtocolError
from protocol.limits import Limits
from protocol.virtio_gpu import CTRL_HDR_SIZE, CtrlHdr, GpuConfig
from protocol.virtio_gpu_codes import Cmd, CtrlFlag, Feature, Resp
from protocol.wire import encode, layout
from vgpu_backend.chains import ChainBatch, DescriptorChain
from vgpu_backend.commands_2d import Commands2D
from vgpu_backend.commands_blob import BlobCommands, userptr_capset
from vgpu_backend.commands_compute import ComputeCommands, compute_capset
from vgpu_backend.compute.engine import Engine
from vgpu_backend.contexts import ContextTable
from vgpu_backend.device_state import (
    ChainHandler,
    Deferred,
    DeviceOptions,
    DeviceState,
    Handler,
    Reply,
    UserptrProtocol,
)
from vgpu_backend.display import DisplayChannel, DisplayState
from vgpu_backend.eventloop import EventLoop
from vgpu_backend.guest_memory import GuestMemory, MemoryRegion
from vgpu_backend.hostgpu.base import HostGpu
from vgpu_backend.resources import ResourceTable
from vgpu_backend.scanout import ScanoutManager
from vgpu_backend.virtqueue import Virtqueue

__all__ = ["CONTROL_QUEUE", "CURSOR_QUEUE", "VirtioGpuDevice"]

log = logging.getLogger(__name__)

CONTROL_QUEUE = 0
CURSOR_QUEUE = 1
#: the largest fixed command struct (SET_SCANOUT_BLOB / CTX_CREATE: 96 bytes), rounded up
_COMMAND_READ = 128
# plain ints: IntFlag arithmetic builds enum members, far too slow per command
_FENCE = int(CtrlFlag.FENCE)
_INFO_RING_IDX = int(CtrlFlag.INFO_RING_IDX)
_FENCE_FLAGS = _FENCE | _INFO_RING_IDX
_HDR = layout(CtrlHdr).struct  # the same bytes both ways: commands and responses
_unpack_hdr, _PAD = _HDR.unpack_from, b"\0\0\0"
_new_hdr = tuple.__new__  # CtrlHdr._make without its length check (unpack gives all 6)
_HEADERS_KEPT = 64


def _context_types(options: DeviceOptions) -> list[int]:
    """The capset ids a context may be created with, the default (``context_init`` 0)
    first: compute contexts run SUBMIT_3D on the engine; userptr contexts only own
    HOST3D_GUEST USERPTR blobs (a real KFD host: no simulated engine, but the guest's
    UMD still creates its blobs in a context)."""
    types = [options.compute_capset_id] if options.compute else []
    if options.blob and options.userptr_protocol is not UserptrProtocol.OFF:
        types.append(options.userptr_capset_id)
    return types


class VirtioGpuDevice:
    """One virtio-gpu device instance."""

    def __init__(self, loop: EventLoop, memory: GuestMemory, limits: Limits,
                 options: DeviceOptions, host_gpu: HostGpu | None) -> None:
        self.state = DeviceState(
            loop=loop, memory=memory, limits=limits, options=options,
            resources=ResourceTable(limits),
            scanouts=ScanoutManager(limits.max_scanouts, limits.display_queue_bytes),
            host_gpu=host_gpu)
        self.commands_2d = Commands2D(self.state)
        self._handlers: dict[int, Handler] = self.commands_2d.handlers()
        self._chain_handlers: dict[int, ChainHandler] = self.commands_2d.chain_handlers()
        gpu_memory = host_gpu.gpu_memory() if host_gpu is not None else None
        if options.compute and gpu_memory is None:
            log.warning("compute contexts are disabled: %s",
                        _no_compute_reason(host_gpu))
            options = replace(options, compute=False)
            self.state.options = options
        self.contexts = ContextTable(self.state, _context_types(options))
        self._handlers.update(self.contexts.handlers())
        if options.blob:
            self.blobs = BlobCommands(self.state, self.contexts)
            self._handlers.update(self.blobs.handlers())
            self._chain_handlers.update(self.blobs.chain_handlers())
        self.compute: ComputeCommands | None = None
        if options.compute and gpu_memory is not None:
            self.compute = ComputeCommands(self.state, self.contexts, Engine(
                gpu_memory, job_timeout=limits.compute_job_timeout,
                max_staging=limits.max_compute_staging))
            self._handlers.update(self.compute.handlers())
            self._chain_handlers.update(self.compute.chain_handlers())
            self.state.capsets.append(compute_capset(self.state))
        if options.userptr_protocol is not UserptrProtocol.OFF:
            self.state.capsets.append(userptr_capset(self.state))
        self.queues: list[Virtqueue] = [Virtqueue(i, memory, limits) for i in range(2)]
        self._waiting: Deferred | None = None
        self._processing = [False, False]
        self.leaked_mappings = 0
        self._again = [False, False]
        self._closing = False
        self._inflight: list[tuple[Deferred, Callable[[], Reply]]] = []
        #: control-queue heads answered with a bare header, not pushed yet
        self._answered: list[int] = []
        #: command headers decoded lately, by their bytes
        self._headers: dict[bytes, CtrlHdr] = {}
        self._quiescing = False
        memory.add_unmap_listener(self._region_unmapping)

    @property
    def internal_errors(self) -> int:
        """Bugs of ours met so far (each logged with its traceback; the guest got
        ERR_UNSPEC, or a scanout was not updated)."""
        return self.state.internal_errors + self.state.scanouts.internal_errors

    # --- virtio features and config ----------------------------------------------------

    def offered_features(self) -> int:
        """The virtio feature bits this device offers in GET_FEATURES."""
        opts = self.state.options
        bits = (Feature.VERSION_1 | Feature.RING_INDIRECT_DESC | Feature.RING_EVENT_IDX
                | Feature.RESOURCE_UUID)
        if opts.edid:
            bits |= Feature.EDID
        if opts.blob:
            bits |= Feature.RESOURCE_BLOB
        if opts.compute:
            bits |= Feature.CONTEXT_INIT
        if opts.userptr_protocol is UserptrProtocol.V3:
            bits |= Feature.RESOURCE_USERPTR_V3
        return int(bits)

    def set_features(self, acked: int) -> None:
        """SET_FEATURES: what the driver acked (may include bits we never offered)."""
        self.state.acked_features = acked
        self.state.offered_features = self.offered_features()
        for queue in self.queues:
            queue.event_idx = bool(acked & Feature.RING_EVENT_IDX)

    def config_space(self) -> bytes:
        """``struct virtio_gpu_config``; QEMU keeps only ``num_capsets``."""
        return encode(GpuConfig(0, 0, self.state.num_scanouts, len(self.state.capsets)))

    # --- display socket --------------------------------------------------------------

    def attach_display(self, fd: int) -> None:
        """GPU_SET_SOCKET: adopt a new display socket, replacing the old one."""
        old = self.state.scanouts.display
        if old is not None:
            log.info("display: replacing the previous display socket")
            old.close()
        try:
            sock = socket.socket(fileno=fd)
        except OSError as err:
            log.error("display: GPU_SET_SOCKET fd is not a socket: %s", err)
            socket.close(fd)
            return
        self.state.scanouts.display = DisplayChannel(
            self.state.loop, sock, self.state.limits, self._display_ready,
            self._display_closed)

    def _display_ready(self, channel: DisplayChannel) -> None:
        self.state.scanouts.attach(channel)
        self.process(CONTROL_QUEUE)

    def _display_closed(self, channel: DisplayChannel) -> None:
        self.state.scanouts.detach(channel)
        self.process(CONTROL_QUEUE)

    # --- queue processing ------------------------------------------------------------

    def process(self, index: int) -> None:
        """Drain every available chain of queue ``index``.  Not re-entrant: a call made
        while a command of that queue is being executed (e.g. from a display callback)
        runs after it, so replies keep their order."""
        if self._quiescing:
            return  # the ring is stopping: what is still available stays for later
        if self._processing[index]:
            self._again[index] = True
            return
        self._processing[index] = True
        try:
            while True:
                self._again[index] = False
                self._process(index)
                if not self._again[index]:
                    return
        finally:
            self._processing[index] = False

    def _process(self, index: int) -> None:
        queue = self.queues[index]
        if not queue.ready or self._closing:
            return
        if index == CONTROL_QUEUE and not self._control_may_run():
            return
        used_before = queue.used_idx
        held = False
        while queue.ready and not held:
            try:
                chains = queue.pop_batch()
            except GuestProtocolError as err:
                queue.mark_broken(str(err))
                break
            if not chains:
                break
            run = self._run_cursor_batch if index == CURSOR_QUEUE else self._run_controls
            done, held = run(queue, chains)
            if done < len(chains):  # held, or the ring stopped: the rest waits
                queue.unpop(len(chains) - done)
                break
        if queue.used_idx != used_before:
            queue.notify()

    def _control_may_run(self) -> bool:
        if self._waiting is not None:
            return False
        display = self.state.scanouts.display
        return display is None or display.state is not DisplayState.NEGOTIATING

    def _run_controls(self, queue: Virtqueue, chains: ChainBatch) -> tuple[int, bool]:
        """Execute the commands of ``chains`` in order until one holds the queue or the
        ring stops: (how many ran, whether the last one holds the queue).

        A plain reply that fits one writable buffer (nearly every reply) is written
        there at once, and its used entry joins :attr:`_answered`: pushed with the
        others before any other answer is pushed, and at the end.  The used ring lists
        answers in the order they were made, as if each were pushed at once."""
        try:
            return self._run_batch(queue, chains)
        finally:  # whatever happened, what was answered is used (and only once)
            self._push_answered(queue)

    def _run_batch(self, queue: Virtqueue, chains: ChainBatch) -> tuple[int, bool]:
        handlers, headers = self._handlers, self._headers
        for index, (head, data, slot, at, error) in enumerate(
                chains.commands(_COMMAND_READ, CTRL_HDR_SIZE)):
            hdr = headers.get(data[:CTRL_HDR_SIZE]) or self._decode_header(data)
            handler = handlers.get(hdr.type) if error is None else None
            if handler is not None:  # the common case, without a call of its own
                try:
                    result = handler(hdr, data)
                except GuestProtocolError as err:
                    result = _refused(hdr, err)
                except Exception:  # a bug of ours: answer, count, keep serving
                    result = self._internal_error(hdr)
            else:
                result = self._execute(hdr, data, chains[index], error)
            if hdr.flags & _FENCE:
                result = self._after_earlier_work(hdr, result)
            elif slot is not None and type(result) is Reply and not result.body:
                # no command changes the ring's state (only vhost-user requests do,
                # between batches): ready is checked after the others for safety
                _HDR.pack_into(slot, at, result.resp, 0, 0, 0, 0, _PAD)
                self._answered.append(head)
                continue
            if isinstance(result, Reply):
                self._respond(queue, chains[index], hdr, result)
            elif result.reply is not None:
                self._respond(queue, chains[index], hdr, result.reply)
            else:
                self._push_answered(queue)  # it may be answered before the next push
                self._defer(queue, chains[index], hdr, result)
                if result.pause:
                    return index + 1, True
            if not queue.ready:
                break
        else:
            index = len(chains) - 1
        return index + 1, False

    def _decode_header(self, data: bytes) -> CtrlHdr:
        """The header of a command (type 0 if it is too short for one), remembered in
        :attr:`_headers`: most commands repeat the header of an earlier one (no fence,
        same type), and decoding costs more than finding it."""
        if len(data) < CTRL_HDR_SIZE:
            return CtrlHdr(0)
        if len(self._headers) >= _HEADERS_KEPT:  # fenced headers seldom repeat
            self._headers.clear()
        hdr = self._headers[data[:CTRL_HDR_SIZE]] = _new_hdr(CtrlHdr, _unpack_hdr(data))
        return hdr

    def _push_answered(self, queue: Virtqueue) -> None:
        if self._answered:
            answered, self._answered = self._answered, []
            if queue.mapped:  # else the ring is gone, and its answers with it
                queue.push_many(answered, CTRL_HDR_SIZE)

    def _run_cursor_batch(self, queue: Virtqueue, chains: ChainBatch) -> tuple[int, bool]:
        """Execute the cursor commands of ``chains`` (never held)."""
        for done, chain in enumerate(chains, 1):
            self._run_cursor(chain)
            queue.push(chain.head, 0)
            if not queue.ready:
                return done, False
        return len(chains), False

    def _defer(self, queue: Virtqueue, chain: DescriptorChain, hdr: CtrlHdr,
               result: Deferred) -> None:
        """Answer ``chain`` when ``result`` resolves (not yet); a pausing one holds the
        queue meanwhile."""

        def complete(reply: Reply) -> None:
            self._inflight = [e for e in self._inflight if e[0] is not result]
            if queue.mapped:  # also while the ring is disabled and about to stop
                self._respond(queue, chain, hdr, reply)
            if self._waiting is result:  # the queue runs on before the guest hears,
                self._waiting = None  # so one interrupt covers both, and avail_event
                self.process(CONTROL_QUEUE)  # is published when the ring runs empty
            queue.notify()

        result.on_resolve(complete)
        self._inflight.append((result, result.fallback or _unspecified))
        if result.pause:
            self._waiting = result

    def _after_earlier_work(self, hdr: CtrlHdr, result: Reply | Deferred) -> Reply | Deferred:
        """A fence completes only after the compute work submitted before it on its
        timeline (its context's ring, or the global one): hold the answer until then."""
        barrier = self.state.fence_barrier
        wait = barrier(hdr) if barrier is not None else None
        if wait is None:
            return result
        if isinstance(result, Reply):
            reply = result
            later = wait.then(lambda: reply)
            later.pause = False
            return later
        joined = Deferred(pause=result.pause, fallback=result.fallback)
        result.on_resolve(lambda reply: wait.on_resolve(lambda _: joined.resolve(reply)))
        return joined

    def _execute(self, hdr: CtrlHdr, data: bytes, chain: DescriptorChain,
                 error: GuestProtocolError | None) -> Reply | Deferred:
        """Run a command that is not a plain fixed-struct one: a chain with a bad
        buffer, a command reading its chain, a short or unknown command."""
        if error is not None:  # not raised: a traceback would keep the chain alive
            log.info("guest error: %s: %s", _command_name(hdr.type), error)
            return Reply(error.resp_code)
        try:
            if len(data) < CTRL_HDR_SIZE:
                raise GuestProtocolError(f"command of {len(data)} bytes has no header")
            chain_handler = self._chain_handlers.get(hdr.type)
            if chain_handler is None:
                raise GuestProtocolError(f"unsupported command {hdr.type:#x}", Resp.ERR_UNSPEC)
            return chain_handler(hdr, data, chain)
        except GuestProtocolError as err:
            return _refused(hdr, err)
        except Exception:  # a bug of ours: answer, count, keep serving
            return self._internal_error(hdr)

    def _internal_error(self, hdr: CtrlHdr) -> Reply:
        """A handler raised something else than a guest error: a bug of ours."""
        return self.state.internal_error(_command_name(hdr.type))

    def _respond(self, queue: Virtqueue, chain: DescriptorChain, hdr: CtrlHdr,
                 reply: Reply) -> None:
        self._push_answered(queue)  # the answers before this one go first
        flags = fence_id = ctx_id = ring_idx = 0
        if hdr.flags & _FENCE:
            flags = hdr.flags & _FENCE_FLAGS
            fence_id, ctx_id = hdr.fence_id, hdr.ctx_id
            if hdr.flags & _INFO_RING_IDX:
                ring_idx = hdr.ring_idx
        if not reply.body and chain.writable_ok and len(chain.inp) == 1 and \
                chain.in_len >= CTRL_HDR_SIZE:  # a bare header in one piece
            _HDR.pack_into(chain.inp[0], 0, reply.resp, flags, fence_id, ctx_id, ring_idx,
                           _PAD)
            queue.push(chain.head, CTRL_HDR_SIZE)
            return
        response = _HDR.pack(reply.resp, flags, fence_id, ctx_id, ring_idx, _PAD) + reply.body
        written = chain.write(response) if chain.writable_ok else 0
        if written < len(response) and chain.writable_ok:
            log.info("response of %d bytes truncated to %d", len(response), written)
        queue.push(chain.head, written)

    def _run_cursor(self, chain: DescriptorChain) -> None:
        if chain.error is not None:
            log.info("guest error on the cursor queue: %s", chain.error)
            return
        try:
            self.commands_2d.cursor(chain.read(_COMMAND_READ))
        except GuestProtocolError as err:
            log.info("guest error on the cursor queue: %s", err)

    def quiesce(self) -> None:
        """Finish in-flight work and answer every deferred command (a ring stops)."""
        if self.compute is not None:
            self.compute.drain()
        # answering a queue-holding command would let the queue run on and pop more
        # chains whose answers would then be lost: nothing is popped meanwhile
        self._quiescing = True
        try:
            while self._inflight:
                deferred, fallback = self._inflight.pop(0)
                deferred.resolve(fallback())
        finally:
            self._quiescing = False
        self._waiting = None

    # --- lifecycle -----------------------------------------------------------------

    def _region_unmapping(self, region: MemoryRegion) -> None:
        if self.compute is not None:  # no compute job may be running on it
            self.compute.wait_running()
        for queue in self.queues:
            if queue.uses_region(region):
                queue.drop_memory()
        for res in self.state.resources:
            if res.backing is not None and res.backing.uses_region(region.id):
                for hook in self.state.detach_hooks[type(res)]:
                    hook(res)
                res.backing = None
                log.info("resource %d lost its backing: guest memory %s was removed",
                         res.resource_id, region)
        if self.state.host_gpu is not None:
            self.state.host_gpu.invalidate_host_range(region.host_addr, region.size)

    def reset(self) -> None:
        """Device reset: compute work is cancelled; every resource, scanout and context
        goes away."""
        if self.compute is not None:
            self.compute.stop()
        self.quiesce()
        for res in self.state.resources:
            self.commands_2d.destroy(res)
        self.contexts.destroy_all()
        for scanout in self.state.scanouts.scanouts:
            scanout.clear()
        log.info("device reset")

    def close(self) -> None:
        """Free everything (disconnect).  Nothing the guest queued runs any more."""
        self._closing = True
        for queue in self.queues:
            queue.started = queue.enabled = False
        display = self.state.scanouts.display
        if display is not None:
            display.close()
        self.reset()
        if self.compute is not None:
            self.compute.close()
        gpu = self.state.host_gpu
        # every resource is gone: nothing may be mapped any more (counted before guest
        # memory goes away, which would tear leftovers down as invalidations)
        self.leaked_mappings = gpu.live_mappings() if gpu is not None else 0


def _no_compute_reason(host_gpu: HostGpu | None) -> str:
    """Why the host GPU gives the compute engine no page table to run on."""
    info = host_gpu.info() if host_gpu is not None else None
    if info is not None and info.backend == "sim" and info.isolation == "context":
        return ("they run on one KFD process's simulated page table, and "
                "--kfd-isolation context gives each context its own process")
    return "they run on the simulated GPU's page table (--gpu sim)"


def _refused(hdr: CtrlHdr, err: GuestProtocolError) -> Reply:
    """The error response to a command the guest got wrong."""
    log.info("guest error: %s: %s", _command_name(hdr.type), err)
    return Reply(err.resp_code)


def _unspecified() -> Reply:
    return Reply(Resp.ERR_UNSPEC)


def _command_name(cmd: int) -> str:
    try:
        return Cmd(cmd).name
    except ValueError:
        return f"command {cmd:#x}"
