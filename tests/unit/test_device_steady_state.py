"""A long-running device does not grow: rounds of every kind of command (2D, display,
cursor, USERPTR blobs, contexts with compute work, and the guest's errors) leave the
back-end's own memory where it was.

The leak checks at shutdown count host GPU mappings, guest memory and fds; a Python
object kept per command (a closure in a list, an id in a table, a timer kept after
its request was answered) shows only as slow growth over days.  After warm-up rounds,
``gc`` counts the live objects by type and the entries of every table, so one object
or entry kept per round is found however small; tracemalloc then bounds the heap's
growth, which finds a buffer that grows without new objects.
"""

from __future__ import annotations

import gc
import logging
import socket
import struct
import tracemalloc
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from protocol.compute import (
    MapResource,
    Op,
    ResultHeader,
    Status,
    UnmapResource,
    encode_command,
    encode_stream,
)
from protocol.display import DisplayReq
from protocol.limits import Limits
from protocol.virtio_gpu import (
    CtxCreate,
    ResourceCreate2d,
    ResourceCreate3d,
    ResourceCreateBlob,
    ResourceDetachBacking,
    ResourceFlush,
    ResourceUnref,
    SetScanout,
    Submit3d,
    TransferHost3d,
    TransferToHost2d,
    UpdateCursor,
)
from protocol.virtio_gpu_codes import BlobFlag, BlobMem, Cmd, CtrlFlag, Format, Resp
from protocol.wire import decode, encode, layout
from tests.unit.device_harness import (
    BACKING_BASE,
    DeviceHarness,
    code,
    command,
    mem_entries,
    peer_of,
)
from tests.unit.loop_runner import run_until
from vgpu_backend import eventloop
from vgpu_backend.device_state import DeviceOptions
from vgpu_backend.hostgpu.factory import HostGpuOptions, create_host_gpu

WARM_UP = 30
ROUNDS = 200
TRACED_ROUNDS = 100
#: heap growth allowed over TRACED_ROUNDS: tuples, lists and dicts freed to the
#: interpreter's free lists still count as allocated (15-20 KiB here)
HEAP_SLACK = 64 << 10
SIDE = 64  # 64x64 B8G8R8X8: a valid cursor too
BLOB_GPA = BACKING_BASE + 0x100000
RESULT_HEADER_SIZE = layout(ResultHeader).size


class _Formatting(logging.Handler):
    """Formats every record (as a log file would) and keeps none."""

    def emit(self, record: logging.LogRecord) -> None:
        self.format(record)


@pytest.fixture
def quiet_logs() -> Iterator[None]:
    """The back-end's records are made and formatted at INFO, but not collected by
    pytest (its capture would look like growth)."""
    handler = _Formatting()
    saved = []
    for name in ("vgpu_backend", "protocol"):
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger.addHandler(handler)
    yield
    for logger, level, propagate in saved:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.fixture
def device() -> Iterator[DeviceHarness]:
    """Every feature on, the simulated host GPU, a display peer."""
    gpu = create_host_gpu(HostGpuOptions(gpu="sim"))
    harness = DeviceHarness(Limits(max_hostmem=16 << 20), DeviceOptions(), display=True,
                            host_gpu=gpu)
    yield harness
    errors = harness.device.internal_errors
    harness.close()
    gpu.close()
    assert errors == 0


def expect(harness: DeviceHarness, cmd: bytes, resp: Resp) -> None:
    """Run ``cmd`` and check its answer."""
    got = code(harness, cmd)
    assert got == resp.name, f"{got}, expected {resp.name}"


