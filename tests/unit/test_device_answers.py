"""Answers to a batch of control commands: written and used in ring order, however
each one is made (a bare header straight into its buffer, a fence, a body, a refusal,
an internal error, a reply that comes later), and the used ring's batched pushes."""

from __future__ import annotations

import struct

import pytest

from protocol.virtio_gpu import (
    CTRL_HDR_SIZE,
    CtrlHdr,
    GetEdid,
    ResourceCreate2d,
    ResourceUnref,
)
from protocol.virtio_gpu_codes import Cmd, CtrlFlag, Resp
from protocol.virtqueue import DescFlag
from tests.unit.device_harness import DeviceHarness, command, peer_of
from tests.unit.driver_ring import DriverRing
from tests.unit.loop_runner import run_until
from vgpu_backend.chains import ChainBatch
from vgpu_backend.device import CONTROL_QUEUE
from vgpu_backend.device_state import OK, Deferred, Reply

NEXT, WRITE, INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)
FENCE, INFO_RING_IDX = int(CtrlFlag.FENCE), int(CtrlFlag.INFO_RING_IDX)


def create(rid: int) -> bytes:
    return command(Cmd.RESOURCE_CREATE_2D, ResourceCreate2d(rid, 2, 4, 4))


def unref(rid: int) -> bytes:
    return command(Cmd.RESOURCE_UNREF, ResourceUnref(rid))


def names(harness: DeviceHarness) -> list[tuple[int, str, int]]:
    """(head, response type name, bytes written) of each answer published since the
    last look, in used-ring order."""
    return [(r.head, Resp(r.type).name, r.written) for r in harness.collect()]


def test_every_kind_of_answer_is_used_in_ring_order(dev: DeviceHarness) -> None:
    """One kick mixing bare OK headers, a fence, a body, refusals, a short command, an
    unknown one and a response buffer shorter than a header: each answer is right and
    the used ring lists them exactly in the order they were made available."""
    dev.stage(create(1))
    dev.stage(command(Cmd.GET_EDID, GetEdid(0, 0)))
    dev.stage(command(Cmd.RESOURCE_CREATE_2D, ResourceCreate2d(2, 2, 4, 4),
                      flags=FENCE | INFO_RING_IDX, fence_id=77, ctx_id=3, ring_idx=2))
    dev.stage(unref(9))
    dev.stage(create(3)[:CTRL_HDR_SIZE + 4])
    dev.stage(command(0x0FFF))
    dev.stage(create(4), response_size=16)
    dev.stage(unref(1))
    dev.device.process(CONTROL_QUEUE)
    got = dev.collect()
    assert [(r.head, r.written) for r in got] == [
        (0, 24), (2, got[1].written), (4, 24), (6, 24), (8, 24), (10, 24), (12, 16),
        (14, 24)]
    assert got[1].written > CTRL_HDR_SIZE  # the EDID body came along
    assert [Resp(r.type).name for i, r in enumerate(got) if i != 6] == [
        "OK_NODATA", "OK_EDID", "OK_NODATA", "ERR_INVALID_RESOURCE_ID",
        "ERR_INVALID_PARAMETER", "ERR_UNSPEC", "OK_NODATA"]
    fenced = got[2].hdr
    assert (fenced.flags, fenced.fence_id, fenced.ctx_id, fenced.ring_idx) == (
        FENCE | INFO_RING_IDX, 77, 3, 2)
    assert got[0].hdr.flags == got[0].hdr.fence_id == 0
    assert dev.submit(unref(4))[0].type == Resp.OK_NODATA  # the truncated one ran too


def test_an_internal_error_is_answered_in_order_and_the_batch_goes_on() -> None:
    """A handler failing with something other than a guest error: ERR_UNSPEC, counted,
    in its place; the commands around it are served."""
    harness = DeviceHarness()
    try:
        def broken(hdr: CtrlHdr, data: bytes) -> Reply:
            raise RuntimeError("a bug")
        harness.device._handlers[Cmd.RESOURCE_FLUSH] = broken
        harness.stage(create(1))
        harness.stage(command(Cmd.RESOURCE_FLUSH, b"\0" * 24))
        harness.stage(unref(1))
        harness.device.process(CONTROL_QUEUE)
        assert names(harness) == [(0, "OK_NODATA", 24), (2, "ERR_UNSPEC", 24),
                                  (4, "OK_NODATA", 24)]
        assert harness.device.internal_errors == 1
    finally:
        harness.close()


def test_answers_before_a_held_command_are_used_before_it(shown: DeviceHarness) -> None:
    """Bare-header answers made before a command that waits for QEMU are published
    when it starts waiting; it and the rest come after, in order."""
    display_peer = peer_of(shown)
    display_peer.answer_display_info = False
    shown.stage(create(1))
    shown.stage(create(2))
    shown.stage(command(Cmd.GET_DISPLAY_INFO))
    shown.stage(unref(2))
    shown.device.process(CONTROL_QUEUE)
    assert names(shown) == [(0, "OK_NODATA", 24), (2, "OK_NODATA", 24)]
    display_peer.close()
    run_until(shown.loop, lambda: shown.control.used_idx() == 4)
    assert [(head, name) for head, name, _ in names(shown)] == [
        (4, "OK_DISPLAY_INFO"), (6, "OK_NODATA")]


