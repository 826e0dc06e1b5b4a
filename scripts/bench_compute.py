#!/usr/bin/env python3
"""Benchmark: compute on zero-copy USERPTR blobs against the copy path and plain numpy.

The real back-end process is driven by the front-end simulator (``tests/frontend``:
memfd guest RAM).  For every size the guest's buffers are laid out the way a guest
hands them over -- ``thp``: 2 MiB-aligned 2 MiB runs in random order (transparent huge
pages), ``4k``: scattered 4 KiB pages -- and used three ways:

* userptr: the pages registered once as USERPTR blobs (HOST3D_GUEST; inputs
  USERPTR_RDONLY) and mapped into a compute context; timed: one fenced SUBMIT_3D
  running the kernel, from the kick to its completion;
* copy: the same pages as backing of RESOURCE_CREATE_3D host buffers; timed: one kick
  of TRANSFER_TO_HOST_3D (inputs), the fenced SUBMIT_3D on the host buffers and
  TRANSFER_FROM_HOST_3D (output).  The transfers alone, timed as one kick, are the copy
  cost; the SUBMIT alone is the kernel on host-owned memory (``hostbuf``);
* numpy: the same kernel on private arrays in this process (the baseline).

Kernels: SAXPY_F32 (y = a*x + y; 12 bytes touched per element) and MATMUL_F32
(n x n; 2 n^3 flop).  Every path is checked once against numpy, then the paths are
timed in interleaved rounds, caches flushed before every run; medians are reported from
wall-clock time and from CPU time (the back-end's threads via ``/proc``, or this
process), which a shared machine disturbs less.  BLAS runs one thread in both processes
unless ``OPENBLAS_NUM_THREADS`` says otherwise.  The back-end gets
``--max-backing-entries`` large enough for ATTACH_BACKING of scattered pages (QEMU's
16384 would stop the 4k copy path at 64 MiB).

    python3 scripts/bench_compute.py [--sizes 1,4,16,64,256] [--matmul-sizes 512,...]
        [--layouts thp,4k] [--repeat 7] [--matmul-repeat 3] [--plot PATH] [--json PATH]
        [--from-json PATH] [--backend-args="--sim-pre-batch ..."]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

# One BLAS thread in this process and the back-end (which inherits the environment) unless
# the caller says otherwise: on 2 shared cores a multithreaded BLAS stalls whenever a
# sibling thread is descheduled, which swamps the differences measured here.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchkit.compute_report import (
    LAYOUTS,
    Row,
    plot,
    print_cpu_table,
    print_setup,
    print_table,
    print_targets,
)
from vmrunner.errors import HarnessError
from vmrunner.hugepages import HugePageReservation

from protocol.compute import (
    Dispatch,
    Kernel,
    KernelArg,
    MapResource,
    Op,
    buffer_arg,
    encode_command,
    encode_stream,
    f32_arg,
    u64_arg,
)
from protocol.virtio_gpu import (
    CTRL_HDR_SIZE,
    CtrlHdr,
    CtxCreate,
    MemEntry,
    ResourceCreate3d,
    ResourceCreateBlob,
    Submit3d,
    TransferHost3d,
)
from protocol.virtio_gpu_codes import BlobFlag, BlobMem, Cmd, CtrlFlag, Resp
from protocol.virtqueue import DescFlag
from protocol.wire import encode, layout
from tests.frontend import gpu_commands as cmds
from tests.frontend.backend_process import OURS_COMMAND, BackendProcess
from tests.frontend.session import Session, SessionConfig

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
PAGE = 4096
HUGE = 2 * MiB
CTX = 1
RESULTS_RID = 1
ALPHA = 0.5
TIMEOUT = 600.0
F32 = npt.NDArray[np.float32]
DEVICE_PATHS = ("userptr", "copy", "xfer", "hostbuf")
ROUND_BUDGET = 1.5  # seconds of timed runs per case, at least --repeat rounds
MAX_REPEAT_FACTOR = 5
EVICT_BYTES = 64 * MiB  # read before every timed run: twice the 32 MiB L3 here
BLOCK = HUGE // 4  # floats per piece of the SAXPY baseline: the engine's piece at 2 MiB runs


_EVICT = np.ones(EVICT_BYTES // 8, dtype=np.float64)


def evict() -> None:
    """Push earlier runs' data out of the caches (a read pass: no dirty lines left)."""
    float(np.add.reduce(_EVICT))


