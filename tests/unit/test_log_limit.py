"""RepeatLimiter: per-call-site token buckets for log lines a guest can repeat."""

from __future__ import annotations

import logging
import threading

import pytest

from vgpu_backend.log_limit import BURST_SECONDS, RepeatLimiter


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def record(msg: str = "guest error: %s", args: tuple[object, ...] = ("bad",),
           line: int = 10, path: str = "device.py") -> logging.LogRecord:
    """A record as the logger of module ``path`` makes it at ``line``."""
    return logging.makeLogRecord({"msg": msg, "args": args, "pathname": f"/src/{path}",
                                  "name": path.removesuffix(".py"), "lineno": line,
                                  "levelno": logging.INFO})


def passed(limiter: RepeatLimiter, count: int, **site: object) -> list[logging.LogRecord]:
    """Offer ``count`` records from one site; the ones that pass."""
    out = []
    for i in range(count):
        rec = record(args=(i,), **site)  # type: ignore[arg-type]
        if limiter.filter(rec):
            out.append(rec)
    return out


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_burst_passes_then_lines_are_dropped(clock: Clock) -> None:
    """BURST_SECONDS * rate lines at once pass, the rest do not."""
    limiter = RepeatLimiter(4, clock=clock)
    assert len(passed(limiter, 100)) == BURST_SECONDS * 4 == 20


def test_the_rate_refills_the_bucket_up_to_the_burst(clock: Clock) -> None:
    """After the burst, ``rate`` lines a second; a long pause refills only the burst."""
    limiter = RepeatLimiter(4, clock=clock)
    passed(limiter, 100)
    clock.now += 1.0
    assert len(passed(limiter, 100)) == 4
    clock.now += 0.5
    assert len(passed(limiter, 100)) == 2
    clock.now += 3600
    assert len(passed(limiter, 100)) == 20


def test_the_next_line_through_counts_what_was_dropped(clock: Clock) -> None:
    """The first line that passes after drops carries their number, with its own
    arguments formatted; the one after it carries nothing."""
    limiter = RepeatLimiter(1, clock=clock)
    passed(limiter, 5 + 7)
    clock.now += 1.0
    [first] = passed(limiter, 1)
    assert first.getMessage() == "guest error: 0 [7 more like this suppressed]"
    assert first.args is None
    clock.now += 1.0
    [second] = passed(limiter, 1)
    assert second.getMessage() == "guest error: 0"


def test_each_line_of_code_has_its_own_bucket(clock: Clock) -> None:
    """A flood from one call site leaves another site's lines alone."""
    limiter = RepeatLimiter(1, clock=clock)
    passed(limiter, 100, line=10)
    assert len(passed(limiter, 3, line=11)) == 3
    assert len(passed(limiter, 3, path="other.py", line=10)) == 3
    assert passed(limiter, 1, line=10) == []


def test_report_names_every_site_with_drops_once(clock: Clock,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """One line listing count, format string and site of each; then nothing pending."""
    limiter = RepeatLimiter(1, clock=clock)
    passed(limiter, 8, line=10)
    passed(limiter, 6, line=20, path="virtqueue.py")
    passed(limiter, 2, line=30)  # within the burst: nothing dropped
    logger = logging.getLogger("test_log_limit")
    with caplog.at_level(logging.INFO, logger="test_log_limit"):
        limiter.report(logger)
        limiter.report(logger)
    [line] = caplog.messages
    assert "3 x 'guest error: %s' (device:10)" in line
    assert "1 x 'guest error: %s' (virtqueue:20)" in line
    assert ":30" not in line


def test_drops_reported_at_exit_are_not_counted_again(clock: Clock) -> None:
    """After report(), the next line through does not repeat the count."""
    limiter = RepeatLimiter(1, clock=clock)
    passed(limiter, 9)
    limiter.report(logging.getLogger("test_log_limit"))
    clock.now += 1.0
    [line] = passed(limiter, 1)
    assert "suppressed" not in line.getMessage()


def test_threads_logging_at_once_lose_no_count(clock: Clock) -> None:
    """Lines from several threads: every one is either passed or counted."""
    limiter = RepeatLimiter(10, clock=clock)
    results: list[int] = []
    lock = threading.Lock()

    def flood() -> None:
        got = len(passed(limiter, 2000))
        with lock:
            results.append(got)

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(results) == BURST_SECONDS * 10
    clock.now += 1000
    [line, *_] = passed(limiter, 1)
    assert f"[{4 * 2000 - BURST_SECONDS * 10} more like this suppressed]" in line.getMessage()