def one_round(h: DeviceHarness, n: int) -> None:
    """Every kind of command once; resource and context ids new in each round."""
    rid, blob, res3d, ctx = 1000 + 4 * n, 1001 + 4 * n, 1002 + 4 * n, 1 + n
    ok = Resp.OK_NODATA
    expect(h, command(Cmd.GET_DISPLAY_INFO), Resp.OK_DISPLAY_INFO)
    expect(h, command(Cmd.GET_EDID, struct.pack("<II", 0, 0)), Resp.OK_EDID)
    # 2D: a frame on the scanout, and the same resource as the cursor
    h.create_2d(rid, SIDE, SIDE)
    expect(h, command(Cmd.TRANSFER_TO_HOST_2D, TransferToHost2d(0, 0, SIDE, SIDE, 0, rid)), ok)
    expect(h, command(Cmd.SET_SCANOUT, SetScanout(0, 0, SIDE, SIDE, 0, rid)), ok)
    expect(h, command(Cmd.RESOURCE_FLUSH, ResourceFlush(0, 0, SIDE, SIDE, rid)), ok)
    h.cursor_command(command(Cmd.UPDATE_CURSOR, UpdateCursor(0, n % 50, 5, 0, rid, 1, 1)))
    h.cursor_command(command(Cmd.MOVE_CURSOR, UpdateCursor(0, 7, n % 50, 0, rid, 0, 0)))
    expect(h, command(Cmd.SET_SCANOUT, SetScanout(0, 0, 0, 0, 0, 0)), ok)
    expect(h, command(Cmd.RESOURCE_DETACH_BACKING, ResourceDetachBacking(rid)), ok)
    expect(h, command(Cmd.RESOURCE_UNREF, ResourceUnref(rid), flags=CtrlFlag.FENCE,
                      fence_id=n + 1), ok)
    # a USERPTR blob: registered with the host GPU, then released
    expect(h, command(Cmd.RESOURCE_CREATE_BLOB, encode(ResourceCreateBlob(
        blob, BlobMem.GUEST, BlobFlag.USE_USERPTR, 2, 0, 8192)) + mem_entries(
        (BLOB_GPA, 4096), (BLOB_GPA + 0x3000, 4096))), ok)
    expect(h, command(Cmd.RESOURCE_UNREF, ResourceUnref(blob)), ok)
    # a context whose compute job maps and unmaps a USERPTR blob (results in its second
    # page); a TRANSFER_TO_HOST_3D waits for the job
    expect(h, command(Cmd.CTX_CREATE, CtxCreate(0, 0, bytes(64)), ctx_id=ctx), ok)
    expect(h, command(Cmd.RESOURCE_CREATE_BLOB, encode(ResourceCreateBlob(
        blob, BlobMem.HOST3D_GUEST, BlobFlag.USE_USERPTR, 2, blob, 8192)) + mem_entries(
        (BLOB_GPA, 4096), (BLOB_GPA + 0x3000, 4096)), ctx_id=ctx), ok)
    stream = encode_stream([encode_command(Op.MAP_RESOURCE, MapResource(blob, 0)),
                            encode_command(Op.UNMAP_RESOURCE, UnmapResource(blob))],
                           result_resource_id=blob, result_offset=4096)
    expect(h, command(Cmd.SUBMIT_3D, Submit3d(len(stream)), flags=CtrlFlag.FENCE,
                      fence_id=n + 1, ctx_id=ctx) + stream, ok)
    expect(h, command(Cmd.RESOURCE_CREATE_3D, ResourceCreate3d(
        res3d, 0, 64, 0, 4096, 1, 1, 1, 0, 0, 0), ctx_id=ctx), ok)
    expect(h, command(Cmd.RESOURCE_ATTACH_BACKING, struct.pack("<II", res3d, 1)
                      + mem_entries((BLOB_GPA + 0x1000, 4096))), ok)
    expect(h, command(Cmd.TRANSFER_TO_HOST_3D, TransferHost3d(
        0, 0, 0, 4096, 1, 1, 0, res3d, 0, 0, 0), ctx_id=ctx), ok)
    done = decode(ResultHeader, h.ram.read(BLOB_GPA + 0x3000, RESULT_HEADER_SIZE))
    assert (done.status, done.completed) == (Status.OK, 2), done
    h.ram.write(BLOB_GPA + 0x3000, bytes(RESULT_HEADER_SIZE))
    expect(h, command(Cmd.CTX_DESTROY, ctx_id=ctx), ok)
    expect(h, command(Cmd.RESOURCE_UNREF, ResourceUnref(res3d)), ok)
    expect(h, command(Cmd.RESOURCE_UNREF, ResourceUnref(blob)), ok)
    # the guest's errors, each answered and logged
    expect(h, command(Cmd.RESOURCE_UNREF, ResourceUnref(rid)), Resp.ERR_INVALID_RESOURCE_ID)
    expect(h, command(Cmd.RESOURCE_CREATE_2D, ResourceCreate2d(rid, 999, 4, 4)),
           Resp.ERR_INVALID_PARAMETER)
    expect(h, command(Cmd.RESOURCE_CREATE_2D, ResourceCreate2d(rid, Format.B8G8R8X8_UNORM,
                                                                0, 4)),
           Resp.ERR_INVALID_PARAMETER)
    expect(h, command(Cmd.RESOURCE_CREATE_2D), Resp.ERR_INVALID_PARAMETER)
    expect(h, command(0x0999), Resp.ERR_UNSPEC)
    h.create_2d(rid, 4, 4, backing_gpa=None)
    expect(h, command(Cmd.RESOURCE_ATTACH_BACKING, struct.pack("<II", rid, 1000)),
           Resp.ERR_INVALID_PARAMETER)  # 1000 entries, none in the chain
    expect(h, command(Cmd.RESOURCE_UNREF, ResourceUnref(rid)), ok)
    peer = peer_of(h)
    run_until(h.loop, lambda: bool(peer.of(DisplayReq.UPDATE)))
    peer.received.clear()  # the test's QEMU keeps what it got