def cpu_ns(pid: int) -> int:
    """Nanoseconds on CPU of every thread of a process (``/proc/PID/task/*/schedstat``)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # the thread ended
    return total


# --- guest side --------------------------------------------------------------------------


@dataclass(slots=True)
class GuestBuffer:
    """Guest pages of one buffer, in buffer order, and the allocations to free."""

    pages: npt.NDArray[np.int64]
    allocations: list[tuple[int, int]]

    def entries(self) -> tuple[bytes, int]:
        """The mem entries (guest-physically adjacent pages coalesced, as Linux does)."""
        starts = np.flatnonzero(np.diff(self.pages, prepend=-2) != 1)
        lengths = np.diff(np.append(starts, self.pages.size))
        table = np.zeros(starts.size, dtype=layout(MemEntry).dtype)
        table["addr"] = self.pages[starts] * PAGE
        table["length"] = lengths * PAGE
        return table.tobytes(), int(starts.size)


class Batch:
    """Commands laid out once in guest RAM, re-submitted unchanged with one kick."""

    def __init__(self, s: Session, commands: Sequence[bytes]) -> None:
        self.s, self.q = s, s.queues[0]
        self.heads: list[int] = []
        self.responses: list[int] = []
        self.allocations: list[tuple[int, int]] = []
        for command in commands:
            gpa = s.ram.alloc_contiguous(len(command) + CTRL_HDR_SIZE)
            self.allocations.append((gpa, len(command) + CTRL_HDR_SIZE))
            s.ram.write(gpa, command)
            ids = self.q.take_descriptors(2)
            self.q.write_desc(ids[0], gpa, len(command), int(DescFlag.NEXT), ids[1])
            self.q.write_desc(ids[1], gpa + len(command), CTRL_HDR_SIZE,
                              int(DescFlag.WRITE), 0)
            self.q.claim(ids[0], descriptors=ids)
            self.heads.append(ids[0])
            self.responses.append(gpa + len(command))

    def run(self) -> tuple[float, float]:
        """Submit every command with one kick and wait until all completed OK; wall
        seconds, and CPU seconds the back-end process spent meanwhile."""
        for resp in self.responses:
            self.s.ram.write(resp, b"\xa5\xa5\xa5\xa5")
        cpu_start = cpu_ns(self.s.backend.proc.pid)
        start = time.perf_counter()
        for head in self.heads:
            self.q.put_head(head)
        self.q.submit(force_kick=True)
        self.q.wait_used_raw(len(self.heads), TIMEOUT)
        elapsed = time.perf_counter() - start
        cpu = (cpu_ns(self.s.backend.proc.pid) - cpu_start) / 1e9
        got = [int.from_bytes(self.s.ram.read(r, 4), "little") for r in self.responses]
        if any(code != Resp.OK_NODATA for code in got):
            raise RuntimeError(f"responses {[hex(c) for c in got]}: "
                               f"{self.s.backend.stderr[-1500:]}")
        return elapsed, cpu

    def release(self) -> None:
        """Give the descriptors and guest RAM back."""
        for head in self.heads:
            self.q.release(head)
        for gpa, length in self.allocations:
            self.s.ram.free(gpa, length)


def header(cmd: int, *, fenced: bool = False) -> bytes:
    """A control header in the compute context."""
    return encode(CtrlHdr(cmd, int(CtrlFlag.FENCE) if fenced else 0, 1 if fenced else 0,
                          CTX))


def submit(commands: list[bytes], result_rid: int = 0) -> bytes:
    """A fenced SUBMIT_3D of a compute stream."""
    stream = encode_stream(commands, result_rid, 0)
    return header(Cmd.SUBMIT_3D, fenced=True) + encode(Submit3d(len(stream))) + stream


def transfer(cmd: int, rid: int, nbytes: int) -> bytes:
    """TRANSFER_TO_HOST_3D / TRANSFER_FROM_HOST_3D of a whole buffer."""
    return header(cmd) + encode(TransferHost3d(0, 0, 0, nbytes, 1, 1, 0, rid, 0, 0, 0))


class Guest:
    """The guest driver side: context, buffers, resources."""

    def __init__(self, s: Session, seed: int) -> None:
        self.s = s
        self.ram_pages = s.ram.bytes.reshape(-1, PAGE)
        self.rng = np.random.default_rng(seed)
        self.next_rid = 100
        self.run(header(Cmd.CTX_CREATE) + encode(CtxCreate(5, 0, b"bench".ljust(64, b"\0"))))
        self.results = self.alloc(PAGE, "thp")
        self.userptr(RESULTS_RID, self.results, readonly=False)

    def run(self, command: bytes, extra: bytes = b"") -> float:
        """One command, checked to succeed; seconds it took."""
        start = time.perf_counter()
        resp = self.s.gpu.run(command, extra_out=extra)
        elapsed = time.perf_counter() - start
        if resp.type != Resp.OK_NODATA:
            raise RuntimeError(f"{resp.type_name}: {self.s.backend.stderr[-1500:]}")
        return elapsed

    def alloc(self, nbytes: int, layout_name: str) -> GuestBuffer:
        """Guest pages for ``nbytes`` in the given layout (zeroed)."""
        npages = -(-nbytes // PAGE)
        ram = self.s.ram
        if layout_name == "4k":
            gpas = np.array(ram.alloc_scattered(npages), dtype=np.int64)
            return GuestBuffer(gpas // PAGE, [(int(g), PAGE) for g in gpas])
        chunk = min(HUGE, npages * PAGE) // PAGE
        span = npages * PAGE + HUGE
        base = ram.alloc_contiguous(span)
        first = -(-base // HUGE) * HUGE // PAGE
        order = self.rng.permutation(-(-npages // chunk))
        pages = (first + order[:, None] * chunk + np.arange(chunk)).reshape(-1)[:npages]
        return GuestBuffer(pages.astype(np.int64), [(base, span)])

    def free(self, buf: GuestBuffer) -> None:
        """Return a buffer's pages."""
        for gpa, length in buf.allocations:
            self.s.ram.free(gpa, length)

    def write(self, buf: GuestBuffer, data: npt.NDArray[np.generic]) -> None:
        """Store ``data`` in the buffer (the guest program filling its memory)."""
        raw = np.zeros(buf.pages.size * PAGE, dtype=np.uint8)
        raw[:data.nbytes] = data.reshape(-1).view(np.uint8)
        self.ram_pages[buf.pages] = raw.reshape(-1, PAGE)

    def read(self, buf: GuestBuffer, nbytes: int) -> npt.NDArray[np.uint8]:
        """The buffer's first ``nbytes``."""
        return self.ram_pages[buf.pages].reshape(-1)[:nbytes]

    def new_rid(self) -> int:
        """A fresh resource id."""
        self.next_rid += 1
        return self.next_rid

    def userptr(self, rid: int, buf: GuestBuffer, *, readonly: bool) -> tuple[float, int]:
        """RESOURCE_CREATE_BLOB USERPTR; seconds and entry count."""
        entries, count = buf.entries()
        flags = BlobFlag.USE_USERPTR | (BlobFlag.USERPTR_RDONLY if readonly else 0)
        body = ResourceCreateBlob(rid, BlobMem.HOST3D_GUEST, int(flags), count, 0,
                                  buf.pages.size * PAGE)
        return self.run(header(Cmd.RESOURCE_CREATE_BLOB) + encode(body), entries), count

    def host_buffer(self, rid: int, buf: GuestBuffer, nbytes: int) -> float:
        """RESOURCE_CREATE_3D (PIPE_BUFFER) + ATTACH_BACKING of the pages; seconds."""
        entries, count = buf.entries()
        took = self.run(header(Cmd.RESOURCE_CREATE_3D) +
                        encode(ResourceCreate3d(rid, 0, 0, 0, nbytes, 1, 1, 1, 0, 0, 0, 0)))
        return took + self.run(cmds.attach_backing(rid, count), entries)

    def map(self, rids: list[int]) -> list[int]:
        """MAP_RESOURCE every resource; their GPU VAs."""
        self.run(submit([encode_command(Op.MAP_RESOURCE, MapResource(rid), i)
                         for i, rid in enumerate(rids)], RESULTS_RID))
        raw = self.read(self.results, 32 + 16 * len(rids))
        return [int(raw[40 + 16 * i:48 + 16 * i].view(np.uint64)[0]) for i in range(len(rids))]

    def unref(self, rid: int) -> None:
        """RESOURCE_UNREF."""
        self.run(cmds.resource_unref(rid))


