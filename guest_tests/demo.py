"""USERPTR demo: a guest program lends its own memory to the host GPU engine, zero copies.

The program allocates one plain buffer (anonymous memory, transparent huge pages when
available), fills it with numpy, pins it, and registers it as a USERPTR blob through the
userspace virtio-gpu driver.  The host engine then runs SAXPY and a float32 matrix
multiply directly on those pages; the program verifies the results in its own memory
and prints what it took.  No transfer command is ever sent.

Run in the scripts/vm.py guest (as root, with ``--second-gpu``)::

    python3 -m guest_tests.demo [--size-mib N] [--matmul N] [--saxpy-rounds N]

``scripts/vm.py demo`` boots the guest with ``vgpu.mode=demo`` and runs it.  Its lines
also go to the guest console (the first GPU, driven by the same back-end), and at the end
it asks the host for a screendump of that console.  Exit status: 0 verified, 1
verification failed (or an error), 2 bad arguments, 77 the device cannot run it (no
USERPTR).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from guest_tests.guest_helpers import ControlChannel, GuestEnvironment, Screendumps
from guest_tests.userspace.compute import ComputeContext, RunResult, discover_capsets, dispatch
from guest_tests.userspace.gpu import VirtioGpu
from guest_tests.userspace.pinned import PinnedBuffer
from protocol.capsets import HostBackend, HostPath, UserptrCapFlag
from protocol.compute import Kernel, Status, buffer_arg, f32_arg, u64_arg

EXIT_OK, EXIT_FAILED, EXIT_UNSUPPORTED = 0, 1, 77  # 77: automake's "skipped"
MiB = 1 << 20
SAXPY_ALPHA = 0.5
Floats = npt.NDArray[Any]


def _open_console() -> Any:
    try:
        return open("/dev/tty0", "w", encoding="utf-8")
    except OSError:
        return None


_CONSOLE = _open_console()


def say(message: str) -> None:
    """One progress line, on the serial log (streamed by the host) and the screen."""
    line = f"demo: {message}"
    print(line, flush=True)
    if _CONSOLE is not None:
        try:
            _CONSOLE.write(line + "\n")
            _CONSOLE.flush()
        except OSError:
            pass


def _screenshot() -> None:
    """Ask the host for a screendump of the console (RESULTS/screendumps/demo.png)."""
    env = GuestEnvironment.from_environ()
    if env is None or not env.control_port:
        return
    channel = ControlChannel(env.control_port)
    try:
        Screendumps(channel, env.results_dir).png("demo")
    except (OSError, RuntimeError) as error:
        print(f"demo: no screenshot: {error}", flush=True)
    finally:
        channel.close()


@dataclass
class Phases:
    """Wall time per phase, in order."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        say(f"[{name}] ...")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - start
            say(f"[{name}] {self.seconds[name]:.2f} s")


