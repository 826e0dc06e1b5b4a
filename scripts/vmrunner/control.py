"""The guest's control channel: a virtio-serial port (org.vgpu.control) to a host unix socket.

Why virtio-serial: it exists before any root filesystem is mounted (the busybox init uses
it), it is a reliable ordered byte stream that needs no guest network stack, and it is
independent of the display path under test.  QEMU connects to the runner's listening socket
at start-up, so no guest byte can be lost to a race.

Protocol: ASCII lines.  ``event NAME [key=value ...] [text]`` from the guest gets no reply;
any other line is a request ``VERB ARGS`` and gets exactly one reply line, ``ok ...`` or
``error ...``.  A guest must keep the port open between a request and its reply (the guest
driver drops data that arrives for a closed port).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

RequestHandler = Callable[[str], Awaitable[str]]
MAX_LINE = 64 * 1024


@dataclass(frozen=True)
class GuestEvent:
    """One `event` line, or a synthetic event the runner adds (process exits)."""

    name: str
    fields: dict[str, str] = field(default_factory=dict)
    text: str = ""
    arrived: float = field(default_factory=time.monotonic)


def parse_event(line: str) -> GuestEvent:
    """Parse the part after "event ": a name, key=value fields, free text for the rest."""
    words = line.split()
    name = words[0] if words else ""
    fields = {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if sep and key.isidentifier():
            fields[key] = value
    text = line[len(name):].strip()
    return GuestEvent(name, fields, text)


def parse_fields(args: str) -> dict[str, str]:
    """The key=value words of a request's arguments."""
    return parse_event("request " + args).fields


class ControlServer:
    """Listens on the control socket; queues events and answers requests in order."""

    def __init__(self, socket_path: Path, events: asyncio.Queue[GuestEvent],
                 transcript: Path) -> None:
        self.socket_path = socket_path
        self.events = events
        self.transcript = transcript
        self.handlers: dict[str, RequestHandler] = {}
        self._server: asyncio.Server | None = None
        self._connections: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        """Listen (before QEMU starts, which connects as the client)."""
        self.socket_path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.socket_path),
                                                       limit=MAX_LINE)

    def _log(self, direction: str, line: str) -> None:
        with self.transcript.open("a") as out:
            out.write(f"{time.strftime('%H:%M:%S')} {direction} {line}\n")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.append(writer)
        try:
            while raw := await reader.readline():
                line = raw.decode(errors="replace").strip()
                if not line:
                    continue
                self._log("guest:", line)
                verb, _, args = line.partition(" ")
                if verb == "event":
                    await self.events.put(parse_event(args))
                    continue
                handler = self.handlers.get(verb)
                try:
                    reply = await handler(args) if handler else f"error unknown request {verb}"
                except Exception as error:  # a broken request must not kill the runner
                    reply = f"error {type(error).__name__}: {error}"
                self._log("host: ", reply)
                writer.write(reply.replace("\n", " ").encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError) as error:
            self._log("host: ", f"connection dropped: {error}")
        finally:
            writer.close()

    async def close(self) -> None:
        """Stop listening and drop the connection."""
        for writer in self._connections:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.socket_path.unlink(missing_ok=True)
