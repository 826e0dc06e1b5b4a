"""The benchmark scripts still run: each one on a tiny workload, checking what it
reports (never how fast -- speed figures belong to the scripts' own output)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.frontend.backend_process import REFERENCE_BINARY

ROOT = Path(__file__).resolve().parents[1]


def bench(name: str, *args: str, timeout: float = 120) -> str:
    """Run ``scripts/<name>.py`` and return its standard output (it must exit 0)."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          check=False)
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


def test_bench_device_answers_every_command() -> None:
    out = bench("bench_device", "--batches", "5")
    assert "us per command" in out and "commands/s" in out
    for part in ("command handlers alone", "queue path", "bare loop, no checks",
                 "ring side in numpy"):
        assert part in out  # the split of the cost, each part checked by the script


def test_bench_userptr_coalesces_contiguous_lists_only() -> None:
    out = bench("bench_userptr", "--max-entries", "256", "--repeat", "1", "--ram-gib", "1")
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [1, 4, 16, 64, 256]
    for row in rows:  # entries bytes | ms p90 ranges | ms ranges
        assert int(row[5]) == int(row[0]), "scattered pages must stay separate ranges"
        assert int(row[8]) == 1, "a contiguous list must coalesce into one range"


def test_bench_hostgpu_runs_every_path() -> None:
    out = bench("bench_hostgpu", "--max-ranges", "16", "--budget", "1")
    paths = {line.split()[0] for line in out.splitlines()
             if line.split()[:1] and line.split()[0] in ("batch", "alias", "per-range")}
    assert paths == {"batch", "alias", "per-range"}


def test_bench_2d_reports_every_metric_without_errors() -> None:
    backends = "ours,polled" + (",reference" if os.access(REFERENCE_BINARY, os.X_OK) else "")
    out = bench("bench_2d", "--backends", backends, "--latency-iterations", "10",
                "--batches", "3", "--attach-iterations", "2", "--frames", "2", "--json")
    results = json.loads(out[out.index("\n{") + 1:])
    assert sorted(results) == sorted(backends.split(","))
    for name, result in results.items():
        assert result["errors"] == [], f"{name}: {result['errors']}"
        assert result["metrics"], name
    for name in results:
        assert sorted(results[name]["metrics"]) == sorted(results["ours"]["metrics"])


def test_bench_2d_ratios_are_printed_for_every_back_end_against_the_reference() -> None:
    if not os.access(REFERENCE_BINARY, os.X_OK):
        pytest.skip(f"the reference back-end {REFERENCE_BINARY} is not installed")
    out = bench("bench_2d", "--backends", "ours,reference,floor-polled", "--poll-max-us",
                "100", "--latency-iterations", "10", "--batches", "3",
                "--attach-iterations", "2", "--frames", "2")
    header = out.splitlines()[0].split()
    assert header[-2:] == ["ours/ref", "floor-polled/ref"]
    throughput = next(line for line in out.splitlines() if line.startswith("CREATE_2D"))
    assert len(throughput.split()) == len(header) + 3  # a label of four words, every cell


def test_bench_2d_runs_another_checkout_beside_ours(tmp_path: Path) -> None:
    """``--checkout PATH`` adds that checkout's back-end as ``ours@NAME``, measured in
    the same run as the others (here: this checkout, under another name)."""
    other = tmp_path / "before"
    other.symlink_to(ROOT)
    out = bench("bench_2d", "--backends", "ours", "--checkout", str(other),
                "--latency-iterations", "10", "--batches", "3", "--attach-iterations", "2",
                "--frames", "2", "--json")
    results = json.loads(out[out.index("\n{") + 1:])
    assert sorted(results) == ["ours", "ours@before"]
    assert all(r["errors"] == [] and r["metrics"]["exit_status"] == 0
               for r in results.values()), results


@pytest.mark.parametrize("floor", ["floor", "floor-polled"])
def test_bench_2d_floor_runs_the_throughput_phase_only(floor: str) -> None:
    """The floor back-end answers the 64-command batches itself (the script checks
    every answer; the floor exits 1 when it answered none) and is measured on nothing
    else; busy-polling too."""
    out = bench("bench_2d", "--backends", floor, "--batches", "3", "--json")
    metrics = json.loads(out[out.index("\n{") + 1:])[floor]["metrics"]
    assert sorted(metrics) == ["batch_us", "command_cpu_us", "commands_per_s", "exit_status"]
    assert metrics["exit_status"] == 0  # 1 when it answered no batch itself


def test_compute_report_ratios_skip_rounds_the_clock_did_not_see() -> None:
    """A CPU time too short for the clock is 0: such a round gives no ratio (it used
    to divide by zero), and with no round left the ratio is NaN."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from benchkit.compute_report import Row

    row = Row("saxpy", "thp", "1 MiB", 1.0, 1.0, 1,
              cpu={"copy": [3.0, 2.0, 5.0], "userptr": [1.0, 1.0, 1.0],
                   "xfer": [0.0, 1.0, 2.0], "numpy": [0.0, 0.0, 0.0]})
    assert row.gap(cpu=True) == 1.5  # rounds 2 and 3: (2-1)/1 and (5-1)/2
    assert row.ratio("userptr", "xfer", cpu=True) == 0.75
    assert math.isnan(row.ratio("userptr", "numpy", cpu=True))


def test_bench_compute_checks_results_and_times_every_path(tmp_path: Path) -> None:
    saved = tmp_path / "results.json"
    bench("bench_compute", "--sizes", "1", "--matmul-sizes", "64", "--guest-ram", "shmem",
          "--repeat", "1", "--matmul-repeat", "1", "--plot", str(tmp_path / "plot.png"),
          "--json", str(saved))
    rows = json.loads(saved.read_text())["rows"]
    assert {(r["kernel"], r["layout"]) for r in rows} == {
        (k, lay) for k in ("saxpy", "matmul") for lay in ("thp", "4k")}
    for row in rows:
        assert {"numpy", "userptr", "copy", "xfer", "hostbuf"} <= set(row["wall"])
        assert all(row["wall"].values()), row
    assert (tmp_path / "plot.png").stat().st_size > 0
    again = bench("bench_compute", "--from-json", str(saved), "--plot", "")
    assert "targets at the largest size" in again


@pytest.mark.skipif(shutil.which("valgrind") is None,
                    reason="valgrind is not installed (scripts/setup-host.sh installs it)")
def test_bench_instructions_counts_the_device_and_the_floor() -> None:
    """Callgrind's counts of the device's and the floor's loops come out, each large
    enough to be the work (a count of nothing is refused by the script)."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_instructions.py"),
                           "--batches", "2", "--measure", "device,floor"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    if done.returncode == 3:
        pytest.skip(f"this Python cannot be counted: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    counts = {line.split()[0]: int(line.split()[1].replace(",", ""))
              for line in out.splitlines() if line.strip()}
    assert set(counts) == {"device", "floor"}
    # each command allocates and zeroes a 16 KiB image: thousands of instructions
    assert all(n > 4096 for n in counts.values()), counts


@pytest.mark.parametrize("name", ["bench_device", "bench_userptr", "bench_hostgpu",
                                  "bench_2d", "bench_compute", "bench_instructions"])
def test_bench_has_help(name: str) -> None:
    assert "usage:" in bench(name, "--help")
