"""virtio-gpu wire structs (``include/uapi/linux/virtio_gpu.h``), all little-endian.

Commands are declared as *bodies*: the fields after the 24-byte
``struct virtio_gpu_ctrl_hdr`` that every command and response starts with.  Nested
``struct virtio_gpu_rect r`` members are flattened to ``x, y, width, height``.
"""

from __future__ import annotations

from typing import Annotated, Final, NamedTuple

from construct import Bytes

from protocol.wire import U8, U32, U64, layout, wire

__all__ = [
    "CTRL_HDR_SIZE",
    "EDID_BLOB_SIZE",
    "MAX_SCANOUTS",
    "CtrlHdr",
    "CtxCreate",
    "CtxResource",
    "CursorPos",
    "DisplayOne",
    "GetCapset",
    "GetCapsetInfo",
    "GetEdid",
    "GpuConfig",
    "MemEntry",
    "ResourceAssignUuid",
    "ResourceAttachBacking",
    "ResourceCreate2d",
    "ResourceCreate3d",
    "ResourceCreateBlob",
    "ResourceDetachBacking",
    "ResourceFlush",
    "ResourceMapBlob",
    "ResourceUnmapBlob",
    "ResourceUnref",
    "RespCapsetInfo",
    "RespEdidHeader",
    "RespMapInfo",
    "RespResourceUuid",
    "SetScanout",
    "SetScanoutBlob",
    "Submit3d",
    "TransferHost3d",
    "TransferToHost2d",
    "UpdateCursor",
]

Bytes3 = Annotated[bytes, Bytes(3)]
Bytes16 = Annotated[bytes, Bytes(16)]
Bytes64 = Annotated[bytes, Bytes(64)]

MAX_SCANOUTS: Final = 16
EDID_BLOB_SIZE: Final = 1024


@wire("struct virtio_gpu_ctrl_hdr")
class CtrlHdr(NamedTuple):
    """``struct virtio_gpu_ctrl_hdr { __le32 type; __le32 flags; __le64 fence_id;
    __le32 ctx_id; __u8 ring_idx; __u8 padding[3]; };`` (24 bytes)"""

    type: U32
    flags: U32 = 0
    fence_id: U64 = 0
    ctx_id: U32 = 0
    ring_idx: U8 = 0
    padding: Bytes3 = b"\0\0\0"


CTRL_HDR_SIZE: Final = layout(CtrlHdr).size


@wire("struct virtio_gpu_config")
class GpuConfig(NamedTuple):
    """``struct virtio_gpu_config { __le32 events_read; __le32 events_clear;
    __le32 num_scanouts; __le32 num_capsets; };`` (device config space, 16 bytes)"""

    events_read: U32
    events_clear: U32
    num_scanouts: U32
    num_capsets: U32


@wire("struct virtio_gpu_display_one")
class DisplayOne(NamedTuple):
    """``struct virtio_gpu_display_one { struct virtio_gpu_rect r; __le32 enabled;
    __le32 flags; };`` -- one of the 16 pmodes of ``virtio_gpu_resp_display_info``
    (which is ``hdr`` + 16 of these = 408 bytes)."""

    x: U32
    y: U32
    width: U32
    height: U32
    enabled: U32
    flags: U32


@wire("struct virtio_gpu_resource_create_2d")
class ResourceCreate2d(NamedTuple):
    """``struct virtio_gpu_resource_create_2d { hdr; __le32 resource_id; __le32 format;
    __le32 width; __le32 height; };``"""

    resource_id: U32
    format: U32
    width: U32
    height: U32


@wire("struct virtio_gpu_resource_unref")
class ResourceUnref(NamedTuple):
    """``struct virtio_gpu_resource_unref { hdr; __le32 resource_id; __le32 padding; };``"""

    resource_id: U32
    padding: U32 = 0


@wire("struct virtio_gpu_set_scanout")
class SetScanout(NamedTuple):
    """``struct virtio_gpu_set_scanout { hdr; struct virtio_gpu_rect r;
    __le32 scanout_id; __le32 resource_id; };``"""

    x: U32
    y: U32
    width: U32
    height: U32
    scanout_id: U32
    resource_id: U32


@wire("struct virtio_gpu_resource_flush")
class ResourceFlush(NamedTuple):
    """``struct virtio_gpu_resource_flush { hdr; struct virtio_gpu_rect r;
    __le32 resource_id; __le32 padding; };``"""

    x: U32
    y: U32
    width: U32
    height: U32
    resource_id: U32
    padding: U32 = 0


