"""RepeatLimiter: per-call-site token buckets for log lines a guest can repeat."""

from __future__ import annotations

import logging
import sys
import threading

import pytest

from protocol.limits import DEFAULT_LIMITS, Limits
from vgpu_backend.log_limit import MAX_RATE, RepeatLimiter


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
    """log_burst_seconds * rate lines at once pass, the rest do not."""
    limiter = RepeatLimiter(4, clock=clock)
    assert len(passed(limiter, 100)) == DEFAULT_LIMITS.log_burst_seconds * 4 == 20


def test_a_burst_of_less_than_one_line_is_refused() -> None:
    """It would drop every line for ever."""
    with pytest.raises(ValueError, match="at least 1"):
        Limits(log_rate=1, log_burst_seconds=0.5)
    assert RepeatLimiter(1, burst_seconds=1.0, clock=lambda: 0.0).burst == 1


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
    assert first.getMessage() == "guest error: 0 [7 more from here suppressed]"
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
    """One line with the count, site and last dropped message of each; then nothing is
    pending."""
    limiter = RepeatLimiter(1, clock=clock)
    passed(limiter, 8, line=10)
    passed(limiter, 6, line=20, path="virtqueue.py")
    passed(limiter, 2, line=30)  # within the burst: nothing dropped
    logger = logging.getLogger("test_log_limit")
    with caplog.at_level(logging.INFO, logger="test_log_limit"):
        limiter.report(logger)
        limiter.report(logger)
    [line] = caplog.messages
    assert "3 from device:10 (last: 'guest error: 7')" in line
    assert "1 from virtqueue:20 (last: 'guest error: 5')" in line
    assert ":30" not in line


def test_report_comes_at_the_most_severe_level_dropped(
        clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    """Dropped warnings are reported as a warning: at --log-level warning an INFO
    report would itself be dropped."""
    limiter = RepeatLimiter(1, clock=clock)
    passed(limiter, 7, line=10)
    for _ in range(6):
        limiter.filter(logging.makeLogRecord({
            "msg": "display: %s", "args": ("gone",), "pathname": "/src/display.py",
            "name": "display", "lineno": 5, "levelno": logging.WARNING}))
    logger = logging.getLogger("test_log_limit")
    with caplog.at_level(logging.WARNING, logger="test_log_limit"):
        limiter.report(logger)
    [report] = caplog.records
    assert report.levelno == logging.WARNING
    assert "1 from display:5 (last: 'display: gone')" in report.getMessage()
    assert "2 from device:10" in report.getMessage()


def test_one_sites_report_keeps_its_most_severe_drop(
        clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    """A dropped ERROR then a dropped INFO from one line of code: reported as an error
    (not at the level of the last drop)."""
    limiter = RepeatLimiter(1, clock=clock)
    passed(limiter, 5, line=10)  # the burst
    for level in (logging.ERROR, logging.INFO):
        rec = record(line=10)
        rec.levelno = level
        assert not limiter.filter(rec)
    logger = logging.getLogger("test_log_limit")
    with caplog.at_level(logging.INFO, logger="test_log_limit"):
        limiter.report(logger)
    [report] = caplog.records
    assert report.levelno == logging.ERROR


def test_a_clock_going_back_neither_adds_tokens_nor_fails(clock: Clock) -> None:
    """Time running backwards refills nothing; the refill counts from there on."""
    limiter = RepeatLimiter(2, clock=clock)
    passed(limiter, 100)
    clock.now -= 50
    assert passed(limiter, 5) == []
    clock.now += 0.5
    assert len(passed(limiter, 5)) == 1


def test_an_absurd_rate_is_no_limit_not_a_crash(clock: Clock) -> None:
    """--log-rate with hundreds of digits passes the limit checks; it must not overflow
    the float arithmetic."""
    limiter = RepeatLimiter(10 ** 400, clock=clock)
    assert limiter.rate == MAX_RATE
    clock.now += 1.0
    assert len(passed(limiter, 1000)) == 1000


def test_drops_reported_at_exit_are_not_counted_again(clock: Clock) -> None:
    """After report(), the next line through does not repeat the count."""
    limiter = RepeatLimiter(1, clock=clock)
    passed(limiter, 9)
    limiter.report(logging.getLogger("test_log_limit"))
    clock.now += 1.0
    [line] = passed(limiter, 1)
    assert "suppressed" not in line.getMessage()


def test_threads_logging_at_once_lose_no_count() -> None:
    """Lines from several threads switching as often as the interpreter allows: every
    one is either passed or counted, and each bucket is read and updated under the
    limiter's lock (the clock, read first, sees it held: a lost update needs a thread
    switch at just the wrong bytecode, too rare to wait for)."""
    held: list[bool] = []

    def clock() -> float:
        held.append(limiter._lock.locked())
        return 100.0

    limiter = RepeatLimiter(10, clock=clock)
    results: list[int] = []
    lock = threading.Lock()

    def flood() -> None:
        got = len(passed(limiter, 5000))
        with lock:
            results.append(got)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=flood) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert len(held) == 4 * 5000 and all(held)
    assert sum(results) == DEFAULT_LIMITS.log_burst_seconds * 10
    assert limiter._buckets[("/src/device.py", 10)].suppressed == 4 * 5000 - sum(results)
