"""``build_edid``: valid checksums, the requested size in the timing, our name."""

from __future__ import annotations

import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocol.edid import EDID_BLOCK, build_edid

EDID_HEADER = bytes([0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0])
DESCRIPTOR_OFFSETS = (54, 72, 90, 108)
REFRESH_HZ = 60
SIZES = st.integers(1, 16384)


def block_checksum_ok(block: bytes) -> bool:
    return len(block) == EDID_BLOCK and sum(block) % 256 == 0


def detailed_timing(block: bytes) -> dict[str, int]:
    """Decode the first 18-byte descriptor as a detailed timing (VESA E-EDID 1.4 §3.10.2)."""
    d = block[54:72]
    return {
        "clock_10khz": struct.unpack_from("<H", d)[0],
        "hactive": d[2] | (d[4] >> 4) << 8,
        "hblank": d[3] | (d[4] & 0xF) << 8,
        "vactive": d[5] | (d[7] >> 4) << 8,
        "vblank": d[6] | (d[7] & 0xF) << 8,
        "width_mm": d[12] | (d[14] >> 4) << 8,
        "height_mm": d[13] | (d[14] & 0xF) << 8,
    }


def display_descriptors(block: bytes) -> dict[int, bytes]:
    """Tag -> 13-byte text of the display descriptors (pixel clock 0)."""
    out = {}
    for off in DESCRIPTOR_OFFSETS:
        d = block[off:off + 18]
        if d[0:3] == b"\0\0\0" and d[4] == 0:
            out[d[3]] = d[5:18]
    return out


def descriptor_text(raw: bytes) -> bytes:
    """Text of a descriptor: up to the 0x0A terminator, padded with spaces after it."""
    text, newline, padding = raw.partition(b"\n")
    assert newline or len(text) == 13
    assert padding.strip(b" ") == b""
    return text


def displayid_timing(ext: bytes) -> dict[str, int]:
    """Decode the DisplayID 1.3 extension's Type I timing (stored as value - 1)."""
    assert ext[0] == 0x70  # DisplayID extension tag
    version, length, product, ext_count = ext[1:5]
    assert (version, product, ext_count) == (0x13, 0x03, 0)
    section = ext[1:1 + 4 + length + 1]  # header, data blocks, checksum
    assert sum(section) % 256 == 0, "DisplayID section checksum"
    tag, revision, block_len = ext[5:8]
    assert (tag, revision, block_len) == (0x03, 0x00, 20)
    timing = ext[8:8 + block_len]
    fields = struct.unpack_from("<8H", timing, 4)
    return {"clock_10khz": int.from_bytes(timing[0:3], "little"), "options": timing[3],
            "hactive": fields[0] + 1, "hblank": fields[1] + 1,
            "vactive": fields[4] + 1, "vblank": fields[5] + 1}


