"""EDID 1.4 generation for a virtual display (VESA E-EDID 1.4, DisplayID 1.3).

QEMU 7.2 never answers the display socket's GET_EDID, so the device builds the EDID
itself from the scanout's size.  The preferred mode is that size at 60 Hz with CVT
reduced-blanking timings.  Sizes beyond the 12-bit limits of an EDID detailed timing
descriptor (4095) get a DisplayID extension block with a Type I timing, as QEMU's own
generator does.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = ["EDID_BLOCK", "build_edid"]

EDID_BLOCK: Final = 128
_HEADER: Final = bytes([0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00])
_VENDOR: Final = "VGB"  # vgpu-backend
_PRODUCT: Final = 0x0001
_NAME: Final = b"vgpu-backend"
_DPI: Final = 100
_REFRESH_HZ: Final = 60
# CVT reduced blanking v1: 160-pixel horizontal blank, >= 460 us vertical blank
_HBLANK: Final = 160
_HFRONT, _HSYNC = 48, 32
_VFRONT, _VSYNC = 3, 6
_MIN_VBLANK_US: Final = 460
_MIN_REFRESH_HZ: Final = 24
#: a detailed timing descriptor holds the clock in 16 bits of 10 kHz
_DTD_MAX_CLOCK_KHZ: Final = 0xFFFF * 10
#: a DisplayID Type I timing holds it in 24 bits of 10 kHz
_DISPLAYID_MAX_CLOCK_KHZ: Final = 0xFFFFFF * 10


def _checksum(block: bytearray) -> None:
    block[-1] = (-sum(block[:-1])) & 0xFF


def _timing(width: int, height: int, max_clock_khz: int) -> tuple[int, int, int]:
    """(pixel clock in kHz, horizontal blank, vertical blank) for ``width``x``height``
    at 60 Hz, or at the highest refresh whose clock fits ``max_clock_khz``."""
    refresh = _REFRESH_HZ
    while True:
        # CVT's estimate: the line time when the blank takes exactly the minimum; any
        # whole number of lines above _MIN_VBLANK_US / line_us lasts at least that
        line_us = (1e6 / refresh - _MIN_VBLANK_US) / height
        vblank = max(_VFRONT + _VSYNC + 6, int(_MIN_VBLANK_US / line_us) + 1)
        clock_khz = (width + _HBLANK) * (height + vblank) * refresh // 1000
        if clock_khz <= max_clock_khz or refresh <= _MIN_REFRESH_HZ:
            return min(clock_khz, max_clock_khz), _HBLANK, vblank
        refresh -= 1


def _detailed_timing(width: int, height: int, width_mm: int, height_mm: int) -> bytes:
    """An 18-byte EDID detailed timing descriptor (needs width, height <= 4095)."""
    clock_khz, hblank, vblank = _timing(width, height, _DTD_MAX_CLOCK_KHZ)
    clock = clock_khz // 10  # 10 kHz units
    return struct.pack(
        "<H16B", clock,
        width & 0xFF, hblank & 0xFF, ((width >> 8) << 4) | (hblank >> 8),
        height & 0xFF, vblank & 0xFF, ((height >> 8) << 4) | (vblank >> 8),
        _HFRONT, _HSYNC, (_VFRONT << 4) | _VSYNC, 0,
        width_mm & 0xFF, height_mm & 0xFF, ((width_mm >> 8) << 4) | (height_mm >> 8),
        0, 0, 0x1A)  # no border; digital separate sync, +hsync -vsync


def _text_descriptor(tag: int, text: bytes) -> bytes:
    body = (text[:12] + b"\n").ljust(13, b" ")
    return bytes([0, 0, 0, tag, 0]) + body


def _range_limits(clock_khz: int) -> bytes:
    # 0xFD: vertical 24-125 Hz, horizontal 30-255 kHz, the preferred mode's pixel clock
    # rounded up to 10 MHz units, no extended timing information
    max_clock = min(255, -(-clock_khz // 10000))
    return bytes([0, 0, 0, 0xFD, 0, _MIN_REFRESH_HZ, 125, 30, 255, max_clock, 0x00,
                  0x0A]) + b" " * 6


def _displayid_extension(width: int, height: int) -> bytes:
    """A DisplayID 1.3 extension block with one Type I detailed timing (the layout
    QEMU's ``qemu_displayid_generate`` uses)."""
    clock_khz, hblank, vblank = _timing(width, height, _DISPLAYID_MAX_CLOCK_KHZ)
    timing = struct.pack(
        "<3sB8H", (clock_khz // 10).to_bytes(3, "little"),
        0x88,  # preferred timing, aspect ratio undefined
        width - 1, hblank - 1, _HFRONT - 1, _HSYNC - 1,
        height - 1, vblank - 1, _VFRONT - 1, _VSYNC - 1)
    data_block = bytes([0x03, 0x00, len(timing)]) + timing  # Type I detailed timing
    section = bytes([0x13, len(data_block), 0x03, 0x00]) + data_block  # v1.3, standalone
    block = bytearray(EDID_BLOCK)
    block[0] = 0x70  # DisplayID extension tag
    block[1:1 + len(section)] = section
    block[1 + len(section)] = (-sum(section)) & 0xFF  # DisplayID section checksum
    _checksum(block)
    return bytes(block)


def build_edid(width: int, height: int, serial: int = 0) -> bytes:
    """An EDID for a ``width``x``height`` display (128 bytes, or 256 with DisplayID).

    :param serial: goes into the serial-number field (use the scanout index).
    """
    if not (1 <= width <= 0xFFFF and 1 <= height <= 0xFFFF):
        raise ValueError(f"display size {width}x{height} out of range")
    width_mm = width * 254 // (_DPI * 10)
    height_mm = height * 254 // (_DPI * 10)
    large = width > 4095 or height > 4095
    block = bytearray(EDID_BLOCK)
    block[0:8] = _HEADER
    vendor = 0
    for ch in _VENDOR:
        vendor = (vendor << 5) | (ord(ch) - ord("A") + 1)
    struct.pack_into(">H", block, 8, vendor)
    struct.pack_into("<HI", block, 10, _PRODUCT, serial & 0xFFFFFFFF)
    block[16], block[17] = 0, 2026 - 1990  # week unspecified, model year
    block[18], block[19] = 1, 4  # EDID 1.4
    block[20] = 0xA5  # digital, 8 bits per colour, DisplayPort
    block[21] = min(width_mm // 10, 255)
    block[22] = min(height_mm // 10, 255)
    block[23] = 120  # gamma 2.2
    block[24] = 0x06  # RGB 4:4:4, sRGB default, preferred timing is native
    # sRGB chromaticity (10-bit fixed point): R .640/.330 G .300/.600 B .150/.060 W .3127/.3290
    block[25:35] = bytes([0xEE, 0x91, 0xA3, 0x54, 0x4C, 0x99, 0x26, 0x0F, 0x50, 0x54])
    block[35:38] = bytes([0x21, 0x08, 0x00])  # 640x480@60, 800x600@60, 1024x768@60
    standard = [(1280, 0b00), (1280, 0b11), (1600, 0b11), (1920, 0b00)]  # 16:10, 16:9
    for i in range(8):
        if i < len(standard):
            h, aspect = standard[i]
            block[38 + 2 * i:40 + 2 * i] = bytes([h // 8 - 31, aspect << 6])
        else:
            block[38 + 2 * i:40 + 2 * i] = b"\x01\x01"
    preferred = (min(width, 4095), min(height, 4095))
    block[54:72] = _detailed_timing(*preferred, min(width_mm, 4095), min(height_mm, 4095))
    block[72:90] = _range_limits(_timing(*preferred, _DTD_MAX_CLOCK_KHZ)[0])
    block[90:108] = _text_descriptor(0xFC, _NAME)
    block[108:126] = _text_descriptor(0xFF, f"{serial:08d}".encode())
    block[126] = 1 if large else 0
    _checksum(block)
    if large:
        return bytes(block) + _displayid_extension(width, height)
    return bytes(block)
