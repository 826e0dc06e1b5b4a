"""EDID base blocks: the one QEMU >= 8 answers on the display socket, and a parser.

The generator follows the shape of QEMU's ``qemu_edid_generate`` (manufacturer
``RHT``, preferred mode in the first detailed timing descriptor, monitor name and
range descriptors); the parser extracts what tests check.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["EDID_HEADER", "EdidInfo", "build_edid", "parse_edid"]

EDID_HEADER = bytes([0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00])


def _descriptor_text(tag: int, text: str) -> bytes:
    body = text.encode("ascii")[:13]
    if len(body) < 13:
        body += b"\n" + b" " * (12 - len(body))
    return bytes([0, 0, 0, tag, 0]) + body


def _detailed_timing(width: int, height: int, refresh: int = 75) -> bytes:
    hblank, vblank = max(width // 4, 160), max(height // 20, 30)
    clock_10khz = (width + hblank) * (height + vblank) * refresh // 10_000
    hfront, hsync, vfront, vsync = 48, 32, 3, 5
    out = bytearray(18)
    struct.pack_into("<H", out, 0, min(clock_10khz, 0xFFFF))
    out[2], out[3] = width & 0xFF, hblank & 0xFF
    out[4] = ((width >> 8) & 0xF) << 4 | ((hblank >> 8) & 0xF)
    out[5], out[6] = height & 0xFF, vblank & 0xFF
    out[7] = ((height >> 8) & 0xF) << 4 | ((vblank >> 8) & 0xF)
    out[8], out[9] = hfront, hsync
    out[10] = (vfront & 0xF) << 4 | (vsync & 0xF)
    out[17] = 0x18  # digital separate sync
    return bytes(out)


def build_edid(width: int, height: int, name: str = "QEMU Monitor") -> bytes:
    """A 128-byte EDID 1.4 base block whose preferred mode is ``width`` x ``height``."""
    edid = bytearray(128)
    edid[0:8] = EDID_HEADER
    letters = "RHT"
    vendor = ((ord(letters[0]) - 64) << 10) | ((ord(letters[1]) - 64) << 5) | (ord(letters[2]) - 64)
    struct.pack_into(">H", edid, 8, vendor)
    struct.pack_into("<HI", edid, 10, 0x1234, 0)
    edid[16], edid[17] = 42, 2014 - 1990
    edid[18], edid[19] = 1, 4
    edid[20] = 0xA5  # digital, 8 bpc, DisplayPort
    edid[21], edid[22] = width * 254 // 960 // 10 or 1, height * 254 // 960 // 10 or 1
    edid[23], edid[24] = 120, 0x06  # gamma 2.2; sRGB, preferred timing includes native mode
    edid[38:54] = b"\x01\x01" * 8  # no standard timings
    edid[54:72] = _detailed_timing(width, height)
    edid[72:90] = _descriptor_text(0xFC, name)
    edid[90:108] = bytes([0, 0, 0, 0xFD, 0, 50, 125, 30, 160, 0xFF, 0x00, 0x0A]) + b" " * 6
    edid[108:126] = _descriptor_text(0xFF, "1")
    edid[126] = 0
    edid[127] = (-sum(edid[:127])) & 0xFF
    return bytes(edid)


@dataclass(frozen=True, slots=True)
class EdidInfo:
    """What tests check in an EDID base block."""

    header_ok: bool
    checksum_ok: bool
    version: tuple[int, int]
    extensions: int
    preferred_width: int
    preferred_height: int
    pixel_clock_khz: int


def parse_edid(blob: bytes) -> EdidInfo:
    """Parse the first 128 bytes of ``blob``."""
    if len(blob) < 128:
        raise ValueError(f"EDID of {len(blob)} bytes is shorter than a base block")
    base = blob[:128]
    dtd = base[54:72]
    clock = struct.unpack_from("<H", dtd, 0)[0] * 10
    width = dtd[2] | (dtd[4] & 0xF0) << 4
    height = dtd[5] | (dtd[7] & 0xF0) << 4
    return EdidInfo(
        header_ok=base[:8] == EDID_HEADER,
        checksum_ok=sum(base) & 0xFF == 0,
        version=(base[18], base[19]),
        extensions=base[126],
        preferred_width=width,
        preferred_height=height,
        pixel_clock_khz=clock,
    )
