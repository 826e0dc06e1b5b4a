"""The virtio-gpu driver's probe: which features, params and capsets the guest sees.

QEMU 10's vhost-user-gpu-pci passes to the guest only VIRGL, EDID and RESOURCE_UUID of the
back-end's features; RESOURCE_BLOB and CONTEXT_INIT never arrive, and the guest's
num_capsets is the back-end's (see /work/shared/reference/vhost-user-gpu-protocol.md §4).
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import reduce
from operator import or_
from pathlib import Path

import pytest

from guest_tests import drm
from guest_tests import drm_checks as checks
from guest_tests.guest_helpers import GuestEnvironment
from protocol.capsets import DEFAULT_COMPUTE_CAPSET, DEFAULT_USERPTR_CAPSET

# virtio feature bits (include/uapi/linux/virtio_gpu.h, virtio_config.h, virtio_ring.h)
F_VIRGL, F_EDID, F_RESOURCE_UUID, F_RESOURCE_BLOB, F_CONTEXT_INIT = 0, 1, 2, 3, 4
F_BIT5 = 5  # RESOURCE_USERPTR in the v3 series, BLOB_ALIGNMENT from Linux 7.2
F_INDIRECT_DESC, F_EVENT_IDX, F_VERSION_1 = 28, 29, 32
# our capsets' headers: le32 magic, le16 version, le16 size (protocol/capsets.py, compute.py)
CAPSET_MAGICS = {DEFAULT_USERPTR_CAPSET: b"UPTR", DEFAULT_COMPUTE_CAPSET: b"VGCC"}
CAPSET_LINE_RE = re.compile(r"cap set (\d+): id (\d+), max-version (\d+), max-size (\d+)")


@dataclass(frozen=True)
class GuestView:
    """What the guest driver must see of a back-end behind QEMU 10's vhost-user-gpu-pci."""

    edid: bool
    resource_uuid: bool
    capset_ids: frozenset[int]


EXPECTED = {
    # vgpu_backend/device.py offered_features(): EDID, RESOURCE_UUID, RESOURCE_BLOB and
    # CONTEXT_INIT (+ VERSION_1, INDIRECT_DESC, EVENT_IDX); QEMU forwards EDID and
    # RESOURCE_UUID.  Capsets: compute (the simulated GPU, the default on hosts without
    # /dev/kfd, like the vm.py hosts) and userptr (--userptr-protocol v5, the default).
    "ours": GuestView(edid=True, resource_uuid=True, capset_ids=frozenset(
        {DEFAULT_USERPTR_CAPSET, DEFAULT_COMPUTE_CAPSET})),
    # /usr/lib/qemu/vhost-user-gpu (QEMU 10.0.2) without --virgl offers EDID only and
    # publishes no capset.
    "reference": GuestView(edid=True, resource_uuid=False, capset_ids=frozenset()),
}


@pytest.fixture(scope="module")
def expected(vgpu_backend: str) -> GuestView:
    """The view expected for the back-end under test."""
    if vgpu_backend not in EXPECTED:
        pytest.skip(f"no feature expectations for back-end {vgpu_backend!r} "
                    "(defined for --backend ours and --backend reference)")
    return EXPECTED[vgpu_backend]


@pytest.fixture(scope="module")
def card() -> Iterator[drm.Card]:
    """/dev/dri/card0 (no modesets here)."""
    with drm.Card() as opened:
        yield opened


def capsets_in_boot_log() -> dict[int, tuple[int, int]]:
    """Capset id -> (max version, max size) as the driver logged them at probe."""
    found = {}
    for line in checks.kernel_log_since_boot():
        match = CAPSET_LINE_RE.search(line)
        if match:
            found[int(match[2])] = (int(match[3]), int(match[4]))
    return found


def kernel_capset_masks(ids: frozenset[int]) -> set[int]:
    """What Linux 6.1's SUPPORTED_CAPSET_IDs may report for ``ids``.

    virtio_gpu_get_capsets() computes ``1 << id`` on an int (undefined past 31; x86 wraps
    the count mod 32: ids 48 and 49 would become bits 16 and 17) unless the kernel has the
    Dec 2025 "fix undefined behavior in capset shift calculation" (1ULL); either way the
    getparam ioctl copies only an int, so bits 32-63 never reach userspace.
    """
    wrapped = reduce(or_, (1 << (i % 32) for i in ids), 0)
    exact = reduce(or_, (1 << i for i in ids), 0) & 0xFFFFFFFF
    return {wrapped, exact}


def test_virtio_gpu_driver_owns_card0(card: drm.Card, drm_pci_address: str) -> None:
    version = card.version()
    assert (version.name, version.description) == ("virtio_gpu", "virtio GPU")
    assert Path("/sys/class/drm/card0/device").resolve().name == drm_pci_address
    boot_log = checks.kernel_log_since_boot()
    assert any(f"Initialized virtio_gpu {version.major}.{version.minor}.{version.patchlevel}"
               in line and drm_pci_address in line for line in boot_log)
    assert card.get_cap(drm.CAP_DUMB_BUFFER) == 1
    trouble = [line for line in boot_log if checks.TROUBLE_RE.search(line)
               and re.search(r"drm|virtio", line, re.IGNORECASE)]
    assert not trouble


