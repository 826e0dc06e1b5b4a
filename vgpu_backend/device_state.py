"""What the command handlers share: device state, options, and the reply types."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from protocol.capsets import DEFAULT_COMPUTE_CAPSET, DEFAULT_USERPTR_CAPSET
from protocol.errors import GuestProtocolError
from protocol.limits import Limits
from protocol.virtio_gpu import CTRL_HDR_SIZE, CtrlHdr, DisplayOne
from protocol.virtio_gpu_codes import Resp
from protocol.wire import layout
from vgpu_backend.chains import DescriptorChain
from vgpu_backend.eventloop import EventLoop
from vgpu_backend.guest_memory import GuestMemory
from vgpu_backend.hostgpu.base import HostGpu
from vgpu_backend.resources import Resource, ResourceTable
from vgpu_backend.scanout import ScanoutManager

__all__ = [
    "OK",
    "Capset",
    "ChainHandler",
    "Deferred",
    "DeviceOptions",
    "DeviceState",
    "Handler",
    "Reply",
    "ResourceHook",
    "ResourceHooks",
    "UserptrProtocol",
    "with_body",
    "with_body_and_chain",
]

log = logging.getLogger(__name__)


class UserptrProtocol(enum.Enum):
    """Which generation of the USERPTR guest protocol the device speaks."""

    #: guest series v3: feature bit 5 = VIRTIO_GPU_F_RESOURCE_USERPTR (Linux < 7.2 only)
    V3 = "v3"
    #: guest series v4/v5: no feature bit; userptr whenever blob is offered (default)
    V5 = "v5"
    #: no userptr blobs
    OFF = "off"


@dataclass(frozen=True, slots=True)
class DeviceOptions:
    """Device behaviour chosen on the command line."""

    #: QEMU's ``max_outputs`` (the guest's num_scanouts); must match QEMU's property
    max_outputs: int = 1
    #: mode reported when no display socket answers
    default_mode: tuple[int, int] = (1280, 800)
    edid: bool = True
    blob: bool = True
    userptr_protocol: UserptrProtocol = UserptrProtocol.V5
    #: capset id of the userptr capset
    userptr_capset_id: int = DEFAULT_USERPTR_CAPSET
    #: compute (3D) contexts
    compute: bool = True
    compute_capset_id: int = DEFAULT_COMPUTE_CAPSET


@dataclass(frozen=True, slots=True)
class Reply:
    """A response: its type and the bytes after the response header."""

    resp: Resp
    body: bytes = b""


OK = Reply(Resp.OK_NODATA)


class Deferred:
    """A reply that comes later (display round trip, compute fence).

    :param pause: hold the queue (no further commands are processed) until resolved.
    :param fallback: the reply to give if the queue must stop before this resolves.
    """

    __slots__ = ("_callback", "fallback", "pause", "reply")

    def __init__(self, pause: bool = True,
                 fallback: Callable[[], Reply] | None = None) -> None:
        self.pause = pause
        self.fallback = fallback
        self.reply: Reply | None = None
        self._callback: Callable[[Reply], None] | None = None

    def on_resolve(self, callback: Callable[[Reply], None]) -> None:
        """Called by the device: run ``callback`` with the reply (now, if it is known)."""
        if self.reply is not None:
            callback(self.reply)
        else:
            self._callback = callback

    def then(self, action: Callable[[], Reply]) -> Deferred:
        """A queue-holding Deferred answered by ``action()`` once this one resolves
        (a :class:`GuestProtocolError` from ``action`` becomes its error reply)."""
        follow = Deferred(pause=True, fallback=lambda: Reply(Resp.ERR_UNSPEC))

        def run(_: Reply) -> None:
            try:
                follow.resolve(action())
            except GuestProtocolError as err:
                follow.resolve(Reply(err.resp_code))
        self.on_resolve(run)
        return follow

    def resolve(self, reply: Reply) -> None:
        """Deliver the reply (once)."""
        if self.reply is not None:
            return
        self.reply = reply
        if self._callback is not None:
            callback, self._callback = self._callback, None
            callback(reply)


@dataclass(frozen=True, slots=True)
class Capset:
    """A capability set the device publishes (GET_CAPSET_INFO / GET_CAPSET)."""

    capset_id: int
    version: int
    data: bytes
    #: the bytes as of now, when they depend on state that changes (guest RAM); of
    #: ``len(data)`` bytes
    refresh: Callable[[], bytes] | None = None

    def current(self) -> bytes:
        """What GET_CAPSET answers now."""
        return self.refresh() if self.refresh is not None else self.data


ResourceHook = Callable[[Resource], None]


class ResourceHooks(dict[type[Resource], list[ResourceHook]]):
    """Hooks that concern resources of given kinds: ``hooks[type(res)]`` lists the
    ones for ``res``, in the order they were added (found once per class: every
    command that destroys a plain 2D image would otherwise call each blob and host
    buffer hook only for it to return)."""

    def __init__(self) -> None:
        super().__init__()
        self._kinds: list[tuple[type[Resource], ResourceHook]] = []

    def add(self, kind: type[Resource], hook: ResourceHook) -> None:
        """Run ``hook`` for resources of ``kind`` (and its subclasses)."""
        self._kinds.append((kind, hook))
        self.clear()

    def __missing__(self, cls: type[Resource]) -> list[ResourceHook]:
        hooks = self[cls] = [hook for kind, hook in self._kinds if issubclass(cls, kind)]
        return hooks


@dataclass(slots=True)
class DeviceState:
    """State shared by every command handler."""

    loop: EventLoop
    memory: GuestMemory
    limits: Limits
    options: DeviceOptions
    resources: ResourceTable
    scanouts: ScanoutManager
    host_gpu: HostGpu | None
    #: the last display info (from QEMU, or the default mode); see :meth:`set_modes`
    modes: list[DisplayOne] = field(default_factory=list)
    #: its ``virtio_gpu_resp_display_info`` body (after the header), ready to send
    display_info_body: bytes = b""
    #: scanouts the guest may address (see :meth:`set_modes`)
    num_scanouts: int = 1
    capsets: list[Capset] = field(default_factory=list)
    #: virtio feature bits the driver acked (SET_FEATURES)
    acked_features: int = 0
    #: virtio feature bits we offered
    offered_features: int = 0
    #: run before a resource is destroyed (release host GPU mappings, detach contexts)
    destroy_hooks: ResourceHooks = field(default_factory=ResourceHooks)
    #: run by RESOURCE_UNREF and DETACH_BACKING before the resource loses its guest
    #: memory (the guest may reuse the pages right after the answer); may refuse with a
    #: GuestProtocolError (nothing changes, and the guest may retry)
    release_hooks: ResourceHooks = field(default_factory=ResourceHooks)
    #: run before a resource's backing is dropped by DETACH_BACKING
    detach_hooks: ResourceHooks = field(default_factory=ResourceHooks)
    #: run when a resource's host GPU mapping goes away (released or invalidated)
    unmap_hooks: ResourceHooks = field(default_factory=ResourceHooks)
    #: a Deferred that resolves when the compute work the given contexts submitted so
    #: far is done (None when they have none in flight)
    compute_barrier: Callable[[Iterable[int]], Deferred | None] | None = None
    #: for a fenced command: a Deferred that resolves when the earlier work on its
    #: fence timeline is done (None when there is none)
    fence_barrier: Callable[[CtrlHdr], Deferred | None] | None = None
    #: bugs of ours met in commands, and in actions that waited for compute work
    #: (see :meth:`internal_error`)
    internal_errors: int = 0

    def __post_init__(self) -> None:
        self.num_scanouts = self.options.max_outputs

    def after_compute(self, ctx_ids: Collection[int],
                      action: Callable[[], Reply]) -> Reply | Deferred:
        """``action()`` now, or (holding the queue) once the compute work the contexts
        ``ctx_ids`` submitted so far is done: a resource or context is going away."""
        barrier = self.compute_barrier
        wait = barrier(ctx_ids) if barrier is not None and ctx_ids else None
        if wait is None:
            return action()  # the device's error boundary is around this call

        def guarded() -> Reply:  # runs from a compute completion, outside that boundary
            try:
                return action()
            except GuestProtocolError:
                raise  # the guest's error: its reply (Deferred.then)
            except Exception:  # a bug of ours: answer, count, keep serving
                return self.internal_error("an action held for compute work")
        return wait.then(guarded)

    def internal_error(self, where: str) -> Reply:
        """The answer to a bug of ours met in ``where`` (call it from the ``except``
        block): counted, logged with its traceback; the guest gets ERR_UNSPEC."""
        self.internal_errors += 1
        log.exception("internal error in %s", where)
        return Reply(Resp.ERR_UNSPEC)

    def set_modes(self, modes: list[DisplayOne], info: bytes) -> None:
        """New display info (``info`` is the whole 408-byte response).  The guest may
        address QEMU's max_outputs scanouts, or more if QEMU reports more enabled."""
        self.modes = modes
        self.display_info_body = info[CTRL_HDR_SIZE:]
        enabled = [i for i, m in enumerate(modes) if m.enabled]
        self.num_scanouts = min(self.limits.max_scanouts, max(
            self.options.max_outputs, (max(enabled) + 1) if enabled else 0))