@wire("struct virtio_gpu_transfer_to_host_2d")
class TransferToHost2d(NamedTuple):
    """``struct virtio_gpu_transfer_to_host_2d { hdr; struct virtio_gpu_rect r;
    __le64 offset; __le32 resource_id; __le32 padding; };``"""

    x: U32
    y: U32
    width: U32
    height: U32
    offset: U64
    resource_id: U32
    padding: U32 = 0


@wire("struct virtio_gpu_resource_attach_backing")
class ResourceAttachBacking(NamedTuple):
    """``struct virtio_gpu_resource_attach_backing { hdr; __le32 resource_id;
    __le32 nr_entries; };`` followed by ``nr_entries`` mem entries."""

    resource_id: U32
    nr_entries: U32


@wire("struct virtio_gpu_mem_entry")
class MemEntry(NamedTuple):
    """``struct virtio_gpu_mem_entry { __le64 addr; __le32 length; __le32 padding; };``
    (guest-physical; its dtype views entry arrays in guest memory)"""

    addr: U64
    length: U32
    padding: U32 = 0


@wire("struct virtio_gpu_resource_detach_backing")
class ResourceDetachBacking(NamedTuple):
    """``struct virtio_gpu_resource_detach_backing { hdr; __le32 resource_id;
    __le32 padding; };``"""

    resource_id: U32
    padding: U32 = 0


@wire("struct virtio_gpu_get_capset_info")
class GetCapsetInfo(NamedTuple):
    """``struct virtio_gpu_get_capset_info { hdr; __le32 capset_index; __le32 padding; };``"""

    capset_index: U32
    padding: U32 = 0


@wire("struct virtio_gpu_resp_capset_info")
class RespCapsetInfo(NamedTuple):
    """``struct virtio_gpu_resp_capset_info { hdr; __le32 capset_id;
    __le32 capset_max_version; __le32 capset_max_size; __le32 padding; };``"""

    capset_id: U32
    capset_max_version: U32
    capset_max_size: U32
    padding: U32 = 0


@wire("struct virtio_gpu_get_capset")
class GetCapset(NamedTuple):
    """``struct virtio_gpu_get_capset { hdr; __le32 capset_id; __le32 capset_version; };``
    (the response is ``hdr`` + the capset bytes)"""

    capset_id: U32
    capset_version: U32


@wire("struct virtio_gpu_cmd_get_edid")
class GetEdid(NamedTuple):
    """``struct virtio_gpu_cmd_get_edid { hdr; __le32 scanout; __le32 padding; };``"""

    scanout: U32
    padding: U32 = 0


@wire("struct virtio_gpu_resp_edid (header)")
class RespEdidHeader(NamedTuple):
    """``struct virtio_gpu_resp_edid { hdr; __le32 size; __le32 padding;
    __u8 edid[1024]; };`` -- the two words before the 1024-byte blob."""

    size: U32
    padding: U32 = 0


@wire("struct virtio_gpu_resource_assign_uuid")
class ResourceAssignUuid(NamedTuple):
    """``struct virtio_gpu_resource_assign_uuid { hdr; __le32 resource_id;
    __le32 padding; };``"""

    resource_id: U32
    padding: U32 = 0


@wire("struct virtio_gpu_resp_resource_uuid")
class RespResourceUuid(NamedTuple):
    """``struct virtio_gpu_resp_resource_uuid { hdr; __u8 uuid[16]; };``"""

    uuid: Bytes16


@wire("struct virtio_gpu_resource_create_blob")
class ResourceCreateBlob(NamedTuple):
    """``struct virtio_gpu_resource_create_blob { hdr; __le32 resource_id;
    __le32 blob_mem; __le32 blob_flags; __le32 nr_entries; __le64 blob_id;
    __le64 size; };`` followed by ``nr_entries`` mem entries."""

    resource_id: U32
    blob_mem: U32
    blob_flags: U32
    nr_entries: U32
    blob_id: U64
    size: U64


