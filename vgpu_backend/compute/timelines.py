"""Work that runs off the event loop, in order per timeline.

A timeline is a key (the global timeline, or a context's ring).  Jobs of one timeline
run one after another on a small thread pool; jobs of different timelines run side by
side (numpy releases the GIL in its kernels, so the loop stays responsive).  Every
completion comes back to the loop thread, in submission order per timeline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from vgpu_backend.eventloop import EventLoop

__all__ = ["Timelines"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Timeline:
    pending: deque[tuple[Callable[[], Any], Callable[[Any], None]]] = field(
        default_factory=deque)
    running: bool = False


class Timelines:
    """In-order job queues per key, executed on worker threads."""

    def __init__(self, loop: EventLoop, workers: int = 2) -> None:
        self._loop = loop
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="compute")
        self._lines: dict[Hashable, _Timeline] = {}
        #: jobs ever submitted / delivered per timeline (barriers compare the two)
        self._submitted: dict[Hashable, int] = {}
        self._delivered: dict[Hashable, int] = {}
        self._waiters: list[tuple[dict[Hashable, int], Callable[[], None]]] = []
        self._lock = threading.Lock()
        self._running = 0  # jobs executing on a worker right now
        self._idle = threading.Condition(self._lock)
        #: finished jobs whose completion the loop has not delivered yet
        self._done: list[tuple[Hashable, Callable[[Any], None], Any]] = []

    def submit(self, key: Hashable, job: Callable[[], Any],
               on_done: Callable[[Any], None]) -> None:
        """Queue ``job`` on timeline ``key``; ``on_done(result)`` runs on the loop."""
        line = self._lines.setdefault(key, _Timeline())
        line.pending.append((job, on_done))
        self._submitted[key] = self._submitted.get(key, 0) + 1
        if not line.running:
            self._start_next(key, line)

    def _start_next(self, key: Hashable, line: _Timeline) -> None:
        job, on_done = line.pending.popleft()
        line.running = True

        def run() -> None:
            try:
                result = job()
            except Exception:  # a bug: report on the loop, keep the timeline going
                log.exception("compute job on %s failed", key)
                result = None
            with self._lock:
                self._running -= 1
                self._done.append((key, on_done, result))
                self._idle.notify_all()
            self._loop.call_soon_threadsafe(self._deliver)

        with self._lock:
            self._running += 1
        self._pool.submit(run)

    def _deliver(self) -> None:
        """Loop thread: hand finished jobs' results over and start the next jobs."""
        with self._lock:
            done, self._done = self._done, []
        for key, on_done, result in done:
            line = self._lines[key]
            line.running = False
            self._delivered[key] = self._delivered.get(key, 0) + 1
            on_done(result)
            if line.pending:
                self._start_next(key, line)
            else:
                del self._lines[key]
        if done:
            self._wake_waiters()

    # --- barriers ------------------------------------------------------------------

    def busy(self, keys: frozenset[Hashable] | None = None) -> bool:
        """Jobs are queued or running (on ``keys``, or anywhere)."""
        if keys is None:
            return bool(self._lines)
        return any(k in self._lines for k in keys)

    def after_current(self, keys: frozenset[Hashable] | None,
                      callback: Callable[[], None]) -> None:
        """Run ``callback`` on the loop once every job submitted so far on ``keys`` (or
        anywhere) is done.  Later submissions do not delay it (no starvation)."""
        targets = {k: n for k, n in self._submitted.items()
                   if (keys is None or k in keys) and self._delivered.get(k, 0) < n}
        if not targets:
            callback()
        else:
            self._waiters.append((targets, callback))

    def _reached(self, targets: dict[Hashable, int]) -> bool:
        return all(self._delivered.get(k, 0) >= n for k, n in targets.items())

    def _wake_waiters(self) -> None:
        ready = [w for w in self._waiters if self._reached(w[0])]
        if ready:
            self._waiters = [w for w in self._waiters if not self._reached(w[0])]
            for _targets, callback in ready:
                callback()

    def wait_running(self, timeout: float) -> bool:
        """Block the loop thread until no job is executing (rare paths: guest memory is
        about to be unmapped).  Queued jobs start only from the loop thread, so none
        starts meanwhile; they run later against the invalidated page table and fault
        cleanly.  Completions are delivered on the loop afterwards.  False on timeout."""
        with self._lock:
            return self._idle.wait_for(lambda: self._running == 0, timeout)

    def drain(self, timeout: float) -> bool:
        """Block the loop thread until every queued job has run and been delivered
        (rings stopping: every fence must be answered before GET_VRING_BASE returns).
        False on timeout."""
        deadline = time.monotonic() + timeout
        while self._lines:
            if not self.wait_running(max(0.0, deadline - time.monotonic())):
                return False
            self._deliver()
        return True

    def close(self) -> None:
        """Wait for running jobs and stop the workers (pending jobs are dropped)."""
        for line in self._lines.values():
            line.pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