#: a command whose parameters all lie in its fixed-size struct: called with its header
#: and a copy of its first bytes (up to the largest fixed struct)
Handler = Callable[[CtrlHdr, bytes], Reply | Deferred]
#: a command followed by guest data of its own length (memory entries, a command
#: stream), which the handler reads from the chain
ChainHandler = Callable[[CtrlHdr, bytes, DescriptorChain], Reply | Deferred]


def _too_short(c_name: str, data: bytes, need: int) -> GuestProtocolError:
    return GuestProtocolError(f"{c_name}: {len(data)} bytes, needs {need}")


def with_body(body_type: type[Any],
              handler: Callable[[CtrlHdr, Any], Reply | Deferred]) -> Handler:
    """Wrap a handler taking a decoded command body; a short command gets
    ERR_INVALID_PARAMETER."""
    codec = layout(body_type)
    need = CTRL_HDR_SIZE + codec.size
    unpack, new = codec.struct.unpack_from, tuple.__new__  # _make without its check

    def handle(hdr: CtrlHdr, data: bytes) -> Reply | Deferred:
        if len(data) < need:
            raise _too_short(codec.c_name, data, need)
        return handler(hdr, new(body_type, unpack(data, CTRL_HDR_SIZE)))
    return handle


def with_body_and_chain(body_type: type[Any],
                        handler: Callable[[CtrlHdr, Any, DescriptorChain],
                                          Reply | Deferred]) -> ChainHandler:
    """:func:`with_body` for a command whose handler also reads the chain past its
    struct."""
    codec = layout(body_type)
    need = CTRL_HDR_SIZE + codec.size
    unpack, new = codec.struct.unpack_from, tuple.__new__

    def handle(hdr: CtrlHdr, data: bytes, chain: DescriptorChain) -> Reply | Deferred:
        if len(data) < need:
            raise _too_short(codec.c_name, data, need)
        return handler(hdr, new(body_type, unpack(data, CTRL_HDR_SIZE)), chain)
    return handle
