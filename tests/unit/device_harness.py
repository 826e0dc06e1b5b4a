"""A :class:`VirtioGpuDevice` in-process: memfd guest RAM, hand-made rings, and an
optional display socketpair whose QEMU end is a :class:`DisplayPeer` on the same loop.

Guest RAM layout (one 4 MiB region at guest address 0)::

    0x000000  control ring (64 entries)   0x010000  32 command buffers (16 KiB each)
    0x004000  cursor ring (16 entries)    0x090000  32 response buffers (4 KiB each)
    0x008000  cursor command              0x100000..0x400000  pages for resource backing

Control-queue slot ``k`` (``avail_idx % 32``) uses descriptors ``2k, 2k+1`` and the
``k``-th command and response buffers, so several commands can be in flight.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from protocol.limits import Limits
from protocol.virtio_gpu import CTRL_HDR_SIZE, CtrlHdr, GetEdid, MemEntry
from protocol.virtio_gpu_codes import Cmd, Resp
from protocol.virtqueue import DescFlag
from protocol.wire import decode, encode
from tests.unit.display_peer import DisplayPeer
from tests.unit.driver_ring import DriverRing
from tests.unit.guest_ram import GuestRam
from tests.unit.loop_runner import run_until
from vgpu_backend.device import CONTROL_QUEUE, CURSOR_QUEUE, VirtioGpuDevice
from vgpu_backend.device_state import DeviceOptions, UserptrProtocol
from vgpu_backend.display import DisplayState
from vgpu_backend.eventloop import EventLoop
from vgpu_backend.hostgpu.base import HostGpu

__all__ = ["BACKING_BASE", "BACKING_END", "TWO_D_ONLY", "DeviceHarness", "Response", "command",
           "mem_entries"]

RAM_SIZE = 4 << 20
SLOTS = 32
COMMAND_GPA = 0x10000
COMMAND_SIZE = 0x4000
RESPONSE_GPA = 0x90000
RESPONSE_SIZE = 0x1000
CURSOR_COMMAND_GPA = 0x8000
BACKING_BASE = 0x100000
BACKING_END = RAM_SIZE
_NEXT, _WRITE = int(DescFlag.NEXT), int(DescFlag.WRITE)
#: the 2D command set alone: no blobs, contexts or capsets (no host GPU needed)
TWO_D_ONLY = DeviceOptions(blob=False, compute=False, userptr_protocol=UserptrProtocol.OFF)


def command(cmd: int, body: bytes | tuple[object, ...] = b"", *, flags: int = 0,
            fence_id: int = 0, ctx_id: int = 0, ring_idx: int = 0) -> bytes:
    """A command: ctrl header + body (raw bytes or a wire record)."""
    raw = body if isinstance(body, bytes) else encode(body)
    return encode(CtrlHdr(cmd, flags, fence_id, ctx_id, ring_idx)) + raw


def mem_entries(*entries: tuple[int, int]) -> bytes:
    """Packed ``virtio_gpu_mem_entry`` list."""
    return b"".join(encode(MemEntry(addr, length)) for addr, length in entries)


@dataclass(frozen=True, slots=True)
class Response:
    """What the device wrote back for one command."""

    head: int
    written: int
    raw: bytes

    @property
    def hdr(self) -> CtrlHdr:
        """The response header."""
        assert self.written >= CTRL_HDR_SIZE, f"response of {self.written} bytes"
        return decode(CtrlHdr, self.raw)

    @property
    def type(self) -> int:
        """The response type (a :class:`Resp` value)."""
        return self.hdr.type

    @property
    def body(self) -> bytes:
        """Bytes after the header."""
        return self.raw[CTRL_HDR_SIZE:self.written]


class DeviceHarness:
    """One device, its guest RAM and rings; with ``display=True`` a QEMU display peer;
    with ``host_gpu`` (closed by the caller) blobs, contexts and compute can be served."""

    def __init__(self, limits: Limits | None = None, options: DeviceOptions | None = None,
                 display: bool = False, display_send_buffer: int = 0,
                 host_gpu: HostGpu | None = None) -> None:
        self.limits = limits or Limits(max_hostmem=16 << 20)
        self.ram = GuestRam([(0, RAM_SIZE)])
        self.loop = EventLoop()
        self.device = VirtioGpuDevice(self.loop, self.ram.memory, self.limits,
                                      options or TWO_D_ONLY, host_gpu)
        self.control = DriverRing(self.ram, 64, 0x0)
        self.cursor = DriverRing(self.ram, 16, 0x4000)
        self.control.attach(self.device.queues[CONTROL_QUEUE])
        self.cursor.attach(self.device.queues[CURSOR_QUEUE])
        self.peer: DisplayPeer | None = None
        if display:
            self.connect_display(display_send_buffer)

    def connect_display(self, send_buffer: int = 0) -> DisplayPeer:
        """GPU_SET_SOCKET of a new socketpair whose QEMU end is a new :attr:`peer`;
        returns it once the channel is ready.  (The device drops a previous socket
        itself; the previous peer is the caller's to close.)

        :param send_buffer: the socket takes that much at a time (0: the default).
        """
        ours, theirs = socket.socketpair()
        if send_buffer:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        self.peer = DisplayPeer(self.loop, theirs)
        self.device.attach_display(ours.detach())
        run_until(self.loop, self._display_ready)
        return self.peer

    def _display_ready(self) -> bool:
        channel = self.device.state.scanouts.display
        return channel is not None and channel.state is DisplayState.READY

    def close(self) -> None:
        """Free everything (fds included)."""
        self.device.close()
        if self.peer is not None:
            self.peer.close()
        self.control.close()
        self.cursor.close()
        self.ram.close()
        self.loop.close()

    # --- the control queue -----------------------------------------------------------

    def submit(self, cmd: bytes, response_size: int = 4096) -> list[Response]:
        """Queue one command (out descriptor + in descriptor) and process the queue;
        returns every used element published (the device may answer later)."""
        self.stage(cmd, response_size)
        self.device.process(CONTROL_QUEUE)
        return self.collect()

    def stage(self, cmd: bytes, response_size: int = 4096) -> None:
        """Make one command available without a kick (several go in one batch)."""
        assert len(cmd) <= COMMAND_SIZE and response_size <= RESPONSE_SIZE
        slot = self.control.avail_idx % SLOTS
        command_gpa = COMMAND_GPA + slot * COMMAND_SIZE
        response_gpa = RESPONSE_GPA + slot * RESPONSE_SIZE
        self.ram.write(command_gpa, cmd)
        self.ram.write(response_gpa, b"\xEE" * response_size)
        head = 2 * slot
        self.control.set_desc(head, command_gpa, len(cmd), _NEXT, head + 1)
        self.control.set_desc(head + 1, response_gpa, response_size, _WRITE)
        self.control.publish(head)

    def collect(self) -> list[Response]:
        """Used elements published since the last look, with the response bytes."""
        return [Response(head, written,
                         self.ram.read(RESPONSE_GPA + head // 2 * RESPONSE_SIZE, written))
                for head, written in self.control.take_used()]

    def run(self, cmd: bytes, response_size: int = 4096) -> Response:
        """Submit one command and wait (running the loop) for its answer."""
        got = self.submit(cmd, response_size)
        if not got:
            run_until(self.loop, lambda: self.control.used_idx() != self.control.seen_used)
            got = self.collect()
        assert len(got) == 1, got
        return got[0]

    def ok(self, cmd: bytes) -> Response:
        """Run a command that must succeed with OK_NODATA."""
        response = self.run(cmd)
        assert response.type == Resp.OK_NODATA, Resp(response.type).name
        return response

    # --- conveniences --------------------------------------------------------------------

    def create_2d(self, resource_id: int, width: int, height: int, fmt: int = 2,
                  backing_gpa: int | None = BACKING_BASE) -> None:
        """RESOURCE_CREATE_2D, and ATTACH_BACKING of one linear range at ``backing_gpa``."""
        self.ok(command(Cmd.RESOURCE_CREATE_2D,
                        struct.pack("<IIII", resource_id, fmt, width, height)))
        if backing_gpa is not None:
            self.ok(command(Cmd.RESOURCE_ATTACH_BACKING,
                            struct.pack("<II", resource_id, 1)
                            + mem_entries((backing_gpa, width * height * 4))))

    def cursor_command(self, cmd: bytes) -> None:
        """Queue one command on the cursor queue and process it."""
        self.ram.write(CURSOR_COMMAND_GPA, cmd)
        self.cursor.set_desc(0, CURSOR_COMMAND_GPA, len(cmd))
        self.cursor.publish(0)
        self.device.process(CURSOR_QUEUE)


def peer_of(harness: DeviceHarness) -> DisplayPeer:
    """The harness's display peer (made with ``display=True``)."""
    assert harness.peer is not None
    return harness.peer


def code(harness: DeviceHarness, cmd: bytes) -> str:
    """The response type name of one command."""
    return Resp(harness.run(cmd).type).name


def edid_of(harness: DeviceHarness, scanout: int) -> bytes:
    """GET_EDID of ``scanout``: the EDID bytes (the response must be OK_EDID)."""
    response = harness.run(command(Cmd.GET_EDID, GetEdid(scanout)), response_size=2048)
    assert response.type == Resp.OK_EDID
    size = struct.unpack_from("<I", response.body)[0]
    return response.body[8:8 + size]
