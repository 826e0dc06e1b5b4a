"""Busy-polling before the event loop sleeps (``--poll-max-us``): the adaptive window
and what the loop does with it."""

from __future__ import annotations

import math
import os
import select
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.unit.loop_runner import run_until
from vgpu_backend.eventloop import EventLoop, PollWindow

MS = 1e-3


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


@pytest.mark.parametrize("maximum", [-1e-6, math.inf, math.nan])
def test_a_maximum_that_is_not_a_finite_duration_is_refused(maximum: float) -> None:
    with pytest.raises(ValueError, match="finite number of seconds >= 0"):
        PollWindow(maximum)
    with pytest.raises(ValueError, match="finite number of seconds >= 0"):
        EventLoop(maximum)


# --- the loop ----------------------------------------------------------------------------


class RecordingEpoll:
    """Wraps a loop's epoll object and records the timeout of every poll."""

    def __init__(self, epoll: select.epoll) -> None:
        self._epoll = epoll
        self.timeouts: list[float] = []

    def poll(self, timeout: float = -1.0) -> list[tuple[int, int]]:
        self.timeouts.append(timeout)
        return self._epoll.poll(timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._epoll, name)

    def sleeps(self) -> int:
        """Polls that could block."""
        return sum(1 for t in self.timeouts if t != 0)


@pytest.fixture
def event_fd() -> Iterator[int]:
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


def polling_loop(maximum: float, window: float, monkeypatch: pytest.MonkeyPatch
                 ) -> tuple[EventLoop, RecordingEpoll]:
    loop = EventLoop(maximum)
    loop._poll.window = window
    recording = RecordingEpoll(loop._epoll)
    monkeypatch.setattr(loop, "_epoll", recording)
    return loop, recording


def test_an_event_within_the_window_is_taken_without_sleeping(
        event_fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Written by another thread 20 ms into a 500 ms window: seen by polling alone."""
    loop, epoll = polling_loop(1.0, 0.5, monkeypatch)
    seen: list[float] = []
    try:
        def readable() -> None:
            os.eventfd_read(event_fd)
            seen.append(time.monotonic())
            loop.stop()
        loop.add_reader(event_fd, readable)
        writer = threading.Timer(20 * MS, os.eventfd_write, (event_fd, 1))
        start = time.monotonic()
        writer.start()
        loop.run()
        writer.join()
    finally:
        loop.close()
    assert len(seen) == 1 and seen[0] - start < 0.4
    assert epoll.sleeps() == 0 and len(epoll.timeouts) > 1
    assert loop._poll.window == 0.5  # the window covered the wait


def test_without_a_polling_limit_the_loop_only_sleeps(
        event_fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    loop, epoll = polling_loop(0.0, 0.0, monkeypatch)
    try:
        loop.add_reader(event_fd, loop.stop)
        writer = threading.Timer(20 * MS, os.eventfd_write, (event_fd, 1))
        writer.start()
        loop.run()
        writer.join()
    finally:
        loop.close()
    assert epoll.timeouts == [-1.0]


def test_an_idle_loop_polls_once_then_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 100 ms silence after a 1 ms window: one window of polling, then one sleep
    until the stop; the window is closed for the next wait."""
    loop, epoll = polling_loop(1 * MS, 1 * MS, monkeypatch)
    stopper = threading.Timer(0.1, loop.stop)
    try:
        stopper.start()
        loop.run()
        stopper.join()
    finally:
        loop.close()
    assert epoll.sleeps() == 1 and epoll.timeouts[-1] == -1.0
    assert loop._poll.window == 0.0


def test_a_timer_inside_the_window_fires_on_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The window never outlasts the next timer: polling stops at the timer's time."""
    loop, epoll = polling_loop(1.0, 1.0, monkeypatch)
    fired: list[float] = []
    try:
        start = time.monotonic()

        def fire() -> None:
            fired.append(time.monotonic() - start)
            loop.stop()
        loop.call_later(30 * MS, fire)
        loop.run()
    finally:
        loop.close()
    assert 30 * MS <= fired[0] < 0.5
    assert epoll.sleeps() <= 1  # at most a last sleep of what was left after polling


def test_events_close_together_open_the_window(event_fd: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Events every 2 ms, limit 200 ms: the loop learns to poll for them, and catches
    some of them without sleeping."""
    loop, epoll = polling_loop(0.2, 0.0, monkeypatch)
    count = [0]
    stop_sending = threading.Event()

    def send() -> None:
        while not stop_sending.wait(2 * MS):
            os.eventfd_write(event_fd, 1)

    def readable() -> None:
        os.eventfd_read(event_fd)
        count[0] += 1

    sender = threading.Thread(target=send)
    try:
        loop.add_reader(event_fd, readable)
        sender.start()
        run_until(loop, lambda: count[0] >= 30 and loop._poll.window > 0, timeout=10.0)
    finally:
        stop_sending.set()
        sender.join()
        loop.close()
    assert 0 in epoll.timeouts
