"""virtio-gpu resources: 2D images and blobs, in one table with a host-memory budget."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from protocol.errors import GuestProtocolError
from protocol.limits import Limits
from protocol.virtio_gpu_codes import BlobFlag, BlobMem, Format, Resp
from vgpu_backend.backing import Backing
from vgpu_backend.hostgpu.base import GpuMapping
from vgpu_backend.pixels import BYTES_PER_PIXEL

__all__ = ["BlobResource", "HostBuffer", "Image2D", "Resource", "ResourceTable"]

log = logging.getLogger(__name__)
_NO_FLAGS = BlobFlag(0)


@dataclass(slots=True, eq=False)
class Resource:
    """What every resource has: an id, maybe guest backing, the scanouts showing it."""

    resource_id: int
    backing: Backing | None = None
    scanouts: set[int] = field(default_factory=set)
    uuid: bytes | None = None
    #: contexts this resource is attached to
    contexts: set[int] = field(default_factory=set)

    @property
    def host_bytes(self) -> int:
        """Host memory charged to the budget."""
        return 0

    def extent(self) -> tuple[int, int] | None:
        """(width, height) in pixels when the resource can be shown, else ``None``."""
        return None


@dataclass(slots=True, eq=False)
class Image2D(Resource):
    """RESOURCE_CREATE_2D: a host-side image the guest fills by TRANSFER_TO_HOST_2D."""

    format: Format = Format.B8G8R8X8_UNORM
    width: int = 0
    height: int = 0
    #: (height, width*4) bytes in ``format``
    image: npt.NDArray[np.uint8] = field(default_factory=lambda: np.zeros((0, 0), np.uint8))

    @property
    def stride(self) -> int:
        """Bytes per row of the host image and of the guest's linear backing."""
        return self.width * BYTES_PER_PIXEL

    @property
    def host_bytes(self) -> int:
        """The image's size."""
        return self.height * self.width * BYTES_PER_PIXEL

    def extent(self) -> tuple[int, int] | None:
        """The image's size."""
        return self.width, self.height

    def pixels(self, x: int, y: int, width: int, height: int) -> npt.NDArray[np.uint32]:
        """A (height, width) uint32 view of a rectangle of the image."""
        return self.image[y:y + height, x * 4:(x + width) * 4].view("<u4")


@dataclass(slots=True, eq=False)
class BlobResource(Resource):
    """RESOURCE_CREATE_BLOB: guest memory used in place (GUEST / HOST3D_GUEST)."""

    blob_mem: BlobMem = BlobMem.GUEST
    blob_flags: BlobFlag = _NO_FLAGS
    blob_id: int = 0
    size: int = 0
    ctx_id: int = 0
    #: the host GPU mapping of a USERPTR blob
    gpu_mapping: GpuMapping | None = None
    #: why a userptr blob stopped being usable (guest memory changed under it)
    invalidated: str | None = None
    #: framebuffer size given by SET_SCANOUT_BLOB
    fb_size: tuple[int, int] | None = None

    def extent(self) -> tuple[int, int] | None:
        """The framebuffer size of its last SET_SCANOUT_BLOB."""
        return self.fb_size

    @property
    def userptr(self) -> bool:
        """A USERPTR blob."""
        return bool(self.blob_flags & BlobFlag.USE_USERPTR)

    @property
    def readonly(self) -> bool:
        """A USERPTR_RDONLY blob."""
        return bool(self.blob_flags & BlobFlag.USERPTR_RDONLY)


class ResourceTable:
    """Live resources by id, with the 2D host-memory budget and the count limit."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._by_id: dict[int, Resource] = {}
        self.hostmem_used = 0

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Resource]:
        """A snapshot of the live resources (safe to remove while iterating)."""
        return iter(list(self._by_id.values()))

    def check_new_id(self, resource_id: int) -> None:
        """Refuse id 0, an id in use, or one resource too many."""
        if resource_id == 0:
            raise GuestProtocolError("resource id 0", Resp.ERR_INVALID_RESOURCE_ID)
        if resource_id in self._by_id:
            raise GuestProtocolError(f"resource id {resource_id} is in use",
                                     Resp.ERR_INVALID_RESOURCE_ID)
        if len(self._by_id) >= self._limits.max_resources:
            raise GuestProtocolError(f"more than {self._limits.max_resources} resources",
                                     Resp.ERR_OUT_OF_MEMORY)

    def reserve_hostmem(self, nbytes: int) -> None:
        """Charge ``nbytes`` to the budget, or refuse with OUT_OF_MEMORY."""
        if self.hostmem_used + nbytes > self._limits.max_hostmem:
            raise GuestProtocolError(
                f"{nbytes} bytes would exceed the {self._limits.max_hostmem}-byte host "
                "memory budget", Resp.ERR_OUT_OF_MEMORY)
        self.hostmem_used += nbytes

    def add(self, resource: Resource) -> None:
        """Insert a resource whose id passed :meth:`check_new_id` and whose memory was
        reserved."""
        self._by_id[resource.resource_id] = resource

    def get(self, resource_id: int) -> Resource:
        """The resource, or INVALID_RESOURCE_ID."""
        try:
            return self._by_id[resource_id]
        except KeyError:
            raise GuestProtocolError(f"no resource {resource_id}",
                                     Resp.ERR_INVALID_RESOURCE_ID) from None

    def get_2d(self, resource_id: int) -> Image2D:
        """A 2D resource, or INVALID_RESOURCE_ID (unknown) / INVALID_PARAMETER (a blob)."""
        res = self.get(resource_id)
        if not isinstance(res, Image2D):
            raise GuestProtocolError(f"resource {resource_id} is not a 2D resource")
        return res

    def remove(self, resource_id: int) -> Resource:
        """Drop a resource and give back its host memory."""
        res = self._by_id.pop(resource_id)
        self.hostmem_used -= res.host_bytes
        return res

    def assign_uuid(self, resource_id: int) -> bytes:
        """A stable random UUID for the resource (RESOURCE_ASSIGN_UUID)."""
        res = self.get(resource_id)
        if res.uuid is None:
            res.uuid = uuid.uuid4().bytes
        return res.uuid


@dataclass(slots=True, eq=False)
class HostBuffer(Resource):
    """RESOURCE_CREATE_3D with target PIPE_BUFFER: host-owned memory the guest fills and
    reads back with TRANSFER_TO/FROM_HOST_3D (the copy path), usable by compute
    contexts through its host GPU mapping."""

    size: int = 0
    #: host address of the (page-aligned, anonymous) memory
    host_addr: int = 0
    mapped_bytes: int = 0
    gpu_mapping: GpuMapping | None = None
    invalidated: str | None = None
    readonly: bool = False
