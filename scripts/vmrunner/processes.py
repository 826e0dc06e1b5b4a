"""Child processes of the runner: started in their own session, logged, always reaped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path


def tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a log file ("" if it does not exist)."""
    try:
        with path.open("rb") as log:
            log.seek(max(0, log.seek(0, 2) - 200 * lines))
            text = log.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class ManagedProcess:
    """A child with its output in `log_path`; stop() ends its whole process group."""

    def __init__(self, name: str, argv: list[str], log_path: Path,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.cwd = cwd
        self.process: asyncio.subprocess.Process | None = None
        self.stopped_by: str = ""  # "", "SIGTERM" or "SIGKILL" once stop() had to signal

    async def spawn(self) -> None:
        """Start the process (its stdin is /dev/null, stdout and stderr go to the log)."""
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=log,
                stderr=asyncio.subprocess.STDOUT, cwd=self.cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        """The child's pid (it leads its own process group)."""
        assert self.process is not None, "spawn() first"
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once it has exited (negative: killed by that signal)."""
        return None if self.process is None else self.process.returncode

    async def wait(self) -> int:
        """Wait for the exit and return the status."""
        assert self.process is not None, "spawn() first"
        return await self.process.wait()

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    async def stop(self, grace: float, term_wait: float = 5.0) -> int | None:
        """Give it `grace` seconds to exit on its own, then SIGTERM, then SIGKILL."""
        if self.process is None:
            return None
        for signum, wait in ((None, grace), (signal.SIGTERM, term_wait),
                             (signal.SIGKILL, 5.0)):
            if signum is not None and self.process.returncode is None:
                self.stopped_by = signal.Signals(signum).name
                self._signal_group(signum)
            try:
                return await asyncio.wait_for(asyncio.shield(self.process.wait()), wait)
            except TimeoutError:
                continue
        return self.process.returncode

    def describe_exit(self) -> str:
        """How it ended, for messages."""
        code = self.returncode
        if code is None:
            return f"{self.name} is still running"
        how = f"exited with status {code}" if code >= 0 else \
            f"was killed by {signal.Signals(-code).name}"
        return f"{self.name} {how}" + (f" (after {self.stopped_by})" if self.stopped_by else "")
