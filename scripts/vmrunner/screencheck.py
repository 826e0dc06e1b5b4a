"""Host-side pixel checks of the guest's display: the guest says what must be on screen,
the host takes QMP screendumps and compares them pixel for pixel.

Request (control channel): ``screencheck NAME [device=gpu0] [head=0] [x=0] [y=0]
[timeout=15] [whole=1]``.  The guest first writes the expected picture as a binary PPM to
``RESULTS/screendumps/NAME.expected.ppm`` (the results share).  The host screendumps
until the display shows it at (x, y) -- the whole display must equal it when ``whole``
-- or the time is up (the display lags the guest's writes), and answers
``ok NAME.ppm attempts=N`` or ``error NAME: what differs``; the last screendump stays
as ``NAME.ppm`` for people to look at.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from .control import parse_fields
from .qemu import GPU_IDS
from .screendump import MAX_HEADS, SCREENDUMP_NAME_RE, Screendumper, parse_head, parse_ppm

MAX_TIMEOUT = 120.0
POLL_INTERVAL = 0.5


def compare_pixels(image: np.ndarray, expected: np.ndarray, x: int, y: int,
                   whole: bool) -> str | None:
    """None if ``image`` shows ``expected`` at (x, y) (and nothing else is checked unless
    ``whole``); otherwise what differs, naming the first wrong pixel."""
    height, width = expected.shape[:2]
    if whole and (x, y) != (0, 0):
        return f"a whole-display check starts at (0,0), not ({x},{y})"
    if whole and image.shape[:2] != expected.shape[:2]:
        return (f"display is {image.shape[1]}x{image.shape[0]}, expected "
                f"{width}x{height}")
    region = image[y:y + height, x:x + width]
    if region.shape != expected.shape:
        return (f"a {width}x{height} picture at ({x},{y}) does not fit a "
                f"{image.shape[1]}x{image.shape[0]} display")
    wrong = np.argwhere((region != expected).any(axis=2))
    if not len(wrong):
        return None
    wy, wx = (int(v) for v in wrong[0])
    return (f"{len(wrong)} of {width * height} pixels differ; first at ({x + wx},{y + wy}): "
            f"got {tuple(int(c) for c in region[wy, wx])}, "
            f"want {tuple(int(c) for c in expected[wy, wx])}")


class ScreenChecker:
    """Serves the guest's ``screencheck`` requests with screendumps from ``dumper``."""

    def __init__(self, dumper: Screendumper) -> None:
        self.dumper = dumper

    async def handle_request(self, args: str) -> str:
        """See the module docstring."""
        name = (args.split(maxsplit=1) or [""])[0]
        fields = parse_fields(args)
        if not SCREENDUMP_NAME_RE.match(name):
            return f"error bad screencheck name {name!r}"
        device, head = fields.get("device", GPU_IDS[0]), parse_head(fields)
        if device not in GPU_IDS or head is None:
            return f"error device must be one of {GPU_IDS}, head 0..{MAX_HEADS - 1}"
        try:
            x, y = int(fields.get("x", "0")), int(fields.get("y", "0"))
            timeout = float(fields.get("timeout", "15"))
            whole = fields.get("whole", "1") == "1"
            if x < 0 or y < 0 or not 0 <= timeout <= MAX_TIMEOUT or (whole and (x or y)):
                raise ValueError(f"x={x} y={y} timeout={timeout} whole={int(whole)}: need "
                                 f"x, y >= 0 (0 with whole=1) and 0 <= timeout <= "
                                 f"{MAX_TIMEOUT:g}")
            expected = parse_ppm((self.dumper.directory / f"{name}.expected.ppm").read_bytes())
        except (OSError, ValueError) as error:
            return f"error {name}: bad request or expected picture: {error}"
        deadline = time.monotonic() + timeout
        attempts = 0
        while True:
            path = self.dumper.directory / f"{name}.ppm"
            try:
                await self.dumper.dump(path, device, head=head)
                image = parse_ppm(path.read_bytes())
            except Exception as error:  # QMP errors and timeouts go back to the guest
                return f"error {name}: screendump failed: {error}"
            attempts += 1
            verdict = compare_pixels(image, expected, x, y, whole)
            if verdict is None:
                return f"ok {path.name} attempts={attempts}"
            if time.monotonic() >= deadline:
                return f"error {name}: {verdict} (after {attempts} screendumps, {timeout:g} s)"
            await asyncio.sleep(POLL_INTERVAL)
