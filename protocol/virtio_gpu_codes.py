"""virtio-gpu numbers: commands, responses, features, formats, blob and capset ids.

Values from ``include/uapi/linux/virtio_gpu.h`` (``enum virtio_gpu_ctrl_type`` counts
up from each base) and the virtio spec, plus the proposed USERPTR blob flags (guest
series v5, Jan 2026).  Number collisions are documented where they occur.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

__all__ = [
    "BlobFlag",
    "BlobMem",
    "Capset",
    "Cmd",
    "CtrlFlag",
    "Feature",
    "Format",
    "MapCache",
    "Resp",
]


class Cmd(IntEnum):
    """``enum virtio_gpu_ctrl_type``: commands."""

    # 2D
    GET_DISPLAY_INFO = 0x0100
    RESOURCE_CREATE_2D = 0x0101
    RESOURCE_UNREF = 0x0102
    SET_SCANOUT = 0x0103
    RESOURCE_FLUSH = 0x0104
    TRANSFER_TO_HOST_2D = 0x0105
    RESOURCE_ATTACH_BACKING = 0x0106
    RESOURCE_DETACH_BACKING = 0x0107
    GET_CAPSET_INFO = 0x0108
    GET_CAPSET = 0x0109
    GET_EDID = 0x010A
    RESOURCE_ASSIGN_UUID = 0x010B
    RESOURCE_CREATE_BLOB = 0x010C
    SET_SCANOUT_BLOB = 0x010D
    # 3D
    CTX_CREATE = 0x0200
    CTX_DESTROY = 0x0201
    CTX_ATTACH_RESOURCE = 0x0202
    CTX_DETACH_RESOURCE = 0x0203
    RESOURCE_CREATE_3D = 0x0204
    TRANSFER_TO_HOST_3D = 0x0205
    TRANSFER_FROM_HOST_3D = 0x0206
    SUBMIT_3D = 0x0207
    RESOURCE_MAP_BLOB = 0x0208
    RESOURCE_UNMAP_BLOB = 0x0209
    # cursor
    UPDATE_CURSOR = 0x0300
    MOVE_CURSOR = 0x0301


class Resp(IntEnum):
    """``enum virtio_gpu_ctrl_type``: responses."""

    OK_NODATA = 0x1100
    OK_DISPLAY_INFO = 0x1101
    OK_CAPSET_INFO = 0x1102
    OK_CAPSET = 0x1103
    OK_EDID = 0x1104
    OK_RESOURCE_UUID = 0x1105
    OK_MAP_INFO = 0x1106
    ERR_UNSPEC = 0x1200
    ERR_OUT_OF_MEMORY = 0x1201
    ERR_INVALID_SCANOUT_ID = 0x1202
    ERR_INVALID_RESOURCE_ID = 0x1203
    ERR_INVALID_CONTEXT_ID = 0x1204
    ERR_INVALID_PARAMETER = 0x1205


class CtrlFlag(IntFlag):
    """``virtio_gpu_ctrl_hdr.flags``."""

    FENCE = 1 << 0
    INFO_RING_IDX = 1 << 1


class Feature(IntFlag):
    """virtio-gpu device feature bits (and the generic virtio/vhost bits we use).

    Bit 5 is ``VIRTIO_GPU_F_BLOB_ALIGNMENT`` since Linux 7.2; the USERPTR guest series
    v2/v3 used the same bit as ``VIRTIO_GPU_F_RESOURCE_USERPTR``.  We only ever offer
    bit 5 in the ``v3`` userptr protocol generation, and then never mean BLOB_ALIGNMENT.
    """

    VIRGL = 1 << 0
    EDID = 1 << 1
    RESOURCE_UUID = 1 << 2
    RESOURCE_BLOB = 1 << 3
    CONTEXT_INIT = 1 << 4
    RESOURCE_USERPTR_V3 = 1 << 5  # == BLOB_ALIGNMENT on Linux >= 7.2
    NOTIFY_ON_EMPTY = 1 << 24
    LOG_ALL = 1 << 26
    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    PROTOCOL_FEATURES = 1 << 30
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    RING_RESET = 1 << 40


class Format(IntEnum):
    """``enum virtio_gpu_formats``: every 2D resource format (all 32 bits per pixel)."""

    B8G8R8A8_UNORM = 1
    B8G8R8X8_UNORM = 2
    A8R8G8B8_UNORM = 3
    X8R8G8B8_UNORM = 4
    R8G8B8A8_UNORM = 67
    X8B8G8R8_UNORM = 68
    A8B8G8R8_UNORM = 121
    R8G8B8X8_UNORM = 134


class BlobMem(IntEnum):
    """``virtio_gpu_resource_create_blob.blob_mem``."""

    GUEST = 1
    HOST3D = 2
    HOST3D_GUEST = 3


class BlobFlag(IntFlag):
    """``virtio_gpu_resource_create_blob.blob_flags``.

    ``USE_USERPTR`` (0x8) and ``USERPTR_RDONLY`` (0x10) are from the proposed USERPTR
    series (v5).  crosvm/rutabaga guests use 0x8 as ``CREATE_GUEST_HANDLE``.
    """

    USE_MAPPABLE = 0x0001
    USE_SHAREABLE = 0x0002
    USE_CROSS_DEVICE = 0x0004
    USE_USERPTR = 0x0008
    USERPTR_RDONLY = 0x0010


class MapCache(IntEnum):
    """``VIRTIO_GPU_MAP_CACHE_*`` (``resp_map_info.map_info``)."""

    NONE = 0
    CACHED = 1
    UNCACHED = 2
    WC = 3


class Capset(IntEnum):
    """Capability set ids.  1..6 upstream; 8 is ROCM (proposed) and GFXSTREAM_GLES
    (rutabaga) at once.  Our own capsets default to ids far above both."""

    VIRGL = 1
    VIRGL2 = 2
    GFXSTREAM_VULKAN = 3
    VENUS = 4
    CROSS_DOMAIN = 5
    DRM = 6
    ROCM = 8
