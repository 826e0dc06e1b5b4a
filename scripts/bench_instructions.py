#!/usr/bin/env python3
"""Benchmark: CPU instructions per 2D command, counted by valgrind (callgrind).

Times on a shared machine wander by 2x from one minute to the next; instruction counts
do not.  This counts, per command, what ``bench_device.py`` times: the device's
``process()`` over batches of 64 RESOURCE_CREATE_2D / RESOURCE_UNREF commands in
INDIRECT chains, the command handlers alone, and the floor loop (no checks, the ring
side in numpy, ``scripts/benchkit/floor_loop.py``).  Only the measured loop is counted
(``--toggle-collect`` on the ``functools.reduce`` that drives it), not start-up.  Needs
valgrind (``apt-get install valgrind``) and a Python whose symbols are not stripped
(exit status 3 otherwise); each measurement takes about 10-30 s.

    python3 scripts/bench_instructions.py [--batches 30] [--measure device,handlers,floor]
        [-- BACKEND-OPTIONS...]
"""

from __future__ import annotations

import argparse
import functools
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MEASURES = ("device", "handlers", "floor")
_COLLECTED = re.compile(r"Collected : (\d+)")
WARM_UP = 5
#: the exit status when this Python cannot be counted (a stripped build)
CANNOT_COUNT = 3


def count(measure: str, batches: int, backend_options: list[str]) -> int:
    """Instructions of ``batches`` batches of ``measure``, in a child under callgrind."""
    command = ["valgrind", "--tool=callgrind", "--toggle-collect=functools_reduce",
               "--callgrind-out-file=/dev/null", sys.executable, __file__, "--child",
               measure, "--batches", str(batches), "--", *backend_options]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"bench_instructions: {measure} failed ({done.returncode}):\n"
                         f"{done.stdout}{done.stderr[-2000:]}")
    if int(found.group(1)) == 0:  # callgrind never saw functools_reduce run
        print(f"bench_instructions: counted nothing: {sys.executable} has no symbol "
              "functools_reduce (a stripped build, as Debian's); use a Python with "
              "symbols (pyenv's, say)", file=sys.stderr)
        sys.exit(CANNOT_COUNT)
    return int(found.group(1))


def child(measure: str, batches: int, backend_options: list[str]) -> None:
    """Set ``measure`` up as bench_device.py does, warm it up, then run ``batches``
    batches inside one ``functools.reduce`` (what callgrind counts)."""
    import bench_device  # the same set-up as the timed benchmark
    import numpy as np
    import numpy.typing as npt
    from benchkit.floor_loop import Ring, serve_batch

    from vgpu_backend.cli import parser
    from vgpu_backend.config import build_config

    config = build_config(parser().parse_args(["--socket-path", "unused", *backend_options]))
    batch = bench_device.create_unref_batch()
    memory, device, avail_idx, _loop = bench_device.build(batch, config)
    step: Callable[[], object]
    if measure == "device":
        queue = device.queues[0]
        republish = bench_device.republisher(memory, queue, avail_idx)

        def step() -> None:
            republish()
            device.process(0)
    elif measure == "handlers":
        step = bench_device.handler_run(device, batch)
    else:
        ram = memory.regions[0].array
        ring = Ring.over(ram, bench_device.QSIZE, bench_device.DESC, bench_device.AVAIL,
                         bench_device.USED)
        images: dict[int, npt.NDArray[np.uint8]] = {}
        bench_device.prepare_loop(memory)

        def step() -> None:
            serve_batch(ram, ring, ring.heads(0, bench_device.BATCH), 0, images)
    for _ in range(WARM_UP):
        step()
    functools.reduce(lambda _, __: step(), range(batches), None)


def main() -> int:
    """Count each measure and print instructions per command."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--measure", default=",".join(MEASURES),
                    help=f"comma-separated, of {', '.join(MEASURES)}")
    ap.add_argument("--child", choices=MEASURES, help=argparse.SUPPRESS)
    ap.add_argument("backend_options", nargs="*", metavar="BACKEND-OPTIONS",
                    help="vgpu-backend options (after --), e.g. --no-compute")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.batches, args.backend_options)
        return 0
    wanted = [m.strip() for m in args.measure.split(",") if m.strip()]
    if set(wanted) - set(MEASURES):
        ap.error(f"unknown measures {sorted(set(wanted) - set(MEASURES))}")
    if shutil.which("valgrind") is None:
        raise SystemExit("bench_instructions: needs valgrind (apt-get install valgrind)")
    commands = args.batches * 64
    for measure in wanted:
        per_command = count(measure, args.batches, args.backend_options) / commands
        print(f"{measure:<9} {per_command:>9,.0f} instructions per command")
    return 0


if __name__ == "__main__":
    sys.exit(main())
