"""``Timelines``: one timeline runs one job at a time, in submission order, even when a
completion submits more work on the same timeline (a resolved fence lets the control
queue run on and queue the next submission); completions come back on the loop thread;
barriers wait for the jobs before them only; ``stop`` cancels running work and drops
queued work.

Most tests stand in for the event loop (:class:`_Loop`): the test thread is the loop
thread and runs what the workers post when it pumps, so nothing is delivered, and no
queued job starts, behind the test's back."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from vgpu_backend.compute.timelines import Timelines
from vgpu_backend.eventloop import EventLoop

#: safety net for every wait: a correct run never comes near it
WAIT = 10.0


def test_work_submitted_from_a_completion_waits_its_turn() -> None:
    """A job submitted by a completion runs after the jobs queued before it, never
    beside them (on a real loop, with real workers)."""
    loop = EventLoop()
    timelines = Timelines(loop, workers=4)
    lock = threading.Lock()
    running: set[str] = set()
    overlaps: list[set[str]] = []
    order: list[str] = []

    def job(name: str, seconds: float) -> Callable[[threading.Event], str]:
        def run(cancel: threading.Event) -> str:
            with lock:
                running.add(name)
                if len(running) > 1:
                    overlaps.append(set(running))
            time.sleep(seconds)
            with lock:
                running.discard(name)
            return name
        return run

    def done(result: str) -> None:
        order.append(result)
        if result == "A":
            timelines.submit("global", job("C", 0.05), done)

    try:
        timelines.submit("global", job("A", 0.01), done)
        timelines.submit("global", job("B", 0.2), done)
        deadline = time.monotonic() + 10
        while len(order) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
            timelines._deliver()  # what the loop does when a worker reports
        assert order == ["A", "B", "C"]
        assert overlaps == []
    finally:
        timelines.close()
        loop.close()


# --- helpers ---------------------------------------------------------------------------


class _Loop(EventLoop):
    """The event loop as the workers see it; the test thread runs their calls
    (:meth:`pump`).  With ``hold`` set, a worker posting a call waits (its worker busy)
    until ``resume`` is set, and says so with ``held``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.hold = threading.Event()
        self.held = threading.Event()
        self.resume = threading.Event()

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        if self.hold.is_set():
            self.held.set()
            self.resume.wait(WAIT)
        self.calls.put(callback)

    def pump(self, until: Callable[[], bool]) -> None:
        """Run the posted calls (on this thread) until ``until()`` holds."""
        deadline = time.monotonic() + WAIT
        while not until():
            self.calls.get(timeout=max(0.0, deadline - time.monotonic()))()


class _Job:
    """A job that runs until released or cancelled; it returns its name (or raises)."""

    def __init__(self, name: str, *, released: bool = False, fail: bool = False) -> None:
        self.name = name
        self.fail = fail
        self.release = threading.Event()
        if released:
            self.release.set()
        self.started = threading.Event()
        self.finished = threading.Event()
        self.cancelled: bool | None = None
        self.thread: threading.Thread | None = None
        self.on_start: Callable[[], None] | None = None

    def __call__(self, cancel: threading.Event) -> str:
        self.thread = threading.current_thread()
        if self.on_start is not None:
            self.on_start()
        self.started.set()
        deadline = time.monotonic() + WAIT
        while not (self.release.wait(0.002) or cancel.is_set()) \
                and time.monotonic() < deadline:
            pass
        self.cancelled = cancel.is_set()
        self.finished.set()
        if self.fail:
            raise RuntimeError(f"job {self.name} fails")
        return self.name


class _Record:
    """What the loop thread saw, in order: completions ``(name, result)`` and marks."""

    def __init__(self) -> None:
        self.events: list[object] = []
        self.threads: set[int] = set()

    def done(self, name: str) -> Callable[[Any], None]:
        def on_done(result: Any) -> None:
            self.threads.add(threading.get_ident())
            self.events.append((name, result))
        return on_done

    def mark(self, what: str) -> Callable[[], None]:
        def callback() -> None:
            self.threads.add(threading.get_ident())
            self.events.append(what)
        return callback

    def has(self, what: object) -> Callable[[], bool]:
        return lambda: what in self.events


@pytest.fixture
def loop() -> Iterator[_Loop]:
    loop = _Loop()
    yield loop
    loop.close()


