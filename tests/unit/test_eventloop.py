"""The single-threaded event loop: fd readiness, timers, thread-safe calls, stop."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.unit.loop_runner import run_until
from vgpu_backend.eventloop import EventLoop


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


def test_close_releases_the_wakeup_fd() -> None:
    loop = EventLoop()
    before = len(os.listdir("/proc/self/fd"))
    loop.close()
    assert len(os.listdir("/proc/self/fd")) < before
