"""virtio-gpu contexts: CTX_CREATE / CTX_DESTROY / CTX_ATTACH_RESOURCE / CTX_DETACH_RESOURCE.

A context is created with a capset id in the low byte of ``context_init`` (when the
guest uses CONTEXT_INIT); 0 means the default context type: the compute capset, or the
userptr capset when there is no compute engine (its contexts hold HOST3D_GUEST USERPTR
blobs and take no SUBMIT_3D).
QEMU's ``vhost-user-gpu-pci`` never forwards CONTEXT_INIT to the guest, so the field is
honoured whether or not the bit was acked.  Destroying a context, or detaching a
resource from it, first runs the context's detach hooks (compute mappings go away
before the resource link does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from protocol.errors import GuestProtocolError
from protocol.virtio_gpu import CtrlHdr, CtxCreate, CtxResource
from protocol.virtio_gpu_codes import Cmd, Resp
from vgpu_backend.device_state import OK, Deferred, DeviceState, Handler, Reply, with_body
from vgpu_backend.hostgpu.base import HostGpuError
from vgpu_backend.resources import Resource

__all__ = ["CONTEXT_INIT_CAPSET_MASK", "Context", "ContextTable"]

log = logging.getLogger(__name__)

CONTEXT_INIT_CAPSET_MASK = 0xFF


@dataclass(slots=True, eq=False)
class Context:
    """One guest context."""

    ctx_id: int
    capset_id: int
    name: str
    resources: set[int] = field(default_factory=set)
    #: per-context engine state (compute contexts)
    engine: Any = None


#: run when a resource leaves a context (context, resource)
DetachHook = Callable[[Context, Resource], None]
#: run when a context is destroyed, after its resources were detached
DestroyHook = Callable[[Context], None]


class ContextTable:
    """Live contexts and their command handlers."""

    def __init__(self, state: DeviceState, context_capsets: list[int]) -> None:
        """:param context_capsets: the capset ids that name a context type, the one
        ``context_init`` 0 means first."""
        self.s = state
        self._by_id: dict[int, Context] = {}
        self._context_capsets = context_capsets
        self.detach_hooks: list[DetachHook] = []
        self.destroy_hooks: list[DestroyHook] = []
        self.create_hooks: list[Callable[[Context], None]] = []
        state.destroy_hooks.add(Resource, self._resource_destroyed)

    def __iter__(self) -> Iterator[Context]:
        return iter(list(self._by_id.values()))

    def handlers(self) -> dict[int, Handler]:
        """Command type -> handler."""
        return {
            Cmd.CTX_CREATE: with_body(CtxCreate, self.create),
            Cmd.CTX_DESTROY: self.destroy_command,
            Cmd.CTX_ATTACH_RESOURCE: with_body(CtxResource, self.attach),
            Cmd.CTX_DETACH_RESOURCE: with_body(CtxResource, self.detach_command),
        }

    def get(self, ctx_id: int) -> Context:
        """The context, or INVALID_CONTEXT_ID."""
        try:
            return self._by_id[ctx_id]
        except KeyError:
            raise GuestProtocolError(f"no context {ctx_id}", Resp.ERR_INVALID_CONTEXT_ID) from None

    # --- commands ------------------------------------------------------------------

    def create(self, hdr: CtrlHdr, body: CtxCreate) -> Reply:
        """CTX_CREATE with ``hdr.ctx_id``."""
        ctx_id = hdr.ctx_id
        if ctx_id == 0 or ctx_id in self._by_id:
            raise GuestProtocolError(f"context id {ctx_id} is 0 or in use",
                                     Resp.ERR_INVALID_CONTEXT_ID)
        if len(self._by_id) >= self.s.limits.max_contexts:
            raise GuestProtocolError(f"more than {self.s.limits.max_contexts} contexts",
                                     Resp.ERR_OUT_OF_MEMORY)
        if body.nlen > len(body.debug_name):
            raise GuestProtocolError(f"debug name length {body.nlen} > 64")
        requested = body.context_init & CONTEXT_INIT_CAPSET_MASK
        if not self._context_capsets:
            raise GuestProtocolError("this device has no context types", Resp.ERR_UNSPEC)
        if requested == 0:
            capset_id = self._context_capsets[0]
        elif requested in {c & CONTEXT_INIT_CAPSET_MASK for c in self._context_capsets}:
            capset_id = next(c for c in self._context_capsets
                             if c & CONTEXT_INIT_CAPSET_MASK == requested)
        else:
            raise GuestProtocolError(f"context type (capset) {requested} is not offered")
        name = body.debug_name[:body.nlen].decode("utf-8", "replace")
        ctx = Context(ctx_id, capset_id, name)
        if self.s.host_gpu is not None:
            try:
                self.s.host_gpu.open_context(ctx_id)
            except HostGpuError as err:
                log.error("context %d: host GPU: %s", ctx_id, err)
                raise GuestProtocolError(f"host GPU refused context {ctx_id}",
                                         Resp.ERR_UNSPEC) from None
        self._by_id[ctx_id] = ctx
        for hook in self.create_hooks:
            hook(ctx)
        log.info("context %d (%r) created, type capset %#x", ctx_id, name, capset_id)
        return OK

    def destroy_command(self, hdr: CtrlHdr, data: bytes) -> Reply | Deferred:
        """CTX_DESTROY of ``hdr.ctx_id`` (after its in-flight compute work)."""
        self.get(hdr.ctx_id)

        def now() -> Reply:
            self.destroy(self.get(hdr.ctx_id))
            return OK
        return self.s.after_compute((hdr.ctx_id,), now)

    def attach(self, hdr: CtrlHdr, body: CtxResource) -> Reply:
        """Make a resource usable in a context (idempotent)."""
        ctx = self.get(hdr.ctx_id)
        res = self.s.resources.get(body.resource_id)
        self.link(ctx, res)
        return OK

    def detach_command(self, hdr: CtrlHdr, body: CtxResource) -> Reply | Deferred:
        """Remove a resource from a context (idempotent; after in-flight compute work)."""
        self.get(hdr.ctx_id)
        self.s.resources.get(body.resource_id)

        def now() -> Reply:
            self.unlink(self.get(hdr.ctx_id), self.s.resources.get(body.resource_id))
            return OK
        return self.s.after_compute((hdr.ctx_id,), now)

    # --- operations ----------------------------------------------------------------

    def link(self, ctx: Context, res: Resource) -> None:
        """Attach ``res`` to ``ctx``."""
        ctx.resources.add(res.resource_id)
        res.contexts.add(ctx.ctx_id)

    def unlink(self, ctx: Context, res: Resource) -> None:
        """Detach ``res`` from ``ctx``; the context's mappings of it go away first."""
        if res.resource_id not in ctx.resources:
            return
        for hook in self.detach_hooks:
            hook(ctx, res)
        ctx.resources.discard(res.resource_id)
        res.contexts.discard(ctx.ctx_id)

    def destroy(self, ctx: Context) -> None:
        """Detach every resource, run the destroy hooks, drop the context."""
        for resource_id in sorted(ctx.resources):
            try:
                self.unlink(ctx, self.s.resources.get(resource_id))
            except GuestProtocolError:
                ctx.resources.discard(resource_id)
        for hook in self.destroy_hooks:
            hook(ctx)
        del self._by_id[ctx.ctx_id]
        if self.s.host_gpu is not None:
            self.s.host_gpu.close_context(ctx.ctx_id)
        log.info("context %d destroyed", ctx.ctx_id)

    def destroy_all(self) -> None:
        """Device reset: every context goes."""
        for ctx in self:
            self.destroy(ctx)

    def _resource_destroyed(self, res: Resource) -> None:
        for ctx_id in sorted(res.contexts):
            ctx = self._by_id.get(ctx_id)
            if ctx is not None:
                self.unlink(ctx, res)
