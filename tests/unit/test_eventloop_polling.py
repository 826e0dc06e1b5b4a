"""Busy-polling before the event loop sleeps (``--poll-max-us``): the adaptive window
and what the loop does with it."""

from __future__ import annotations

import math
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.unit.loop_runner import run_until
from vgpu_backend import eventloop
from vgpu_backend.eventloop import EventLoop, PollWindow

# --- the window --------------------------------------------------------------------------


def test_the_window_starts_closed() -> None:
    assert PollWindow(50e-6).window == 0.0


def test_a_wait_within_the_maximum_opens_the_window_and_doubles_it() -> None:
    """4 us first (QEMU's start), then twice as long each time it fell short."""
    window = PollWindow(50e-6)
    seen = []
    for _ in range(6):
        window.record(40e-6)
        seen.append(round(window.window * 1e6, 3))
    assert seen == [4.0, 8.0, 16.0, 32.0, 50.0, 50.0]  # capped at the maximum


def grown(maximum: float, waits: int) -> PollWindow:
    """A window after ``waits`` waits just within ``maximum``."""
    window = PollWindow(maximum)
    for _ in range(waits):
        window.record(0.9 * maximum)
    return window


def test_a_wait_the_window_covered_leaves_it_as_it_is() -> None:
    window = grown(100e-6, 3)
    assert window.window == pytest.approx(16e-6)
    window.record(10e-6)
    window.record(16e-6)
    assert window.window == pytest.approx(16e-6)


def test_a_wait_beyond_the_maximum_closes_the_window() -> None:
    """Polling would have cost more than it saves: the next wait sleeps at once."""
    window = grown(100e-6, 8)
    assert window.window == pytest.approx(100e-6)
    window.record(101e-6)
    assert window.window == 0.0
    window.record(60e-6)  # and it opens again when events come close together
    assert window.window == pytest.approx(4e-6)


def test_a_maximum_of_zero_never_polls() -> None:
    window = PollWindow(0.0)
    for waited in (0.0, 1e-9, 1e-6, 1.0):
        window.record(waited)
        assert window.window == 0.0


@pytest.mark.parametrize("maximum", [-1e-6, math.inf, math.nan, True])
def test_a_maximum_that_is_not_a_finite_duration_is_refused(maximum: float) -> None:
    with pytest.raises(ValueError, match="finite number of seconds >= 0"):
        PollWindow(maximum)
    with pytest.raises(ValueError, match="finite number of seconds >= 0"):
        EventLoop(maximum)


# --- the loop's wait, on a scripted clock ---------------------------------------------

US = 1e-6
READY = [(7, select.EPOLLIN)]


class ScriptedEpoll:
    """The loop's epoll on a fake clock: a poll(0) takes 1 us; the one fd becomes
    ready at ``ready_at`` (never when None); a blocking poll sleeps until then or until
    its timeout.  Records every poll's timeout."""

    def __init__(self, ready_at: float | None) -> None:
        self.now = 0.0
        self.ready_at = ready_at
        self.timeouts: list[float] = []

    def clock(self) -> float:
        return self.now

    def poll(self, timeout: float = -1.0) -> list[tuple[int, int]]:
        self.timeouts.append(timeout)
        wake = math.inf if self.ready_at is None else max(self.now, self.ready_at)
        if timeout == 0:
            self.now += US
        elif timeout < 0:
            assert wake < math.inf, "slept for ever"
            self.now = wake
        else:
            self.now = min(self.now + timeout, wake)
        return READY if self.ready_at is not None and self.now >= self.ready_at else []

    def polls(self) -> int:
        return sum(1 for t in self.timeouts if t == 0)

    def sleeps(self) -> list[float]:
        return [t for t in self.timeouts if t != 0]


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., tuple[EventLoop,
                                                                        ScriptedEpoll]]]:
    """``scripted(maximum, window, ready_at)``: a loop whose waits run on the script."""
    loops: list[tuple[EventLoop, select.epoll]] = []

    def make(maximum: float, window: float, ready_at: float | None
             ) -> tuple[EventLoop, ScriptedEpoll]:
        loop = EventLoop(maximum)
        loops.append((loop, loop._epoll))
        loop._poll.window = window
        epoll = ScriptedEpoll(ready_at)
        monkeypatch.setattr(loop, "_epoll", epoll)
        monkeypatch.setattr(eventloop, "_clock", epoll.clock)
        return loop, epoll
    yield make
    for loop, real in loops:
        loop._epoll = real
        loop.close()


