"""The guest's ``pause`` request: QMP ``stop``, a wait, QMP ``cont`` (what ``virsh
suspend`` and ``virsh resume`` do).

QEMU stops a vhost-user-gpu device when the VM stops: it closes the display socket and
takes the rings back (GET_VRING_BASE).  On ``cont`` it starts the device again: the
rings resume from the saved bases and the back-end gets a new display socket (a second
GPU_SET_SOCKET), on which it must announce its scanouts again.  The guest asks for the
pause and checks afterwards that its display and its commands survived.

Request (control channel): ``pause [seconds=0.5]``; the reply comes once the VM runs
again: ``ok paused=S`` (seconds the VM was stopped) or ``error ...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

from qemu.qmp import QMPClient

from .control import parse_fields
from .qemu import qmp_execute

MAX_PAUSE = 10.0


class VmPauser:
    """Serves ``pause`` requests over a QMP connection."""

    def __init__(self, qmp: QMPClient) -> None:
        self.qmp = qmp

    async def _running(self) -> bool:
        status = await qmp_execute(self.qmp, "query-status")
        return bool(status["running"])

    async def handle_request(self, args: str) -> str:
        """Stop the VM, wait, continue it.  Once stopped, ``cont`` is always sent: the
        VM stays stopped only when QEMU refuses it."""
        try:
            seconds = float(parse_fields(args).get("seconds", "0.5"))
        except ValueError:
            return f"error bad pause request {args!r}"
        if not (math.isfinite(seconds) and 0 <= seconds <= MAX_PAUSE):
            return f"error pause seconds must be within 0-{MAX_PAUSE:g}"
        try:
            await qmp_execute(self.qmp, "stop")
        except Exception as error:  # QMP errors and timeouts go back to the guest
            if await self._maybe_stopped():  # a lost reply: the VM may have stopped
                with contextlib.suppress(Exception):
                    await qmp_execute(self.qmp, "cont")
            return f"error stop failed: {error!r}"
        stopped = time.monotonic()
        problem = await self._hold(seconds)
        try:
            await qmp_execute(self.qmp, "cont")
        except Exception as error:
            return f"error cont failed (the VM stays stopped): {error!r}"
        paused = time.monotonic() - stopped
        try:
            if not problem and not await self._running():
                problem = "error the VM does not run after cont"
        except Exception as error:
            problem = f"error query-status after cont failed: {error!r}"
        return problem or f"ok paused={paused:.2f}"

    async def _maybe_stopped(self) -> bool:
        """After a failed ``stop``: not known to be running."""
        try:
            return not await self._running()
        except Exception:
            return True

    async def _hold(self, seconds: float) -> str:
        """Check that the VM stopped, then wait; what went wrong, or ""."""
        try:
            if await self._running():
                return "error the VM still runs after stop"
        except Exception as error:
            return f"error query-status after stop failed: {error!r}"
        await asyncio.sleep(seconds)
        return ""
