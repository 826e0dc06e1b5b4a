"""The capability sets this device publishes (GET_CAPSET_INFO / GET_CAPSET).

Ids in use elsewhere: 1-6 upstream, 7 magma, 8 gfxstream-gles (rutabaga) and ROCM
(proposed), 9 gfxstream-composer.  Linux rejects every capset when one has an id above
``MAX_CAPSET_ID`` (63) ("invalid capset id"), and a context type is a capset id, so
ours must lie in 10..63; Linux 6.1 also computes ``VIRTGPU_PARAM_SUPPORTED_CAPSET_IDs``
as ``1 << id`` on an int, which garbles ids above 31.  They default to 28 (userptr) and
29 (compute) and are configurable.  Each capset starts with a magic and a version;
fields are only ever appended, so a guest reading an older version reads a prefix.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Final, NamedTuple

from protocol.wire import U16, U32, U64, wire

__all__ = [
    "DEFAULT_COMPUTE_CAPSET",
    "DEFAULT_USERPTR_CAPSET",
    "MAX_CAPSET_ID",
    "RESERVED_CAPSET_IDS",
    "USERPTR_CAPSET_MAGIC",
    "USERPTR_CAPSET_VERSION",
    "HostBackend",
    "HostPath",
    "UserptrCapFlag",
    "UserptrCapset",
]

#: the largest capset id Linux accepts (``MAX_CAPSET_ID``)
MAX_CAPSET_ID: Final = 63
#: ids used by upstream, rutabaga and proposed series
RESERVED_CAPSET_IDS: Final = frozenset(range(1, 10))
DEFAULT_USERPTR_CAPSET: Final = 28
DEFAULT_COMPUTE_CAPSET: Final = 29
USERPTR_CAPSET_MAGIC: Final = 0x52545055  # "UPTR" little-endian
USERPTR_CAPSET_VERSION: Final = 1


class UserptrCapFlag(IntFlag):
    """``vgpu_userptr_capset.flags``."""

    #: USERPTR blobs are served (a host path is available)
    AVAILABLE = 1 << 0
    #: USERPTR_RDONLY is honoured (GPU writes to the buffer fault)
    RDONLY = 1 << 1
    #: the kernel accepted the batch-userptr probe
    BATCH_SUPPORTED = 1 << 2
    #: blobs are mapped where the guest's pages are: no copies
    ZERO_COPY = 1 << 3
    #: contexts can map USERPTR blobs into a GPU VA space (compute contexts)
    CONTEXT_MAP = 1 << 4


class HostPath(IntEnum):
    """``vgpu_userptr_capset.host_path``."""

    NONE = 0
    BATCH = 1
    ALIAS = 2
    PER_RANGE = 3


class HostBackend(IntEnum):
    """``vgpu_userptr_capset.host_backend``."""

    NONE = 0
    KFD = 1
    SIM = 2


@wire("struct vgpu_userptr_capset")
class UserptrCapset(NamedTuple):
    """Version 1 of the userptr capset::

        struct vgpu_userptr_capset {
            le32 magic;          /* "UPTR" */
            le16 version;        /* 1 */
            le16 size;           /* bytes of this struct */
            le32 protocol;       /* guest protocol generation: 3, 5 (0 = off) */
            le32 flags;          /* UserptrCapFlag */
            le32 host_path;      /* HostPath */
            le32 host_backend;   /* HostBackend */
            le32 page_size;      /* entries must be multiples of this */
            le32 max_entries;    /* entries per RESOURCE_CREATE_BLOB */
            le64 max_bytes;      /* size of one userptr blob */
            le32 num_gpus;       /* host GPUs each blob is mapped on */
            le32 kfd_version;    /* major << 16 | minor */
            le32 blob_mem_mask;  /* 1 << BLOB_MEM_* accepted with USE_USERPTR */
            le32 padding;
        };
    """

    magic: U32
    version: U16
    size: U16
    protocol: U32
    flags: U32
    host_path: U32
    host_backend: U32
    page_size: U32
    max_entries: U32
    max_bytes: U64
    num_gpus: U32
    kfd_version: U32
    blob_mem_mask: U32
    padding: U32 = 0
