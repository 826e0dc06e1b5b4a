"""The vhost-user-gpu back-end under test: command templates and start-up.

Every back-end follows one convention: ``CMD --socket-path PATH`` listens on PATH, serves the
QEMU that connects and exits 0 when QEMU disconnects.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import HarnessError, HarnessTimeout
from .processes import ManagedProcess, tail

REPO_ROOT = Path(__file__).resolve().parents[2]
REFERENCE_BACKEND = "/usr/lib/qemu/vhost-user-gpu"
DEFAULT_PRESET = "ours"  # the runner exists to test this project's back-end
SOCKET_PLACEHOLDER = "{socket}"
PRESETS = {
    "ours": (f"{shlex.quote(sys.executable)} -m vgpu_backend --socket-path {SOCKET_PLACEHOLDER}",
             REPO_ROOT),
    "reference": (f"{REFERENCE_BACKEND} --socket-path {SOCKET_PLACEHOLDER}", None),
}
UNIX_LISTENING_FLAG = 0x10000  # __SO_ACCEPTCON in /proc/net/unix


@dataclass(frozen=True)
class BackendSpec:
    """Which back-end to run: its name for the guest and its argv with {socket} in it."""

    name: str  # "ours", "reference" or "custom"
    template: tuple[str, ...]
    cwd: Path | None

    def argv(self, socket: Path, heads: int = 1) -> list[str]:
        """The command for one device listening on `socket`, with `heads` outputs (our
        back-end is told; the others take what QEMU's device says)."""
        argv = [arg.replace(SOCKET_PLACEHOLDER, str(socket)) for arg in self.template]
        if heads > 1 and self.name == "ours":
            argv += ["--max-outputs", str(heads)]  # must match QEMU's max_outputs
        return argv


def backend_spec(preset: str | None, command: str | None,
                 extra_args: Sequence[str] = ()) -> BackendSpec:
    """The spec for --backend PRESET (default DEFAULT_PRESET) with ``extra_args``
    (--backend-arg) after the preset's, or --backend-cmd 'TEMPLATE' (the latter wins;
    it takes no extra arguments)."""
    if command is not None:
        if extra_args:
            raise HarnessError("--backend-arg goes with a preset; put the arguments in "
                               f"--backend-cmd instead: {shlex.join(extra_args)}")
        template = tuple(shlex.split(command))
        if not any(SOCKET_PLACEHOLDER in arg for arg in template):
            raise HarnessError(f"--backend-cmd must contain {SOCKET_PLACEHOLDER}: {command!r}")
        return BackendSpec("custom", template, REPO_ROOT)
    name = preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise HarnessError(f"unknown back-end {name!r} (choose from {', '.join(PRESETS)})")
    line, cwd = PRESETS[name]
    return BackendSpec(name, (*shlex.split(line), *extra_args), cwd)


def is_listening(socket: Path) -> bool:
    """True once a process listens on the unix socket `socket` (read from /proc/net/unix).

    Connecting to find out would use up the back-end's one front-end connection.
    """
    wanted = str(socket)
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == wanted and \
                    int(fields[3], 16) & UNIX_LISTENING_FLAG:
                return True
    return False


async def start_backend(spec: BackendSpec, index: int, socket: Path, log_path: Path,
                        timeout: float, heads: int = 1) -> ManagedProcess:
    """Start one back-end and wait until it listens on `socket`."""
    socket.unlink(missing_ok=True)
    process = ManagedProcess(f"back-end {index} ({spec.name})", spec.argv(socket, heads),
                             log_path, cwd=spec.cwd)
    try:
        await process.spawn()
    except OSError as error:
        raise HarnessError(f"cannot start {process.name}: {shlex.join(process.argv)}: "
                           f"{error}") from error
    deadline = time.monotonic() + timeout
    while not is_listening(socket):
        if process.returncode is not None:
            raise HarnessError(f"{process.describe_exit()} before listening on {socket}\n"
                               f"--- {log_path} ---\n{tail(log_path)}")
        if time.monotonic() > deadline:
            await process.stop(0)
            raise HarnessTimeout(f"{process.name} did not listen on {socket} within "
                                 f"{timeout:.0f} s\n--- {log_path} ---\n{tail(log_path)}")
        await asyncio.sleep(0.02)
    return process