# --- workloads ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Operand:
    """A kernel buffer: initial contents and how the copy path moves it."""

    name: str
    data: F32
    upload: bool
    download: bool


@dataclass(slots=True)
class Workload:
    """One kernel at one size."""

    kernel: str
    size_mib: float  # per vector / per matrix
    label: str
    work: float  # bytes touched or flop per run
    operands: list[Operand]
    dispatch: Callable[[dict[str, int]], bytes]
    #: "numpy" (the baseline) and optional further references, run in this process
    baselines: dict[str, Callable[[], None]]
    check: Callable[[npt.NDArray[np.uint8]], bool]


def saxpy(mib: float, rng: np.random.Generator) -> Workload:
    """y = a*x + y over ``mib`` MiB per vector."""
    n = int(mib * MiB) // 4
    x, y = rng.random(n, dtype=np.float32), rng.random(n, dtype=np.float32)
    alpha = np.float32(ALPHA)
    expected = y + x * alpha
    px, py, tmp = x.copy(), y.copy(), np.zeros_like(x)  # private arrays of the baseline

    def blocked() -> None:  # the engine's kernel over 2 MiB pieces, scratch reused
        for lo in range(0, n, BLOCK):
            xs, ys, ts = px[lo:lo + BLOCK], py[lo:lo + BLOCK], tmp[:BLOCK]
            np.multiply(xs, alpha, out=ts[:xs.shape[0]])
            np.add(ys, ts[:xs.shape[0]], out=ys)

    def whole() -> None:  # the same over the whole array at once
        np.multiply(px, alpha, out=tmp)
        np.add(py, tmp, out=py)

    def dispatch(va: dict[str, int]) -> bytes:
        args = (buffer_arg(va["y"]), buffer_arg(va["x"]), u64_arg(n), f32_arg(ALPHA))
        return encode_command(Op.DISPATCH, Dispatch(Kernel.SAXPY_F32, 4), 1, args)

    return Workload("saxpy", mib, f"{mib:g} MiB", 12.0 * n,
                    [Operand("x", x, True, False), Operand("y", y, True, True)],
                    dispatch, {"numpy": blocked, "np-whole": whole},
                    lambda out: bool(np.array_equal(out.view(np.float32), expected)))