@dataclass(frozen=True)
class Layout:
    """Where each array lives in the one buffer (byte offsets, 4 KiB aligned)."""

    vector: int  # float32 per SAXPY vector
    dim: int  # matrices are dim x dim float32

    @staticmethod
    def fit(total: int, dim: int) -> Layout:
        """Matrices first; the rest split between x and y."""
        matrix = 4 * dim * dim
        vector_bytes = (total - 3 * _page(matrix)) // 2 // 4096 * 4096
        if vector_bytes < 4096:
            raise ValueError(f"{total >> 20} MiB cannot hold three {dim}x{dim} matrices")
        return Layout(vector_bytes // 4, dim)

    @property
    def offsets(self) -> dict[str, int]:
        """x, y, a, b, c -> byte offset."""
        vector, matrix = _page(4 * self.vector), _page(4 * self.dim * self.dim)
        return {"x": 0, "y": vector, "a": 2 * vector, "b": 2 * vector + matrix,
                "c": 2 * vector + 2 * matrix}

    @property
    def size(self) -> int:
        """Bytes the arrays need."""
        return self.offsets["c"] + _page(4 * self.dim * self.dim)


def _page(nbytes: int) -> int:
    return -(-nbytes // 4096) * 4096


def _rate(nbytes: float, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f} GB/s" if seconds > 0 else "n/a"


def _check(result: RunResult, what: str) -> RunResult:
    if result.status is not Status.OK:
        raise RuntimeError(f"{what}: {result.status.name} at command "
                           f"{result.header.failed_index} (fault {result.header.fault_address:#x})")
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The demo's options."""
    parser = argparse.ArgumentParser(prog="guest_tests.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--pci", default=os.environ.get("VGPU_USERSPACE_PCI", ""),
                        help="PCI address of the unbound virtio-gpu (default: "
                             "$VGPU_USERSPACE_PCI, else the first unbound one)")
    parser.add_argument("--size-mib", type=int, default=128,
                        help="size of the program's buffer (default: %(default)s)")
    parser.add_argument("--matmul", type=int, default=768, metavar="N",
                        help="N x N x N float32 matrix multiply (default: %(default)s)")
    parser.add_argument("--saxpy-rounds", type=int, default=8,
                        help="y = a*x + y this many times (default: %(default)s)")
    parser.add_argument("--no-thp", action="store_true",
                        help="4 KiB pages only (many scattered entries)")
    args = parser.parse_args(argv)
    try:
        Layout.fit(args.size_mib * MiB, args.matmul)
    except ValueError as error:
        parser.error(str(error))
    if args.saxpy_rounds < 1:
        parser.error("--saxpy-rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the demo; the exit status says whether the results verified."""
    args = parse_args(argv)
    try:
        return _main(args)
    except Exception as error:  # reported as a failed demo, with the traceback
        traceback.print_exc()
        say(f"FAILED: {type(error).__name__}: {error}")
        return EXIT_FAILED
    finally:
        time.sleep(0.3)  # let fbcon draw the last lines before the screendump
        _screenshot()


def _main(args: argparse.Namespace) -> int:
    phases = Phases()
    layout = Layout.fit(args.size_mib * MiB, args.matmul)
    with phases("driver init"):
        gpu = VirtioGpu(args.pci)
        capsets = discover_capsets(gpu)
    try:
        cap = capsets.userptr
        if cap is None or capsets.compute is None or capsets.compute_id is None:
            say(f"the device at {gpu.function.address} publishes no userptr/compute capset "
                f"(capsets {sorted(capsets.raw)}): its back-end has no USERPTR blobs")
            return EXIT_UNSUPPORTED
        flags = UserptrCapFlag(cap.flags)
        host_path = HostPath(cap.host_path).name.lower().replace("_", "-")
        say(f"device {gpu.function.address}: userptr protocol v{cap.protocol}, host path "
            f"{host_path} on {HostBackend(cap.host_backend).name} ({cap.num_gpus} GPU), "
            f"zero-copy {'yes' if UserptrCapFlag.ZERO_COPY in flags else 'NO'}")
        return _run(gpu, capsets.compute_id, layout, args, phases, host_path)
    finally:
        gpu.close()


def _run(gpu: VirtioGpu, compute_id: int, layout: Layout, args: argparse.Namespace,
         phases: Phases, host_path: str) -> int:
    n, dim, offsets = layout.vector, layout.dim, layout.offsets
    with phases("buffer setup"):
        buffer = PinnedBuffer(layout.size, huge=not args.no_thp)
        x = buffer.view(np.float32, n, offsets["x"])
        y = buffer.view(np.float32, n, offsets["y"])
        a = buffer.view(np.float32, dim * dim, offsets["a"]).reshape(dim, dim)
        b = buffer.view(np.float32, dim * dim, offsets["b"]).reshape(dim, dim)
        c = buffer.view(np.float32, dim * dim, offsets["c"]).reshape(dim, dim)
        ramp = np.arange(n, dtype=np.uint32)
        x[:] = (ramp & 1023).astype(np.float32) / np.float32(1024)
        y[:] = (ramp >> 10 & 255).astype(np.float32)
        rng = np.random.default_rng(2024)
        a[:] = rng.standard_normal((dim, dim), dtype=np.float32)
        b[:] = rng.standard_normal((dim, dim), dtype=np.float32)
        say(f"{buffer.size / MiB:.1f} MiB of plain memory at {buffer.address:#x} "
            f"({'THP' if buffer.huge else '4 KiB pages'}), {buffer.span // 4096} pages pinned")
    try:
        context = ComputeContext(gpu, compute_id, "userptr-demo")
    except BaseException:
        buffer.close()
        raise
    try:
        with phases("registration"):
            blob = context.register(buffer)
            (va,) = context.map(blob)
            say(f"USERPTR blob {blob.resource_id}: {blob.entries} mem entries, GPU VA {va:#x}")
        times, results = _compute(context, va, layout, args.saxpy_rounds, phases)
        with phases("verification"):
            failures = _verify(x, y, a, b, c, args.saxpy_rounds, results)
        moved = buffer.moved()
        if moved:
            failures.append(f"{moved} pages moved while the device held them")
    finally:
        context.close()
        buffer.close()
    _summary(gpu, buffer, layout, blob.entries, args.saxpy_rounds, times, phases, host_path,
             failures)
    return EXIT_FAILED if failures else EXIT_OK


def _compute(context: ComputeContext, va: int, layout: Layout, rounds: int,
             phases: Phases) -> tuple[dict[str, tuple[float, float]], dict[str, int]]:
    """Run the kernels; (guest round trip, host engine) seconds per kernel, and checksums."""
    n, dim, offsets = layout.vector, layout.dim, layout.offsets
    times: dict[str, tuple[float, float]] = {}
    with phases("compute"):
        saxpy = dispatch(Kernel.SAXPY_F32, buffer_arg(va + offsets["y"]),
                         buffer_arg(va + offsets["x"]), u64_arg(n), f32_arg(SAXPY_ALPHA))
        start = time.perf_counter()
        result = _check(context.run([saxpy] * rounds, timeout=300.0), "saxpy")
        times["saxpy"] = (time.perf_counter() - start, result.header.elapsed_ns / 1e9)
        say(f"saxpy: {rounds} x {n} floats in {times['saxpy'][1]:.3f} s on the host")
        matmul = dispatch(Kernel.MATMUL_F32, buffer_arg(va + offsets["c"]),
                          buffer_arg(va + offsets["a"]), buffer_arg(va + offsets["b"]),
                          u64_arg(dim), u64_arg(dim), u64_arg(dim))
        start = time.perf_counter()
        result = _check(context.run([matmul], timeout=300.0), "matmul")
        times["matmul"] = (time.perf_counter() - start, result.header.elapsed_ns / 1e9)
        say(f"matmul: {dim}^3 in {times['matmul'][1]:.3f} s on the host")
        sums = _check(context.run([
            dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(va + offsets["y"]), u64_arg(4 * n)),
            dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(va + offsets["c"]),
                     u64_arg(4 * dim * dim))]), "checksum")
    return times, {"y": sums.value(0), "c": sums.value(1)}


def _verify(x: Floats, y: Floats, a: Floats, b: Floats, c: Floats, rounds: int,
            crcs: dict[str, int]) -> list[str]:
    """Check the results where they are: in this program's own buffer."""
    failures = []
    n = x.shape[0]
    ramp = np.arange(n, dtype=np.uint32)
    expected = (ramp >> 10 & 255).astype(np.float32)
    step = x * np.float32(SAXPY_ALPHA)
    for _ in range(rounds):
        expected += step
    wrong = int(np.count_nonzero(~np.isclose(y, expected, rtol=1e-6, atol=1e-6)))
    say(f"saxpy: {n - wrong} of {n} elements correct")
    if wrong:
        failures.append(f"saxpy: {wrong} wrong elements")
    product = a @ b
    error = float(np.max(np.abs(c - product)))
    say(f"matmul: max |C - A@B| = {error:.2e}")
    if not np.allclose(c, product, rtol=1e-4, atol=1e-3):
        failures.append(f"matmul: max error {error:.3g}")
    differ = [name for name, array in (("y", y), ("c", c))
              if zlib.crc32(array.tobytes()) != crcs[name]]
    say(f"host CRC-32 of y and C: {'differs for ' + ', '.join(differ) if differ else 'match'}")
    failures.extend(f"{name}: the host's CRC-32 differs from the guest's" for name in differ)
    return failures


def _summary(gpu: VirtioGpu, buffer: PinnedBuffer, layout: Layout, entries: int, rounds: int,
             times: dict[str, tuple[float, float]], phases: Phases, host_path: str,
             failures: list[str]) -> None:
    n, dim = layout.vector, layout.dim
    saxpy_round_trip, saxpy_host = times["saxpy"]
    matmul_round_trip, matmul_host = times["matmul"]
    flops = 2.0 * dim ** 3
    lines = [
        "-" * 72,
        f"USERPTR zero-copy demo: {'FAILED: ' + '; '.join(failures) if failures else 'PASSED'}",
        f"buffer        {buffer.size / MiB:.1f} MiB of the program's own memory "
        f"({'THP' if buffer.huge else '4 KiB pages'}), {entries} mem entries",
        f"host path     {host_path} (from the userptr capset)",
        f"bytes copied  {gpu.stats.transfer_bytes} (no transfer commands); "
        f"{gpu.stats.command_bytes} bytes of commands, entries and streams in "
        f"{gpu.stats.commands} requests",
        f"saxpy         {rounds} x {n} float32 ({4 * n / MiB:.1f} MiB vectors): host "
        f"{saxpy_host:.3f} s, {_rate(12.0 * n * rounds, saxpy_host)}; "
        f"guest round trip {saxpy_round_trip:.3f} s",
        f"matmul        {dim}x{dim}x{dim} float32: host {matmul_host:.3f} s, "
        f"{flops / matmul_host / 1e9 if matmul_host else 0:.2f} GFLOP/s; "
        f"guest round trip {matmul_round_trip:.3f} s",
        "phases        " + " | ".join(f"{name} {sec:.2f} s" for name, sec in
                                      phases.seconds.items()),
    ]
    for line in lines:
        say(line)


if __name__ == "__main__":
    sys.exit(main())