@pytest.fixture
def make(loop: _Loop) -> Iterator[Callable[[int], Timelines]]:
    made: list[Timelines] = []

    def make(workers: int) -> Timelines:
        made.append(Timelines(loop, workers=workers))
        return made[-1]
    yield make
    for timelines in made:
        timelines.close()


# --- order and threads -----------------------------------------------------------------


def test_one_job_at_a_time_in_submission_order(loop: _Loop,
                                               make: Callable[[int], Timelines]) -> None:
    """The next job of a timeline starts only once the previous one's completion is
    delivered; completions come in submission order, with the jobs' results, on the
    loop thread."""
    timelines = make(3)
    rec = _Record()
    jobs = [_Job(name) for name in "abc"]
    for job in jobs:
        timelines.submit("k", job, rec.done(job.name))
    a, b, c = jobs
    assert a.started.wait(WAIT)
    a.release.set()
    assert a.finished.wait(WAIT)
    assert not b.started.is_set() and not c.started.is_set()  # nothing pumped yet
    loop.pump(rec.has(("a", "a")))
    assert b.started.wait(WAIT)
    assert not c.started.is_set()
    b.release.set()
    c.release.set()
    loop.pump(lambda: len(rec.events) == 3)
    assert rec.events == [("a", "a"), ("b", "b"), ("c", "c")]
    assert rec.threads == {threading.get_ident()}


def test_a_completion_runs_before_the_next_job_starts(
        loop: _Loop, make: Callable[[int], Timelines]) -> None:
    """While a completion runs, its timeline's next job has not started (the timeline
    is still busy with the delivered job)."""
    timelines = make(2)
    rec = _Record()
    idle_during_completion: list[bool] = []

    def a_done(result: Any) -> None:
        rec.done("a")(result)
        idle_during_completion.append(timelines.wait_running(0))

    b = _Job("b")  # held: once started, it is running until released
    timelines.submit("k", _Job("a", released=True), a_done)
    timelines.submit("k", b, rec.done("b"))
    loop.pump(rec.has(("a", "a")))
    assert idle_during_completion == [True]
    assert b.started.wait(WAIT)
    b.release.set()
    loop.pump(rec.has(("b", "b")))


def test_timelines_run_side_by_side(make: Callable[[int], Timelines]) -> None:
    """Jobs of different timelines run at the same time."""
    timelines = make(2)
    first, second = _Job("first"), _Job("second")
    timelines.submit(1, first, lambda _: None)
    timelines.submit(2, second, lambda _: None)
    assert first.started.wait(WAIT) and second.started.wait(WAIT)
    assert not first.finished.is_set() and not second.finished.is_set()


def test_a_failing_job_completes_with_none_and_the_timeline_goes_on(
        loop: _Loop, make: Callable[[int], Timelines],
        caplog: pytest.LogCaptureFixture) -> None:
    """A job that raises is logged, completes with ``None``, and the next job runs."""
    timelines = make(2)
    rec = _Record()
    timelines.submit("k", _Job("bad", released=True, fail=True), rec.done("bad"))
    timelines.submit("k", _Job("good", released=True), rec.done("good"))
    loop.pump(lambda: len(rec.events) == 2)
    assert rec.events == [("bad", None), ("good", "good")]
    assert "compute job on k failed" in caplog.text


def test_a_completions_submission_runs_after_the_queued_job(
        loop: _Loop, make: Callable[[int], Timelines]) -> None:
    """Work a completion submits on its timeline queues behind the job already queued
    and starts only once that job is done (a second worker is free meanwhile)."""
    timelines = make(2)
    rec = _Record()
    a, b, c = _Job("a", released=True), _Job("b"), _Job("c", released=True)
    b_done_when_c_started: list[bool] = []
    c.on_start = lambda: b_done_when_c_started.append(b.finished.is_set())

    def a_done(result: Any) -> None:
        rec.done("a")(result)
        timelines.submit("k", c, rec.done("c"))

    timelines.submit("k", a, a_done)
    timelines.submit("k", b, rec.done("b"))
    loop.pump(rec.has(("a", "a")))
    assert b.started.wait(WAIT)
    c.started.wait(0.2)  # a chance to start beside b, which it must not take
    b.release.set()
    loop.pump(lambda: len(rec.events) == 3)
    assert rec.events == [("a", "a"), ("b", "b"), ("c", "c")]
    assert b_done_when_c_started == [True]