def test_debugfs_features_are_what_qemu_forwards(expected: GuestView,
                                                 guest_env: GuestEnvironment) -> None:
    features = checks.debugfs_fields("virtio-gpu-features")
    yes_no = {True: "yes", False: "no"}
    assert features == {
        "virgl": "no", "edid": yes_no[expected.edid], "indirect": "yes",
        "resource uuid": yes_no[expected.resource_uuid], "blob resources": "no",
        "context init": "no", "cap sets": str(len(expected.capset_ids)),
        "scanouts": guest_env.host_facts().get("heads", "1"),  # QEMU's max_outputs
    }, "a 'host visible region' line or a changed flag is not what QEMU can forward"


def test_negotiated_feature_bits(expected: GuestView, drm_pci_address: str) -> None:
    devices = list(Path("/sys/bus/pci/devices", drm_pci_address).glob("virtio[0-9]*"))
    assert len(devices) == 1, devices
    bits = (devices[0] / "features").read_text().strip()
    negotiated = {i for i, bit in enumerate(bits) if bit == "1"}
    assert {F_INDIRECT_DESC, F_EVENT_IDX, F_VERSION_1} <= negotiated
    gpu_bits = negotiated & set(range(24))
    want = {F_EDID} if expected.edid else set()
    want |= {F_RESOURCE_UUID} if expected.resource_uuid else set()
    assert gpu_bits == want, f"device-specific bits {sorted(gpu_bits)}, want {sorted(want)}"
    assert not negotiated & {F_VIRGL, F_RESOURCE_BLOB, F_CONTEXT_INIT, F_BIT5}


def test_getparam_values(card: drm.Card, expected: GuestView) -> None:
    values = {
        "3D_FEATURES": card.get_param(drm.PARAM_3D_FEATURES),
        "CAPSET_QUERY_FIX": card.get_param(drm.PARAM_CAPSET_QUERY_FIX),
        "RESOURCE_BLOB": card.get_param(drm.PARAM_RESOURCE_BLOB),
        "HOST_VISIBLE": card.get_param(drm.PARAM_HOST_VISIBLE),
        "CROSS_DEVICE": card.get_param(drm.PARAM_CROSS_DEVICE),
        "CONTEXT_INIT": card.get_param(drm.PARAM_CONTEXT_INIT),
    }
    assert values == {"3D_FEATURES": 0, "CAPSET_QUERY_FIX": 1, "RESOURCE_BLOB": 0,
                      "HOST_VISIBLE": 0, "CROSS_DEVICE": int(expected.resource_uuid),
                      "CONTEXT_INIT": 0}
    mask = card.get_param(drm.PARAM_SUPPORTED_CAPSET_IDS)
    assert mask in kernel_capset_masks(expected.capset_ids), \
        f"SUPPORTED_CAPSET_IDs {mask:#x} for capsets {sorted(expected.capset_ids)}"
    for unknown in (0, 0xFFFF):
        with pytest.raises(OSError) as error:
            card.get_param(unknown)
        assert error.value.errno == errno.EINVAL


def test_kernel_accepted_the_capsets(expected: GuestView) -> None:
    boot_log = checks.kernel_log_since_boot()
    assert f"number of cap sets: {len(expected.capset_ids)}" in "\n".join(boot_log)
    refused = [line for line in boot_log
               if "invalid capset id" in line or "timed out waiting for cap set" in line]
    assert not refused
    assert set(capsets_in_boot_log()) == expected.capset_ids


def test_capsets_are_readable_through_get_caps(card: drm.Card, expected: GuestView) -> None:
    capsets = capsets_in_boot_log()
    if not expected.capset_ids:
        with pytest.raises(OSError) as error:
            card.get_caps(DEFAULT_USERPTR_CAPSET, 0, 16)
        assert error.value.errno == errno.ENOSYS, "GET_CAPS without capsets"
        return
    for capset_id, (version, size) in sorted(capsets.items()):
        data = card.get_caps(capset_id, version, size)  # the kernel asks the device
        assert data[:4] == CAPSET_MAGICS[capset_id], (capset_id, data[:16].hex())
        header_version = int.from_bytes(data[4:6], "little")
        header_size = int.from_bytes(data[6:8], "little")
        assert header_version == version and 8 <= header_size <= size, (capset_id, data.hex())
    missing = (set(range(1, 64)) - set(capsets)).pop()
    with pytest.raises(OSError) as error:
        card.get_caps(missing, 0, 16)
    assert error.value.errno == errno.EINVAL