def assert_clock_is_60hz(clock_10khz: int, htotal: int, vactive: int, vblank: int,
                         field_max: int) -> None:
    """The pixel clock gives 60 Hz within its 10 kHz resolution; or, when 60 Hz does not
    fit the field even with the shortest vertical blank allowed at 60 Hz (460 us), a
    lower refresh (>= 24 Hz) whose clock does."""
    vtotal = vactive + vblank
    assert 0 < clock_10khz <= field_max
    if 0 <= htotal * vtotal * REFRESH_HZ / 1000 - clock_10khz * 10 < 10 + 1e-6:
        return
    refresh = clock_10khz * 10_000 / (htotal * vtotal)
    assert 24 - 1e-6 <= refresh < REFRESH_HZ
    # the fewest blank lines lasting 460 us at 60 Hz: v / (60 (vactive + v)) >= 460e-6
    blank_60 = -(-460 * REFRESH_HZ * vactive // (1_000_000 - 460 * REFRESH_HZ))
    assert htotal * (vactive + blank_60) * REFRESH_HZ / 10_000 > field_max


@settings(max_examples=300, deadline=None)
@given(width=SIZES, height=SIZES, serial=st.integers(0, 15))
@example(width=1, height=1, serial=0)
@example(width=4095, height=4095, serial=0)
@example(width=4096, height=2160, serial=1)
@example(width=1280, height=4096, serial=0)
@example(width=16384, height=16384, serial=15)
@example(width=2434, height=4094, serial=0)  # 60 Hz fits only with too short a blank
def test_edid_is_valid_and_encodes_the_size(width: int, height: int, serial: int) -> None:
    edid = build_edid(width, height, serial=serial)
    large = width > 4095 or height > 4095
    assert len(edid) == (2 if large else 1) * EDID_BLOCK
    base = edid[:EDID_BLOCK]
    assert block_checksum_ok(base)
    assert base[0:8] == EDID_HEADER
    assert (base[18], base[19]) == (1, 4)  # EDID 1.4
    assert base[126] == (1 if large else 0)  # extension count
    assert struct.unpack_from("<I", base, 12)[0] == serial

    dtd = detailed_timing(base)
    assert (dtd["hactive"], dtd["vactive"]) == (min(width, 4095), min(height, 4095))
    assert dtd["clock_10khz"] != 0  # a zero clock would make it a display descriptor
    assert_clock_is_60hz(dtd["clock_10khz"], dtd["hactive"] + dtd["hblank"],
                         dtd["vactive"], dtd["vblank"], 0xFFFF)
    assert dtd["width_mm"] <= 4095 and dtd["height_mm"] <= 4095

    texts = display_descriptors(base)
    assert descriptor_text(texts[0xFC]) == b"vgpu-backend"
    assert descriptor_text(texts[0xFF]) == f"{serial:08d}".encode()
    assert 0xFD in texts  # range limits

    if large:
        ext = edid[EDID_BLOCK:]
        assert block_checksum_ok(ext)
        timing = displayid_timing(ext)
        assert (timing["hactive"], timing["vactive"]) == (width, height)
        assert timing["options"] & 0x80  # preferred
        assert_clock_is_60hz(timing["clock_10khz"], width + timing["hblank"],
                             height, timing["vblank"], 0xFFFFFF)


def test_vendor_id_is_vgb() -> None:
    word = struct.unpack_from(">H", build_edid(1024, 768), 8)[0]
    letters = "".join(chr(ord("A") - 1 + ((word >> shift) & 0x1F)) for shift in (10, 5, 0))
    assert letters == "VGB" and not word & 0x8000


def test_physical_size_follows_100_dpi() -> None:
    edid = build_edid(1000, 500)
    dtd = detailed_timing(edid)
    assert (dtd["width_mm"], dtd["height_mm"]) == (254, 127)
    assert (edid[21], edid[22]) == (25, 12)  # cm


def test_sizes_differ_only_where_they_should() -> None:
    a, b = build_edid(1280, 800), build_edid(1920, 1080)
    differing = {i for i in range(EDID_BLOCK) if a[i] != b[i]}
    # size in cm, the detailed timing, the range limits' max clock (byte 81), checksum
    assert differing <= set(range(21, 23)) | set(range(54, 72)) | {81, 127}


@pytest.mark.parametrize("width, height", [(0, 1), (1, 0), (65536, 1), (1, 65536), (-1, 5)])
def test_out_of_range_sizes_are_refused(width: int, height: int) -> None:
    with pytest.raises(ValueError):
        build_edid(width, height)


# --- fields the size-driven test above cannot tell apart --------------------------------


def dtd_refresh(block: bytes) -> tuple[int, int]:
    """(refresh in Hz rounded, pixel clock in kHz) of the detailed timing."""
    dtd = detailed_timing(block)
    clock_khz = dtd["clock_10khz"] * 10
    total = (dtd["hactive"] + dtd["hblank"]) * (dtd["vactive"] + dtd["vblank"])
    return round(clock_khz * 1000 / total), clock_khz


@pytest.mark.parametrize(("width", "height", "mm", "cm"), [
    (1920, 1080, (487, 274), (48, 27)),  # past 255 mm: the upper nibbles carry bits
    (16384, 12000, (4095, 3048), (255, 255)),  # past 4095 mm / 255 cm: saturated
])
def test_physical_size_uses_the_upper_bits_and_saturates(
        width: int, height: int, mm: tuple[int, int], cm: tuple[int, int]) -> None:
    edid = build_edid(width, height)
    dtd = detailed_timing(edid)
    assert (dtd["width_mm"], dtd["height_mm"]) == mm
    assert (edid[21], edid[22]) == cm


def test_standard_timings_list_four_modes_and_mark_the_rest_unused() -> None:
    edid = build_edid(1024, 768)
    slots = [edid[38 + 2 * i:40 + 2 * i] for i in range(8)]
    aspect = {0b00: (16, 10), 0b11: (16, 9)}
    modes = [((s[0] + 31) * 8, aspect[s[1] >> 6], s[1] & 0x3F) for s in slots[:4]]
    # (horizontal pixels, aspect ratio, refresh - 60)
    assert modes == [(1280, (16, 10), 0), (1280, (16, 9), 0), (1600, (16, 9), 0),
                     (1920, (16, 10), 0)]
    assert slots[4:] == [b"\x01\x01"] * 4


def test_detailed_timing_sync_and_flags() -> None:
    d = build_edid(1024, 768)[54:72]
    assert (d[8], d[9], d[10] >> 4, d[10] & 0xF, d[11]) == (48, 32, 3, 6, 0)  # porch, sync
    assert (d[15], d[16]) == (0, 0)  # no border
    assert d[17] == 0x1A  # digital separate sync, +hsync -vsync, not interlaced


@pytest.mark.parametrize(("width", "height"), [(1920, 1080), (1024, 768), (4095, 4095), (1, 1)])
def test_range_limits_cover_the_preferred_pixel_clock(width: int, height: int) -> None:
    edid = build_edid(width, height)
    _, clock_khz = dtd_refresh(edid)
    max_clock_mhz = edid[72 + 9] * 10
    assert clock_khz <= max_clock_mhz * 1000 < clock_khz + 10_000


@pytest.mark.parametrize(("width", "height"), [(4095, 3500), (3800, 4095), (4095, 4095)])
def test_a_mode_too_fast_for_60hz_gets_the_highest_refresh_that_fits(
        width: int, height: int) -> None:
    dtd = detailed_timing(build_edid(width, height))
    refresh, _ = dtd_refresh(build_edid(width, height))
    total = (dtd["hactive"] + dtd["hblank"]) * (dtd["vactive"] + dtd["vblank"])
    assert 24 <= refresh < REFRESH_HZ
    assert total * (refresh + 1) // 1000 > 0xFFFF * 10  # one more Hz would not fit


def test_serial_number_keeps_all_32_bits() -> None:
    serial = 0x89ABCDEF
    edid = build_edid(800, 600, serial=serial)
    assert struct.unpack_from("<I", edid, 12)[0] == serial
    assert descriptor_text(display_descriptors(edid)[0xFF]) == str(serial).encode()


@pytest.mark.parametrize(("width", "height"), [(65535, 65535), (65535, 1), (1, 65535)])
def test_the_largest_sizes_are_accepted(width: int, height: int) -> None:
    edid = build_edid(width, height)
    timing = displayid_timing(edid[EDID_BLOCK:])
    assert (timing["hactive"], timing["vactive"]) == (width, height)


def test_small_modes_get_the_minimum_vertical_blank() -> None:
    # CVT-RB minimum: front porch 3 + sync 6 + back porch 6 lines, when 460 us needs fewer
    assert detailed_timing(build_edid(640, 480))["vblank"] == 15


@pytest.mark.parametrize(("width", "height"), [(640, 480), (1280, 800), (1920, 1080),
                                               (3840, 2160), (4095, 4095), (1, 1)])
def test_vertical_blank_lasts_at_least_460_us(width: int, height: int) -> None:
    edid = build_edid(width, height)
    dtd = detailed_timing(edid)
    _, clock_khz = dtd_refresh(edid)
    line_us = (dtd["hactive"] + dtd["hblank"]) * 1000 / clock_khz
    assert dtd["vblank"] * line_us >= 460
