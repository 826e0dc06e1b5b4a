"""The connector's EDID (GET_EDID through the device) and the modes Linux derives from it.

With VIRTIO_GPU_F_EDID the driver builds the mode list from the EDID alone, and its
mode_valid hook drops a preferred mode that is not the scanout size the device reported
in GET_DISPLAY_INFO (virtio_gpu_conn_mode_valid).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_tests import drm
from guest_tests import drm_checks as checks
from guest_tests.guest_helpers import Screendumps

#: QEMU's vhost-user-gpu-pci xres/yres defaults (scripts/vmrunner/qemu.py sets neither)
QEMU_SCANOUT_SIZE = (1280, 800)
EDID_HEADER = bytes.fromhex("00ffffffffffff00")
#: who writes the EDID: ours builds it (protocol/edid.py); the reference forwards GET_EDID
#: to QEMU, whose generator (hw/display/edid-generate.c) names the monitor "QEMU Monitor"
MONITOR_NAMES = {"ours": "vgpu-backend", "reference": "QEMU Monitor"}
#: EDID 1.4 established timings I/II (bytes 35-36, MSB first) and byte 37 bit 7
ESTABLISHED = ((720, 400), (720, 400), (640, 480), (640, 480), (640, 480), (640, 480),
               (800, 600), (800, 600), (800, 600), (800, 600), (832, 624), None,
               (1024, 768), (1024, 768), (1024, 768), (1280, 1024), (1152, 870))
#: standard timing aspect codes (EDID >= 1.3): height = width * num // den
ASPECTS = ((10, 16), (3, 4), (4, 5), (9, 16))


@pytest.fixture(scope="module")
def card() -> Iterator[drm.Card]:
    """/dev/dri/card0 (no modesets here)."""
    with drm.Card() as opened:
        yield opened


@pytest.fixture(scope="module")
def connector(card: drm.Card) -> drm.Connector:
    """The connected output (virtio-gpu scanout 0)."""
    return drm.find_output(card).connector


@pytest.fixture(scope="module")
def edid_blob(card: drm.Card, connector: drm.Connector, vgpu_backend: str) -> bytes | None:
    """The connector's EDID property blob; None without VIRTIO_GPU_F_EDID (only allowed
    for a back-end whose offer we do not know)."""
    props = {card.property(prop_id).name: (card.property(prop_id), value)
             for prop_id, value in connector.properties.items()}
    if checks.debugfs_fields("virtio-gpu-features")["edid"] != "yes":
        assert vgpu_backend not in MONITOR_NAMES, \
            f"back-end {vgpu_backend!r} offers VIRTIO_GPU_F_EDID; the guest did not get it"
        assert "EDID" not in props, "an EDID property without VIRTIO_GPU_F_EDID"
        return None
    assert "EDID" in props, "the connector has no EDID property"
    prop, blob_id = props["EDID"]
    assert prop.flags & (drm.PROP_BLOB | drm.PROP_IMMUTABLE) == \
        drm.PROP_BLOB | drm.PROP_IMMUTABLE
    assert blob_id, "VIRTIO_GPU_F_EDID negotiated but the EDID property is empty"
    return card.property_blob(blob_id)


@pytest.fixture(scope="module")
def edid(edid_blob: bytes | None) -> bytes:
    """The EDID; skips when the device does not offer it."""
    if edid_blob is None:
        pytest.skip("the device does not offer VIRTIO_GPU_F_EDID (modes come from "
                    "GET_DISPLAY_INFO)")
    return edid_blob


def detailed_timings(base: bytes) -> list[tuple[int, int, int]]:
    """(width, height, pixel clock kHz) of the base block's detailed timing descriptors."""
    found = []
    for offset in range(54, 126, 18):
        d = base[offset:offset + 18]
        clock = int.from_bytes(d[0:2], "little") * 10
        if clock:
            found.append((d[2] | (d[4] & 0xF0) << 4, d[5] | (d[7] & 0xF0) << 4, clock))
    return found


