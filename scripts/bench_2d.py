#!/usr/bin/env python3
"""Benchmark: our back-end against QEMU's C reference, on identical 2D work, in one run.

Each back-end is started as a process and driven by the test front-end simulator
(``tests/frontend``: memfd guest RAM, eventfds, a display peer thread that reads and
composites UPDATEs as fast as they come).  Chains are laid out once and re-submitted,
so the simulator's own cost per command is a few microseconds.  Measured:

* GET_DISPLAY_INFO round-trip latency (median, p99) -- it includes the back-end's
  display-socket round trip to the (simulated) QEMU;
* batched 2D throughput: RESOURCE_CREATE_2D + RESOURCE_UNREF pairs, 64 per kick;
* RESOURCE_ATTACH_BACKING of 16384 scattered page entries, and its DETACH_BACKING;
* full-frame 1280x800 TRANSFER_TO_HOST_2D + RESOURCE_FLUSH per kick (frames/s, until
  the display peer has the last frame).

Back-ends: ``ours`` (as QEMU starts it, with the defaults), ``polled`` (ours with
``--poll-max-us``: the event loop busy-polls before it sleeps), ``reference``, and
``floor`` and ``floor-polled`` (see ``FLOOR_BACKEND``; the throughput phase only).

All back-ends are up at once.  The latency and throughput phases take turns
(``--rounds``): the speed of a shared machine drifts by 2x over seconds, and taking
turns puts every back-end through the same drift, so their ratios hold from run to
run.  The other phases run one back-end after the other.

    python3 scripts/bench_2d.py [--backends ours,polled,reference,floor,floor-polled]
        [--poll-max-us 500]
        [--latency-iterations 2000] [--batches 2000] [--rounds 10] [--attach-iterations 20]
        [--frames 120] [--flavour 10.x] [--checkout PATH] [--json]

``--checkout`` runs another checkout's back-end in the same run (``ours@NAME``):
before/after comparisons of a change, through the same drift.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol.display import DisplayReq
from protocol.virtio_gpu_codes import Feature, Format, Resp
from protocol.virtqueue import DescFlag
from tests.frontend import gpu_commands as cmds
from tests.frontend.backend_process import (
    OURS_COMMAND,
    REFERENCE_BINARY,
    BackendProcess,
)
from tests.frontend.flavour import FLAVOURS, QEMU_7_2
from tests.frontend.gpu_commands import Rect
from tests.frontend.session import Session, SessionConfig

MiB = 1 << 20
#: ``vgpu-backend`` with the throughput phase's batches answered by the no-checks loop
FLOOR_BACKEND = Path(__file__).resolve().parent / "benchkit" / "floor_backend.py"
SLOT = 512  # bytes per command slot in a batch arena: command, then response at +256
WIDTH, HEIGHT = 1280, 800


class FixedBatch:
    """Commands laid out once in guest RAM as chains that are re-submitted unchanged.

    :param indirect: one INDIRECT descriptor per command (64 commands fit a 64-ring).
    """

    def __init__(self, s: Session, commands: Sequence[bytes], response_size: int, *,
                 indirect: bool, extra: Sequence[bytes] = ()) -> None:
        self.s, self.q = s, s.queues[0]
        self.response_size = response_size
        extras = list(extra) or [b""] * len(commands)
        sizes = [len(c) + len(e) for c, e in zip(commands, extras, strict=True)]
        slot = max(SLOT, max(sizes) + response_size + 64)
        self.arena_size = slot * len(commands)
        self.arena = s.ram.alloc_contiguous(self.arena_size)
        tables: list[tuple[int, int]] = []
        self.responses: list[int] = []
        self.heads: list[int] = []
        q = self.q
        for k, command in enumerate(commands):
            data = command + extras[k]
            base = self.arena + k * slot
            resp = base + slot - response_size
            s.ram.write(base, data)
            self.responses.append(resp)
            segments = [(base, len(command), 0)]
            if extras[k]:
                segments.append((base + len(command), len(extras[k]), 0))
            segments.append((resp, response_size, int(DescFlag.WRITE)))
            if indirect:
                table = s.ram.alloc_contiguous(16 * len(segments))
                tables.append((table, 16 * len(segments)))
                entries = b"".join(
                    struct.pack("<QIHH", gpa, length,
                                flags | (int(DescFlag.NEXT) if i < len(segments) - 1 else 0),
                                i + 1 if i < len(segments) - 1 else 0)
                    for i, (gpa, length, flags) in enumerate(segments))
                s.ram.write(table, entries)
                head = q.take_descriptors(1)[0]
                q.write_desc(head, table, len(entries), int(DescFlag.INDIRECT), 0)
                q.claim(head, descriptors=[head])
            else:
                ids = q.take_descriptors(len(segments))
                for i, (gpa, length, flags) in enumerate(segments):
                    last = i == len(segments) - 1
                    q.write_desc(ids[i], gpa, length,
                                 flags | (0 if last else int(DescFlag.NEXT)),
                                 0 if last else ids[i + 1])
                head = ids[0]
                q.claim(head, descriptors=ids)
            self.heads.append(head)

        self.tables = tables

    def release(self) -> None:
        """Give the descriptors and guest RAM back."""
        for head in self.heads:
            self.q.release(head)
        for gpa, length in self.tables:
            self.s.ram.free(gpa, length)
        self.s.ram.free(self.arena, self.arena_size)

    def run(self, timeout: float = 10.0) -> None:
        """Publish every chain with one kick and wait for all of them."""
        for head in self.heads:
            self.q.put_head(head)
        self.q.submit(force_kick=True)
        self.q.wait_used_raw(len(self.heads), timeout)

    def response_types(self) -> list[int]:
        """The response header types written by the device."""
        return [int.from_bytes(self.s.ram.read(r, 4), "little") for r in self.responses]

    def check(self, expected: Sequence[int]) -> None:
        """Raise unless every response has the expected type."""
        got = self.response_types()
        if got != list(expected):
            names = sorted({Resp(t).name if t in Resp._value2member_map_ else hex(t)
                            for t in got})
            raise RuntimeError(f"unexpected responses: {names}")


@dataclass(slots=True)
class Results:
    """Measured numbers of one back-end (None where a phase failed)."""

    name: str
    metrics: dict[str, float | None] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def percentiles(samples_ns: list[int]) -> tuple[float, float]:
    """Median and p99 in microseconds."""
    arr = np.asarray(samples_ns, dtype=np.float64) / 1000.0
    return float(np.median(arr)), float(np.percentile(arr, 99))


def backend_cpu(s: Session) -> float:
    """CPU seconds the back-end process's threads have run so far (scheduler
    statistics, nanosecond resolution): unlike wall time, hardly disturbed by other
    work on a shared machine."""
    total_ns = 0
    for task in Path(f"/proc/{s.backend.proc.pid}/task").iterdir():
        try:
            total_ns += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # a thread that just ended
            continue
    return total_ns / 1e9


class Stretches(Protocol):
    """A measurement run in as many stretches as wanted, so back-ends can take turns
    (a shared machine's speed drifts over seconds; taking turns puts every back-end
    through the same drift)."""

    def run(self, count: int) -> None:
        """Measure ``count`` more iterations."""

    def finish(self) -> dict[str, float | None]:
        """Check the answers, free what was laid out, give the metrics."""


class Latency:
    """Single GET_DISPLAY_INFO round trips."""

    def __init__(self, s: Session) -> None:
        self.s = s
        self.batch = FixedBatch(s, [cmds.get_display_info()], cmds.DISPLAY_INFO_RESP_SIZE,
                                indirect=False)
        for _ in range(20):
            self.batch.run()
        self.samples: list[int] = []
        self.cpu = 0.0

    def run(self, count: int) -> None:
        """``count`` more round trips, each timed."""
        cpu = backend_cpu(self.s)
        for _ in range(count):
            start = time.perf_counter_ns()
            self.batch.run()
            self.samples.append(time.perf_counter_ns() - start)
        self.cpu += backend_cpu(self.s) - cpu

    def finish(self) -> dict[str, float | None]:
        """Median and p99 round trip, back-end CPU per round trip."""
        self.batch.check([Resp.OK_DISPLAY_INFO])
        self.batch.release()
        median, p99 = percentiles(self.samples)
        return {"display_info_median_us": median, "display_info_p99_us": p99,
                "display_info_cpu_us": self.cpu / len(self.samples) * 1e6}


class Throughput:
    """RESOURCE_CREATE_2D + RESOURCE_UNREF pairs, 64 commands per kick."""

    def __init__(self, s: Session) -> None:
        commands = []
        for i in range(32):
            commands.append(cmds.resource_create_2d(5000 + i, Format.B8G8R8X8_UNORM, 64, 64))
            commands.append(cmds.resource_unref(5000 + i))
        self.s = s
        self.batch = FixedBatch(s, commands, cmds.NODATA_RESP_SIZE, indirect=True)
        for _ in range(5):
            self.batch.run()
        self.batch_seconds: list[float] = []  # per stretch: its seconds per batch
        self.batches, self.cpu = 0, 0.0

    def run(self, count: int) -> None:
        """``count`` more batches, timed together."""
        start, cpu = time.perf_counter(), backend_cpu(self.s)
        for _ in range(count):
            self.batch.run()
        self.batch_seconds.append((time.perf_counter() - start) / count)
        self.cpu += backend_cpu(self.s) - cpu
        self.batches += count

    def finish(self) -> dict[str, float | None]:
        """Commands per second and time per batch of the median stretch (a stretch the
        machine stalled in does not count), back-end CPU per command overall."""
        self.batch.check([Resp.OK_NODATA] * 64)
        self.batch.release()
        batch = float(np.median(self.batch_seconds))
        return {"commands_per_s": 64 / batch, "batch_us": batch * 1e6,
                "command_cpu_us": self.cpu / (self.batches * 64) * 1e6}


def take_turns(sessions: list[tuple[Results, Session]], phase: str,
               measure: Callable[[Session], Stretches], count: int, rounds: int) -> None:
    """``measure`` on every session, taking turns: ``rounds`` rounds of
    ``count / rounds`` iterations each, the order rotating every round.  A back-end
    that fails is reported and left out of the rest."""
    runs: list[tuple[Results, Stretches]] = []
    for results, s in sessions:
        try:
            runs.append((results, measure(s)))
        except Exception as exc:
            results.errors.append(f"{phase}: {type(exc).__name__}: {exc}")
    rounds = max(1, min(rounds, count))
    for n in range(rounds):
        turn = n % len(runs) if runs else 0
        share = count // rounds + (1 if n < count % rounds else 0)  # all ``count``
        for results, run in runs[turn:] + runs[:turn]:
            try:
                run.run(share)
            except Exception as exc:
                results.errors.append(f"{phase}: {type(exc).__name__}: {exc}")
                runs.remove((results, run))
    for results, run in runs:
        try:
            results.metrics.update(run.finish())
        except Exception as exc:
            results.errors.append(f"{phase}: {type(exc).__name__}: {exc}")


def bench_attach(s: Session, iterations: int) -> dict[str, float | None]:
    """ATTACH_BACKING of 16384 scattered pages, then DETACH_BACKING."""
    rid = 6000
    side = 4096  # 64 MiB image = 16384 pages
    s.gpu.create_2d(rid, Format.B8G8R8X8_UNORM, side, side).expect(Resp.OK_NODATA)
    backing = s.gpu.alloc_backing(side * side * 4)
    assert len(backing) == 16384
    attach = FixedBatch(s, [cmds.attach_backing(rid, len(backing))], cmds.NODATA_RESP_SIZE,
                        indirect=False, extra=[cmds.mem_entries(backing)])
    detach = FixedBatch(s, [cmds.detach_backing(rid)], cmds.NODATA_RESP_SIZE, indirect=False)
    attach_ns, detach_ns = [], []
    cpu = backend_cpu(s)
    for i in range(iterations + 2):
        start = time.perf_counter_ns()
        attach.run()
        middle = time.perf_counter_ns()
        attach.check([Resp.OK_NODATA])
        detach_start = time.perf_counter_ns()
        detach.run()
        end = time.perf_counter_ns()
        detach.check([Resp.OK_NODATA])
        if i >= 2:  # warm-up
            attach_ns.append(middle - start)
            detach_ns.append(end - detach_start)
    cpu = backend_cpu(s) - cpu
    attach.release()
    detach.release()
    s.gpu.unref(rid).expect(Resp.OK_NODATA)
    return {"attach_16384_median_us": percentiles(attach_ns)[0],
            "detach_median_us": percentiles(detach_ns)[0],
            "attach_detach_cpu_us": cpu / (iterations + 2) * 1e6}


def bench_frames(s: Session, frames: int) -> dict[str, float | None]:
    """Full-frame TRANSFER + FLUSH per kick until the display has the last frame."""
    image = s.gpu.create_image(WIDTH, HEIGHT)
    full = Rect(0, 0, WIDTH, HEIGHT)
    image.write_pixels(s.ram, np.zeros((HEIGHT, WIDTH, 4), dtype=np.uint8))
    s.gpu.show(image)
    display = s.display
    display.wait_count(DisplayReq.UPDATE, 1, timeout=20)
    frame = FixedBatch(s, [cmds.transfer_to_host_2d(image.resource_id, full),
                           cmds.resource_flush(image.resource_id, full)],
                       cmds.NODATA_RESP_SIZE, indirect=False)
    updates_before, bytes_before = display.count(DisplayReq.UPDATE), display.update_bytes
    start, cpu = time.perf_counter(), backend_cpu(s)
    for n in range(1, frames + 1):
        image.write(s.ram, 0, np.array([n & 0xFF, (n >> 8) & 0xFF, 0x5A, 0], dtype=np.uint8))
        frame.run(timeout=30)
    last = frames
    display.wait_for(lambda: bool(display.console.scanouts[0].surface is not None and
                                  int(display.console.scanouts[0].surface[0, 0, 0]) ==
                                  last & 0xFF and
                                  int(display.console.scanouts[0].surface[0, 0, 1]) ==
                                  (last >> 8) & 0xFF), 60, "the last frame on the display")
    elapsed, cpu = time.perf_counter() - start, backend_cpu(s) - cpu
    frame.check([Resp.OK_NODATA] * 2)
    frame.release()
    updates = display.count(DisplayReq.UPDATE) - updates_before
    moved = display.update_bytes - bytes_before
    return {"frames_per_s": frames / elapsed, "updates_per_frame": updates / frames,
            "display_mb_per_s": moved / elapsed / MiB, "frame_cpu_us": cpu / frames * 1e6}


PHASES: list[tuple[str, Callable[[Session, int], dict[str, float | None]], str]] = [
    ("attach", bench_attach, "attach_iterations"),
    ("frames", bench_frames, "frames"),
]


def start_backend(name: str, command: Sequence[str],
                  args: argparse.Namespace) -> tuple[Results, Session | None]:
    """Start one back-end and bring its device up (None: it failed, see the errors)."""
    results = Results(name)
    flavour = FLAVOURS[args.flavour]
    config = SessionConfig(flavour=flavour, ram_size=256 * MiB, timeout=30.0)
    if name == "reference" and flavour is QEMU_7_2:
        config.drop_guest_features = int(Feature.EDID)  # else the reference exits (no EDID)
    try:
        process = BackendProcess(command, name=name)
    except RuntimeError as exc:
        results.errors.append(f"start: {exc}")
        return results, None
    s = Session(process, config)
    try:
        s.realize()
        s.probe()
        s.driver_ok()
    except Exception as exc:
        results.errors.append(f"session: {type(exc).__name__}: {exc}")
        s.close(expect_exit=None)
        return results, None
    return results, s


def run_phase(results: Results, s: Session, phase: str,
              bench: Callable[[Session, int], dict[str, float | None]], count: int) -> None:
    """One phase on one back-end; a failure is reported and the next phase runs."""
    try:
        results.metrics.update(bench(s, count))
    except Exception as exc:
        results.errors.append(f"{phase}: {type(exc).__name__}: {exc}")


def stop_backend(results: Results, s: Session) -> None:
    """Close the session; the back-end's exit status becomes a metric."""
    try:
        results.metrics["exit_status"] = s.close(exit_timeout=20)
    except Exception as exc:
        results.errors.append(f"session: {type(exc).__name__}: {exc}")
        s.close(expect_exit=None)


