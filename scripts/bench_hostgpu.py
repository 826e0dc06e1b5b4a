#!/usr/bin/env python3
"""Time USERPTR register + resolve + release over the simulated KFD, per path.

Guest RAM is a sparse memfd mapped shared; each buffer is ``n`` scattered 4 KiB pages
(every other page, shuffled, so nothing coalesces).  A path stops growing once one
size took longer than ``--budget`` seconds (the per-range fallback does two ioctls per
range).  The alias path needs one mapping per range and so hits ``vm.max_map_count``.

    python3 scripts/bench_hostgpu.py [--max-ranges 262144] [--budget 10] [--paths ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vgpu_backend.hostgpu import hostmem
from vgpu_backend.hostgpu.base import HostGpuError, HostRanges
from vgpu_backend.hostgpu.factory import HostGpuOptions, create_host_gpu
from vgpu_backend.hostgpu.sim_config import SimKfdConfig

PAGE = 4096
SIZES = [1, 16, 256, 4096, 16384, 65536, 262144]


def scattered(base: int, fd: int, n: int, rng: np.random.Generator) -> HostRanges:
    """``n`` single pages, every other page of the file, in random order."""
    pages = rng.permutation(n).astype(np.uint64) * np.uint64(2)
    offsets = pages * np.uint64(PAGE)
    return HostRanges(addr=offsets + np.uint64(base), length=np.full(n, PAGE, np.uint64),
                      fd=np.full(n, fd, np.int32), file_offset=offsets)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-ranges", type=int, default=SIZES[-1])
    parser.add_argument("--budget", type=float, default=10.0,
                        help="stop growing a path after a size took this many seconds")
    parser.add_argument("--paths", nargs="+", default=["batch", "alias", "per-range"])
    parser.add_argument("--gpus", type=int, default=1)
    args = parser.parse_args()
    sizes = [n for n in SIZES if n <= args.max_ranges]
    size = 2 * sizes[-1] * PAGE
    fd = os.memfd_create("bench-guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    base = hostmem.map_file(size, fd)
    rng = np.random.default_rng(1)
    print(f"sim KFD, {args.gpus} GPU(s); n scattered 4 KiB ranges; times in ms "
          f"(vm.max_map_count = {Path('/proc/sys/vm/max_map_count').read_text().strip()})")
    print(f"{'path':>9} {'ranges':>7} {'register':>10} {'us/range':>9} {'resolve':>9} "
          f"{'release':>9}  note")
    try:
        for path in args.paths:
            cfg = SimKfdConfig(gpu_count=args.gpus, userptr_limit=1 << 50)
            gpu = create_host_gpu(HostGpuOptions(gpu="sim", sim=cfg, userptr_path=path))
            memory = gpu.gpu_memory()
            assert memory is not None
            try:
                for n in sizes:
                    ranges = scattered(base, fd, n, rng)
                    t0 = time.perf_counter()
                    try:
                        mapping = gpu.register_userptr(ranges, readonly=False)
                    except HostGpuError as e:
                        print(f"{path:>9} {n:>7} {'failed':>10}  {e}"[:160])
                        break
                    t1 = time.perf_counter()
                    runs = memory.resolve(mapping.gpu_va, mapping.size, write=True)
                    t2 = time.perf_counter()
                    gpu.release(mapping)
                    t3 = time.perf_counter()
                    note = f"{len(runs)} host runs"
                    print(f"{path:>9} {n:>7} {(t1 - t0) * 1e3:>10.2f} "
                          f"{(t1 - t0) / n * 1e6:>9.2f} {(t2 - t1) * 1e3:>9.2f} "
                          f"{(t3 - t2) * 1e3:>9.2f}  {note}")
                    if t3 - t0 > args.budget and n != sizes[-1]:
                        print(f"{path:>9} {'...':>7} larger sizes skipped (over the "
                              f"{args.budget:g} s budget)")
                        break
            finally:
                gpu.close()
    finally:
        hostmem.unmap(base, size)
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