# --- barriers --------------------------------------------------------------------------


def test_after_current_waits_for_earlier_jobs_only(
        loop: _Loop, make: Callable[[int], Timelines]) -> None:
    """A barrier runs after every job submitted before it on its timeline, after their
    completions, and is not held by jobs submitted after it."""
    timelines = make(2)
    rec = _Record()
    a, b, later = _Job("a", released=True), _Job("b", released=True), _Job("later")
    timelines.submit("k", a, rec.done("a"))
    timelines.submit("k", b, rec.done("b"))
    timelines.after_current(frozenset({"k"}), rec.mark("barrier"))
    timelines.submit("k", later, rec.done("later"))
    loop.pump(rec.has("barrier"))
    assert rec.events == [("a", "a"), ("b", "b"), "barrier"]
    assert not later.finished.is_set()
    later.release.set()
    loop.pump(lambda: len(rec.events) == 4)


def test_after_current_on_some_timelines_or_all(
        loop: _Loop, make: Callable[[int], Timelines]) -> None:
    """``after_current(keys)`` waits for those timelines only; ``after_current(None)``
    waits for every timeline."""
    timelines = make(2)
    rec = _Record()
    one, two = _Job("one"), _Job("two")
    timelines.submit(1, one, rec.done("one"))
    timelines.submit(2, two, rec.done("two"))
    timelines.after_current(frozenset({2}), rec.mark("after 2"))
    timelines.after_current(None, rec.mark("after all"))
    two.release.set()
    loop.pump(rec.has("after 2"))
    assert rec.events == [("two", "two"), "after 2"]
    one.release.set()
    loop.pump(rec.has("after all"))
    assert rec.events == [("two", "two"), "after 2", ("one", "one"), "after all"]


def test_after_jobs_on_finished_or_unknown_timelines_runs_at_once(
        loop: _Loop, make: Callable[[int], Timelines]) -> None:
    """A barrier whose jobs are all delivered (or that names none, or an idle timeline)
    runs at once, on the caller's thread."""
    timelines = make(2)
    rec = _Record()
    seq = timelines.submit("k", _Job("a", released=True), rec.done("a"))
    loop.pump(rec.has(("a", "a")))
    timelines.after_jobs({"k": seq}, rec.mark("delivered"))
    timelines.after_jobs({}, rec.mark("nothing"))
    timelines.after_jobs({"idle": 12345}, rec.mark("idle"))
    timelines.after_current(frozenset({"idle"}), rec.mark("current idle"))
    assert rec.events == [("a", "a"), "delivered", "nothing", "idle", "current idle"]
    timelines.submit("k", _Job("b", released=True), rec.done("b"))
    loop.pump(rec.has(("b", "b")))  # none of them runs again
    assert rec.events == [("a", "a"), "delivered", "nothing", "idle", "current idle",
                          ("b", "b")]


def test_after_jobs_waits_for_the_given_job_on_every_timeline(
        loop: _Loop, make: Callable[[int], Timelines]) -> None:
    """``after_jobs`` waits for the job whose sequence number ``submit`` returned (not
    the one before it) on every timeline it names."""
    timelines = make(2)
    rec = _Record()
    first, a, b = _Job("first", released=True), _Job("a"), _Job("b")
    timelines.submit(1, first, rec.done("first"))
    seq_a = timelines.submit(1, a, rec.done("a"))
    seq_b = timelines.submit(2, b, rec.done("b"))
    timelines.after_jobs({1: seq_a, 2: seq_b}, rec.mark("barrier"))
    loop.pump(rec.has(("first", "first")))
    a.release.set()
    loop.pump(rec.has(("a", "a")))
    assert "barrier" not in rec.events
    b.release.set()
    loop.pump(rec.has("barrier"))
    assert rec.events == [("first", "first"), ("a", "a"), ("b", "b"), "barrier"]


def test_each_barrier_runs_once_when_its_jobs_are_done(
        loop: _Loop, make: Callable[[int], Timelines]) -> None:
    """Barriers run in turn as their jobs complete, each exactly once; one not yet
    reached stays pending."""
    timelines = make(2)
    rec = _Record()
    jobs = [_Job(name) for name in "abc"]
    for job in jobs:
        timelines.submit("k", job, rec.done(job.name))
        timelines.after_current(frozenset({"k"}), rec.mark(f"after {job.name}"))
    for job in jobs:
        job.release.set()
        loop.pump(rec.has(f"after {job.name}"))
    assert rec.events == [("a", "a"), "after a", ("b", "b"), "after b", ("c", "c"),
                          "after c"]


