"""The cursor queue: UPDATE_CURSOR and MOVE_CURSOR become CURSOR_* display messages."""

from __future__ import annotations

import numpy as np

from protocol.display import DisplayReq
from protocol.virtio_gpu_codes import Format, Resp
from tests.frontend.gpu_commands import Rect
from tests.frontend.pixels import random_pixels
from tests.frontend.session import Session


def test_cursor_update_move_and_hide(session: Session) -> None:
    """The 64x64 cursor image, hot spot, position and visibility reach QEMU."""
    gpu, display, cursor = session.gpu, session.display, session.console.cursor
    image = gpu.create_image(64, 64, Format.B8G8R8A8_UNORM)
    pixels = random_pixels(64, 64, 11)
    image.write_pixels(session.ram, pixels)
    gpu.transfer(image.resource_id, Rect(0, 0, 64, 64)).expect(Resp.OK_NODATA)
    gpu.update_cursor(0, 100, 200, resource_id=image.resource_id, hot_x=3, hot_y=5)
    display.wait_count(DisplayReq.CURSOR_UPDATE, 1)
    assert display.of_type(DisplayReq.CURSOR_UPDATE)[0].fields == (0, 100, 200)
    assert (cursor.x, cursor.y, cursor.hot_x, cursor.hot_y, cursor.visible) == (
        100, 200, 3, 5, True)
    assert cursor.image is not None and np.array_equal(cursor.image, pixels)
    gpu.move_cursor(0, 300, 400, resource_id=image.resource_id)
    display.wait_count(DisplayReq.CURSOR_POS, 1)
    assert display.of_type(DisplayReq.CURSOR_POS)[0].fields == (0, 300, 400)
    assert (cursor.x, cursor.y, cursor.visible) == (300, 400, True)
    gpu.move_cursor(0, 310, 410, resource_id=0)
    display.wait_count(DisplayReq.CURSOR_POS_HIDE, 1)
    assert not cursor.visible
    assert cursor.updates == 1


def test_cursor_queue_completes_every_command(session: Session) -> None:
    """Each cursor command is returned on the used ring (no response buffer)."""
    for i in range(40):  # more than the 16-entry cursor ring
        session.gpu.move_cursor(0, i, i, resource_id=0)
    session.display.wait_count(DisplayReq.CURSOR_POS_HIDE, 40)
    assert session.queues[1].used_idx() == 40
