"""QEMU's side of the vhost-user-gpu display socket, and the console it draws into.

:class:`DisplayPeer` owns QEMU's end of one ``GPU_SET_SOCKET`` socketpair.  A thread
reads every message as fast as it arrives (QEMU's main loop), answers
GET_PROTOCOL_FEATURES / GET_DISPLAY_INFO / GET_EDID the way the chosen QEMU version
does, and applies SCANOUT / UPDATE / CURSOR_* to a :class:`SimulatedConsole`, which
composites exactly like ``hw/display/vhost-user-gpu.c`` and records the conditions that
crash or corrupt QEMU as *violations* (tests assert there are none).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from protocol.display import (
    CURSOR_DATA_SIZE,
    DISPLAY_HEADER_SIZE,
    DisplayFlag,
    DisplayReq,
    VhostUserGpuCursorPos,
    VhostUserGpuCursorUpdate,
    VhostUserGpuEdidRequest,
    VhostUserGpuScanout,
    VhostUserGpuUpdate,
    encode_display_info,
    encode_message,
)
from protocol.virtio_gpu import EDID_BLOB_SIZE, CtrlHdr, DisplayOne, RespEdidHeader
from protocol.virtio_gpu_codes import Resp
from protocol.wire import decode, encode, layout
from tests.frontend.edid import build_edid
from tests.frontend.flavour import QemuFlavour

__all__ = ["CursorState", "DisplayEvent", "DisplayPeer", "ScanoutSurface", "SimulatedConsole",
           "default_modes"]

_HEADER = struct.Struct("<III")
_UPDATE_SIZE = layout(VhostUserGpuUpdate).size
_POS_SIZE = layout(VhostUserGpuCursorPos).size
_CURSOR_HEADER_SIZE = layout(VhostUserGpuCursorUpdate).size
_SCANOUT_SIZE = layout(VhostUserGpuScanout).size


def default_modes(num_scanouts: int = 1) -> list[DisplayOne]:
    """QEMU's defaults: scanout 0 enabled at 1280x800, the others disabled."""
    modes = [DisplayOne(0, 0, 1280, 800, 1, 0)]
    modes += [DisplayOne(0, 0, 1280, 800, 0, 0) for _ in range(num_scanouts - 1)]
    return modes


@dataclass(slots=True)
class ScanoutSurface:
    """QEMU's ``scanout[i]``: the display surface (``ds``) and whether it is shown."""

    surface: npt.NDArray[np.uint8] | None = None  # (h, w, 4) B,G,R,X
    shown: bool = False  # the surface became the console surface (first UPDATE)
    freed: bool = False  # SCANOUT(w=0) freed it: UPDATE now is a use-after-free
    scanouts: int = 0
    updates: int = 0


@dataclass(slots=True)
class CursorState:
    """The last cursor QEMU was told about."""

    scanout_id: int = 0
    x: int = 0
    y: int = 0
    visible: bool = False
    hot_x: int = 0
    hot_y: int = 0
    image: npt.NDArray[np.uint8] | None = None  # (64, 64, 4) a8r8g8b8 = B,G,R,A bytes
    updates: int = 0


