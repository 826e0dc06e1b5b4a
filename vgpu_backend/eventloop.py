"""The single-threaded, non-blocking event loop (epoll).

Everything the back-end does happens in callbacks of this loop: vhost-user requests,
virtqueue kicks, display-socket traffic, timers, and completions that worker threads
hand back with :meth:`EventLoop.call_soon_threadsafe`.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["EventLoop", "TimerHandle"]

log = logging.getLogger(__name__)

Callback = Callable[[], None]
_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP
_WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_MIN_PURGE = 64  # below this many timers, cancelled ones wait to reach the top
#: the longest single poll: epoll takes at most 2^31-1 ms (~24.8 days), and an operator
#: may give a timeout of years (--display-timeout 1e9)
_MAX_SLEEP = 3600.0


@dataclass(order=True, slots=True)
class TimerHandle:
    """A pending :meth:`EventLoop.call_later`; :meth:`cancel` it to drop it."""

    when: float
    seq: int
    callback: Callback | None = field(compare=False)

    def cancel(self) -> None:
        """Do not run the callback."""
        self.callback = None


class EventLoop:
    """Dispatch fd readiness, timers and thread-safe calls until :meth:`stop`."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._registered: dict[int, int] = {}
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._timers: list[TimerHandle] = []
        self._purge_at = _MIN_PURGE  # heap size at which cancelled timers are dropped
        self._seq = itertools.count()
        self._calls: deque[Callback] = deque()
        self._calls_lock = threading.Lock()
        self._wakeup_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._running = False
        self._shut_down = False
        self.add_reader(self._wakeup_fd, self._drain_wakeup)

    # --- fd watches -------------------------------------------------------------------

    def _update(self, fd: int) -> None:
        events = (select.EPOLLIN if fd in self._readers else 0) | (
            select.EPOLLOUT if fd in self._writers else 0)
        registered = self._registered.get(fd)
        if events == 0:
            if registered is not None:
                del self._registered[fd]
                with contextlib.suppress(OSError):  # already closed: epoll forgot it
                    self._epoll.unregister(fd)
        elif registered != events:
            try:
                self._epoll.modify(fd, events)
            except FileNotFoundError:  # new, or closed and its number reused
                self._epoll.register(fd, events)
            self._registered[fd] = events

    def _watch(self, watches: dict[int, Callback], fd: int, callback: Callback) -> None:
        watches[fd] = callback
        try:
            self._update(fd)
        except OSError:  # epoll refused it: keep nothing
            del watches[fd]
            raise

    def add_reader(self, fd: int, callback: Callback) -> None:
        """Call ``callback`` whenever ``fd`` is readable.

        :raise OSError: epoll cannot watch ``fd`` (e.g. a regular file); nothing is kept.
        """
        self._watch(self._readers, fd, callback)

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd`` for reading (no error if it was not watched)."""
        if self._readers.pop(fd, None) is not None:
            self._update(fd)

    def add_writer(self, fd: int, callback: Callback) -> None:
        """Call ``callback`` whenever ``fd`` is writable (OSError as :meth:`add_reader`)."""
        self._watch(self._writers, fd, callback)

    def remove_writer(self, fd: int) -> None:
        """Stop watching ``fd`` for writing."""
        if self._writers.pop(fd, None) is not None:
            self._update(fd)

    def forget_fd(self, fd: int) -> None:
        """Drop every watch on ``fd`` (call before closing it)."""
        self._readers.pop(fd, None)
        self._writers.pop(fd, None)
        self._update(fd)

    # --- timers and calls -------------------------------------------------------------

    def call_later(self, delay: float, callback: Callback) -> TimerHandle:
        """Run ``callback`` on the loop after ``delay`` seconds."""
        if len(self._timers) >= self._purge_at:
            self._purge_cancelled()
        handle = TimerHandle(time.monotonic() + delay, next(self._seq), callback)
        heapq.heappush(self._timers, handle)
        return handle

    def _purge_cancelled(self) -> None:
        """Drop cancelled timers from the heap.  They would leave only when they come
        to the top: a display request answered at once keeps its 2 s timer there, so
        a guest asking in a loop would pile up thousands.  The next purge comes when
        the heap has doubled since this one (at least 64), so it stays under twice
        the timers live at the last purge (or 64), at amortised O(1) per timer."""
        self._timers = [t for t in self._timers if t.callback is not None]
        heapq.heapify(self._timers)
        self._purge_at = max(_MIN_PURGE, 2 * len(self._timers))

    def call_soon_threadsafe(self, callback: Callback) -> None:
        """Run ``callback`` on the loop thread; callable from any thread."""
        with self._calls_lock:
            self._calls.append(callback)
        os.eventfd_write(self._wakeup_fd, 1)

    def _drain_wakeup(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wakeup_fd)
        while True:
            with self._calls_lock:
                if not self._calls:
                    return
                callback = self._calls.popleft()
            callback()

    # --- running ----------------------------------------------------------------------

    def stop(self) -> None:
        """Make :meth:`run` return after the current iteration (signal-handler safe)."""
        self._running = False
        with contextlib.suppress(OSError):  # closed during shutdown
            os.eventfd_write(self._wakeup_fd, 1)

    def shutdown(self) -> None:
        """Stop for good: :meth:`run` returns after the current iteration, and at once
        whenever it is called again -- also when this comes before :meth:`run` (a
        SIGTERM during start-up).  Signal-handler safe."""
        self._shut_down = True
        self.stop()

    def run(self) -> None:
        """Dispatch events until :meth:`stop` (or :meth:`shutdown`)."""
        self._running = True
        while self._running and not self._shut_down:
            timeout = -1.0
            while self._timers and self._timers[0].callback is None:
                heapq.heappop(self._timers)
            if self._timers:  # a far-off timer is looked at again within the hour
                timeout = min(_MAX_SLEEP, max(0.0, self._timers[0].when - time.monotonic()))
            for fd, events in self._epoll.poll(timeout):
                # errors and hang-ups are reported to the reader, which sees EOF or an error
                if events & _READABLE and (reader := self._readers.get(fd)):
                    reader()
                if events & _WRITABLE and (writer := self._writers.get(fd)):
                    writer()
            now = time.monotonic()
            while self._timers and self._timers[0].when <= now:
                handle = heapq.heappop(self._timers)
                if handle.callback is not None:
                    callback, handle.callback = handle.callback, None
                    callback()

    def close(self) -> None:
        """Release the selector and the wake-up eventfd."""
        self._epoll.close()
        os.close(self._wakeup_fd)
