"""QEMU's end of the display socket, in-process, on the same event loop.

It frames what the back-end sends with the protocol's own :class:`MessageReader`,
records every message, and answers GET_PROTOCOL_FEATURES and GET_DISPLAY_INFO the
way QEMU does (or stays silent, for timeout tests).
"""

from __future__ import annotations

import socket
import struct

from protocol.display import (
    DisplayFlag,
    DisplayMessage,
    DisplayReq,
    MessageReader,
    encode_display_info,
    encode_message,
)
from protocol.virtio_gpu import DisplayOne
from vgpu_backend.eventloop import EventLoop

__all__ = ["DisplayPeer"]

_U64 = struct.Struct("<Q")


class DisplayPeer:
    """Reads one end of a socketpair on ``loop``.

    :param features: the GET_PROTOCOL_FEATURES answer, or ``None`` to stay silent.
    :param modes: the GET_DISPLAY_INFO answer, or ``None`` to stay silent.
    """

    def __init__(self, loop: EventLoop, sock: socket.socket, features: int | None = 0,
                 modes: list[DisplayOne] | None = None) -> None:
        self.loop = loop
        self.sock = sock
        self.features = features
        self.modes = modes if modes is not None else [DisplayOne(0, 0, 1280, 800, 1, 0)]
        self.answer_display_info = True
        self.received: list[DisplayMessage] = []
        self._reader = MessageReader(max_payload=1 << 28)
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return
        for message in self._reader.receive(data):
            self.received.append(message)
            self._answer(message)

    def _answer(self, message: DisplayMessage) -> None:
        if message.request == DisplayReq.GET_PROTOCOL_FEATURES and self.features is not None:
            self.send(encode_message(DisplayReq.GET_PROTOCOL_FEATURES,
                                     _U64.pack(self.features), DisplayFlag.REPLY))
        elif message.request == DisplayReq.GET_DISPLAY_INFO and self.answer_display_info:
            self.send(encode_message(DisplayReq.GET_DISPLAY_INFO,
                                     encode_display_info(self.modes), DisplayFlag.REPLY))

    def send(self, data: bytes) -> None:
        """Write raw bytes to the back-end."""
        self.sock.sendall(data)

    def answer_features(self, features: int) -> None:
        """Answer, late, the GET_PROTOCOL_FEATURES received while silent."""
        self.features = features
        for message in self.of(DisplayReq.GET_PROTOCOL_FEATURES):
            self._answer(message)

    def pause(self) -> None:
        """Stop reading, as a QEMU whose main loop is busy: the back-end's queue grows."""
        self.loop.remove_reader(self.sock.fileno())

    def read_once(self) -> None:
        """Read what the socket holds now, once (a QEMU that reads now and then)."""
        self._readable()

    def resume(self) -> None:
        """Read again."""
        self.loop.add_reader(self.sock.fileno(), self._readable)

    def of(self, request: DisplayReq) -> list[DisplayMessage]:
        """Received messages of one type, in order."""
        return [m for m in self.received if m.request == request]

    def close(self) -> None:
        """Hang up (idempotent)."""
        if self.sock.fileno() >= 0:
            self.loop.forget_fd(self.sock.fileno())
            self.sock.close()
