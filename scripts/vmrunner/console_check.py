"""What console-check writes on the guest's fbcon console and /dev/fb0, and how it is judged.

The guest (``guest_tests/boot/init``, mode ``console``) clears tty1, hides the cursor, writes
``CONSOLE_LINES`` with their colours and copies ``pattern_bgrx()`` into /dev/fb0 at
(x0, y0).  It then reports its framebuffer geometry and the host checks a screendump:

* the screendump has the guest's framebuffer size (a back-end that never set a scanout
  leaves QEMU's placeholder surface);
* the pattern is there pixel-exact (catches shifted rows, swapped channels, stale frames);
* every written text cell holds exactly its two VGA-palette colours, non-blank glyphs hold
  both, blanks only the background;
* equal characters have identical glyph bitmaps and different characters differ, across
  lines of different colours (catches noise and garbage that happens to use the palette);
* everything else on the screen is black.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

RGB = tuple[int, int, int]
Image = npt.NDArray[np.uint8]

# The Linux VT default palette (drivers/tty/vt/vt.c default_red/grn/blu), by ANSI index.
BLACK: RGB = (0x00, 0x00, 0x00)
GREEN: RGB = (0x00, 0xAA, 0x00)
BLUE: RGB = (0x00, 0x00, 0xAA)
GREY: RGB = (0xAA, 0xAA, 0xAA)
BRIGHT_YELLOW: RGB = (0xFF, 0xFF, 0x55)

PATTERN_WIDTH = 256
PATTERN_HEIGHT = 64
GEOMETRY_KEYS = ("xres", "yres", "stride", "bpp", "rows", "cols", "x0", "y0")


@dataclass(frozen=True)
class ConsoleLine:
    """One line of text written at `row`, column 0, with SGR attributes `sgr`."""

    row: int
    text: str
    sgr: str
    fg: RGB
    bg: RGB


CONSOLE_LINES = (
    ConsoleLine(0, "vgpu-backend console check", "0", GREY, BLACK),
    ConsoleLine(2, "AABBA 0123 XYZ xyz", "1;33;44", BRIGHT_YELLOW, BLUE),
    ConsoleLine(3, "Hello, vhost-user-gpu! 0123", "32", GREEN, BLACK),
)


def console_tty_bytes() -> bytes:
    """What the guest writes to /dev/tty1: clear, hide the cursor, then each line."""
    out = "\x1b[0m\x1b[2J\x1b[H\x1b[?25l"
    for line in CONSOLE_LINES:
        out += f"\x1b[{line.row + 1};1H\x1b[{line.sgr}m{line.text}\x1b[0m"
    return out.encode("ascii")


def pattern_rgb() -> Image:
    """The (PATTERN_HEIGHT, PATTERN_WIDTH, 3) test pattern: no two pixels equal, none black."""
    y, x = np.mgrid[0:PATTERN_HEIGHT, 0:PATTERN_WIDTH]
    rgb = np.empty((PATTERN_HEIGHT, PATTERN_WIDTH, 3), np.uint8)
    rgb[..., 0] = x
    rgb[..., 1] = y * 4
    rgb[..., 2] = (x * 7 + y * 13 + 1) & 0xFF
    return rgb


def pattern_bgrx() -> bytes:
    """The pattern as XRGB8888 little-endian bytes (B, G, R, 0xff), row after row."""
    rgb = pattern_rgb()
    bgrx = np.full((PATTERN_HEIGHT, PATTERN_WIDTH, 4), 0xFF, np.uint8)
    bgrx[..., 0] = rgb[..., 2]
    bgrx[..., 1] = rgb[..., 1]
    bgrx[..., 2] = rgb[..., 0]
    return bgrx.tobytes()


def parse_geometry(fields: Mapping[str, str]) -> dict[str, int]:
    """The guest's `key=value` report as ints; raises ValueError when a key is missing."""
    missing = [key for key in GEOMETRY_KEYS if key not in fields]
    if missing:
        raise ValueError(f"console-ready lacks {', '.join(missing)}")
    return {key: int(fields[key]) for key in GEOMETRY_KEYS}


def _colours_in(cell: Image) -> set[RGB]:
    flat = np.unique(cell.reshape(-1, 3), axis=0)
    return {(int(r), int(g), int(b)) for r, g, b in flat}


def check_console(image: Image, geometry: Mapping[str, int]) -> list[str]:
    """Every way `image` differs from what the guest drew (empty list: it passed)."""
    xres, yres = geometry["xres"], geometry["yres"]
    if image.shape != (yres, xres, 3):
        return [f"screendump is {image.shape[1]}x{image.shape[0]}, guest framebuffer is "
                f"{xres}x{yres}"]
    if geometry["bpp"] != 32:
        return [f"guest framebuffer has {geometry['bpp']} bpp, the check expects 32"]
    failures: list[str] = []
    covered = np.zeros((yres, xres), bool)

    x0, y0 = geometry["x0"], geometry["y0"]
    region = image[y0:y0 + PATTERN_HEIGHT, x0:x0 + PATTERN_WIDTH]
    covered[y0:y0 + PATTERN_HEIGHT, x0:x0 + PATTERN_WIDTH] = True
    wrong = np.argwhere((region != pattern_rgb()).any(axis=2))
    if len(wrong):
        wy, wx = (int(v) for v in wrong[0])
        failures.append(
            f"pattern: {len(wrong)} of {PATTERN_WIDTH * PATTERN_HEIGHT} pixels differ; first at "
            f"({x0 + wx},{y0 + wy}): got {tuple(int(c) for c in region[wy, wx])}, "
            f"want {tuple(int(c) for c in pattern_rgb()[wy, wx])}")

    cell_w, cell_h = xres // geometry["cols"], yres // geometry["rows"]
    glyphs: dict[str, tuple[npt.NDArray[np.bool_], int, int]] = {}
    for line in CONSOLE_LINES:
        for col, char in enumerate(line.text):
            top, left = line.row * cell_h, col * cell_w
            cell = image[top:top + cell_h, left:left + cell_w]
            covered[top:top + cell_h, left:left + cell_w] = True
            where = f"text cell row {line.row} col {col} {char!r}"
            colours = _colours_in(cell)
            if not colours <= {line.fg, line.bg}:
                failures.append(f"{where}: colours {sorted(colours - {line.fg, line.bg})} "
                                f"besides fg {line.fg} / bg {line.bg}")
                continue
            want = {line.bg} if char == " " else {line.fg, line.bg}
            if colours != want:
                failures.append(f"{where}: has colours {sorted(colours)}, want {sorted(want)}")
                continue
            mask = (cell == np.array(line.fg, np.uint8)).all(axis=2)
            if char in glyphs and not np.array_equal(glyphs[char][0], mask):
                failures.append(f"{where}: glyph differs from the same character at row "
                                f"{glyphs[char][1]} col {glyphs[char][2]}")
            glyphs.setdefault(char, (mask, line.row, col))
    shapes: dict[bytes, str] = {}
    for char, (mask, _, _) in glyphs.items():
        other = shapes.setdefault(mask.tobytes(), char)
        if char not in (other, " "):
            failures.append(f"text: characters {other!r} and {char!r} have identical glyphs")

    stray = np.argwhere(image.any(axis=2) & ~covered)
    if len(stray):
        sy, sx = (int(v) for v in stray[0])
        failures.append(f"{len(stray)} non-black pixels outside the text and the pattern; "
                        f"first at ({sx},{sy}): {tuple(int(c) for c in image[sy, sx])}")
    return failures