class SimulatedConsole:
    """Scanout surfaces and cursor as QEMU keeps them; violations are QEMU's traps."""

    def __init__(self, num_scanouts: int = 1) -> None:
        self.num_scanouts = num_scanouts
        self.scanouts = [ScanoutSurface() for _ in range(num_scanouts)]
        self.cursor = CursorState()
        self.violations: list[str] = []
        self.lock = threading.RLock()

    def reset(self) -> None:
        """Device reset: QEMU drops every scanout surface."""
        with self.lock:
            self.scanouts = [ScanoutSurface() for _ in range(self.num_scanouts)]

    def _scanout(self, what: str, scanout_id: int) -> ScanoutSurface | None:
        if scanout_id >= self.num_scanouts:
            self.violations.append(f"{what} on unknown scanout {scanout_id}")
            return None
        return self.scanouts[scanout_id]

    def apply_scanout(self, payload: bytes) -> None:
        """VHOST_USER_GPU_SCANOUT."""
        if len(payload) != _SCANOUT_SIZE:
            self.violations.append(f"SCANOUT payload of {len(payload)} bytes")
            return
        msg = decode(VhostUserGpuScanout, payload)
        s = self._scanout("SCANOUT", msg.scanout_id)
        if s is None:
            return
        s.scanouts += 1
        if msg.width == 0 or msg.height == 0:
            # dpy_gfx_replace_surface(con, NULL) frees the surface, ds keeps pointing at it
            s.freed = s.surface is not None
            s.shown = False
            return
        s.surface = np.zeros((msg.height, msg.width, 4), dtype=np.uint8)
        s.shown, s.freed = False, False

    def apply_update(self, payload: memoryview) -> None:
        """VHOST_USER_GPU_UPDATE: composite x8r8g8b8 pixels at scanout-relative x, y."""
        if len(payload) < _UPDATE_SIZE:
            self.violations.append(f"UPDATE payload of {len(payload)} bytes")
            return
        msg = decode(VhostUserGpuUpdate, payload)
        s = self._scanout("UPDATE", msg.scanout_id)
        if s is None:
            return
        expected = _UPDATE_SIZE + msg.width * msg.height * 4
        if len(payload) != expected:
            self.violations.append(
                f"UPDATE {msg.width}x{msg.height} with {len(payload)} bytes, "
                f"expected {expected}")
            return
        if s.freed:
            self.violations.append(f"UPDATE on scanout {msg.scanout_id} after SCANOUT(w=0) "
                                   "(use-after-free in QEMU)")
            return
        if s.surface is None:
            self.violations.append(f"UPDATE on scanout {msg.scanout_id} before any SCANOUT "
                                   "(NULL dereference in QEMU)")
            return
        s.updates += 1
        s.shown = True
        height, width = s.surface.shape[:2]
        x0, y0 = min(msg.x, width), min(msg.y, height)
        x1, y1 = min(msg.x + msg.width, width), min(msg.y + msg.height, height)
        if x1 > x0 and y1 > y0:
            src = np.frombuffer(payload, dtype=np.uint8, offset=_UPDATE_SIZE)
            src = src.reshape(msg.height, msg.width, 4)
            s.surface[y0:y1, x0:x1] = src[:y1 - y0, :x1 - x0]

    def apply_cursor(self, request: int, payload: bytes) -> None:
        """CURSOR_POS, CURSOR_POS_HIDE and CURSOR_UPDATE."""
        want = _CURSOR_HEADER_SIZE + CURSOR_DATA_SIZE if request == DisplayReq.CURSOR_UPDATE \
            else _POS_SIZE
        if len(payload) != want:
            self.violations.append(f"{DisplayReq(request).name} payload of {len(payload)} "
                                   f"bytes, expected {want}")
            return
        pos = decode(VhostUserGpuCursorPos, payload)
        if self._scanout(DisplayReq(request).name, pos.scanout_id) is None:
            return
        c = self.cursor
        c.scanout_id, c.x, c.y = pos.scanout_id, pos.x, pos.y
        c.visible = request != DisplayReq.CURSOR_POS_HIDE
        if request == DisplayReq.CURSOR_UPDATE:
            head = decode(VhostUserGpuCursorUpdate, payload)
            c.hot_x, c.hot_y = head.hot_x, head.hot_y
            c.image = np.frombuffer(payload, dtype=np.uint8, offset=_CURSOR_HEADER_SIZE
                                    ).reshape(64, 64, 4).copy()
            c.updates += 1

    def surface(self, scanout_id: int = 0) -> npt.NDArray[np.uint8]:
        """A copy of a scanout's surface (``AssertionError`` if it has none)."""
        with self.lock:
            s = self.scanouts[scanout_id].surface
            if s is None:
                raise AssertionError(f"scanout {scanout_id} has no surface")
            return s.copy()


@dataclass(frozen=True, slots=True)
class DisplayEvent:
    """One message the back-end sent on the display socket."""

    request: int
    size: int
    fields: tuple[int, ...]
    time: float = field(compare=False)

    @property
    def name(self) -> str:
        """``UPDATE`` etc."""
        try:
            return DisplayReq(self.request).name
        except ValueError:
            return f"UNKNOWN({self.request})"


