"""Our end of the display socket that QEMU passes with ``GPU_SET_SOCKET``.

Writes never block: messages go to an output queue drained when the socket is
writable (QEMU reads this socket only from its main loop, while its vCPU thread may be
waiting for our GET_CONFIG reply).  Requests that expect a reply are matched FIFO and
time out (``display_reply_timeout``), so a silent peer cannot stall the device.

The channel refuses to send an UPDATE for a scanout it has not announced with a
SCANOUT of non-zero size (QEMU dereferences a NULL surface otherwise).
"""

from __future__ import annotations

import enum
import itertools
import logging
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from protocol.display import (
    CURSOR_DATA_SIZE,
    DisplayMessage,
    DisplayReq,
    MessageReader,
    VhostUserGpuCursorPos,
    VhostUserGpuCursorUpdate,
    VhostUserGpuScanout,
    encode_message,
    encode_update,
)
from protocol.errors import DisplayProtocolError
from protocol.limits import Limits
from protocol.wire import encode
from vgpu_backend.eventloop import EventLoop, TimerHandle

__all__ = ["DisplayChannel", "DisplayState"]

log = logging.getLogger(__name__)

ReplyCallback = Callable[[DisplayMessage | None], None]
_U64 = struct.Struct("<Q")
_IOV_MAX = 64


class DisplayState(enum.Enum):
    """Run state of the channel."""

    NEGOTIATING = "negotiating"  # GET_PROTOCOL_FEATURES sent, no reply yet
    READY = "ready"
    CLOSED = "closed"


@dataclass(slots=True)
class _Pending:
    request: int
    callback: ReplyCallback
    timer: TimerHandle


