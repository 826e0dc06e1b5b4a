"""Split-ring behaviour: EVENT_IDX in both directions, INDIRECT chains, plain rings."""

from __future__ import annotations

import time

import numpy as np

from protocol.virtio_gpu_codes import Feature, Resp
from tests.frontend import gpu_commands as cmds
from tests.frontend.gpu_commands import Rect
from tests.frontend.guest_ram import Segment
from tests.frontend.pixels import random_pixels
from tests.frontend.session import Session
from tests.integration.conftest import SessionFactory


def queue_display_info(s: Session) -> None:
    """Add one GET_DISPLAY_INFO chain to the control ring without publishing it."""
    prepared = s.gpu.prepare(cmds.get_display_info(), cmds.DISPLAY_INFO_RESP_SIZE)
    assert prepared.response is not None
    s.queues[0].add(prepared.out, [prepared.response])


def test_device_publishes_avail_event(session: Session) -> None:
    """After draining the ring the device asks for a kick on the very next buffer, and
    it does so before it notifies the last completion (a guest woken by it may add a
    buffer at once).  GET_DISPLAY_INFO also holds the queue while QEMU answers."""
    ctrl = session.queues[0]
    assert session.event_idx
    for count in (1, 5, 20):
        ctrl.drain_notifications()
        ctrl.set_used_event(ctrl.last_used + count - 1)  # notify me of the last one only
        for _ in range(count):
            queue_display_info(session)
        ctrl.submit()
        ctrl.wait_used(count, by_notification=False, publish_used_event=False)
        assert ctrl.wait_notification(5.0) == 1
        assert ctrl.avail_event() == ctrl.avail_idx
    assert ctrl.stats.kicks_suppressed == 0


def test_notifications_respect_used_event(session: Session) -> None:
    """No interrupt before used idx passes ``used_event``; one when it does."""
    ctrl = session.queues[0]
    session.gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)
    ctrl.drain_notifications()
    base = ctrl.last_used
    ctrl.set_used_event(base + 3)  # interrupt me once the 4th buffer from now is used
    for _ in range(3):
        queue_display_info(session)
    ctrl.submit(force_kick=True)
    ctrl.wait_used(3, by_notification=False, publish_used_event=False)
    time.sleep(0.2)
    assert ctrl.drain_notifications() == 0
    queue_display_info(session)
    ctrl.submit(force_kick=True)
    ctrl.wait_used(1, by_notification=False, publish_used_event=False)
    assert ctrl.wait_notification(10.0) >= 1


def test_completions_are_notified(session: Session) -> None:
    """A guest sleeping on the call eventfd is woken for every batch."""
    for _ in range(20):
        session.gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)
    assert session.queues[0].stats.missed_notifications == 0


def test_without_event_idx(open_session: SessionFactory) -> None:
    """EVENT_IDX not acked: kicks and interrupts on every buffer still work."""
    s = open_session(drop_guest_features=int(Feature.RING_EVENT_IDX))
    assert not s.event_idx
    image = s.gpu.create_image(16, 16)
    s.gpu.show(image)
    for _ in range(10):
        s.gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)
    assert s.queues[0].stats.missed_notifications == 0


def test_indirect_chains(open_session: SessionFactory) -> None:
    """INDIRECT descriptors, with the command struct split over several of them."""
    s = open_session(indirect=True)
    gpu = s.gpu
    image = gpu.create_image(24, 16)
    pixels = random_pixels(16, 24, 21)
    image.write_pixels(s.ram, pixels)
    full = Rect(0, 0, 24, 16)
    gpu.run(cmds.transfer_to_host_2d(image.resource_id, full), split_at=[5, 24, 40]
            ).expect(Resp.OK_NODATA)
    gpu.run(cmds.set_scanout(0, image.resource_id, full), split_at=[24]).expect(Resp.OK_NODATA)
    gpu.run(cmds.resource_flush(image.resource_id, full), split_at=[1, 2, 3]
            ).expect(Resp.OK_NODATA)
    s.sync_display()
    assert np.array_equal(s.console.surface(0)[..., :3], pixels[..., :3])
    info = gpu.run(cmds.get_display_info(), cmds.DISPLAY_INFO_RESP_SIZE, indirect=False)
    info.expect(Resp.OK_DISPLAY_INFO)


def test_response_split_over_two_buffers(session: Session) -> None:
    """A 408-byte response scattered over two device-writable buffers."""
    gpu, ram = session.gpu, session.ram
    command = gpu.prepare(cmds.get_display_info(), None)
    first, second = ram.alloc_contiguous(100), ram.alloc_contiguous(308)
    done = gpu.submit_raw(command.out, [Segment(first, 100), Segment(second, 308)])
    assert done.length == 408
    raw = ram.read(first, 100) + ram.read(second, 308)
    assert int.from_bytes(raw[:4], "little") == Resp.OK_DISPLAY_INFO
    assert int.from_bytes(raw[24 + 8:24 + 12], "little") == 1280
