"""Turn a hang into a test failure (loops that must terminate: ring walking)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["HangError", "deadline"]


class HangError(AssertionError):
    """The guarded code was still running at the deadline."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`HangError` inside the body if it runs longer than ``seconds``
    (SIGALRM: main thread only)."""
    def expire(signum: int, frame: FrameType | None) -> None:
        raise HangError(f"still running after {seconds}s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