def test_an_answer_made_during_a_later_command_is_used_when_it_is_made() -> None:
    """A reply that resolves while a later command runs is pushed then, after the bare
    headers answered before it: the used ring lists answers in the order they were
    made, as when each was pushed at once."""
    harness = DeviceHarness()
    waiting: list[Deferred] = []

    def answer_later(hdr: CtrlHdr, data: bytes) -> Deferred:
        waiting.append(Deferred(pause=False))
        return waiting[-1]

    def resolve_it(hdr: CtrlHdr, data: bytes) -> Reply:
        waiting.pop().resolve(Reply(Resp.OK_NODATA))
        return OK
    try:
        harness.device._handlers[0x0FF0] = answer_later
        harness.device._handlers[0x0FF1] = resolve_it
        for cmd in (command(0x0FF0), create(1), command(0x0FF1), unref(1)):
            harness.stage(cmd)
        harness.device.process(CONTROL_QUEUE)
        assert [head for head, _, _ in names(harness)] == [2, 0, 4, 6]
    finally:
        harness.close()


def test_every_answer_echoes_its_own_header_past_the_header_cache(dev: DeviceHarness) -> None:
    """More distinct fenced headers than the device keeps decoded, then the first ones
    again: each answer carries its own command's fence id."""
    fence_ids = [*range(1, 97), *range(1, 33)]
    for start in range(0, len(fence_ids), 32):
        chunk = fence_ids[start:start + 32]
        for fence_id in chunk:
            dev.stage(command(Cmd.RESOURCE_UNREF, ResourceUnref(fence_id % 3 + 900),
                              flags=FENCE, fence_id=fence_id))
        dev.device.process(CONTROL_QUEUE)
        got = dev.collect()
        assert [r.hdr.fence_id for r in got] == chunk
        assert {Resp(r.type).name for r in got} == {"ERR_INVALID_RESOURCE_ID"}


@pytest.mark.parametrize("rounds", [5])
def test_batched_pushes_wrap_the_used_ring(dev: DeviceHarness, rounds: int) -> None:
    """Rounds of 32 commands (the harness's slots) on a 64-entry ring: the used ring
    wraps, every answer lands in its slot."""
    for n in range(rounds):
        for i in range(16):
            dev.stage(create(100 + i))
            dev.stage(unref(100 + i))
        dev.device.process(CONTROL_QUEUE)
        got = names(dev)
        assert [head for head, _, _ in got] == list(range(0, 64, 2)), f"round {n}"
        assert {name for _, name, _ in got} == {"OK_NODATA"}
    assert dev.control.used_idx() == 32 * rounds


def test_push_many_is_push_after_push(ring: DriverRing) -> None:
    """push_many writes what one push per head would, across the end of the used ring
    and past used index 0xFFFF; the index is published once."""
    one_by_one, together = ring.queue(), ring.queue(1)
    heads = [3, 1, 4, 1, 5]
    for queue in (one_by_one, together):
        queue.used_idx = 0xFFFE
    for head in heads:
        one_by_one.push(head, 24)
    expected = ring.ram.read(ring.used_gpa, 4 + 8 * ring.num)
    ring.ram.write(ring.used_gpa, bytes(4 + 8 * ring.num))
    together.push_many(heads, 24)
    assert together.used_idx == one_by_one.used_idx == 3
    assert ring.ram.read(ring.used_gpa, 4 + 8 * ring.num) == expected


def test_chain_batch_commands_match_the_built_chains(ring: DriverRing) -> None:
    """What :meth:`ChainBatch.commands` gives for chains kept as offsets (INDIRECT
    pairs in the cached region) and built ones is what their DescriptorChain holds;
    the answer slot is there only when the writable part is one buffer that large."""
    queue = ring.queue()
    data, tables = 0x10000, 0x80000
    ring.set_desc(0, data, 4, WRITE)
    ring.publish(0)  # the general walk caches the region
    assert queue.pop() is not None
    layouts = [(40, 24), (200, 4096), (8, 16)]  # readable, writable lengths
    for i, (out_len, in_len) in enumerate(layouts):
        src, dst = data + 0x1000 * i, data + 0x1000 * i + 0x800
        ring.ram.write(src, bytes(range(i, i + out_len)))
        ring.write_table(tables + 32 * i, [(src, out_len, NEXT, 1), (dst, in_len, WRITE, 0)])
        ring.set_desc(i + 1, tables + 32 * i, 32, INDIRECT)
    ring.set_desc(4, data + 0x8000, 30, NEXT, 5)  # two writable buffers: no slot
    ring.set_desc(5, data + 0x9000, 24, WRITE | NEXT, 6)
    ring.set_desc(6, data + 0xA000, 24, WRITE)
    ring.publish(1, 2, 3, 4)
    batch = queue.pop_batch()
    got = list(batch.commands(128, CTRL_HDR_SIZE))
    built = ChainBatch([batch[i] for i in range(len(batch))])
    assert [c.head for c in built] == [1, 2, 3, 4]
    for (head, command_bytes, slot, at, error), chain in zip(got, built, strict=True):
        assert head == chain.head and error is None
        assert command_bytes == chain.read(128)
        fits = len(chain.inp) == 1 and chain.in_len >= CTRL_HDR_SIZE
        assert (slot is not None) == fits
        if slot is not None:
            struct.pack_into("3s", slot, at, b"abc")
            assert bytes(chain.inp[0][:3]) == b"abc"