def test_busy_and_queued(loop: _Loop, make: Callable[[int], Timelines]) -> None:
    """``busy`` and ``queued`` count the jobs submitted and not yet delivered, running
    or not, on the timelines asked about (or anywhere)."""
    timelines = make(2)
    rec = _Record()
    assert not timelines.busy()
    a, b = _Job("a"), _Job("b")
    timelines.submit(1, a, rec.done("a"))
    timelines.submit(1, b, rec.done("b"))
    assert timelines.busy()
    assert timelines.busy(frozenset({1})) and timelines.busy(frozenset({1, 2}))
    assert not timelines.busy(frozenset({2}))
    assert timelines.queued(frozenset({1})) == 2
    assert timelines.queued(frozenset({1, 2})) == 2
    assert timelines.queued(frozenset({2})) == 0
    a.release.set()
    b.release.set()
    loop.pump(lambda: len(rec.events) == 2)
    assert not timelines.busy() and not timelines.busy(frozenset({1}))
    assert timelines.queued(frozenset({1})) == 0


def test_the_loop_does_not_busy_poll_while_a_job_executes(
        loop: _Loop, make: Callable[[int], Timelines]) -> None:
    """Polling would take the GIL from the job's Python: held from submission until
    the job has ended, and no longer held once the timelines are closed."""
    timelines = make(1)
    rec = _Record()
    assert not loop.polling_held()
    job = _Job("a")
    timelines.submit("k", job, rec.done("a"))
    assert loop.polling_held()
    assert job.started.wait(WAIT)
    assert loop.polling_held()
    job.release.set()
    loop.pump(lambda: len(rec.events) == 1)
    assert not loop.polling_held()
    stuck = _Job("b")
    timelines.submit("k", stuck, rec.done("b"))
    assert loop.polling_held()
    timelines.close()  # cancels b and waits for it
    assert stuck.cancelled and not loop.polling_held()
    assert loop._poll_holds == []  # the hold itself is gone with the timelines


# --- blocking waits --------------------------------------------------------------------


def test_wait_running_waits_for_executing_jobs_only(
        loop: _Loop, make: Callable[[int], Timelines]) -> None:
    """``wait_running`` times out while a job executes, and returns once none does,
    without delivering anything."""
    timelines = make(2)
    rec = _Record()
    job = _Job("a")
    timelines.submit("k", job, rec.done("a"))
    assert job.started.wait(WAIT)
    assert not timelines.wait_running(0.05)
    waiter = threading.Thread(target=timelines.wait_running, daemon=True)  # no timeout
    waiter.start()
    threading.Timer(0.05, job.release.set).start()
    waiter.join(WAIT)
    assert not waiter.is_alive()  # woken when the job ended
    assert job.finished.is_set()
    assert rec.events == [] and timelines.busy()


def test_wait_running_counts_a_started_job_waiting_for_a_worker(
        loop: _Loop, make: Callable[[int], Timelines]) -> None:
    """A job handed to the pool but not yet on a worker counts as running."""
    timelines = make(1)
    rec = _Record()
    loop.hold.set()  # the one worker stays busy posting the first completion
    timelines.submit(1, _Job("a", released=True), rec.done("a"))
    waiting = _Job("waiting", released=True)
    timelines.submit(2, waiting, rec.done("waiting"))
    assert loop.held.wait(WAIT)
    assert not waiting.started.is_set()
    assert not timelines.wait_running(0.05)
    loop.hold.clear()
    loop.resume.set()
    loop.pump(lambda: len(rec.events) == 2)


def test_drain_runs_and_delivers_everything(
        loop: _Loop, make: Callable[[int], Timelines]) -> None:
    """``drain`` runs every queued job, including work its completions submit, and
    delivers every completion before returning."""
    timelines = make(2)
    rec = _Record()

    def a_done(result: Any) -> None:
        rec.done("a")(result)
        timelines.submit("k", _Job("c", released=True), rec.done("c"))

    timelines.submit("k", _Job("a", released=True), a_done)
    timelines.submit("k", _Job("b", released=True), rec.done("b"))
    timelines.submit("other", _Job("d", released=True), rec.done("d"))
    assert timelines.drain(WAIT)
    assert sorted(rec.events, key=str) == [("a", "a"), ("b", "b"), ("c", "c"), ("d", "d")]
    assert [e for e in rec.events if e != ("d", "d")] == [("a", "a"), ("b", "b"), ("c", "c")]
    assert not timelines.busy()