@dataclass
class Census:
    """What a leak shows as: live gc-tracked objects by type, and the elements of
    every live dict, list, set and deque (a table that keeps one entry per command)."""

    objects: Counter[str]
    elements: int

    @classmethod
    def take(cls, *ignore: object) -> Census:
        """Count now, after a full collection (``ignore``: the caller's own records)."""
        gc.collect()
        skip = {id(o) for o in ignore}
        live = [o for o in gc.get_objects() if id(o) not in skip]
        return cls(Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in live),
                   sum(len(o) for o in live if isinstance(o, (dict, list, set, deque))))

    def assert_no_growth_since(self, before: Census, rounds: int) -> None:
        """No object type and no table entries grew by half a round's worth.  Bounded
        pools stay under that with ``rounds`` >= 200: the event loop's heap keeps up to
        64 cancelled timers (a purge comes when it reaches 64), in whatever phase."""
        assert rounds >= 2 * eventloop._MIN_PURGE + 2
        kept = {kind: count - before.objects[kind] for kind, count in self.objects.items()
                if count - before.objects[kind] >= rounds // 2}
        assert not kept, f"objects kept per round: {kept}"
        assert self.elements - before.elements < rounds // 2, \
            f"{self.elements - before.elements} more table entries after {rounds} rounds"


def traced_heap() -> int:
    """Bytes allocated since tracing started and still live, after a full collection."""
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


@pytest.mark.usefixtures("quiet_logs")
def test_many_rounds_leave_no_object_or_table_entry_behind(device: DeviceHarness) -> None:
    """After warm-up, ROUNDS more rounds keep no object type and no table growing by
    even half an entry per round."""
    for n in range(WARM_UP):
        one_round(device, n)
    before = Census.take()
    for n in range(WARM_UP, WARM_UP + ROUNDS):
        one_round(device, n)
    Census.take(before, before.objects).assert_no_growth_since(before, ROUNDS)
    assert len(device.device.state.resources) == 0


def hung_up(sock: socket.socket) -> bool:
    """The other end of ``sock`` closed (and everything it sent was read)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False


def replace_display(h: DeviceHarness) -> None:
    """GPU_SET_SOCKET with a new socket (QEMU after VM stop/cont): the device takes it
    up and hangs up the old one itself."""
    old = peer_of(h)
    h.connect_display()
    run_until(h.loop, lambda: hung_up(old.sock))
    old.close()


@pytest.mark.usefixtures("quiet_logs")
def test_display_sockets_replaced_every_round_leave_nothing_behind(
        device: DeviceHarness) -> None:
    """A new display socket before each round (as many VM stop/cont cycles): the old
    channels, their readers and their backlogs all go."""
    for n in range(WARM_UP):
        replace_display(device)
        one_round(device, n)
    before = Census.take()
    for n in range(WARM_UP, WARM_UP + ROUNDS):
        replace_display(device)
        one_round(device, n)
    Census.take(before, before.objects).assert_no_growth_since(before, ROUNDS)


@pytest.mark.usefixtures("quiet_logs")
def test_many_rounds_leave_the_heap_flat(device: DeviceHarness) -> None:
    """After warm-up, TRACED_ROUNDS more rounds grow the Python heap by at most
    HEAP_SLACK (what the interpreter's free lists keep; a leaked image, command or
    guest memory view per round would be far more)."""
    for n in range(WARM_UP):
        one_round(device, n)
    tracemalloc.start(6)
    try:
        for n in range(WARM_UP, 2 * WARM_UP):  # fills the free lists, as above
            one_round(device, n)
        heap = traced_heap()
        for n in range(2 * WARM_UP, 2 * WARM_UP + TRACED_ROUNDS):
            one_round(device, n)
        grew = traced_heap() - heap
        where = tracemalloc.take_snapshot().statistics("traceback")[:3]
    finally:
        tracemalloc.stop()
    top = "\n".join(f"{stat}\n  " + "\n  ".join(stat.traceback.format(most_recent_first=True))
                    for stat in where)
    assert grew <= HEAP_SLACK, f"heap grew by {grew} bytes over {TRACED_ROUNDS} rounds:\n{top}"