def standard_sizes(base: bytes) -> set[tuple[int, int]]:
    """Sizes of the base block's standard timings (bytes 38-53)."""
    sizes = set()
    for offset in range(38, 54, 2):
        first, second = base[offset], base[offset + 1]
        if (first, second) in ((1, 1), (0, 0), (0x20, 0x20)):
            continue
        width = (first + 31) * 8
        num, den = ASPECTS[second >> 6]
        sizes.add((width, width * num // den))
    return sizes


def established_sizes(base: bytes) -> set[tuple[int, int]]:
    """Sizes of the established timings I/II (the interlaced 1024x768@87 is left out:
    virtio-gpu connectors do not allow interlace)."""
    bits = base[35] << 9 | base[36] << 1 | base[37] >> 7
    return {size for i, size in enumerate(ESTABLISHED)
            if size is not None and bits >> (16 - i) & 1}


def monitor_name(base: bytes) -> str:
    """The display product name descriptor (tag 0xFC)."""
    for offset in range(54, 126, 18):
        d = base[offset:offset + 18]
        if d[0:3] == b"\0\0\0" and d[3] == 0xFC:
            return d[5:18].split(b"\n")[0].decode("ascii", "replace").rstrip()
    return ""


def test_connector_is_a_connected_virtual_output(card: drm.Card,
                                                 connector: drm.Connector) -> None:
    assert connector.connector_type == drm.CONNECTOR_VIRTUAL
    assert connector.connection == drm.CONNECTED
    encoder = card.encoder(connector.encoder_id)
    assert encoder.crtc_id in card.resources().crtcs


def test_edid_blob_is_well_formed(edid: bytes) -> None:
    assert edid[:8] == EDID_HEADER
    assert len(edid) == 128 * (1 + edid[126]), f"{len(edid)} bytes, {edid[126]} extensions"
    sums = [sum(edid[i:i + 128]) % 256 for i in range(0, len(edid), 128)]
    assert sums == [0] * len(sums), f"block checksums {sums}"
    assert (edid[18], edid[19]) in ((1, 3), (1, 4)), "EDID version"
    assert detailed_timings(edid), "no detailed timing descriptor"


def test_edid_names_the_monitor_of_the_backend(edid: bytes, vgpu_backend: str) -> None:
    if vgpu_backend not in MONITOR_NAMES:
        pytest.skip(f"no EDID expectation for back-end {vgpu_backend!r}")
    assert monitor_name(edid) == MONITOR_NAMES[vgpu_backend]


def test_preferred_mode_is_the_scanout_size(card: drm.Card, connector: drm.Connector,
                                            edid_blob: bytes | None,
                                            screendump: Screendumps) -> None:
    preferred = [mode for mode in connector.modes if mode.preferred]
    assert len(preferred) == 1, [mode.name for mode in preferred]
    assert preferred[0].size == QEMU_SCANOUT_SIZE
    width, height = QEMU_SCANOUT_SIZE
    if edid_blob is not None:  # else a CVT mode made from GET_DISPLAY_INFO's rectangle
        assert detailed_timings(edid_blob)[0] == (width, height, preferred[0].clock)
        assert connector.mm_size == (edid_blob[21] * 10, edid_blob[22] * 10)
    crtc = card.crtc(card.encoder(connector.encoder_id).crtc_id)
    assert crtc.mode is not None and crtc.mode.size == QEMU_SCANOUT_SIZE, "console's mode"
    fb0 = Path("/sys/class/graphics/fb0/virtual_size").read_text().strip()
    assert fb0 == "{},{}".format(*QEMU_SCANOUT_SIZE)
    assert screendump("edid-scanout").shape == (height, width, 3)


def test_mode_list_is_the_edid_modes(card: drm.Card, connector: drm.Connector,
                                     edid: bytes) -> None:
    """Every base-block mode is listed (our decoder keeps standard timings Linux would
    drop: non-DMT sizes with a DMT-level EDID; such an EDID fails here, rightly, as it
    advertises a mode the guest cannot use); without extension blocks nothing else is."""
    sizes = [mode.size for mode in connector.modes]
    (min_w, min_h), (max_w, max_h) = card.resources().min_size, card.resources().max_size
    assert all(min_w <= w <= max_w and min_h <= h <= max_h for w, h in sizes), sizes
    advertised = ({(w, h) for w, h, _ in detailed_timings(edid)} | standard_sizes(edid)
                  | established_sizes(edid))
    advertised = {(w, h) for w, h in advertised if w <= max_w and h <= max_h}
    assert advertised - set(sizes) == set(), "EDID modes missing from the mode list"
    if edid[126] == 0:  # no extension blocks: the base block is every mode there is
        assert set(sizes) == advertised, "modes the EDID does not advertise"