def matmul(n: int, rng: np.random.Generator) -> Workload:
    """c = a @ b, n x n float32."""
    a, b = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    pa, pb, pc = a.copy(), b.copy(), np.zeros((n, n), dtype=np.float32)
    expected = a @ b

    def baseline() -> None:
        np.matmul(pa, pb, out=pc)

    def dispatch(va: dict[str, int]) -> bytes:
        args: tuple[KernelArg, ...] = (buffer_arg(va["c"]), buffer_arg(va["a"]),
                                       buffer_arg(va["b"]), u64_arg(n), u64_arg(n), u64_arg(n))
        return encode_command(Op.DISPATCH, Dispatch(Kernel.MATMUL_F32, 6), 1, args)

    def check(out: npt.NDArray[np.uint8]) -> bool:
        return bool(np.allclose(out.view(np.float32).reshape(n, n), expected, rtol=1e-4,
                                atol=1e-3))

    return Workload("matmul", n * n * 4 / MiB, f"{n}x{n}", 2.0 * n ** 3,
                    [Operand("a", a, True, False), Operand("b", b, True, False),
                     Operand("c", np.zeros((n, n), np.float32), False, True)],
                    dispatch, {"numpy": baseline}, check)


# --- measuring ---------------------------------------------------------------------------


def measure(g: Guest, w: Workload, layout_name: str, repeat: int) -> Row:
    """Set both paths up, check them once, time all paths interleaved, tear down."""
    bufs = {op.name: g.alloc(op.data.nbytes, layout_name) for op in w.operands}
    uptr = {op.name: g.new_rid() for op in w.operands}
    host = {op.name: g.new_rid() for op in w.operands}
    row = Row(w.kernel, layout_name, w.label, w.size_mib, w.work, 0)
    batches: dict[str, Batch] = {}
    try:
        for op in w.operands:
            g.write(bufs[op.name], op.data)
            took, count = g.userptr(uptr[op.name], bufs[op.name], readonly=not op.download)
            row.setup_userptr_s += took
            row.entries = max(row.entries, count)
            row.setup_copy_s += g.host_buffer(host[op.name], bufs[op.name], op.data.nbytes)
        vas = g.map(list(uptr.values()) + list(host.values()))
        uva = dict(zip(uptr, vas[:len(uptr)], strict=True))
        hva = dict(zip(host, vas[len(uptr):], strict=True))
        ups = [transfer(Cmd.TRANSFER_TO_HOST_3D, host[o.name], o.data.nbytes)
               for o in w.operands if o.upload]
        downs = [transfer(Cmd.TRANSFER_FROM_HOST_3D, host[o.name], o.data.nbytes)
                 for o in w.operands if o.download]
        on_host = submit([w.dispatch(hva)])
        batches = {"userptr": Batch(g.s, [submit([w.dispatch(uva)])]),
                   "copy": Batch(g.s, [*ups, on_host, *downs]),
                   "xfer": Batch(g.s, [*ups, *downs]),
                   "hostbuf": Batch(g.s, [on_host])}
        out = next(o for o in w.operands if o.download)
        warm = 0.0
        for path in ("userptr", "copy"):  # correctness, and warm-up
            for op in w.operands:
                g.write(bufs[op.name], op.data)
            warm += batches[path].run()[0]
            if not w.check(g.read(bufs[out.name], out.data.nbytes)):
                raise RuntimeError(f"{w.kernel} {w.label} {layout_name}: wrong {path} result")
        batches["hostbuf"].run()
        for fn in w.baselines.values():
            fn()
        # small cases: more rounds (about ROUND_BUDGET s in all), for robust medians
        repeat = max(repeat, min(MAX_REPEAT_FACTOR * repeat, int(ROUND_BUDGET / (2 * warm))))
        paths = [*w.baselines, *DEVICE_PATHS]
        row.wall, row.cpu = {p: [] for p in paths}, {p: [] for p in paths}
        for _ in range(repeat):
            for name, fn in w.baselines.items():
                evict()
                start, cpu_start = time.perf_counter(), time.process_time()
                fn()
                row.wall[name].append(time.perf_counter() - start)
                row.cpu[name].append(time.process_time() - cpu_start)
            for path in DEVICE_PATHS:
                evict()
                wall, cpu = batches[path].run()
                row.wall[path].append(wall)
                row.cpu[path].append(cpu)
    finally:
        for batch in batches.values():
            batch.release()
        for rid in [*uptr.values(), *host.values()]:
            g.unref(rid)
        for buf in bufs.values():
            g.free(buf)
    return row


