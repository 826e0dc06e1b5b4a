"""The host-side pixel check the guest asks for (``screencheck``): comparison, retries
until the display catches up, and the answers the guest reads."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from qemu.qmp import QMPClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from vmrunner import screencheck
from vmrunner.screencheck import ScreenChecker, compare_pixels
from vmrunner.screendump import Screendumper, parse_ppm

from guest_tests.guest_helpers import ppm_bytes

RNG = np.random.default_rng(5)
SCREEN = RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8)


def test_ppm_round_trip() -> None:
    assert np.array_equal(parse_ppm(ppm_bytes(SCREEN)), SCREEN)


def test_compare_whole_display() -> None:
    assert compare_pixels(SCREEN, SCREEN.copy(), 0, 0, whole=True) is None
    wrong = SCREEN.copy()
    wrong[7, 9] ^= 1
    wrong[30, 2] ^= 1
    verdict = compare_pixels(SCREEN, wrong, 0, 0, whole=True)
    assert verdict is not None
    assert verdict.startswith("2 of 3072 pixels differ; first at (9,7)")
    assert compare_pixels(SCREEN, SCREEN[:40], 0, 0, whole=True) == \
        "display is 64x48, expected 64x40"


def test_compare_region() -> None:
    patch = SCREEN[10:20, 30:50]
    assert compare_pixels(SCREEN, patch, 30, 10, whole=False) is None
    verdict = compare_pixels(SCREEN, patch, 31, 10, whole=False)
    assert verdict is not None and "pixels differ" in verdict
    assert "does not fit" in str(compare_pixels(SCREEN, patch, 50, 10, whole=False))
    wrong = patch.copy()
    wrong[3, 2] ^= 1
    verdict = compare_pixels(SCREEN, wrong, 30, 10, whole=False)
    assert str(verdict).startswith("1 of 200 pixels differ; first at (32,13): got ")
    assert compare_pixels(SCREEN, SCREEN, 0, 1, whole=True) == \
        "a whole-display check starts at (0,0), not (0,1)"


class FakeDumper(Screendumper):
    """Writes the given screens in turn, as QEMU's screendump would (the last one stays);
    a PNG dump (a screenshot to keep) is a placeholder and not counted."""

    def __init__(self, directory: Path, screens: list[np.ndarray]) -> None:
        self.directory = directory
        self.screens = screens
        self.dumps = 0
        self.devices: list[str] = []

    async def dump(self, path: Path, device: str = "gpu0", fmt: str = "ppm",
                   head: int = 0) -> Path:
        if fmt == "png":
            path.write_bytes(b"PNG of the last screen")
            return path
        screen = self.screens[min(self.dumps, len(self.screens) - 1)]
        self.dumps += 1
        self.devices.append(device if not head else f"{device}.{head}")
        path.write_bytes(ppm_bytes(screen))
        return path


def ask(tmp_path: Path, screens: list[np.ndarray], expected: np.ndarray, args: str,
        monkeypatch: pytest.MonkeyPatch) -> tuple[str, int]:
    monkeypatch.setattr(screencheck, "POLL_INTERVAL", 0.01)
    (tmp_path / "shot.expected.ppm").write_bytes(ppm_bytes(expected))
    dumper = FakeDumper(tmp_path, screens)
    reply = asyncio.run(ScreenChecker(dumper).handle_request(args))
    return reply, dumper.dumps


def test_waits_until_the_display_catches_up(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    stale = np.zeros_like(SCREEN)
    reply, dumps = ask(tmp_path, [stale, stale, SCREEN], SCREEN, "shot timeout=5",
                       monkeypatch)
    assert (reply, dumps) == ("ok shot.ppm attempts=3", 3)
    assert np.array_equal(parse_ppm((tmp_path / "shot.ppm").read_bytes()), SCREEN)


def test_reports_what_differs_when_time_is_up(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    started = time.monotonic()
    reply, dumps = ask(tmp_path, [np.zeros_like(SCREEN)], SCREEN, "shot timeout=0.05",
                       monkeypatch)
    assert reply.startswith("error shot: ") and "pixels differ" in reply
    assert reply.endswith(f"(after {dumps} screendumps, 0.05 s)")
    assert dumps >= 1 and time.monotonic() - started < 5.0  # not the default 15 s


def test_region_on_another_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reply, _ = ask(tmp_path, [SCREEN], SCREEN[5:9, 6:10], "shot device=gpu1 x=6 y=5 whole=0",
                   monkeypatch)
    assert reply.startswith("ok ")


def test_the_check_dumps_the_device_the_guest_named(tmp_path: Path) -> None:
    (tmp_path / "shot.expected.ppm").write_bytes(ppm_bytes(SCREEN))
    dumper = FakeDumper(tmp_path, [SCREEN])
    checker = ScreenChecker(dumper)
    assert asyncio.run(checker.handle_request("shot device=gpu1")) == "ok shot.ppm attempts=1"
    assert asyncio.run(checker.handle_request("shot")) == "ok shot.ppm attempts=1"
    assert asyncio.run(checker.handle_request("shot head=1")) == "ok shot.ppm attempts=1"
    assert dumper.devices == ["gpu1", "gpu0", "gpu0.1"]


@pytest.mark.parametrize("args", ["../etc device=gpu0", "shot device=gpu7", "shot x=a",
                                  "missing", "shot timeout=nan", "shot timeout=-1",
                                  "shot x=-20 whole=0", "shot x=3",
                                  "shot timeout=121", "shot head=16", "shot head=one"])
def test_bad_requests_are_answered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   args: str) -> None:
    reply, dumps = ask(tmp_path, [SCREEN], SCREEN, args, monkeypatch)
    assert reply.startswith("error ") and dumps == 0


class FakeQmp:
    """Records QMP commands; fails them when told to."""

    def __init__(self, error: Exception | None = None) -> None:
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self.error = error

    async def execute(self, command: str, arguments: dict[str, Any]) -> object:
        self.commands.append((command, arguments))
        if self.error is not None:
            raise self.error
        return {}


def test_screendump_requests_become_qmp_screendumps(tmp_path: Path) -> None:
    qmp = FakeQmp()
    dumper = Screendumper(cast(QMPClient, qmp), tmp_path / "screendumps")
    assert dumper.directory.is_dir()
    assert asyncio.run(dumper.handle_request("boot")) == "ok boot.ppm"
    assert asyncio.run(dumper.handle_request("demo device=gpu1 format=png")) == "ok demo.png"
    assert asyncio.run(dumper.handle_request("side head=1")) == "ok side.ppm"
    assert qmp.commands == [
        ("screendump", {"filename": str(tmp_path / "screendumps" / "boot.ppm"),
                        "device": "gpu0", "format": "ppm"}),
        ("screendump", {"filename": str(tmp_path / "screendumps" / "demo.png"),
                        "device": "gpu1", "format": "png"}),
        ("screendump", {"filename": str(tmp_path / "screendumps" / "side.ppm"),
                        "device": "gpu0", "format": "ppm", "head": 1})]


@pytest.mark.parametrize("args", ["", "../boot", "boot device=gpu2", "boot format=jpeg",
                                  "boot head=16", "boot head=-1", "boot head=x"])
def test_bad_screendump_requests_are_refused(tmp_path: Path, args: str) -> None:
    qmp = FakeQmp()
    reply = asyncio.run(Screendumper(cast(QMPClient, qmp), tmp_path).handle_request(args))
    assert reply.startswith("error ") and qmp.commands == []


def test_a_failed_screendump_is_answered(tmp_path: Path) -> None:
    qmp = FakeQmp(RuntimeError("device gpu1 has no surface"))
    reply = asyncio.run(Screendumper(cast(QMPClient, qmp), tmp_path).handle_request("boot"))
    assert reply == "error screendump failed: device gpu1 has no surface"
