"""Log lines a guest can repeat at will are rate-limited per call site.

Every bad command is logged, and a guest can send tens of thousands a second: the
log (QEMU's or libvirt's file, the journal) would fill the host's disk.  As the kernel's
``printk_ratelimited``, each call site (file and line) gets a token bucket: a burst of
``5 * rate`` lines, then ``rate`` a second on average.  Lines over the limit are counted
and not written; the next line from the same site says how many were dropped, and
:meth:`RepeatLimiter.report` names the ones still pending at exit, at the level of the
most severe.  One site may log different messages (all guest errors come from one
line): a flood of one kind also holds back the others from that site, which is why
the counts say "from here", not "like this".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from protocol.limits import DEFAULT_LIMITS

__all__ = ["MAX_RATE", "RepeatLimiter"]

#: a higher rate is no limit at all (and keeps the arithmetic in floats)
MAX_RATE = 1_000_000


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float
    where: str  # logger name and line, for the report
    suppressed: int = 0
    level: int = 0  # the most severe level dropped
    last: str = ""  # the last message dropped (formatted: a record's arguments may hold
    # a guest error whose traceback holds views of guest memory, which could not be unmapped)

    def forget_drops(self) -> int:
        """Start counting drops afresh; how many there were."""
        dropped, self.suppressed, self.level, self.last = self.suppressed, 0, 0, ""
        return dropped


class RepeatLimiter(logging.Filter):
    """A :class:`logging.Filter` (for a handler): ``rate`` lines a second per call site
    on average, bursts of ``burst_seconds * rate``.  Thread-safe."""

    def __init__(self, rate: int, burst_seconds: float = DEFAULT_LIMITS.log_burst_seconds,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.rate = min(rate, MAX_RATE)
        self.burst = float(burst_seconds * self.rate)
        self._clock = clock
        self._buckets: dict[tuple[str, int], _Bucket] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        """Pass the record, or count it as suppressed.  A record that passes after
        some from its site were dropped gets their number appended."""
        with self._lock:
            now = self._clock()
            bucket = self._buckets.get(site := (record.pathname, record.lineno))
            if bucket is None:
                bucket = self._buckets[site] = _Bucket(self.burst, now,
                                                       f"{record.name}:{record.lineno}")
            elapsed = max(0.0, now - bucket.at)
            bucket.tokens = min(self.burst, bucket.tokens + elapsed * self.rate)
            bucket.at = now
            if bucket.tokens < 1:
                bucket.suppressed += 1
                bucket.level = max(bucket.level, record.levelno)
                bucket.last = _message(record)
                return False
            bucket.tokens -= 1
            dropped = bucket.forget_drops()
        if dropped:
            record.msg = f"{record.getMessage()} [{dropped} more from here suppressed]"
            record.args = None
        return True

    def report(self, logger: logging.Logger) -> None:
        """Log in one line, at the most severe level dropped, each call site with lines
        dropped since its last one passed: how many, and the last of them (at exit:
        nothing goes without a trace)."""
        with self._lock:
            pending = [b for b in self._buckets.values() if b.suppressed]
            lines = [f"{b.suppressed} from {b.where} (last: {b.last!r})" for b in pending]
            level = max((b.level for b in pending), default=logging.INFO)
            for bucket in pending:
                bucket.forget_drops()
        if lines:
            logger.log(level, "log: lines suppressed by --log-rate: %s", "; ".join(lines))


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except (TypeError, ValueError):  # a bad format: what logging would have shown
        return str(record.msg)
