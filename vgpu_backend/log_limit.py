"""Log lines a guest can repeat at will are rate-limited per call site.

Every bad command is logged, and a guest can send tens of thousands a second: the
log (QEMU's or libvirt's file, the journal) would fill the host's disk.  As the kernel's
``printk_ratelimited``, each call site (file and line) gets a token bucket: a burst of
``5 * rate`` lines, then ``rate`` a second on average.  Lines over the limit are counted,
not formatted; the next line that passes says how many of its kind were dropped, and
:meth:`RepeatLimiter.report` names the ones still pending at exit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["BURST_SECONDS", "RepeatLimiter"]

#: a call site may write this many seconds' worth of lines at once
BURST_SECONDS = 5


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float
    where: str  # logger name and line, for the report
    suppressed: int = 0
    last: str = ""  # the format string of the last line dropped


class RepeatLimiter(logging.Filter):
    """A :class:`logging.Filter` (for a handler): ``rate`` lines a second per call site
    on average, bursts of ``BURST_SECONDS * rate``.  Thread-safe."""

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.rate = rate
        self.burst = float(BURST_SECONDS * rate)
        self._clock = clock
        self._buckets: dict[tuple[str, int], _Bucket] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        """Pass the record, or count it as suppressed.  A record that passes after
        some of its site's were dropped gets their number appended."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(site := (record.pathname, record.lineno))
            if bucket is None:
                bucket = self._buckets[site] = _Bucket(self.burst, now,
                                                       f"{record.name}:{record.lineno}")
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
            if bucket.tokens < 1:
                bucket.suppressed += 1
                bucket.last = str(record.msg)
                return False
            bucket.tokens -= 1
            dropped, bucket.suppressed = bucket.suppressed, 0
        if dropped:
            record.msg = f"{record.getMessage()} [{dropped} more like this suppressed]"
            record.args = None
        return True

    def report(self, logger: logging.Logger) -> None:
        """Log in one line, for each call site with lines dropped since its last one
        passed, how many and of which kind (at exit: nothing goes without a trace)."""
        with self._lock:
            pending = [f"{b.suppressed} x {b.last!r} ({b.where})"
                       for b in self._buckets.values() if b.suppressed]
            for bucket in self._buckets.values():
                bucket.suppressed = 0
        if pending:
            logger.info("log: lines suppressed by --log-rate: %s", "; ".join(pending))
