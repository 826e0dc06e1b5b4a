"""A reference model of the USERPTR entry-list rules: what the device must answer to a
RESOURCE_CREATE_BLOB with USE_USERPTR, given guest RAM's regions and the limits.

Written from the rules (README "USERPTR blobs", the guest series v5), independent of the
device code.  Precedence: the entry count is checked against the limit and the chain
before anything else; ``size`` 0, an empty list, a zero-length or unaligned entry, and
entries covering less than ``size`` rounded up to a page are INVALID_PARAMETER; then a
list over ``max_bytes`` is OUT_OF_MEMORY (whatever the addresses); then an entry that is
not entirely guest RAM (a hole, past the end, wrapping 2^64) is INVALID_PARAMETER.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from protocol.virtio_gpu_codes import Resp
from tests.frontend.guest_ram import PAGE_SIZE, RamRegion, Segment

__all__ = ["EntryRules", "expected_response"]

_U64 = 1 << 64


@dataclass(frozen=True, slots=True)
class EntryRules:
    """The device's limits and guest RAM layout."""

    regions: Sequence[RamRegion]
    max_entries: int
    max_bytes: int


def _is_ram(rules: EntryRules, entry: Segment) -> bool:
    """``[gpa, gpa+length)`` is covered by regions without a gap (may cross adjacent
    regions), and does not wrap 2^64."""
    start, end = entry.gpa, entry.gpa + entry.length
    if end > _U64:
        return False
    for region in sorted(rules.regions, key=lambda r: r.guest_phys_addr):
        if region.guest_phys_addr <= start < region.end:
            start = region.end
            if start >= end:
                return True
    return False


def expected_response(rules: EntryRules, entries: Sequence[Segment], size: int,
                      nr_entries: int) -> Resp:
    """The response code for ``nr_entries`` claimed, ``entries`` present, ``size``."""
    if nr_entries > rules.max_entries or nr_entries > len(entries) or size == 0:
        return Resp.ERR_INVALID_PARAMETER
    claimed = entries[:nr_entries]
    if not claimed or any(e.length == 0 or e.gpa % PAGE_SIZE or e.length % PAGE_SIZE
                          for e in claimed):
        return Resp.ERR_INVALID_PARAMETER
    total = sum(e.length for e in claimed)
    if total < -(-size // PAGE_SIZE) * PAGE_SIZE:
        return Resp.ERR_INVALID_PARAMETER
    if total > rules.max_bytes:
        return Resp.ERR_OUT_OF_MEMORY
    if not all(_is_ram(rules, e) for e in claimed):
        return Resp.ERR_INVALID_PARAMETER
    return Resp.OK_NODATA
