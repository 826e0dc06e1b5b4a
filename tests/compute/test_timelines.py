"""``Timelines``: one timeline runs one job at a time, in submission order, even when a
completion submits more work on the same timeline (a resolved fence lets the control
queue run on and queue the next submission)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from vgpu_backend.compute.timelines import Timelines
from vgpu_backend.eventloop import EventLoop


def test_work_submitted_from_a_completion_waits_its_turn() -> None:
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
