"""The single-threaded event loop: fd readiness, timers, thread-safe calls, stop."""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import select
import signal
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest

from tests.unit.hang_guard import deadline
from tests.unit.loop_runner import run_until
from vgpu_backend import eventloop
from vgpu_backend.eventloop import EventLoop

T = TypeVar("T")


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    loop = EventLoop()
    yield loop
    loop.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_reader_runs_when_the_fd_is_readable(loop: EventLoop,
                                             pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    received: list[bytes] = []
    loop.add_reader(a.fileno(), lambda: received.append(a.recv(100)))
    b.send(b"ping")
    run_until(loop, lambda: received == [b"ping"])
    loop.remove_reader(a.fileno())
    b.send(b"more")
    loop.call_later(0.02, loop.stop)
    loop.run()
    assert received == [b"ping"]  # no longer watched
    loop.remove_reader(a.fileno())  # removing twice is fine


def test_writer_and_reader_on_the_same_fd(loop: EventLoop,
                                          pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    events: list[str] = []

    def writable() -> None:
        events.append("w")
        a.send(b"x")
        loop.remove_writer(a.fileno())

    loop.add_reader(a.fileno(), lambda: events.append("r:" + a.recv(10).decode()))
    loop.add_writer(a.fileno(), writable)
    run_until(loop, lambda: "w" in events)
    assert b.recv(10) == b"x"
    b.send(b"y")
    run_until(loop, lambda: "r:y" in events)
    loop.forget_fd(a.fileno())
    b.send(b"z")
    loop.call_later(0.02, loop.stop)
    loop.run()
    assert "r:z" not in events


def test_timers_run_in_order_and_can_be_cancelled(loop: EventLoop) -> None:
    order: list[str] = []
    loop.call_later(0.03, lambda: order.append("late"))
    cancelled = loop.call_later(0.01, lambda: order.append("cancelled"))
    loop.call_later(0.0, lambda: order.append("first"))
    loop.call_later(0.01, lambda: order.append("second"))
    cancelled.cancel()
    run_until(loop, lambda: "late" in order)
    assert order == ["first", "second", "late"]


def test_a_timer_does_not_fire_early(loop: EventLoop) -> None:
    fired: list[float] = []
    start = time.monotonic()
    loop.call_later(0.05, lambda: fired.append(time.monotonic() - start))
    run_until(loop, lambda: bool(fired))
    assert fired[0] >= 0.05


def test_call_soon_threadsafe_wakes_the_loop(loop: EventLoop) -> None:
    done: list[str] = []
    thread = threading.Thread(target=lambda: loop.call_soon_threadsafe(
        lambda: done.append(threading.current_thread().name)))
    loop.call_later(0.01, thread.start)
    run_until(loop, lambda: bool(done))
    thread.join()
    assert done == [threading.main_thread().name]  # ran on the loop thread


def test_stop_from_a_thread_returns_from_run(loop: EventLoop) -> None:
    timer = threading.Timer(0.02, loop.stop)
    timer.start()
    started = time.monotonic()
    loop.run()  # no timers, no fds: only the wake-up eventfd can end the wait
    timer.join()
    assert time.monotonic() - started < 2.0


def test_a_stop_before_run_is_forgotten_a_shutdown_is_not(loop: EventLoop) -> None:
    """stop() ends the current run only: a run() after it dispatches as usual.
    shutdown() sticks: run() returns at once, before it and ever after."""
    ran: list[str] = []

    def timer() -> None:
        ran.append("timer")
        loop.stop()

    loop.stop()
    loop.call_later(0.0, timer)
    with deadline(10.0):
        loop.run()
    assert ran == ["timer"]
    loop.shutdown()
    loop.call_soon_threadsafe(lambda: ran.append("call"))
    with deadline(10.0):
        loop.run()
        loop.run()
    assert ran == ["timer"]  # nothing was dispatched any more


def test_shutdown_from_a_signal_handler_ends_run(loop: EventLoop) -> None:
    """A signal handler calling shutdown() while run() waits ends it (the eventfd
    wakes the wait), and later runs return at once."""
    previous = signal.signal(signal.SIGUSR1, lambda *_: loop.shutdown())
    try:
        loop.call_later(0.01, lambda: signal.raise_signal(signal.SIGUSR1))
        with deadline(10.0):
            loop.run()
            loop.run()
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_close_releases_the_wakeup_fd() -> None:
    """close() releases both descriptors: the epoll one and the wake-up eventfd."""
    loop = EventLoop()
    before = len(os.listdir("/proc/self/fd"))
    loop.close()
    assert len(os.listdir("/proc/self/fd")) == before - 2


# --- readiness routing, watches, spinning ------------------------------------------------------


class CountingEpoll:
    """Wraps the loop's epoll object and counts its polls (a spinning loop polls
    thousands of times; an idle one once per wake-up)."""

    def __init__(self, epoll: select.epoll) -> None:
        self._epoll = epoll
        self.polls = 0

    def poll(self, timeout: float = -1.0) -> list[tuple[int, int]]:
        self.polls += 1
        return self._epoll.poll(timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._epoll, name)


@pytest.fixture
def polls(loop: EventLoop, monkeypatch: pytest.MonkeyPatch) -> CountingEpoll:
    """Count the polls of ``loop``."""
    counting = CountingEpoll(loop._epoll)
    monkeypatch.setattr(loop, "_epoll", counting)
    return counting


def run_for(loop: EventLoop, seconds: float) -> None:
    """Run ``loop`` until another thread stops it after ``seconds`` (or it stops
    itself earlier)."""
    timer = threading.Timer(seconds, loop.stop)
    timer.start()
    loop.run()
    timer.cancel()
    timer.join()


def record_and_stop(loop: EventLoop, into: list[T], value: T) -> None:
    """Append ``value`` to ``into`` and stop ``loop``."""
    into.append(value)
    loop.stop()


def full_pipe() -> tuple[int, int]:
    """A pipe whose (non-blocking) write end is full: ``(read end, write end)``."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(w, bytes(1 << 16))
    return r, w


def test_reader_is_told_of_a_hang_up(loop: EventLoop) -> None:
    """A pipe whose writer closed reports EPOLLHUP only: the reader runs (and sees
    EOF)."""
    r, w = os.pipe()
    got: list[bytes] = []

    def readable() -> None:
        got.append(os.read(r, 10))
        loop.remove_reader(r)

    loop.add_reader(r, readable)
    os.close(w)
    try:
        run_until(loop, lambda: bool(got))
    finally:
        os.close(r)
    assert got == [b""]


@pytest.mark.parametrize("watch", ["reader", "writer"])
def test_an_error_alone_reaches_the_watcher(loop: EventLoop, watch: str) -> None:
    """EPOLLERR without readiness (a full pipe's write end after its reader closed)
    runs the reader or writer, which then sees the error."""
    r, w = full_pipe()
    errors: list[type[OSError]] = []

    def ready() -> None:
        loop.forget_fd(w)
        try:
            os.write(w, b"x")
        except OSError as e:
            errors.append(type(e))

    (loop.add_reader if watch == "reader" else loop.add_writer)(w, ready)
    os.close(r)
    try:
        run_until(loop, lambda: bool(errors))
    finally:
        os.close(w)
    assert errors == [BrokenPipeError]


def test_writer_is_told_of_a_hang_up(loop: EventLoop,
                                     pair: tuple[socket.socket, socket.socket]) -> None:
    """A socket shut down with a full send buffer reports EPOLLHUP only: the writer
    runs (and sees EPIPE)."""
    a, _ = pair
    with contextlib.suppress(BlockingIOError):
        while True:
            a.send(bytes(1 << 16))
    errors: list[type[OSError]] = []

    def writable() -> None:
        loop.remove_writer(a.fileno())
        try:
            a.send(b"x")
        except OSError as e:
            errors.append(type(e))

    loop.add_writer(a.fileno(), writable)
    a.shutdown(socket.SHUT_RDWR)
    run_until(loop, lambda: bool(errors))
    assert errors == [BrokenPipeError]


@pytest.mark.parametrize("watch", ["reader", "writer"])
def test_an_fd_epoll_refuses_leaves_no_watch(loop: EventLoop, tmp_path: Any,
                                            watch: str) -> None:
    """A regular file cannot be watched: add_* raises and keeps nothing.  When the
    number comes back as a socket (readable and writable) watched the other way only,
    the refused callback never runs."""
    r, w = socket.socketpair()
    fd = os.open(tmp_path / "plain", os.O_RDWR | os.O_CREAT)
    refused: list[int] = []
    watched: list[int] = []

    def other_way() -> None:
        watched.append(1)
        loop.stop()

    adds = [loop.add_reader, loop.add_writer]
    add_refused, add_other = adds if watch == "reader" else adds[::-1]
    try:
        with pytest.raises(PermissionError):
            add_refused(fd, lambda: refused.append(1))
        os.dup2(r.fileno(), fd)  # the same number, now a socket
        w.send(b"x")
        add_other(fd, other_way)
        run_for(loop, 1.0)
        assert watched and not refused
        loop.forget_fd(fd)
    finally:
        os.close(fd)
        r.close()
        w.close()


def test_a_removed_reader_can_be_added_again(loop: EventLoop,
                                             pair: tuple[socket.socket, socket.socket]) -> None:
    """remove_reader then add_reader on the same fd watches it again."""
    a, b = pair
    got: list[bytes] = []
    loop.add_reader(a.fileno(), lambda: None)
    loop.remove_reader(a.fileno())
    loop.add_reader(a.fileno(), lambda: got.append(a.recv(10)))
    b.send(b"again")
    run_until(loop, lambda: got == [b"again"])


def test_a_reader_can_be_removed_after_its_fd_closed(loop: EventLoop) -> None:
    """Removing the reader of an fd already closed is fine (epoll forgot it), and the
    same fd number, reused, can be watched again."""
    a, b = socket.socketpair()
    fd = a.fileno()
    loop.add_reader(fd, lambda: None)
    a.close()
    loop.remove_reader(fd)
    c, d = socket.socketpair()
    try:
        assert c.fileno() == fd
        got: list[bytes] = []
        loop.add_reader(fd, lambda: got.append(c.recv(10)))
        d.send(b"reused")
        run_until(loop, lambda: got == [b"reused"])
    finally:
        for s in (b, c, d):
            s.close()


@pytest.mark.parametrize("how", ["remove_reader", "remove_writer", "forget_fd"])
def test_a_dropped_watch_does_not_keep_the_loop_busy(
        loop: EventLoop, polls: CountingEpoll, pair: tuple[socket.socket, socket.socket],
        how: str) -> None:
    """After its watch is dropped, an fd that stays readable and writable neither runs
    a callback nor wakes the loop."""
    a, b = pair
    b.send(b"never read")
    calls: list[str] = []
    fd = a.fileno()

    def dropping(mark: str, remove: Callable[[int], None]) -> Callable[[], None]:
        def callback() -> None:
            calls.append(mark)
            (loop.forget_fd if how == "forget_fd" else remove)(fd)
        return callback

    if how != "remove_writer":
        loop.add_reader(fd, dropping("r", loop.remove_reader))
    if how != "remove_reader":
        loop.add_writer(fd, dropping("w", loop.remove_writer))
    run_for(loop, 0.1)
    if how == "forget_fd":
        assert calls in (["r"], ["w"])
    else:
        assert calls == ["r" if how == "remove_reader" else "w"]
    assert polls.polls <= 4


def test_an_idle_loop_sleeps(loop: EventLoop, polls: CountingEpoll) -> None:
    """With nothing to do the loop blocks in one poll until it is stopped."""
    run_for(loop, 0.05)
    assert polls.polls <= 2


def test_the_wakeup_is_consumed(loop: EventLoop, polls: CountingEpoll) -> None:
    """After running a thread-safe call the loop goes back to sleep (the eventfd is
    read, not left readable)."""
    done: list[int] = []
    loop.call_soon_threadsafe(lambda: done.append(1))
    run_for(loop, 0.05)
    assert done == [1]
    assert polls.polls <= 3


# --- dispatch --------------------------------------------------------------------------------


def test_a_reader_removed_by_an_earlier_callback_does_not_run(loop: EventLoop) -> None:
    """Two fds ready in one poll; whichever reader runs first drops the other's watch:
    the other reader does not run."""
    first, second = socket.socketpair(), socket.socketpair()
    ran: list[int] = []
    try:
        ends = [first[0], second[0]]

        def reader(i: int) -> None:
            ran.append(i)
            ends[i].recv(10)
            loop.forget_fd(ends[1 - i].fileno())

        for i, end in enumerate(ends):
            loop.add_reader(end.fileno(), functools.partial(reader, i))
        first[1].send(b"1")
        second[1].send(b"2")
        loop.call_later(0.05, loop.stop)
        loop.run()
        assert len(ran) == 1
    finally:
        for s in (*first, *second):
            s.close()


def test_a_reader_that_forgets_its_fd_stops_its_writer(
        loop: EventLoop, pair: tuple[socket.socket, socket.socket]) -> None:
    """An fd readable and writable in one poll whose reader forgets it (EOF handling):
    its writer does not run."""
    a, b = pair
    calls: list[str] = []

    def reader() -> None:
        calls.append("r")
        a.recv(10)
        loop.forget_fd(a.fileno())

    loop.add_reader(a.fileno(), reader)
    loop.add_writer(a.fileno(), lambda: calls.append("w"))
    b.send(b"bye")
    loop.call_later(0.05, loop.stop)
    loop.run()
    assert calls == ["r"]


# --- timers ----------------------------------------------------------------------------------


def test_timers_due_together_run_in_the_order_they_were_set(
        loop: EventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a clock that does not move, every timer is due at once (when == now) and
    they run first come, first served."""
    monkeypatch.setattr(eventloop, "time", SimpleNamespace(monotonic=lambda: 1000.0))
    order: list[int] = []
    for i in range(20):
        loop.call_later(0, functools.partial(order.append, i))
    loop.call_later(0, loop.stop)
    run_for(loop, 1.0)  # a safety stop; the last timer stops the loop first
    assert order == list(range(20))


def test_cancelled_timers_do_not_wake_the_loop(loop: EventLoop, polls: CountingEpoll) -> None:
    """The loop sleeps until the first live timer, not until cancelled ones."""
    for i in range(5):
        loop.call_later(0.005 * (i + 1), lambda: None).cancel()
    fired: list[float] = []
    loop.call_later(0.06, functools.partial(record_and_stop, loop, fired, 1.0))
    loop.run()
    assert fired == [1.0]
    assert polls.polls <= 2


def timer_handles() -> int:
    """Live TimerHandle objects."""
    gc.collect()
    return sum(isinstance(o, eventloop.TimerHandle) for o in gc.get_objects())


def test_cancelled_timers_are_not_kept_until_due(loop: EventLoop) -> None:
    """A display request answered at once cancels its 2 s timer: ten thousand of them
    in a row (a guest asking in a loop) leave fewer than twice the live timers plus
    the minimum heap behind, not ten thousand handles."""
    before = timer_handles()
    live = [loop.call_later(60, lambda: None) for _ in range(10)]
    for _ in range(10_000):
        loop.call_later(2.0, lambda: None).cancel()
    assert timer_handles() - before <= 2 * len(live) + eventloop._MIN_PURGE


@pytest.mark.parametrize("live", [0, 1000])
def test_purges_are_amortised(loop: EventLoop, monkeypatch: pytest.MonkeyPatch,
                              live: int) -> None:
    """With many live timers (or none), a purge comes only after the heap has doubled
    (or reached the minimum): about log(n) purges for n timers set, not one per
    call_later."""
    purges = 0
    real = loop._purge_cancelled

    def counting() -> None:
        nonlocal purges
        purges += 1
        real()
    monkeypatch.setattr(loop, "_purge_cancelled", counting)
    for _ in range(live):
        loop.call_later(60, lambda: None)
    purges = 0
    for _ in range(4000):
        loop.call_later(2.0, lambda: None).cancel()
    # each purge leaves the live timers (at least the minimum before the next): the
    # heap then grows by at least that many cancelled ones first
    assert purges <= 4000 // max(live, eventloop._MIN_PURGE) + 1


def test_live_timers_survive_purges_in_order(loop: EventLoop,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Timers set among thousands of cancelled ones (purged several times meanwhile)
    all run, in the order of their deadlines."""
    monkeypatch.setattr(eventloop, "time", SimpleNamespace(monotonic=lambda: 1000.0))
    order: list[int] = []
    for i in range(50):
        loop.call_later((50 - i) * 1e-3, functools.partial(order.append, 50 - i))
        for _ in range(100):
            loop.call_later(1e-3 * i, lambda: order.append(-1)).cancel()
    monkeypatch.setattr(eventloop, "time", SimpleNamespace(monotonic=lambda: 1001.0))
    loop.call_later(0, loop.stop)
    run_for(loop, 1.0)
    assert order == list(range(1, 51))


@pytest.mark.parametrize("delay", [30 * 86400.0, 1e300])
def test_a_timer_beyond_what_epoll_can_wait_for_is_harmless(loop: EventLoop,
                                                           delay: float) -> None:
    """A timer a month or 1e300 s away (an operator's --display-timeout): the loop
    sleeps in bounded polls instead of failing with OverflowError, and the timer does
    not fire."""
    fired: list[int] = []
    loop.call_later(delay, lambda: fired.append(1))
    run_for(loop, 0.05)
    assert fired == []


def test_an_overdue_timer_runs_at_once(loop: EventLoop) -> None:
    """A timer already overdue when the loop gets back to polling (an earlier callback
    was slow) runs without waiting."""
    started = time.monotonic()
    fired: list[float] = []
    loop.call_later(0, lambda: time.sleep(0.03))
    loop.call_later(0.005, lambda: record_and_stop(loop, fired, time.monotonic() - started))
    run_for(loop, 1.5)  # a safety stop
    assert fired and fired[0] < 0.5


def test_a_fired_timer_lets_go_of_its_callback(loop: EventLoop) -> None:
    """The handle of a timer that ran no longer holds the callback (nor what it
    refers to)."""
    fired: list[int] = []

    def callback() -> None:
        fired.append(1)

    handle = loop.call_later(0, callback)
    ref = weakref.ref(callback)
    del callback
    run_until(loop, lambda: bool(fired))
    assert handle.callback is None and ref() is None


# --- thread-safe calls, stop, close ------------------------------------------------------------


def test_thread_safe_calls_run_in_order_in_one_wakeup(loop: EventLoop) -> None:
    """Calls queued before the loop runs (one eventfd count for all) run in order."""
    order: list[str] = []
    loop.call_soon_threadsafe(lambda: order.append("a"))
    loop.call_soon_threadsafe(lambda: order.append("b"))
    loop.call_soon_threadsafe(loop.stop)
    started = time.monotonic()
    run_for(loop, 1.5)  # a safety stop
    assert order == ["a", "b"]
    assert time.monotonic() - started < 1.0


def test_a_thread_safe_call_may_queue_another(loop: EventLoop) -> None:
    """A thread-safe call that itself calls call_soon_threadsafe does not deadlock."""
    order: list[str] = []

    def first() -> None:
        order.append("first")
        loop.call_soon_threadsafe(functools.partial(record_and_stop, loop, order, "second"))

    loop.call_soon_threadsafe(first)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    thread.join(2.0)
    assert not thread.is_alive() and order == ["first", "second"]


def test_stop_after_close_is_harmless() -> None:
    """stop() during shutdown, after close(), does not raise."""
    loop = EventLoop()
    loop.close()
    loop.stop()