class DisplayPeer:
    """QEMU's end of one display socket, served by a reader thread.

    :param modes: GET_DISPLAY_INFO answer (``num_scanouts`` = QEMU's ``max_outputs``).
    """

    def __init__(self, sock: socket.socket, flavour: QemuFlavour, console: SimulatedConsole,
                 modes: Sequence[DisplayOne]) -> None:
        self.sock = sock
        self.flavour = flavour
        self.console = console
        self.modes = list(modes)
        self.events: list[DisplayEvent] = []
        self.unanswered: list[str] = []
        self.closed_by_backend = False
        self.error: BaseException | None = None
        self.update_bytes = 0
        self.cond = threading.Condition(console.lock)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="display-peer", daemon=True)
        self._thread.start()

    # --- reader thread ---------------------------------------------------------------

    def _recv_exact(self, view: memoryview) -> bool:
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:], len(view) - got)
            if n == 0:
                return False
            got += n
        return True

    def _run(self) -> None:
        header = bytearray(DISPLAY_HEADER_SIZE)
        try:
            while True:
                data, ancdata, _, _ = self.sock.recvmsg(DISPLAY_HEADER_SIZE,
                                                        socket.CMSG_SPACE(4 * 8))
                for level, kind, fd_bytes in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        for fd in struct.unpack(f"{len(fd_bytes) // 4}i", fd_bytes):
                            os.close(fd)  # only DMABUF messages carry fds; we never map them
                if not data:
                    break
                header[:len(data)] = data
                if len(data) < DISPLAY_HEADER_SIZE and not self._recv_exact(
                        memoryview(header)[len(data):]):
                    break
                request, _flags, size = _HEADER.unpack(header)
                payload = bytearray(size)
                if size and not self._recv_exact(memoryview(payload)):
                    break
                self._handle(request, memoryview(payload))
        except OSError as exc:
            if not self._stopping:
                self.error = exc
        except Exception as exc:  # pragma: no cover - surfaced through check()
            self.error = exc
        with self.cond:
            if not self._stopping:
                self.closed_by_backend = True
            self.cond.notify_all()

    def _reply(self, request: int, payload: bytes) -> None:
        self.sock.sendall(encode_message(request, payload, DisplayFlag.REPLY))

    def _handle(self, request: int, payload: memoryview) -> None:
        fields: tuple[int, ...] = ()
        with self.cond:
            if request == DisplayReq.UPDATE:
                if len(payload) >= _UPDATE_SIZE:
                    fields = tuple(decode(VhostUserGpuUpdate, payload))
                self.update_bytes += len(payload)
                self.console.apply_update(payload)
            elif request == DisplayReq.SCANOUT:
                fields = tuple(struct.unpack_from("<III", payload)) if len(payload) >= 12 else ()
                self.console.apply_scanout(bytes(payload))
            elif request in (DisplayReq.CURSOR_POS, DisplayReq.CURSOR_POS_HIDE,
                             DisplayReq.CURSOR_UPDATE):
                fields = tuple(struct.unpack_from("<III", payload)) if len(payload) >= 12 else ()
                self.console.apply_cursor(request, bytes(payload))
            elif len(payload) == 8:
                fields = struct.unpack("<Q", payload)
            elif len(payload) == 4:
                fields = struct.unpack("<I", payload)
            self.events.append(DisplayEvent(request, len(payload), fields, time.monotonic()))
            self.cond.notify_all()
        self._answer(request, bytes(payload) if len(payload) <= 64 else b"")

    def _answer(self, request: int, payload: bytes) -> None:
        """Send the reply QEMU would send, if any."""
        if request == DisplayReq.GET_PROTOCOL_FEATURES:
            self._reply(request, struct.pack("<Q", self.flavour.display_features))
        elif request == DisplayReq.GET_DISPLAY_INFO:
            self._reply(request, encode_display_info(self.modes[:self.console.num_scanouts]))
        elif request == DisplayReq.GET_EDID:
            scanout = decode(VhostUserGpuEdidRequest, payload).scanout_id if len(payload) == 4 \
                else None
            if not self.flavour.answers_edid:
                self.unanswered.append("GET_EDID (QEMU 7.2 never answers it)")
            elif scanout is None or scanout >= self.console.num_scanouts:
                self.unanswered.append(f"GET_EDID for invalid scanout {scanout}")
            else:
                mode = self.modes[scanout]
                blob = build_edid(mode.width, mode.height)
                resp = (encode(CtrlHdr(Resp.OK_EDID)) + encode(RespEdidHeader(len(blob)))
                        + blob.ljust(EDID_BLOB_SIZE, b"\0"))
                self._reply(request, resp)
        elif request == DisplayReq.DMABUF_UPDATE:
            self._reply(request, b"")  # no GL console: QEMU unblocks the back-end at once
        elif request not in (DisplayReq.SET_PROTOCOL_FEATURES, DisplayReq.SCANOUT,
                             DisplayReq.UPDATE, DisplayReq.CURSOR_POS,
                             DisplayReq.CURSOR_POS_HIDE, DisplayReq.CURSOR_UPDATE,
                             DisplayReq.DMABUF_SCANOUT, DisplayReq.DMABUF_SCANOUT2):
            self.unanswered.append(f"unhandled display message {request}")

    # --- test API --------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 15.0,
                 what: str = "display condition") -> None:
        """Wait until ``predicate()`` (evaluated under the console lock) holds."""
        with self.cond:
            if not self.cond.wait_for(lambda: predicate() or self.closed_by_backend
                                      or self.error is not None, timeout):
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                                     f"saw {self.names()}")
            if not predicate():
                raise AssertionError(f"display socket ended while waiting for {what} "
                                     f"(error {self.error!r}); saw {self.names()}")

    def count(self, request: int) -> int:
        """How many messages of this type arrived so far."""
        with self.cond:
            return sum(1 for e in self.events if e.request == request)

    def wait_count(self, request: int, count: int, timeout: float = 15.0) -> None:
        """Wait until at least ``count`` messages of type ``request`` arrived."""
        self.wait_for(lambda: self.count(request) >= count, timeout,
                      f"{count} x {DisplayReq(request).name}")

    def of_type(self, request: int) -> list[DisplayEvent]:
        """The messages of one type, in order."""
        with self.cond:
            return [e for e in self.events if e.request == request]

    def names(self) -> list[str]:
        """Message names in arrival order (compact, for assertion messages)."""
        with self.cond:
            return [e.name for e in self.events[-40:]]

    def close(self) -> None:
        """QEMU closes its end (VM stop, device reset or exit); the thread ends."""
        with self.cond:
            self._stopping = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5.0)
        self.sock.close()

    def check(self) -> None:
        """Raise if the reader thread failed or QEMU would have crashed."""
        if self.error is not None:
            raise AssertionError(f"display peer failed: {self.error!r}")
        if self.console.violations:
            raise AssertionError(f"display protocol violations: {self.console.violations}")