@wire("struct virtio_gpu_set_scanout_blob")
class SetScanoutBlob(NamedTuple):
    """``struct virtio_gpu_set_scanout_blob { hdr; struct virtio_gpu_rect r;
    __le32 scanout_id; __le32 resource_id; __le32 width; __le32 height; __le32 format;
    __le32 padding; __le32 strides[4]; __le32 offsets[4]; };``"""

    x: U32
    y: U32
    width: U32
    height: U32
    scanout_id: U32
    resource_id: U32
    fb_width: U32
    fb_height: U32
    format: U32
    padding: U32
    stride0: U32
    stride1: U32
    stride2: U32
    stride3: U32
    offset0: U32
    offset1: U32
    offset2: U32
    offset3: U32


@wire("struct virtio_gpu_ctx_create")
class CtxCreate(NamedTuple):
    """``struct virtio_gpu_ctx_create { hdr; __le32 nlen; __le32 context_init;
    char debug_name[64]; };`` (low 8 bits of context_init = capset id)"""

    nlen: U32
    context_init: U32
    debug_name: Bytes64


@wire("struct virtio_gpu_ctx_resource")
class CtxResource(NamedTuple):
    """``struct virtio_gpu_ctx_resource { hdr; __le32 resource_id; __le32 padding; };``
    (CTX_ATTACH_RESOURCE / CTX_DETACH_RESOURCE)"""

    resource_id: U32
    padding: U32 = 0


@wire("struct virtio_gpu_resource_create_3d")
class ResourceCreate3d(NamedTuple):
    """``struct virtio_gpu_resource_create_3d { hdr; __le32 resource_id; __le32 target;
    __le32 format; __le32 bind; __le32 width; __le32 height; __le32 depth;
    __le32 array_size; __le32 last_level; __le32 nr_samples; __le32 flags;
    __le32 padding; };``"""

    resource_id: U32
    target: U32
    format: U32
    bind: U32
    width: U32
    height: U32
    depth: U32
    array_size: U32
    last_level: U32
    nr_samples: U32
    flags: U32
    padding: U32 = 0


@wire("struct virtio_gpu_transfer_host_3d")
class TransferHost3d(NamedTuple):
    """``struct virtio_gpu_transfer_host_3d { hdr; struct virtio_gpu_box box;
    __le64 offset; __le32 resource_id; __le32 level; __le32 stride;
    __le32 layer_stride; };`` (box = x, y, z, w, h, d)"""

    x: U32
    y: U32
    z: U32
    w: U32
    h: U32
    d: U32
    offset: U64
    resource_id: U32
    level: U32
    stride: U32
    layer_stride: U32


@wire("struct virtio_gpu_cmd_submit")
class Submit3d(NamedTuple):
    """``struct virtio_gpu_cmd_submit { hdr; __le32 size; __le32 num_in_fences; };``
    followed by ``size`` bytes of command stream."""

    size: U32
    num_in_fences: U32 = 0


@wire("struct virtio_gpu_resource_map_blob")
class ResourceMapBlob(NamedTuple):
    """``struct virtio_gpu_resource_map_blob { hdr; __le32 resource_id; __le32 padding;
    __le64 offset; };``"""

    resource_id: U32
    padding: U32
    offset: U64


@wire("struct virtio_gpu_resp_map_info")
class RespMapInfo(NamedTuple):
    """``struct virtio_gpu_resp_map_info { hdr; __u32 map_info; __u32 padding; };``"""

    map_info: U32
    padding: U32 = 0


@wire("struct virtio_gpu_resource_unmap_blob")
class ResourceUnmapBlob(NamedTuple):
    """``struct virtio_gpu_resource_unmap_blob { hdr; __le32 resource_id;
    __le32 padding; };``"""

    resource_id: U32
    padding: U32 = 0


@wire("struct virtio_gpu_cursor_pos")
class CursorPos(NamedTuple):
    """``struct virtio_gpu_cursor_pos { __le32 scanout_id; __le32 x; __le32 y;
    __le32 padding; };``"""

    scanout_id: U32
    x: U32
    y: U32
    padding: U32 = 0


@wire("struct virtio_gpu_update_cursor")
class UpdateCursor(NamedTuple):
    """``struct virtio_gpu_update_cursor { hdr; struct virtio_gpu_cursor_pos pos;
    __le32 resource_id; __le32 hot_x; __le32 hot_y; __le32 padding; };``
    (UPDATE_CURSOR and MOVE_CURSOR)"""

    scanout_id: U32
    x: U32
    y: U32
    pos_padding: U32
    resource_id: U32
    hot_x: U32
    hot_y: U32
    padding: U32 = 0
