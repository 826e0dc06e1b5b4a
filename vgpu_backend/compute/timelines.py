"""Work that runs off the event loop, in order per timeline.

A timeline is a key (the global timeline, or a context's ring).  Jobs of one timeline
run one after another on a small thread pool; jobs of different timelines run side by
side (numpy releases the GIL in its kernels, so the loop stays responsive).  Every
completion comes back to the loop thread, in submission order per timeline.

Each job gets a sequence number; a barrier (:meth:`Timelines.after_current`) waits for
the jobs submitted before it, never for later ones.  Jobs get a cancellation event they
check between pieces of work, so :meth:`Timelines.stop` ends running work within one
piece.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from vgpu_backend.eventloop import EventLoop

__all__ = ["Job", "Timelines"]

log = logging.getLogger(__name__)

#: what a job runs: it receives the cancellation event to check between pieces
Job = Callable[[threading.Event], Any]


@dataclass(slots=True)
class _Timeline:
    #: jobs not started yet: (sequence number, job, completion)
    queued: deque[tuple[int, Job, Callable[[Any], None]]] = field(default_factory=deque)
    #: sequence numbers submitted and not yet delivered, in order
    undelivered: deque[int] = field(default_factory=deque)
    running: bool = False


class Timelines:
    """In-order job queues per key, executed on worker threads."""

    def __init__(self, loop: EventLoop, workers: int = 2) -> None:
        self._loop = loop
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="compute")
        self._lines: dict[Hashable, _Timeline] = {}
        self._seq = itertools.count(1)
        self._waiters: list[tuple[dict[Hashable, int], Callable[[], None]]] = []
        self._lock = threading.Lock()
        self._running = 0  # jobs executing on a worker right now
        self._idle = threading.Condition(self._lock)
        #: finished jobs whose completion the loop has not delivered yet
        self._done: list[tuple[Hashable, Callable[[Any], None], Any]] = []
        self._cancel = threading.Event()
        #: a busy-polling loop would take the GIL from the jobs' Python parts
        self._release_polling = loop.hold_polling_while(self.executing)

    # --- submission ----------------------------------------------------------------

    def submit(self, key: Hashable, job: Job, on_done: Callable[[Any], None]) -> int:
        """Queue ``job`` on timeline ``key``; ``on_done(result)`` runs on the loop
        (``result`` is ``None`` if the job raised or was dropped by :meth:`stop`).
        Returns the job's sequence number (for :meth:`after_jobs`)."""
        line = self._lines.setdefault(key, _Timeline())
        seq = next(self._seq)
        line.queued.append((seq, job, on_done))
        line.undelivered.append(seq)
        if not line.running:
            self._start_next(key, line)
        return seq

    def executing(self) -> bool:
        """A job is executing on a worker (or waiting for one) now."""
        return self._running > 0

    def queued(self, keys: frozenset[Hashable]) -> int:
        """Jobs submitted and not yet delivered on ``keys``."""
        return sum(len(self._lines[k].undelivered) for k in keys if k in self._lines)

    def _start_next(self, key: Hashable, line: _Timeline) -> None:
        _seq, job, on_done = line.queued.popleft()
        line.running = True
        cancel = self._cancel

        def run() -> None:
            try:
                result = job(cancel)
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

    def _deliver(self, wake: bool = True) -> None:
        """Loop thread: hand finished jobs' results over and start the next jobs (and,
        with ``wake``, run the barriers this reaches)."""
        with self._lock:
            done, self._done = self._done, []
        for key, on_done, result in done:
            line = self._lines[key]
            line.undelivered.popleft()
            # still "running" while on_done runs: a job it submits on this timeline is
            # queued behind the next one, never started beside it
            on_done(result)
            line.running = False
            if line.queued:
                self._start_next(key, line)
            elif not line.undelivered:
                del self._lines[key]
        if done and wake:
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
        targets = {k: line.undelivered[-1] for k, line in self._lines.items()
                   if (keys is None or k in keys) and line.undelivered}
        self.after_jobs(targets, callback)

    def after_jobs(self, targets: dict[Hashable, int], callback: Callable[[], None]) -> None:
        """Run ``callback`` on the loop once, on every timeline of ``targets``, the job
        with that sequence number (and so every job before it there) is done."""
        if self._reached(targets):
            callback()
        else:
            self._waiters.append((targets, callback))

    def _reached(self, targets: dict[Hashable, int]) -> bool:
        for key, seq in targets.items():
            line = self._lines.get(key)
            if line is not None and line.undelivered and line.undelivered[0] <= seq:
                return False
        return True

    def _wake_waiters(self) -> None:
        ready = [w for w in self._waiters if self._reached(w[0])]
        if ready:
            self._waiters = [w for w in self._waiters if not self._reached(w[0])]
            for _targets, callback in ready:
                callback()

    # --- blocking waits (rare paths: rings stopping, memory going away, reset) ------

    def wait_running(self, timeout: float | None = None) -> bool:
        """Block the loop thread until no job is executing.  Queued jobs start only
        from the loop thread, so none starts meanwhile.  False on timeout."""
        with self._lock:
            return self._idle.wait_for(lambda: self._running == 0, timeout)

    def drain(self, timeout: float) -> bool:
        """Block the loop thread until every queued job has run and been delivered
        (rings stopping: every fence is answered before GET_VRING_BASE returns).
        False on timeout (jobs may still be running: see :meth:`stop`)."""
        deadline = time.monotonic() + timeout
        while self._lines:
            if not self.wait_running(max(0.0, deadline - time.monotonic())):
                return False
            self._deliver()
        return True

    def stop(self) -> None:
        """Cancel everything: running jobs stop at their next check, queued jobs are
        dropped (their completions get ``None``); returns when nothing runs any more."""
        self._cancel.set()
        self._cancel = threading.Event()  # for work submitted afterwards
        dropped: list[Callable[[Any], None]] = []
        for line in self._lines.values():
            dropped.extend(on_done for _seq, _job, on_done in line.queued)
            line.queued.clear()
            # only the running job (the first undelivered one) will still complete
            line.undelivered = deque([line.undelivered[0]] if line.running else [])
        self.wait_running()
        # barriers on dropped jobs run after the dropped jobs' completions, below
        self._deliver(wake=False)
        self._lines = {k: line for k, line in self._lines.items() if line.undelivered}
        for on_done in dropped:
            on_done(None)
        self._wake_waiters()

    def close(self) -> None:
        """Stop everything and the workers."""
        self.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._release_polling()