def run_backends(commands: dict[str, list[str]], wanted: list[str],
                 args: argparse.Namespace) -> list[Results]:
    """Every phase on every back-end (the floors: throughput only), all of them up
    at once; latency and throughput take turns (:func:`take_turns`), the others run
    one back-end after the other."""
    started = [start_backend(name, commands[name], args) for name in wanted]
    live = [(results, s) for results, s in started if s is not None]
    try:
        devices = [(results, s) for results, s in live if not results.name.startswith("floor")]
        take_turns(devices, "latency", Latency, args.latency_iterations, args.rounds)
        take_turns(live, "throughput", Throughput, args.batches, args.rounds)
        for phase, bench, option in PHASES:
            for results, s in devices:
                run_phase(results, s, phase, bench, int(getattr(args, option)))
    finally:
        for results, s in live:
            stop_backend(results, s)
    return [results for results, _ in started]


ROWS = [
    ("display_info_median_us", "GET_DISPLAY_INFO round trip, median", "us", False),
    ("display_info_p99_us", "GET_DISPLAY_INFO round trip, p99", "us", False),
    ("display_info_cpu_us", "  back-end CPU per round trip", "us", False),
    ("commands_per_s", "CREATE_2D+UNREF, 64 per kick", "cmd/s", True),
    ("batch_us", "  time per 64-command batch", "us", False),
    ("command_cpu_us", "  back-end CPU per command", "us", False),
    ("attach_16384_median_us", "ATTACH_BACKING 16384 entries, median", "us", False),
    ("detach_median_us", "DETACH_BACKING, median", "us", False),
    ("attach_detach_cpu_us", "  back-end CPU per attach+detach", "us", False),
    ("frames_per_s", "1280x800 TRANSFER+FLUSH", "frames/s", True),
    ("updates_per_frame", "  display UPDATEs per frame", "", True),
    ("display_mb_per_s", "  display socket throughput", "MiB/s", True),
    ("frame_cpu_us", "  back-end CPU per frame", "us", False),
]


