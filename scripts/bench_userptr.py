#!/usr/bin/env python3
"""Benchmark: USERPTR entry lists validated, translated to host ranges and coalesced.

Runs the device's own code path on a memfd guest RAM (sparse, 6 GiB by default):
the entry array is snapshotted out of a descriptor chain in guest memory
(``read_mem_entries``), validated and translated (``translate_userptr``), and turned into
host ranges (``host_ranges``).  Prints the median and p90 per entry count, for
scattered 4 KiB pages and for one contiguous run.

    python3 scripts/bench_userptr.py [--max-entries 1048576] [--repeat 15]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol.limits import Limits
from protocol.vhost_user import MemRegion
from protocol.virtio_gpu import MemEntry
from protocol.wire import layout
from vgpu_backend.backing import read_mem_entries
from vgpu_backend.chains import DescriptorChain
from vgpu_backend.guest_memory import GuestMemory
from vgpu_backend.userptr import PAGE_SIZE, host_ranges, translate_userptr

GiB = 1 << 30
_MAX_ENTRY = 0xFFFFF000  # the guest's largest sg segment


def _chain_with_entries(memory: GuestMemory, entries: np.ndarray, at: int) -> DescriptorChain:
    """Write ``entries`` into guest RAM at ``at`` and wrap them like a popped chain."""
    region, off = memory.gpa_to_region(at, entries.nbytes)
    region.array[off:off + entries.nbytes] = entries.view(np.uint8)
    return DescriptorChain(0, out=[region.view[off:off + entries.nbytes]],
                           out_len=entries.nbytes)


def measure(memory: GuestMemory, count: int, scattered: bool, repeat: int,
            limits: Limits, table_at: int, ram_pages: int) -> tuple[float, float, int]:
    """Median and p90 milliseconds for ``count`` entries, and the coalesced count."""
    dtype = layout(MemEntry).dtype
    size = count * PAGE_SIZE
    if scattered:  # distinct random pages, above the entry table
        first_page = table_at // PAGE_SIZE + 8192
        pages = np.random.default_rng(count).choice(
            ram_pages - first_page, size=count, replace=False).astype(np.uint64)
        entries = np.zeros(count, dtype=dtype)
        entries["addr"] = (pages + np.uint64(first_page)) * np.uint64(PAGE_SIZE)
        entries["length"] = PAGE_SIZE
    else:  # one contiguous run, as a coalescing guest sends it (<= 0xFFFFF000 per entry)
        runs = -(-size // _MAX_ENTRY)
        entries = np.zeros(runs, dtype=dtype)
        entries["addr"] = np.arange(runs, dtype=np.uint64) * np.uint64(_MAX_ENTRY)
        entries["length"] = _MAX_ENTRY
        entries["length"][-1] = size - _MAX_ENTRY * (runs - 1)
    chain = _chain_with_entries(memory, entries, table_at)
    times = []
    coalesced = 0
    for _ in range(repeat):
        start = time.perf_counter()
        addr, length = read_mem_entries(chain, 0, len(entries), limits.max_userptr_entries)
        segments = translate_userptr(memory, addr, length, size, limits.max_userptr_bytes)
        ranges = host_ranges(memory, segments)
        times.append(time.perf_counter() - start)
        coalesced = len(ranges)
    ms = np.array(times) * 1e3
    return float(np.median(ms)), float(np.percentile(ms, 90)), coalesced


def main() -> int:
    """Run the benchmark and print a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-entries", type=int, default=1 << 20)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--ram-gib", type=int, default=6)
    args = ap.parse_args()
    ram = args.ram_gib * GiB
    fd = os.memfd_create("bench-guest-ram")
    os.ftruncate(fd, ram)
    memory = GuestMemory()
    below_4g = min(ram, 3 * GiB)  # QEMU's split: RAM below and above the PCI hole
    memory.add(MemRegion(0, below_4g, 0x7F00_0000_0000, 0), os.dup(fd), 8)
    if ram > below_4g:
        memory.add(MemRegion(below_4g, ram - below_4g, 0x7F00_0000_0000 + below_4g, below_4g),
                   os.dup(fd), 8)
    os.close(fd)
    limits = Limits(max_userptr_entries=args.max_entries)
    table_at = 16 << 20
    print(f"guest RAM {args.ram_gib} GiB in {len(memory.regions)} regions; "
          f"median of {args.repeat} runs")
    print(f"{'entries':>9} {'bytes':>9} | {'scattered ms':>12} {'p90':>7} {'ranges':>8} | "
          f"{'contiguous ms':>13} {'ranges':>6}")
    count = 1
    while count <= args.max_entries:
        s_med, s_p90, s_ranges = measure(memory, count, True, args.repeat, limits, table_at,
                                         ram // PAGE_SIZE)
        c_med, _c90, c_ranges = measure(memory, count, False, args.repeat, limits, table_at,
                                        ram // PAGE_SIZE)
        size = count * PAGE_SIZE
        human = (f"{size / GiB:.2f}G" if size >= GiB else
                 f"{size >> 20}M" if size >= 1 << 20 else f"{size >> 10}K")
        print(f"{count:>9} {human:>9} | {s_med:>12.3f} {s_p90:>7.3f} {s_ranges:>8} | "
              f"{c_med:>13.3f} {c_ranges:>6}")
        count *= 4
    memory.clear()
    return 0


if __name__ == "__main__":
    sys.exit(main())
