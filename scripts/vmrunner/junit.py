"""Per-test summary of the JUnit XML the guest pytest wrote into the results directory."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

OUTCOMES = ("failure", "error", "skipped")


@dataclass(frozen=True)
class TestCase:
    """One test's outcome as pytest reported it."""

    name: str
    outcome: str  # "passed", "failed", "error" or "skipped"
    seconds: float
    message: str


def read_junit(path: Path) -> list[TestCase]:
    """Every <testcase> of a pytest JUnit XML file."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in OUTCOMES:
            child = case.find(tag)
            if child is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = child.get("message", "") or ""
                break
        classname, test = case.get("classname", ""), case.get("name", "?")
        name = f"{classname}::{test}" if classname else test
        cases.append(TestCase(name, outcome, float(case.get("time", "0") or 0), message))
    return cases


def summarize(cases: list[TestCase]) -> str:
    """One line per test, then pytest-style totals ("N passed, N failed, N skipped")."""
    lines = []
    for case in cases:
        line = f"  {case.outcome.upper():<8} {case.name} ({case.seconds:.2f} s)"
        if case.message and case.outcome != "passed":
            line += f"\n           {case.message.splitlines()[0][:200]}"
        lines.append(line)
    counts = Counter(case.outcome for case in cases)
    totals = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "error", "skipped")
                       if counts[k] or k in ("passed", "failed"))
    lines.append(f"guest: {totals}")
    return "\n".join(lines)