class DisplayChannel:
    """One display socket.

    :param on_ready: called once protocol features are negotiated (or timed out).
    :param on_closed: called once when the peer hangs up or the socket fails.
    """

    #: display protocol features we can use (none: we generate EDID ourselves and
    #: never send DMABUF messages)
    OUR_FEATURES = 0

    def __init__(self, loop: EventLoop, sock: socket.socket, limits: Limits,
                 on_ready: Callable[[DisplayChannel], None],
                 on_closed: Callable[[DisplayChannel], None]) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._limits = limits
        self._on_ready = on_ready
        self._on_closed = on_closed
        self._reader = MessageReader(limits.max_display_reply)
        self._out: deque[memoryview] = deque()
        self._out_bytes = 0
        self._pending: deque[_Pending] = deque()
        self._announced: dict[int, tuple[int, int]] = {}
        self._drained: list[Callable[[], None]] = []
        self.state = DisplayState.NEGOTIATING
        self.peer_features = 0
        sock.setblocking(False)
        loop.add_reader(self._fd, self._readable)
        self.request(DisplayReq.GET_PROTOCOL_FEATURES, b"", self._got_features)

    # --- negotiation -------------------------------------------------------------

    def _got_features(self, reply: DisplayMessage | None) -> None:
        if reply is None:
            log.warning("display: no GET_PROTOCOL_FEATURES reply; assuming none")
        else:
            try:
                self.peer_features = reply.u64()
            except DisplayProtocolError as err:
                log.warning("display: %s", err)
        if self.state is DisplayState.CLOSED:
            return
        agreed = self.OUR_FEATURES & self.peer_features
        self.send(encode_message(DisplayReq.SET_PROTOCOL_FEATURES, _U64.pack(agreed)))
        self.state = DisplayState.READY
        log.info("display: peer offers protocol features %#x, using %#x",
                 self.peer_features, agreed)
        self._on_ready(self)

    # --- requests with replies -------------------------------------------------------

    def request(self, req: DisplayReq, payload: bytes, callback: ReplyCallback) -> None:
        """Send ``req``; ``callback`` gets the reply, or ``None`` on timeout or close."""
        if self.state is DisplayState.CLOSED:
            callback(None)
            return
        entry = _Pending(int(req), callback, self._loop.call_later(
            self._limits.display_reply_timeout, self._timeout))
        self._pending.append(entry)
        self.send(encode_message(req, payload))

    def _timeout(self) -> None:
        if self._pending:
            entry = self._pending.popleft()
            log.warning("display: no reply to request %d within %.1fs", entry.request,
                        self._limits.display_reply_timeout)
            entry.callback(None)

    def _readable(self) -> None:
        try:
            # QEMU never sends fds here; plain recv makes the kernel drop any that come
            data = self._sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as err:
            log.warning("display: receive failed: %s", err)
            self.close()
            return
        if not data:
            log.info("display: peer closed the socket")
            self.close()
            return
        try:
            for message in self._reader.receive(data):
                self._dispatch(message)
        except DisplayProtocolError as err:
            log.error("display: %s; dropping the socket", err)
            self.close()

    def _dispatch(self, message: DisplayMessage) -> None:
        if not message.is_reply:
            log.warning("display: ignoring unsolicited request %d", message.request)
            return
        if not self._pending or self._pending[0].request != message.request:
            log.warning("display: unexpected reply to request %d", message.request)
            return
        entry = self._pending.popleft()
        entry.timer.cancel()
        entry.callback(message)

    # --- output ------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """The socket is closed."""
        return self.state is DisplayState.CLOSED

    @property
    def backlog(self) -> int:
        """Bytes queued but not yet written."""
        return self._out_bytes

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the output queue is empty."""
        if not self._out:
            callback()
        else:
            self._drained.append(callback)

    def send(self, *buffers: bytes | memoryview | npt.NDArray[np.uint8]) -> None:
        """Queue a message (given as one or more buffers) for sending."""
        if self.state is DisplayState.CLOSED:
            return
        was_empty = not self._out
        for buf in buffers:
            view = (buf.data if isinstance(buf, np.ndarray) else memoryview(buf)).cast("B")
            if view.nbytes:
                self._out.append(view)
                self._out_bytes += view.nbytes
        if was_empty and self._out:
            self._write()
            if self._out and not self.closed:
                self._loop.add_writer(self._fd, self._write)

    def _write(self) -> None:
        while self._out:
            try:
                sent = self._sock.sendmsg(itertools.islice(self._out, _IOV_MAX))
            except BlockingIOError:
                return
            except OSError as err:
                log.warning("display: send failed: %s", err)
                self.close()
                return
            self._out_bytes -= sent
            while sent:
                head = self._out[0]
                if sent >= head.nbytes:
                    sent -= head.nbytes
                    self._out.popleft()
                else:
                    self._out[0] = head[sent:]
                    sent = 0
        self._loop.remove_writer(self._fd)
        drained, self._drained = self._drained, []
        for callback in drained:
            callback()

    # --- display messages --------------------------------------------------------

    def scanout(self, scanout_id: int, width: int, height: int) -> None:
        """SCANOUT: show a ``width`` x ``height`` surface (0 x 0 disables)."""
        self.send(encode_message(DisplayReq.SCANOUT,
                                 encode(VhostUserGpuScanout(scanout_id, width, height))))
        if width and height:
            self._announced[scanout_id] = (width, height)
        else:
            self._announced.pop(scanout_id, None)

    def announced(self, scanout_id: int) -> tuple[int, int] | None:
        """The surface size last announced for a scanout, if enabled."""
        return self._announced.get(scanout_id)

    def update(self, scanout_id: int, x: int, y: int,
               pixels: npt.NDArray[np.uint32]) -> None:
        """UPDATE a rectangle of an announced scanout with x8r8g8b8 ``pixels`` (h, w)."""
        size = self._announced.get(scanout_id)
        height, width = pixels.shape
        if size is None:
            log.error("display: UPDATE for unannounced scanout %d dropped", scanout_id)
            return
        if width == 0 or height == 0:
            return
        data = np.ascontiguousarray(pixels)
        self.send(encode_update(scanout_id, x, y, width, height), data.view(np.uint8))

    def cursor_update(self, scanout_id: int, x: int, y: int, hot_x: int, hot_y: int,
                      argb: npt.NDArray[np.uint32]) -> None:
        """CURSOR_UPDATE with a 64x64 a8r8g8b8 image."""
        data = np.ascontiguousarray(argb, dtype=np.uint32).view(np.uint8)
        if data.nbytes != CURSOR_DATA_SIZE:
            raise ValueError("cursor image must be 64x64")
        header = encode(VhostUserGpuCursorUpdate(scanout_id, x, y, hot_x, hot_y))
        self.send(encode_message(DisplayReq.CURSOR_UPDATE, header + data.tobytes()))

    def cursor_move(self, scanout_id: int, x: int, y: int, visible: bool) -> None:
        """CURSOR_POS, or CURSOR_POS_HIDE when not ``visible``."""
        req = DisplayReq.CURSOR_POS if visible else DisplayReq.CURSOR_POS_HIDE
        self.send(encode_message(req, encode(VhostUserGpuCursorPos(scanout_id, x, y))))

    # --- teardown ------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket; pending requests get ``None``.  Idempotent."""
        if self.state is DisplayState.CLOSED:
            return
        self.state = DisplayState.CLOSED
        self._loop.forget_fd(self._fd)
        self._sock.close()
        self._out.clear()
        self._out_bytes = 0
        self._drained.clear()
        pending, self._pending = self._pending, deque()
        for entry in pending:
            entry.timer.cancel()
            entry.callback(None)
        self._on_closed(self)