def test_drain_gives_up_at_its_timeout(make: Callable[[int], Timelines]) -> None:
    """``drain`` returns False when a job is still running at its timeout."""
    timelines = make(2)
    job = _Job("stuck")
    timelines.submit("k", job, lambda _: None)
    assert not timelines.drain(0.05)
    assert not job.finished.is_set()


def test_drain_timeout_covers_all_its_rounds(make: Callable[[int], Timelines]) -> None:
    """The timeout of ``drain`` bounds the whole drain, not each job: two jobs of 0.3 s
    that start only during the drain do not fit in 0.5 s."""
    timelines = make(2)

    def slow(cancel: threading.Event) -> None:
        cancel.wait(0.3)

    for _ in range(3):
        timelines.submit("k", slow, lambda _: None)
    assert not timelines.drain(0.5)


# --- stop and close --------------------------------------------------------------------


def test_stop_cancels_running_work_and_drops_queued_work(
        loop: _Loop, make: Callable[[int], Timelines]) -> None:
    """``stop`` cancels the running jobs (their completions get their results), drops
    the queued jobs of every timeline (they never run; their completions get ``None``,
    after the running job's), and only then runs the barriers waiting for them; nothing
    is left busy."""
    timelines = make(2)
    rec = _Record()
    jobs = {name: _Job(name, released=name.startswith("queued"))
            for name in ("running 1", "queued 1", "running 2", "queued 2")}
    for name, job in jobs.items():
        timelines.submit(name[-1], job, rec.done(name))
    timelines.after_current(frozenset({"1"}), rec.mark("barrier"))
    assert jobs["running 1"].started.wait(WAIT) and jobs["running 2"].started.wait(WAIT)
    timelines.stop()
    for name in ("running 1", "running 2"):
        assert jobs[name].finished.is_set() and jobs[name].cancelled
    assert sorted(rec.events[:2], key=str) == [("running 1", "running 1"),
                                               ("running 2", "running 2")]
    assert sorted(rec.events[2:4], key=str) == [("queued 1", None), ("queued 2", None)]
    assert rec.events[4:] == ["barrier"]
    assert not timelines.busy()
    assert timelines.drain(WAIT)
    assert not jobs["queued 1"].started.is_set() and not jobs["queued 2"].started.is_set()
    assert len(rec.events) == 5


def test_work_submitted_after_stop_is_not_cancelled(
        loop: _Loop, make: Callable[[int], Timelines]) -> None:
    """Jobs submitted after ``stop`` get a fresh cancellation event."""
    timelines = make(2)
    rec = _Record()
    timelines.submit("k", _Job("old"), rec.done("old"))
    timelines.stop()
    new = _Job("new", released=True)
    timelines.submit("k", new, rec.done("new"))
    loop.pump(rec.has(("new", "new")))
    assert new.cancelled is False


def test_stop_cancels_a_started_job_still_waiting_for_a_worker(
        make: Callable[[int], Timelines]) -> None:
    """A job handed to the pool before ``stop`` but run after it sees the cancellation
    too."""
    timelines = make(1)
    busy, waiting = _Job("busy"), _Job("waiting")
    timelines.submit(1, busy, lambda _: None)
    timelines.submit(2, waiting, lambda _: None)
    assert busy.started.wait(WAIT)
    timelines.stop()
    assert busy.cancelled and waiting.cancelled


def test_close_cancels_work_and_joins_the_workers(loop: _Loop) -> None:
    """``close`` cancels running work, answers queued work with ``None`` and returns once
    the worker threads are gone."""
    timelines = Timelines(loop, workers=2)
    rec = _Record()
    running, queued = _Job("running"), _Job("queued")
    timelines.submit("k", running, rec.done("running"))
    timelines.submit("k", queued, rec.done("queued"))
    assert running.started.wait(WAIT)
    timelines.close()
    assert running.cancelled
    assert rec.events == [("running", "running"), ("queued", None)]
    assert running.thread is not None and not running.thread.is_alive()
