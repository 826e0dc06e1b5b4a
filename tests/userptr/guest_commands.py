"""Command bytes for blobs, contexts, SUBMIT_3D and the copy path, as a guest builds them.

Complements :mod:`tests.frontend.gpu_commands` (the 2D set) with the 3D/blob commands.
"""

from __future__ import annotations

from protocol.virtio_gpu import (
    CtrlHdr,
    CtxCreate,
    CtxResource,
    ResourceCreate3d,
    ResourceCreateBlob,
    SetScanoutBlob,
    Submit3d,
    TransferHost3d,
)
from protocol.virtio_gpu_codes import Cmd, CtrlFlag
from protocol.wire import encode

__all__ = [
    "PIPE_BUFFER",
    "create_blob",
    "create_buffer_3d",
    "ctx_create",
    "ctx_destroy",
    "ctx_resource",
    "header",
    "set_scanout_blob",
    "submit_3d",
    "transfer_3d",
]

#: ``enum pipe_texture_target`` PIPE_BUFFER (the only RESOURCE_CREATE_3D target served)
PIPE_BUFFER = 0


def header(cmd: int, *, ctx_id: int = 0, fence_id: int | None = None,
           ring_idx: int | None = None) -> bytes:
    """A control header; fenced when ``fence_id`` is given, ring-indexed with
    ``ring_idx`` (VIRTIO_GPU_FLAG_INFO_RING_IDX)."""
    flags = 0
    if fence_id is not None:
        flags |= CtrlFlag.FENCE
    if ring_idx is not None:
        flags |= CtrlFlag.INFO_RING_IDX
    return encode(CtrlHdr(cmd, int(flags), fence_id or 0, ctx_id, ring_idx or 0))


def create_blob(resource_id: int, blob_mem: int, blob_flags: int, nr_entries: int,
                size: int, *, blob_id: int = 0, ctx_id: int = 0,
                fence_id: int | None = None) -> bytes:
    """RESOURCE_CREATE_BLOB without its entries (they go in a second buffer)."""
    return header(Cmd.RESOURCE_CREATE_BLOB, ctx_id=ctx_id, fence_id=fence_id) + encode(
        ResourceCreateBlob(resource_id, blob_mem, blob_flags, nr_entries, blob_id, size))


def ctx_create(ctx_id: int, context_init: int = 0, name: bytes = b"test",
               fence_id: int | None = None) -> bytes:
    """CTX_CREATE (``context_init`` low byte: capset id of the context type)."""
    return header(Cmd.CTX_CREATE, ctx_id=ctx_id, fence_id=fence_id) + encode(
        CtxCreate(len(name), context_init, name.ljust(64, b"\0")))


def ctx_destroy(ctx_id: int, fence_id: int | None = None) -> bytes:
    """CTX_DESTROY."""
    return header(Cmd.CTX_DESTROY, ctx_id=ctx_id, fence_id=fence_id)


def ctx_resource(cmd: int, ctx_id: int, resource_id: int,
                 fence_id: int | None = None) -> bytes:
    """CTX_ATTACH_RESOURCE / CTX_DETACH_RESOURCE."""
    return header(cmd, ctx_id=ctx_id, fence_id=fence_id) + encode(CtxResource(resource_id))


def set_scanout_blob(scanout_id: int, resource_id: int, *, fmt: int, fb_width: int,
                     fb_height: int, stride: int, offset: int = 0,
                     rect: tuple[int, int, int, int] | None = None) -> bytes:
    """SET_SCANOUT_BLOB of one plane (``rect`` defaults to the whole framebuffer)."""
    x, y, w, h = rect or (0, 0, fb_width, fb_height)
    return header(Cmd.SET_SCANOUT_BLOB) + encode(SetScanoutBlob(
        x, y, w, h, scanout_id, resource_id, fb_width, fb_height, fmt, 0,
        stride, 0, 0, 0, offset, 0, 0, 0))


def submit_3d(ctx_id: int, size: int, *, fence_id: int | None = None,
              ring_idx: int | None = None, num_in_fences: int = 0) -> bytes:
    """SUBMIT_3D header; the ``size``-byte stream follows in a second buffer."""
    return header(Cmd.SUBMIT_3D, ctx_id=ctx_id, fence_id=fence_id, ring_idx=ring_idx) + \
        encode(Submit3d(size, num_in_fences))


def create_buffer_3d(resource_id: int, nbytes: int, *, ctx_id: int = 0, target: int = PIPE_BUFFER,
                     height: int = 1) -> bytes:
    """RESOURCE_CREATE_3D of a PIPE_BUFFER of ``nbytes`` (format R8_UNORM = 64)."""
    return header(Cmd.RESOURCE_CREATE_3D, ctx_id=ctx_id) + encode(
        ResourceCreate3d(resource_id, target, 64, 0, nbytes, height, 1, 1, 0, 0, 0))


def transfer_3d(cmd: int, resource_id: int, x: int, width: int, offset: int = 0, *,
                ctx_id: int = 0, fence_id: int | None = None) -> bytes:
    """TRANSFER_TO_HOST_3D / TRANSFER_FROM_HOST_3D of bytes ``[x, x+width)`` of a buffer,
    from/to byte ``offset`` of its guest backing."""
    return header(cmd, ctx_id=ctx_id, fence_id=fence_id) + encode(
        TransferHost3d(x, 0, 0, width, 1, 1, offset, resource_id, 0, 0, 0))
