"""``ResourceTable`` bookkeeping and the ``Resource`` kinds' properties, directly."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from protocol.errors import GuestProtocolError
from protocol.limits import Limits
from protocol.virtio_gpu_codes import BlobFlag, Format, Resp
from vgpu_backend.resources import BlobResource, Image2D, ResourceTable


def image(resource_id: int, width: int, height: int) -> Image2D:
    """A B8G8R8X8 image of ``width`` x ``height`` (not square in the tests)."""
    return Image2D(resource_id, format=Format.B8G8R8X8_UNORM, width=width, height=height,
                   image=np.zeros((height, width * 4), np.uint8))


def test_a_non_square_image_charges_and_gives_back_its_size() -> None:
    """``host_bytes`` is height * width * 4 (what RESOURCE_CREATE_2D reserves), so
    removing a non-square image returns the budget to exactly what it was."""
    table = ResourceTable(Limits(max_hostmem=1 << 20))
    res = image(1, 3, 5)
    assert (res.stride, res.host_bytes, res.extent()) == (12, 60, (3, 5))
    table.reserve_hostmem(3 * 5 * 4)
    table.add(res)
    assert table.hostmem_used == 60
    assert table.remove(1) is res
    assert table.hostmem_used == 0


def test_the_budget_can_be_used_up_exactly() -> None:
    """A reservation that fills the budget to the byte is granted; one byte more is
    OUT_OF_MEMORY and charges nothing."""
    table = ResourceTable(Limits(max_hostmem=100))
    table.reserve_hostmem(40)
    table.reserve_hostmem(60)
    assert table.hostmem_used == 100
    with pytest.raises(GuestProtocolError) as err:
        table.reserve_hostmem(1)
    assert err.value.resp_code == Resp.ERR_OUT_OF_MEMORY
    assert table.hostmem_used == 100


def test_get_2d_refuses_a_blob_with_invalid_parameter() -> None:
    """A blob is a resource but not a 2D one: INVALID_PARAMETER, not the blob."""
    table = ResourceTable(Limits())
    table.add(BlobResource(4, size=4096))
    assert table.get(4).resource_id == 4
    with pytest.raises(GuestProtocolError) as err:
        table.get_2d(4)
    assert err.value.resp_code == Resp.ERR_INVALID_PARAMETER
    with pytest.raises(GuestProtocolError) as err:
        table.get_2d(5)
    assert err.value.resp_code == Resp.ERR_INVALID_RESOURCE_ID


@pytest.mark.parametrize("flags, userptr, readonly", [
    (BlobFlag(0), False, False),
    (BlobFlag.USE_USERPTR, True, False),
    (BlobFlag.USE_USERPTR | BlobFlag.USERPTR_RDONLY, True, True),
    (BlobFlag.USERPTR_RDONLY, False, True),
])
def test_blob_flag_properties(flags: BlobFlag, userptr: bool, readonly: bool) -> None:
    """``userptr`` and ``readonly`` each test their own flag bit."""
    blob = BlobResource(1, blob_flags=flags)
    assert (blob.userptr, blob.readonly) == (userptr, readonly)


def test_a_recreated_id_gets_a_new_random_uuid() -> None:
    """UUIDs are random (version 4) per resource, not derived from the id: a resource
    made again under a freed id is a different object to other devices."""
    table = ResourceTable(Limits())
    table.add(image(1, 2, 2))
    first = table.assign_uuid(1)
    assert table.assign_uuid(1) == first
    assert uuid.UUID(bytes=first).version == 4
    table.remove(1)
    table.add(image(1, 2, 2))
    assert table.assign_uuid(1) != first
