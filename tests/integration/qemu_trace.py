"""The recorded QEMU 7.2 <-> reference back-end session (``data/qemu-7.2-...-trace.txt``).

Parsed into vhost-user messages, display messages, guest commands and their
responses, so tests can require the simulator and the back-ends to follow it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TRACE_PATH", "TraceCommand", "TraceMessage", "load_trace"]

TRACE_PATH = Path(__file__).parent / "data" / "qemu-7.2-vhost-user-gpu-trace.txt"

_MESSAGE = re.compile(r"^\s*[\d.]+\s+(Q->B|B->Q|B->Qg|Q->Bg)\s+#(\d+)\s+(\S+)\s+"
                      r"flags=(0x[0-9a-f]+)\S*\s+size=(\d+)\s+fds=(\d+)(.*)$")
_COMMAND = re.compile(r"^\s*[\d.]+\s+VQ0\s+avail\[(\d+)\]\s+head=\d+\s+CMD\s+(\S+)(.*)$")
_USED = re.compile(r"^\s*[\d.]+\s+VQ0\s+used\[(\d+)\].*RESP\s+(RESP_\w+|\(buffer)")
_EOF = re.compile(r"^\s*[\d.]+\s+(Q->Bg)\s+EOF")


@dataclass(frozen=True, slots=True)
class TraceMessage:
    """One vhost-user or display message of the trace."""

    channel: str
    request: int
    name: str
    flags: int
    size: int
    fds: int
    detail: str

    @property
    def key(self) -> tuple[str, int, int, int, int]:
        """What a replay must reproduce: channel, request, flags, size, fd count."""
        return self.channel, self.request, self.flags, self.size, self.fds


@dataclass(frozen=True, slots=True)
class TraceCommand:
    """One guest command (``VQ0 avail[n]``) with its decoded parameters."""

    index: int
    name: str
    params: dict[str, str]
    response: str | None  # RESP_* name, None where the guest reclaimed the buffer first


@dataclass(frozen=True, slots=True)
class Trace:
    """The parsed trace."""

    messages: list[TraceMessage]
    commands: list[TraceCommand]

    def channel(self, *names: str) -> list[TraceMessage]:
        """Messages on the given channels, in order."""
        return [m for m in self.messages if m.channel in names]


def _params(text: str) -> dict[str, str]:
    out = dict(re.findall(r"(\w+)=([\w.,x]+)", text.split("(descs=", maxsplit=1)[0]))
    size = re.search(r"\b(\d+)x(\d+)\b", text)
    if size:
        out["w"], out["h"] = size.group(1), size.group(2)
    return out


def load_trace(path: Path = TRACE_PATH) -> Trace:
    """Parse the trace file."""
    messages: list[TraceMessage] = []
    commands: dict[int, tuple[str, dict[str, str]]] = {}
    responses: dict[int, str | None] = {}
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            continue
        if m := _MESSAGE.match(line):
            channel, req, name, flags, size, fds, detail = m.groups()
            if channel.endswith("g"):
                name = name.removeprefix("GPU_")
            messages.append(TraceMessage(channel, int(req), name, int(flags, 16), int(size),
                                         int(fds), detail))
        elif m := _COMMAND.match(line):
            commands[int(m.group(1))] = (m.group(2), _params(m.group(3)))
        elif m := _USED.match(line):
            resp = m.group(2)
            responses[int(m.group(1))] = None if resp.startswith("(") else resp
    cmds = [TraceCommand(i, name, params, responses.get(i))
            for i, (name, params) in sorted(commands.items())]
    return Trace(messages, cmds)