def print_table(all_results: list[Results]) -> None:
    """Absolute numbers per back-end and the ours/reference ratio."""
    by_name = {r.name: r for r in all_results}
    names = [r.name for r in all_results]
    header = f"{'metric':<40} {'unit':<9}" + "".join(f"{n:>14}" for n in names)
    ratios = [n for n in names if n != "reference"] if "reference" in by_name else []
    widths = {n: max(12, len(n) + 6) for n in ratios}
    header += "".join(f"{n + '/ref':>{widths[n]}}" for n in ratios)
    print(header)
    print("-" * len(header))
    for key, label, unit, _higher_better in ROWS:
        cells = []
        for n in names:
            value = by_name[n].metrics.get(key)
            cells.append(f"{value:>14.1f}" if value is not None else f"{'n/a':>14}")
        line = f"{label:<40} {unit:<9}" + "".join(cells)
        ref = by_name["reference"].metrics.get(key) if ratios else None
        for n in ratios:
            value = by_name[n].metrics.get(key)
            width = widths[n]
            line += f"{value / ref:>{width}.2f}" if value is not None and ref else " " * width
        print(line)
    print("(latency includes the display-socket round trip to the simulated QEMU; "
          "ours/ref > 1 means more time or more throughput for ours; polled: ours with "
          "--poll-max-us; floor: our process with the batches answered by a loop with no "
          "checks, the throughput phase only)")
    for r in all_results:
        for err in r.errors:
            print(f"{r.name}: {err}", file=sys.stderr)


