"""The single-threaded, non-blocking event loop (epoll).

Everything the back-end does happens in callbacks of this loop: vhost-user requests,
virtqueue kicks, display-socket traffic, timers, and completions that worker threads
hand back with :meth:`EventLoop.call_soon_threadsafe`.

With a polling limit (``--poll-max-us``) the loop busy-polls for a while before it
sleeps, as QEMU's event loop does (``poll-max-ns``): an event that comes soon after
the last one is seen without the sleep and wake-up of both processes.  The window
adapts (:class:`PollWindow`), so an idle guest costs no CPU.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["EventLoop", "PollWindow", "TimerHandle"]

log = logging.getLogger(__name__)

Callback = Callable[[], None]
_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP
_WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_MIN_PURGE = 64  # below this many timers, cancelled ones wait to reach the top
#: the longest single poll: epoll takes at most 2^31-1 ms (~24.8 days), and an operator
#: may give a timeout of years (--display-timeout 1e9)
_MAX_SLEEP = 3600.0
_POLL_GROW_START = 4e-6  # QEMU's first window when polling starts to pay (4 us)
_clock = time.monotonic  # the polling's clock (tests drive it)


@dataclass(order=True, slots=True)
class TimerHandle:
    """A pending :meth:`EventLoop.call_later`; :meth:`cancel` it to drop it."""

    when: float
    seq: int
    callback: Callback | None = field(compare=False)

    def cancel(self) -> None:
        """Do not run the callback."""
        self.callback = None


class PollWindow:
    """How long the loop busy-polls before it sleeps; adapted after every wait as
    QEMU's ``adjust_polling_time`` does (util/aio-posix.c, default grow and shrink).

    A wait that polling covered leaves the window as it is; one longer than the window
    but within ``maximum`` doubles it (from 4 us, at most ``maximum``): polling a
    little longer would have caught it; one longer than ``maximum`` drops it to 0:
    polling would cost more than it saves.  ``maximum`` 0 never polls.
    """

    __slots__ = ("maximum", "window")

    def __init__(self, maximum: float) -> None:
        if isinstance(maximum, bool) or not 0.0 <= maximum < math.inf:
            raise ValueError(f"polling limit must be a finite number of seconds >= 0, not "
                             f"{maximum!r}")
        self.maximum = maximum
        self.window = 0.0

    def record(self, waited: float) -> None:
        """Adapt to a wait of ``waited`` seconds (polling and sleeping) for an event."""
        if waited <= self.window:
            return
        if waited > self.maximum:
            self.window = 0.0
        elif self.window < self.maximum:
            self.window = min(self.maximum, 2 * self.window or _POLL_GROW_START)


class EventLoop:
    """Dispatch fd readiness, timers and thread-safe calls until :meth:`stop`.

    :param poll_max: the longest busy-poll before each sleep, in seconds (0: never
        poll; see :class:`PollWindow`).
    """

    def __init__(self, poll_max: float = 0.0) -> None:
        self._poll = PollWindow(poll_max)
        self._poll_holds: list[Callable[[], bool]] = []
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
            for fd, events in self._wait(timeout):
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

    def _wait(self, timeout: float) -> list[tuple[int, int]]:
        """The ready fds, after at most ``timeout`` s (-1: no limit); busy-polls for
        the poll window first, then sleeps for what is left of ``timeout``."""
        if self._poll.maximum <= 0.0 or timeout == 0.0 or self.polling_held():
            return self._epoll.poll(timeout)
        poll, start = self._epoll.poll, _clock()
        deadline = start + (self._poll.window if timeout < 0 else
                            min(self._poll.window, timeout))
        ready = poll(0) if self._poll.window > 0 else []
        while not ready:
            now = _clock()
            if now >= deadline:
                ready = poll(timeout if timeout < 0 else max(0.0, start + timeout - now))
                break
            ready = poll(0)
        self._poll.record(_clock() - start)
        return ready

    def hold_polling_while(self, predicate: Callable[[], bool]) -> Callable[[], None]:
        """Sleep at once, without busy-polling, whenever ``predicate()`` holds: worker
        threads running Python need the GIL that polling keeps taking.  Returns the
        call that drops the hold."""
        self._poll_holds.append(predicate)

        def release() -> None:
            with contextlib.suppress(ValueError):  # dropped already
                self._poll_holds.remove(predicate)
        return release

    def polling_held(self) -> bool:
        """Whether a hold (:meth:`hold_polling_while`) keeps the loop from polling now."""
        return any(held() for held in self._poll_holds)

    def close(self) -> None:
        """Release the selector and the wake-up eventfd."""
        self._epoll.close()
        os.close(self._wakeup_fd)
