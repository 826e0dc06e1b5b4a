"""Blob resources: RESOURCE_CREATE_BLOB (GUEST, HOST3D_GUEST, USERPTR), SET_SCANOUT_BLOB.

USERPTR blobs are registered with the host GPU as one buffer when created and released
before RESOURCE_UNREF is answered (the guest unpins its pages right after queueing the
UNREF).  When guest memory under a userptr blob changes, its host mapping is torn down
at once, like an MMU-notifier invalidation, and later use of the blob is an error.
"""

from __future__ import annotations

import errno
import logging

import numpy as np
import numpy.typing as npt

from protocol.capsets import (
    USERPTR_CAPSET_MAGIC,
    USERPTR_CAPSET_VERSION,
    HostBackend,
    HostPath,
    UserptrCapFlag,
    UserptrCapset,
)
from protocol.errors import GuestProtocolError
from protocol.virtio_gpu import (
    CTRL_HDR_SIZE,
    CtrlHdr,
    ResourceCreateBlob,
    SetScanoutBlob,
)
from protocol.virtio_gpu_codes import BlobFlag, BlobMem, Cmd, Feature, Format, Resp
from protocol.wire import encode, layout
from vgpu_backend.backing import Backing, read_mem_entries
from vgpu_backend.chains import DescriptorChain
from vgpu_backend.contexts import ContextTable
from vgpu_backend.device_state import (
    OK,
    Capset,
    ChainHandler,
    DeviceState,
    Handler,
    Reply,
    UserptrProtocol,
    with_body,
    with_body_and_chain,
)
from vgpu_backend.guest_memory import Segments
from vgpu_backend.hostgpu.base import HostGpuError, UserptrPath
from vgpu_backend.pixels import to_bgrx
from vgpu_backend.resources import BlobResource, Resource
from vgpu_backend.scanout import PixelSource, Rect
from vgpu_backend.userptr import PAGE_SIZE, host_ranges, translate_userptr

__all__ = ["BlobCommands", "userptr_capset"]

log = logging.getLogger(__name__)

_CREATE_SIZE = CTRL_HDR_SIZE + layout(ResourceCreateBlob).size
_KNOWN_FLAGS = int(BlobFlag.USE_MAPPABLE | BlobFlag.USE_SHAREABLE | BlobFlag.USE_CROSS_DEVICE
                   | BlobFlag.USE_USERPTR | BlobFlag.USERPTR_RDONLY)
_HOST_PATH = {UserptrPath.BATCH: HostPath.BATCH, UserptrPath.ALIAS: HostPath.ALIAS,
              UserptrPath.PER_RANGE: HostPath.PER_RANGE}


def userptr_capset(state: DeviceState) -> Capset:
    """The userptr capset describing what this device and host can do (its entry limit
    depends on the guest RAM of the moment: read when the guest asks)."""
    return Capset(state.options.userptr_capset_id, USERPTR_CAPSET_VERSION,
                  _userptr_capset_bytes(state), lambda: _userptr_capset_bytes(state))


def _userptr_capset_bytes(state: DeviceState) -> bytes:
    opts, gpu = state.options, state.host_gpu
    info = gpu.info() if gpu is not None else None
    flags = UserptrCapFlag(0)
    if info is not None and info.userptr_available:
        flags |= UserptrCapFlag.AVAILABLE | UserptrCapFlag.RDONLY | UserptrCapFlag.ZERO_COPY
        if opts.compute:
            flags |= UserptrCapFlag.CONTEXT_MAP
    if info is not None and info.batch_supported:
        flags |= UserptrCapFlag.BATCH_SUPPORTED
    protocol = {UserptrProtocol.V3: 3, UserptrProtocol.V5: 5}.get(opts.userptr_protocol, 0)
    record = UserptrCapset(
        magic=USERPTR_CAPSET_MAGIC, version=USERPTR_CAPSET_VERSION,
        size=layout(UserptrCapset).size, protocol=protocol, flags=int(flags),
        host_path=int(_HOST_PATH[info.userptr_path]) if info and info.userptr_available
        else HostPath.NONE,
        host_backend=int({"kfd": HostBackend.KFD, "sim": HostBackend.SIM}.get(
            info.backend, HostBackend.NONE)) if info else HostBackend.NONE,
        page_size=PAGE_SIZE, max_entries=min(
            state.limits.max_userptr_entries, 0xFFFFFFFF if info is None
            else info.max_ranges_huge_pages if state.memory.huge_pages else info.max_ranges),
        max_bytes=state.limits.max_userptr_bytes,
        num_gpus=len(info.gpu_ids) if info else 0,
        kfd_version=(info.kfd_version[0] << 16 | info.kfd_version[1]) if info else 0,
        blob_mem_mask=(1 << BlobMem.GUEST) | (1 << BlobMem.HOST3D_GUEST))
    return encode(record)