# --- main ---------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def run(args: argparse.Namespace, layouts: list[str]) -> tuple[list[str], float, list[Row]]:
    """Start the back-end, measure every workload in every layout; the back-end command,
    the empty SUBMIT round trip (us) and the rows."""
    per_case = [2 * v * MiB for v in args.sizes] + [3 * 4 * n * n for n in args.matmul_sizes]
    largest = max(per_case, default=MiB)
    ram = int((2 if "4k" in layouts else 1) * largest + 3 * HUGE + 64 * MiB)
    ram = -(-ram // HUGE) * HUGE
    max_pages = int(max(max([*args.sizes, 0]) * MiB, 4 * max([*args.matmul_sizes, 0]) ** 2)
                    // PAGE)
    command = [*OURS_COMMAND, "--max-backing-entries", str(max(16384, max_pages)),
               *shlex.split(args.backend_args)]
    rng = np.random.default_rng(args.seed)
    workloads = [saxpy(v, rng) for v in args.sizes] + [matmul(n, rng) for n in args.matmul_sizes]

    hugetlb = args.guest_ram == "hugetlb"
    print(f"guest RAM {ram // MiB} MiB ({args.guest_ram})", file=sys.stderr)
    try:
        reservation = HugePageReservation(ram // MiB) if hugetlb else None
    except HarnessError as err:
        raise SystemExit(f"{err} (or use --guest-ram shmem)") from None
    s = Session(BackendProcess(command, name="ours"),
                SessionConfig(ram_size=ram, ctrl_size=256, timeout=TIMEOUT, hugetlb=hugetlb))
    rows: list[Row] = []
    try:
        s.realize()
        s.probe()
        s.driver_ok()
        g = Guest(s, args.seed)
        empty = Batch(s, [submit([])])
        rtt = statistics.median(empty.run()[0] for _ in range(200)) * 1e6
        empty.release()
        for layout_name in layouts:
            for w in workloads:
                repeat = args.repeat if w.kernel == "saxpy" else args.matmul_repeat
                print(f"{w.kernel} {w.label} {layout_name} ...", file=sys.stderr, flush=True)
                rows.append(measure(g, w, layout_name, repeat))
        s.close(exit_timeout=60)
    except BaseException:
        s.close(expect_exit=None)
        raise
    finally:
        if reservation is not None:
            reservation.release()
    return command, rtt, rows


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, run every workload in every layout, print, plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--sizes", type=_floats, default=[1, 4, 16, 64, 256],
                        help="SAXPY MiB per vector (default 1,4,16,64,256)")
    parser.add_argument("--matmul-sizes", type=_ints, default=[512, 1024, 2048, 4096],
                        help="MATMUL n, multiples of 32 (default 512,1024,2048,4096)")
    parser.add_argument("--layouts", default="thp,4k", help="thp, 4k (default both)")
    parser.add_argument("--repeat", type=int, default=7, help="timed SAXPY runs per path")
    parser.add_argument("--matmul-repeat", type=int, default=3, help="timed MATMUL runs")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "compute-throughput.png",
                        help="PNG to write ('' for none)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--from-json", type=Path,
                        help="print and plot the results saved by --json, without measuring")
    parser.add_argument("--backend-args", default="", help="extra back-end options")
    parser.add_argument("--guest-ram", choices=("hugetlb", "shmem"), default="hugetlb",
                        help="guest RAM backing: 2 MiB huge pages like QEMU's "
                             "memory-backend-memfd,hugetlb=on (default; reserves "
                             "vm.nr_hugepages when root), or 4 KiB shmem pages")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    layouts = [v.strip() for v in args.layouts.split(",") if v.strip()]
    if set(layouts) - set(LAYOUTS):
        parser.error(f"layouts are {', '.join(LAYOUTS)}")
    if any(n <= 0 or n % 32 for n in args.matmul_sizes) or \
            any(v <= 0 or v * MiB % PAGE for v in args.sizes):
        parser.error("sizes must be whole pages and matmul n a multiple of 32")

    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        command, rtt = saved["command"], saved["empty_submit_us"]
        rows = [Row(**r) for r in saved["rows"]]
        header = f"(from {args.from_json}) "
    else:
        command, rtt, rows = run(args, layouts)
        header = ""
        if args.json:
            args.json.write_text(json.dumps({"command": command, "empty_submit_us": rtt,
                                             "rows": [asdict(r) for r in rows]}, indent=1))
    print(f"{header}back-end: {' '.join(command[1:])}; empty fenced SUBMIT_3D round trip "
          f"{rtt:.0f} us (median)\n")
    print_table(rows)
    print()
    print_cpu_table(rows)
    print_setup(rows)
    print_targets(rows)
    if str(args.plot) not in ("", "."):
        plot(rows, args.plot)
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
