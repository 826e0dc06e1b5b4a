"""Tables, target verdicts and the plot of ``scripts/bench_compute.py``.

A :class:`Row` holds the samples of one workload in one layout; everything printed or
plotted is derived from rows, so saved results (``--json``) can be shown again later.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

#: how the guest's buffers are laid out: 2 MiB runs (THP) or scattered 4 KiB pages
LAYOUTS = ("thp", "4k")


@dataclass(slots=True)
class Row:
    """Samples of one workload in one layout: wall and CPU seconds per path and round."""

    kernel: str
    layout: str
    label: str
    size_mib: float
    work: float
    entries: int
    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    setup_userptr_s: float = 0.0
    setup_copy_s: float = 0.0

    def _samples(self, cpu: bool) -> dict[str, list[float]]:
        return self.cpu if cpu else self.wall

    def median(self, path: str, cpu: bool = False) -> float:
        """Median seconds of a path."""
        return statistics.median(self._samples(cpu)[path])

    def rate(self, path: str, cpu: bool = False) -> float:
        """GB/s (saxpy) or GFLOP/s (matmul) at the median time."""
        return self.work / self.median(path, cpu) / 1e9

    def ratio(self, num: str, den: str, cpu: bool = False) -> float:
        """Median over rounds of ``time(num) / time(den)`` (paired: same load)."""
        s = self._samples(cpu)
        return _median_or_nan([a / b for a, b in zip(s[num], s[den], strict=True) if b])

    def gap(self, cpu: bool = False) -> float:
        """Median over rounds of ``(copy - userptr) / copy cost``."""
        s = self._samples(cpu)
        return _median_or_nan([(c - u) / x for c, u, x in
                               zip(s["copy"], s["userptr"], s["xfer"], strict=True) if x])


def _median_or_nan(values: list[float]) -> float:
    """The median; NaN when no round could give one (a CPU time too short for the
    clock to see is 0: tiny sizes)."""
    return statistics.median(values) if values else math.nan



def _unit(r: Row) -> str:
    return "GB/s" if r.kernel == "saxpy" else "GFLOP/s"


def print_table(rows: list[Row]) -> None:
    """Wall-clock throughput per path, ratios and copy cost."""
    head = (f"{'kernel':<7}{'layout':<7}{'size':>10}{'entries':>8}{'unit':>8}"
            f"{'numpy':>8}{'np-whole':>9}{'userptr':>8}{'copy':>8}{'hostbuf':>8}"
            f"{'copy ms':>9}{'xfer ms':>9}{'up/np':>7}{'up/copy':>8}{'gap/xfer':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        whole = f"{r.rate('np-whole'):>9.2f}" if "np-whole" in r.wall else f"{'-':>9}"
        print(f"{r.kernel:<7}{r.layout:<7}{r.label:>10}{r.entries:>8}{_unit(r):>8}"
              f"{r.rate('numpy'):>8.2f}{whole}{r.rate('userptr'):>8.2f}{r.rate('copy'):>8.2f}"
              f"{r.rate('hostbuf'):>8.2f}{r.median('copy') * 1e3:>9.1f}"
              f"{r.median('xfer') * 1e3:>9.1f}{r.ratio('numpy', 'userptr'):>7.2f}"
              f"{r.ratio('copy', 'userptr'):>8.2f}{r.gap():>9.2f}")
    print("Wall clock, medians.  entries: mem entries per buffer (largest); numpy: the "
          "baseline (SAXPY in 2 MiB pieces, like the engine); np-whole: whole arrays at once; "
          "hostbuf: the kernel alone on the copy path's host buffers; copy ms: the whole copy "
          "path; xfer ms: its transfers alone (the copy cost); up/np, up/copy: userptr speed "
          "relative to numpy and to the copy path; gap/xfer: (copy - userptr) time / copy "
          "cost; ratios are medians over rounds of paired runs.")


def print_cpu_table(rows: list[Row]) -> None:
    """The same from CPU time (back-end threads, or this process for numpy)."""
    head = (f"{'kernel':<7}{'layout':<7}{'size':>10}{'unit':>8}{'numpy':>8}{'userptr':>8}"
            f"{'copy':>8}{'hostbuf':>8}{'xfer ms':>9}{'up/np':>7}{'up/copy':>8}{'gap/xfer':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.kernel:<7}{r.layout:<7}{r.label:>10}{_unit(r):>8}"
              f"{r.rate('numpy', True):>8.2f}{r.rate('userptr', True):>8.2f}"
              f"{r.rate('copy', True):>8.2f}{r.rate('hostbuf', True):>8.2f}"
              f"{r.median('xfer', True) * 1e3:>9.1f}{r.ratio('numpy', 'userptr', True):>7.2f}"
              f"{r.ratio('copy', 'userptr', True):>8.2f}{r.gap(True):>9.2f}")
    print("CPU time instead of wall time: what the work costs when the process is not "
          "waiting for a core (on a shared machine the more stable estimate).")


def print_setup(rows: list[Row]) -> None:
    """One-time costs at the largest size of each kernel and layout."""
    print("\none-time setup of all buffers of a case (ms): USERPTR RESOURCE_CREATE_BLOB vs "
          "RESOURCE_CREATE_3D + ATTACH_BACKING")
    for r in rows:
        if r.size_mib == max(o.size_mib for o in rows if o.kernel == r.kernel):
            print(f"  {r.kernel} {r.layout} {r.label}: userptr {r.setup_userptr_s * 1e3:.1f}, "
                  f"copy path {r.setup_copy_s * 1e3:.1f}")


def print_targets(rows: list[Row]) -> None:
    """The issue's targets at the largest size of each kernel and layout."""
    print("\ntargets at the largest size: (1) userptr >= 0.8x numpy; (2) userptr ahead of "
          "the copy path by the copy cost, taken as (copy - userptr) >= 0.9 x copy cost")
    for kernel in ("saxpy", "matmul"):
        for layout_name in LAYOUTS:
            mine = [r for r in rows if r.kernel == kernel and r.layout == layout_name]
            if not mine:
                continue
            r = max(mine, key=lambda row: row.size_mib)
            verdicts = []
            for cpu in (False, True):
                speed, gap = r.ratio("numpy", "userptr", cpu), r.gap(cpu)
                verdicts.append(f"{'cpu' if cpu else 'wall'}: (1) {speed:.2f} "
                                f"{'met' if speed >= 0.8 else 'NOT met'}, (2) {gap:.2f} "
                                f"{'met' if gap >= 0.9 else 'NOT met'}")
            print(f"  {kernel} {layout_name} {r.label}: {'; '.join(verdicts)}")