def test_an_event_inside_the_window_is_caught_by_polling(scripted: Any) -> None:
    loop, epoll = scripted(1000 * US, 100 * US, 30 * US)
    assert loop._wait(-1.0) == READY
    assert epoll.sleeps() == [] and 29 <= epoll.polls() <= 31
    assert loop._poll.window == pytest.approx(100 * US)  # it covered the wait


def test_past_the_window_the_loop_sleeps_and_the_sleep_counts(scripted: Any) -> None:
    """Polling for 100 us, then a sleep until the event at 500 us: the window grows,
    as the whole 500 us wait (not just its polling) was within the maximum."""
    loop, epoll = scripted(1000 * US, 100 * US, 500 * US)
    assert loop._wait(-1.0) == READY
    assert epoll.sleeps() == [-1.0] and epoll.timeouts[-1] == -1.0
    assert 99 <= epoll.polls() <= 101
    assert loop._poll.window == pytest.approx(200 * US)


def test_a_wait_longer_than_the_maximum_closes_the_window(scripted: Any) -> None:
    loop, _ = scripted(1000 * US, 100 * US, 5000 * US)
    assert loop._wait(-1.0) == READY
    assert loop._poll.window == 0.0


def test_a_closed_window_sleeps_at_once(scripted: Any) -> None:
    loop, epoll = scripted(1000 * US, 0.0, 300 * US)
    assert loop._wait(-1.0) == READY
    assert epoll.timeouts == [-1.0]
    assert loop._poll.window == pytest.approx(4 * US)  # 300 us was within the maximum


def test_polling_stops_at_the_next_timer(scripted: Any) -> None:
    """A timer due in 50 us, a window of 100 us: back to the timers after 50 us."""
    loop, epoll = scripted(1000 * US, 100 * US, None)
    assert loop._wait(50 * US) == []
    assert 50 * US <= epoll.now <= 52 * US
    assert all(0 <= t <= 1 * US for t in epoll.timeouts)


def test_the_sleep_after_polling_is_what_is_left_of_the_timeout(scripted: Any) -> None:
    loop, epoll = scripted(1000 * US, 100 * US, None)
    assert loop._wait(1000 * US) == []
    (sleep,) = epoll.sleeps()
    assert sleep == pytest.approx(900 * US, abs=2 * US)
    assert epoll.now == pytest.approx(1000 * US)


def test_a_zero_timeout_only_looks(scripted: Any) -> None:
    loop, epoll = scripted(1000 * US, 100 * US, None)
    assert loop._wait(0.0) == []
    assert epoll.timeouts == [0.0] and loop._poll.window == pytest.approx(100 * US)


def test_no_polling_limit_only_sleeps(scripted: Any) -> None:
    loop, epoll = scripted(0.0, 0.0, 30 * US)
    assert loop._wait(-1.0) == READY
    assert epoll.timeouts == [-1.0] and loop._poll.window == 0.0


def test_a_hold_makes_the_loop_sleep_at_once_while_it_lasts(scripted: Any) -> None:
    """E.g. compute jobs running Python on worker threads; the window is kept for
    when the hold ends, and a released hold is forgotten."""
    loop, epoll = scripted(1000 * US, 100 * US, 30 * US)
    busy = [True]
    release = loop.hold_polling_while(lambda: busy[0])
    assert loop.polling_held()
    assert loop._wait(-1.0) == READY
    assert epoll.timeouts == [-1.0] and loop._poll.window == pytest.approx(100 * US)
    busy[0] = False
    assert not loop.polling_held()
    epoll.ready_at = epoll.now + 30 * US
    assert loop._wait(-1.0) == READY and epoll.sleeps() == [-1.0]  # polled this time
    busy[0] = True
    release()
    release()  # twice is harmless
    assert not loop.polling_held()


# --- the real loop ------------------------------------------------------------------------


@pytest.fixture
def event_fd() -> Iterator[int]:
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


def test_a_polling_loop_serves_events_timers_and_stops(event_fd: int) -> None:
    """On real epoll and threads: an event from another thread and a timer are
    dispatched while the window is open, and a stop from another thread ends run()."""
    loop = EventLoop(0.5)
    loop._poll.window = 0.5
    seen: list[str] = []
    try:
        def readable() -> None:
            os.eventfd_read(event_fd)
            seen.append("event")
        loop.add_reader(event_fd, readable)
        start = time.monotonic()
        loop.call_later(0.03, lambda: seen.append("timer"))
        threading.Timer(0.01, os.eventfd_write, (event_fd, 1)).start()
        run_until(loop, lambda: len(seen) == 2, timeout=10.0)
        assert sorted(seen) == ["event", "timer"] and time.monotonic() - start >= 0.03
        stopper = threading.Timer(0.05, loop.stop)
        stopper.start()
        loop.run()
        stopper.join()
    finally:
        loop.close()