class BlobCommands:
    """Handlers for blob resources."""

    def __init__(self, state: DeviceState, contexts: ContextTable) -> None:
        self.s = state
        self.contexts = contexts
        self._warned_features = False
        self._warned_unsupported = False
        state.release_hooks.add(BlobResource, self._release_strictly)
        state.destroy_hooks.add(BlobResource, self._release)
        state.detach_hooks.add(BlobResource, self._invalidate)

    def handlers(self) -> dict[int, Handler]:
        """Command type -> handler."""
        return {
            Cmd.SET_SCANOUT_BLOB: with_body(SetScanoutBlob, self.set_scanout_blob),
        }

    def chain_handlers(self) -> dict[int, ChainHandler]:
        """Command type -> handler, for the commands with entries after their struct."""
        return {Cmd.RESOURCE_CREATE_BLOB: with_body_and_chain(ResourceCreateBlob,
                                                              self.create_blob)}

    # --- RESOURCE_CREATE_BLOB --------------------------------------------------------

    def create_blob(self, hdr: CtrlHdr, body: ResourceCreateBlob,
                    chain: DescriptorChain) -> Reply:
        """Create a GUEST or HOST3D_GUEST blob, or a USERPTR blob mapped on the host GPU."""
        self._note_features()
        flags = body.blob_flags
        userptr = bool(flags & BlobFlag.USE_USERPTR)
        if flags & ~_KNOWN_FLAGS:
            raise GuestProtocolError(f"unknown blob flags {flags:#x}")
        if flags & BlobFlag.USERPTR_RDONLY and not userptr:
            raise GuestProtocolError("USERPTR_RDONLY without USE_USERPTR")
        if userptr and self.s.options.userptr_protocol is UserptrProtocol.OFF:
            raise GuestProtocolError("USERPTR blobs are disabled (--userptr-protocol off)")
        self.s.resources.check_new_id(body.resource_id)
        try:
            blob_mem = BlobMem(body.blob_mem)
        except ValueError:
            raise GuestProtocolError(f"blob_mem {body.blob_mem}") from None
        if blob_mem is BlobMem.HOST3D:
            raise GuestProtocolError(
                "HOST3D blobs need a context object; no context type here provides one"
                if not userptr else "USERPTR with blob_mem HOST3D")
        ctx = self.contexts.get(hdr.ctx_id) if blob_mem is BlobMem.HOST3D_GUEST else None
        if body.size == 0:
            raise GuestProtocolError("blob of size 0")
        if not userptr and body.size > self.s.limits.max_blob_bytes:  # entries or later
            raise GuestProtocolError(f"blob of {body.size} bytes", Resp.ERR_OUT_OF_MEMORY)
        limit = self.s.limits.max_userptr_entries if userptr else \
            self.s.limits.max_backing_entries
        addr, length = read_mem_entries(chain, _CREATE_SIZE, body.nr_entries, limit)
        res = BlobResource(body.resource_id, blob_mem=blob_mem, blob_flags=BlobFlag(flags),
                           blob_id=body.blob_id, size=body.size, ctx_id=hdr.ctx_id)
        if userptr:
            segments = translate_userptr(self.s.memory, addr, length, body.size,
                                         self.s.limits.max_userptr_bytes)
            res.backing = Backing(self.s.memory, segments)
            self._register(res, segments, ctx.ctx_id if ctx else None)
        elif body.nr_entries:
            segments = self.s.memory.translate(addr, length).coalesced()
            if segments.total < body.size:
                raise GuestProtocolError(
                    f"entries cover {segments.total} bytes of a {body.size}-byte blob")
            res.backing = Backing(self.s.memory, segments)
        self.s.resources.add(res)
        if ctx is not None:
            self.contexts.link(ctx, res)
        return OK

    def _register(self, res: BlobResource, segments: Segments, context: int | None) -> None:
        gpu = self.s.host_gpu
        if gpu is None:
            raise GuestProtocolError("no host GPU for USERPTR blobs", Resp.ERR_UNSPEC)
        info = gpu.info()
        if len(segments) > info.max_ranges:
            raise GuestProtocolError(
                f"{len(segments)} host ranges exceed the {info.userptr_path.value} path's "
                f"{info.max_ranges}", Resp.ERR_OUT_OF_MEMORY)
        ranges = host_ranges(self.s.memory, segments)
        try:
            res.gpu_mapping = gpu.register_userptr(ranges, readonly=res.readonly,
                                                   context=context)
        except HostGpuError as err:
            if err.unsupported:
                if not self._warned_unsupported:
                    self._warned_unsupported = True
                    log.error("USERPTR blobs are refused: %s", err)
                raise GuestProtocolError(str(err), Resp.ERR_UNSPEC) from None
            log.error("resource %d: host GPU refused the userptr: %s", res.resource_id, err)
            code = Resp.ERR_OUT_OF_MEMORY if err.errno == errno.ENOMEM else Resp.ERR_UNSPEC
            raise GuestProtocolError(str(err), code) from None
        mapping = res.gpu_mapping
        log.debug("resource %d: userptr of %d bytes in %d ranges at GPU VA %#x (%s)",
                  res.resource_id, mapping.size, len(ranges), mapping.gpu_va, mapping.path.value)

    def _note_features(self) -> None:
        if self._warned_features:
            return
        acked = self.s.acked_features
        wanted = Feature.RESOURCE_BLOB
        if self.s.options.userptr_protocol is UserptrProtocol.V3:
            wanted |= Feature.RESOURCE_USERPTR_V3
        if acked & wanted != wanted:
            self._warned_features = True
            log.warning("the driver did not ack %s (QEMU's vhost-user-gpu-pci never forwards "
                        "them); serving blob commands anyway", wanted)

    # --- lifecycle hooks -----------------------------------------------------------

    def _release_strictly(self, res: Resource) -> None:
        """RESOURCE_UNREF, DETACH_BACKING: the host mapping must be gone before the answer
        (the guest unpins the pages right after).  If the host GPU cannot unmap it, the
        command is refused and the resource keeps its memory: the guest learns the pages
        are still in use and may retry; the mapping is unusable for any context
        meanwhile."""
        self._release(res, strict=True)

    def _release(self, res: Resource, *, strict: bool = False) -> None:
        """Before a resource is destroyed: no context may reach it any more, and its
        host GPU mapping is freed (synchronously)."""
        if isinstance(res, BlobResource) and res.gpu_mapping is not None:
            for hook in self.s.unmap_hooks[type(res)]:
                hook(res)
            gpu, mapping = self.s.host_gpu, res.gpu_mapping
            res.gpu_mapping = None
            if gpu is not None:
                try:
                    gpu.release(mapping)
                except HostGpuError as err:  # kept by the host GPU layer, retried at close
                    log.error("resource %d: releasing its GPU mapping failed: %s",
                              res.resource_id, err)
                    if strict:
                        res.gpu_mapping = mapping
                        raise GuestProtocolError(
                            f"resource {res.resource_id}: the host GPU could not unmap "
                            f"it ({err})", Resp.ERR_UNSPEC) from None

    def _invalidate(self, res: Resource) -> None:
        """Its guest memory goes away (DETACH_BACKING, memory removed): tear down."""
        if isinstance(res, BlobResource) and res.userptr and res.invalidated is None:
            self._release(res)
            res.invalidated = "guest memory behind it changed"
            log.info("resource %d: userptr invalidated", res.resource_id)

    # --- SET_SCANOUT_BLOB ----------------------------------------------------------

    def set_scanout_blob(self, hdr: CtrlHdr, body: SetScanoutBlob) -> Reply:
        """Show a framebuffer that lives in a blob's guest memory."""
        if body.scanout_id >= self.s.num_scanouts:
            raise GuestProtocolError(f"scanout {body.scanout_id}", Resp.ERR_INVALID_SCANOUT_ID)
        if body.resource_id == 0:
            self.s.scanouts.disable(body.scanout_id)
            return OK
        res = self.s.resources.get(body.resource_id)
        if not isinstance(res, BlobResource):
            raise GuestProtocolError(f"resource {body.resource_id} is not a blob")
        if res.backing is None or res.invalidated:
            raise GuestProtocolError(f"blob {body.resource_id} has no usable guest memory",
                                     Resp.ERR_UNSPEC)
        try:
            fmt = Format(body.format)
        except ValueError:
            raise GuestProtocolError(f"unknown format {body.format}") from None
        fb_w, fb_h, stride, offset = body.fb_width, body.fb_height, body.stride0, body.offset0
        limit = self.s.limits.max_dimension
        if not (0 < fb_w <= limit and 0 < fb_h <= limit) or stride < fb_w * 4:
            raise GuestProtocolError(f"framebuffer {fb_w}x{fb_h} stride {stride}")
        if body.width * body.height * 4 > self.s.limits.max_hostmem:
            # each flush converts up to this much on the event loop
            raise GuestProtocolError(f"scanout {body.width}x{body.height} exceeds the "
                                     "host-memory budget", Resp.ERR_OUT_OF_MEMORY)
        # the whole framebuffer lies in the blob (QEMU checks only the rectangle shown)
        if offset + stride * (fb_h - 1) + fb_w * 4 > res.size:
            raise GuestProtocolError("framebuffer extends beyond the blob")
        if body.width == 0 or body.height == 0 or body.x + body.width > fb_w or \
                body.y + body.height > fb_h:
            raise GuestProtocolError("scanout rectangle outside the framebuffer")
        res.fb_size = (fb_w, fb_h)
        self.s.scanouts.show(body.scanout_id, res,
                             (body.x, body.y, body.width, body.height),
                             _blob_source(res, fmt, stride, offset), (fb_w, fb_h))
        return OK


def _blob_source(res: BlobResource, fmt: Format, stride: int, offset: int) -> PixelSource:
    def render(rect: Rect) -> npt.NDArray[np.uint32]:
        x, y, w, h = rect
        backing = res.backing
        if backing is None:
            return np.zeros((h, w), dtype=np.uint32)
        rows = backing.read_rows(offset + y * stride + x * 4, stride, w * 4, h)
        return to_bgrx(np.ascontiguousarray(rows).view("<u4"), fmt)
    return render