def plot(rows: list[Row], path: Path) -> None:
    """Throughput against size per kernel (columns), from wall and CPU time (rows): numpy
    (measured with the first layout), userptr and copy for every layout."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = [k for k in ("saxpy", "matmul") if any(r.kernel == k for r in rows)]
    fig, axes = plt.subplots(2, len(kernels), figsize=(6.5 * len(kernels), 9), squeeze=False)
    for row_axes, cpu in zip(axes, (False, True), strict=True):
        for ax, kernel in zip(row_axes, kernels, strict=True):
            lines: list[tuple[str, str, str, list[Row]]] = []
            for layout_name in LAYOUTS:
                mine = sorted((r for r in rows if r.kernel == kernel and
                               r.layout == layout_name), key=lambda r: r.size_mib)
                if not mine:
                    continue
                style = "-" if layout_name == "thp" else "--"
                if not lines:
                    lines.append(("numpy", "numpy, private arrays", "k-", mine))
                    if "np-whole" in mine[0].wall:
                        lines.append(("np-whole", "numpy, whole arrays at once", "k:", mine))
                lines += [("userptr", f"userptr, {layout_name} guest pages", f"C0{style}", mine),
                          ("copy", f"copy path, {layout_name} guest pages", f"C1{style}", mine)]
            for name, label, fmt, mine in lines:
                ax.plot([r.size_mib for r in mine], [r.rate(name, cpu) for r in mine], fmt,
                        marker="o", markersize=3, label=label)
            sizes = sorted({r.size_mib for r in rows if r.kernel == kernel})
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [f"{v:g}" for v in sizes])
            ax.set_xlabel("MiB per vector" if kernel == "saxpy" else "MiB per matrix")
            ax.set_ylabel(("GB/s touched" if kernel == "saxpy" else "GFLOP/s") +
                          (" (from CPU time)" if cpu else " (wall clock)"))
            ax.set_title(("SAXPY_F32" if kernel == "saxpy" else "MATMUL_F32, n x n") +
                         (", from CPU time" if cpu else ", wall clock"))
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("vgpu-backend compute: zero-copy USERPTR vs copy path vs numpy (medians)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
