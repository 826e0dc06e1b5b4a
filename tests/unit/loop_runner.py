"""Run the real :class:`EventLoop` until a condition holds (bounded in time)."""

from __future__ import annotations

import time
from collections.abc import Callable

from vgpu_backend.eventloop import EventLoop

__all__ = ["run_a_little", "run_until"]

_POLL = 0.002


def run_until(loop: EventLoop, condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """Dispatch events until ``condition()`` is true.

    :raise AssertionError: it did not become true within ``timeout`` seconds.
    """
    give_up = time.monotonic() + timeout
    timed_out = False

    def check() -> None:
        nonlocal timed_out
        if condition():
            loop.stop()
        elif time.monotonic() > give_up:
            timed_out = True
            loop.stop()
        else:
            loop.call_later(_POLL, check)

    if condition():
        return
    loop.call_later(0, check)
    loop.run()
    assert not timed_out, f"condition not met within {timeout}s"


def run_a_little(loop: EventLoop) -> None:
    """Dispatch a few milliseconds of events."""
    checks = iter(range(3))
    run_until(loop, lambda: next(checks, 3) >= 2)