def checkout_command(checkout: Path) -> list[str]:
    """``python -m vgpu_backend`` with the packages of another checkout first."""
    path = str(checkout.resolve())
    return [sys.executable, "-c", f"import runpy, sys; sys.path.insert(0, {path!r}); "
            "runpy.run_module('vgpu_backend', run_name='__main__', alter_sys=True)",
            "--socket-path", "{socket}"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, run the chosen back-ends, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--backends", default="ours,polled,reference,floor,floor-polled",
                        help="comma-separated: ours, polled, reference, floor, floor-polled "
                        "(default all five; floor: the throughput phase only, see "
                        "FLOOR_BACKEND)")
    parser.add_argument("--poll-max-us", type=int, default=500,
                        help="--poll-max-us of polled and floor-polled (default 500)")
    parser.add_argument("--reference-binary", default=REFERENCE_BINARY)
    parser.add_argument("--flavour", default="10.x", choices=sorted(FLAVOURS))
    parser.add_argument("--latency-iterations", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=10,
                        help="turns of the latency and throughput phases: each back-end "
                        "runs 1/ROUNDS of the iterations per round (default 10)")
    parser.add_argument("--attach-iterations", type=int, default=20)
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--checkout", action="append", default=[], type=Path,
                        metavar="PATH", help="also run the vgpu-backend of another "
                        "checkout (a git worktree of an older commit, say) as back-end "
                        "ours@NAME, NAME its directory's name (repeatable; add it to "
                        "--backends to choose it, as by default)")
    parser.add_argument("--json", action="store_true", help="also print JSON results")
    args = parser.parse_args(argv)
    commands = {"ours": list(OURS_COMMAND),
                "polled": [*OURS_COMMAND, "--poll-max-us", str(args.poll_max_us)],
                "reference": [args.reference_binary, "--socket-path", "{socket}"],
                "floor": [sys.executable, str(FLOOR_BACKEND), "--socket-path", "{socket}"]}
    commands["floor-polled"] = [*commands["floor"], "--poll-max-us", str(args.poll_max_us)]
    checkouts = {f"ours@{Path(os.path.abspath(c)).name}": c for c in args.checkout}
    if len(checkouts) < len(args.checkout):
        parser.error("--checkout: two checkouts in directories of the same name")
    for name, checkout in checkouts.items():
        commands[name] = checkout_command(checkout)
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    wanted += [name for name in checkouts if name not in wanted]
    unknown = set(wanted) - set(commands)
    if unknown:
        parser.error(f"unknown back-ends {sorted(unknown)}")
    all_results = run_backends(commands, wanted, args)
    print_table(all_results)
    if args.json:
        print(json.dumps({r.name: {"metrics": r.metrics, "errors": r.errors}
                          for r in all_results}, indent=2))
    return 0 if all(not r.errors for r in all_results) else 1


if __name__ == "__main__":
    sys.exit(main())
