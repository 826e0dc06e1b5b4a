"""Message lines of the recorded QEMU 7.2 session, with their payload bytes.

A line looks like::

    5.752530 Q->B   #8  SET_VRING_NUM  flags=0x1 size=8 fds=0 index=0 num=64 hex=0000000040000000

``hex=`` is the payload, truncated at 512 bytes (64 for GPU_UPDATE/CURSOR_UPDATE);
``payload`` is set only when the dump is complete.  The decoded text between ``fds=``
and ``hex=`` is kept as ``text`` with its ``key=value`` pairs in ``fields``.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

__all__ = ["MESSAGE_CHANNELS", "TRACE_PATH", "TraceLine", "frame", "lines", "load_lines",
           "raw_message_lines"]

#: the copy of ``/work/shared/fixtures/qemu-7.2-vhost-user-gpu-trace.txt`` in the repo
TRACE_PATH = (Path(__file__).resolve().parent.parent / "integration" / "data"
              / "qemu-7.2-vhost-user-gpu-trace.txt")
MESSAGE_CHANNELS = ("Q->B", "B->Q", "B->Qg", "Q->Bg")

_LINE = re.compile(
    r"^\s*[\d.]+\s+(?P<channel>Q->B|B->Q|B->Qg|Q->Bg)\s+#(?P<request>\d+)\s+(?P<name>\S+)\s+"
    r"flags=(?P<flags>0x[0-9a-f]+)(?:\([A-Z_|]*\))?\s+size=(?P<size>\d+)\s+fds=(?P<fds>\d+)"
    r"(?P<rest>.*)$")
_HEX = re.compile(r"\s*hex=(?P<hex>[0-9a-f]*)\s*$")
_FIELD = re.compile(r"(\w+)=(0x[0-9a-f]+|\d+)")
_HEADER = struct.Struct("<III")


@dataclass(frozen=True, slots=True)
class TraceLine:
    """One decoded message line."""

    channel: str
    request: int
    name: str
    flags: int
    size: int
    fds: int
    #: the decoded payload text (without ``hex=``)
    text: str
    #: the dumped payload prefix (possibly truncated)
    dumped: bytes

    @property
    def payload(self) -> bytes | None:
        """The whole payload, or ``None`` when the dump was truncated."""
        return self.dumped if len(self.dumped) == self.size else None

    @property
    def complete(self) -> bytes:
        """The whole payload; fails the test when the dump was truncated."""
        payload = self.payload
        assert payload is not None, f"{self.name}: payload dump truncated"
        return payload

    @property
    def fields(self) -> dict[str, int]:
        """``key=value`` integers of the decoded text (first occurrence wins)."""
        out: dict[str, int] = {}
        for key, value in _FIELD.findall(self.text):
            out.setdefault(key, int(value, 0))
        return out

    @property
    def leading_value(self) -> int:
        """The bare number the text starts with (features, counts)."""
        return int(self.text.split()[0], 0)


def _parse(line: str) -> TraceLine | None:
    match = _LINE.match(line)
    if match is None:
        return None
    rest = match["rest"]
    dumped = b""
    hex_match = _HEX.search(rest)
    if hex_match is not None:
        dumped = bytes.fromhex(hex_match["hex"])
        rest = rest[:hex_match.start()]
    return TraceLine(match["channel"], int(match["request"]), match["name"],
                     int(match["flags"], 16), int(match["size"]), int(match["fds"]),
                     rest.strip(), dumped)


def raw_message_lines() -> list[str]:
    """Every trace line of a message channel that carries a request number."""
    return [line for line in TRACE_PATH.read_text().splitlines()
            if len(line.split()) > 2 and line.split()[1] in MESSAGE_CHANNELS
            and line.split()[2].startswith("#")]


@cache
def load_lines() -> tuple[TraceLine, ...]:
    """Every parsed message line, in order."""
    parsed = [_parse(line) for line in raw_message_lines()]
    return tuple(p for p in parsed if p is not None)


def lines(channel: str, name: str | None = None) -> list[TraceLine]:
    """Message lines of one channel (and request name), in order."""
    return [m for m in load_lines() if m.channel == channel and (name is None or m.name == name)]


def frame(line: TraceLine) -> bytes:
    """The message as it went over the wire: 12-byte header + payload."""
    return _HEADER.pack(line.request, line.flags, line.size) + line.complete
