"""The userptr capset (GET_CAPSET_INFO / GET_CAPSET) in each configuration, checked field
by field against what the configuration implies (``struct vgpu_userptr_capset``)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest

from protocol.capsets import DEFAULT_COMPUTE_CAPSET as COMPUTE_ID
from protocol.capsets import DEFAULT_USERPTR_CAPSET as USERPTR_ID
from protocol.limits import DEFAULT_LIMITS
from protocol.virtio_gpu_codes import Feature, Resp
from tests.userptr.capsets import ALIAS_RANGES, CAPSET_LAYOUT, read_capsets
from tests.userptr.fixtures import VmFactory

GiB = 1 << 30
#: host ranges per buffer on the per-range path: it allocates each one
PER_RANGE_RANGES = DEFAULT_LIMITS.max_per_range_ranges
MAGIC = 0x52545055  # "UPTR"
#: UserptrCapFlag bits
AVAILABLE, RDONLY, BATCH_SUPPORTED, ZERO_COPY, CONTEXT_MAP = 1, 2, 4, 8, 16
SERVING = AVAILABLE | RDONLY | ZERO_COPY
PATH_BATCH, PATH_ALIAS, PATH_PER_RANGE = 1, 2, 3
BACKEND_SIM = 2
#: 1 << BLOB_MEM_GUEST | 1 << BLOB_MEM_HOST3D_GUEST
BLOB_MEMS = (1 << 1) | (1 << 3)


@dataclass(frozen=True, slots=True)
class Expected:
    """The capset a configuration must publish (None: no userptr capset at all)."""

    protocol: int = 5
    flags: int = SERVING | CONTEXT_MAP | BATCH_SUPPORTED
    host_path: int = PATH_BATCH
    #: min(--max-userptr-entries, the path's range cap); None: not checked (USERPTR
    #: unavailable)
    max_entries: int | None = 1 << 20
    max_bytes: int = 16 * GiB
    num_gpus: int = 1
    kfd_minor: int = 19
    capset_id: int = USERPTR_ID
    #: other capset ids published next to it
    others: frozenset[int] = field(default_factory=lambda: frozenset({COMPUTE_ID}))


CONFIGS: dict[str, tuple[tuple[str, ...], Expected | None]] = {
    "default": ((), Expected()),
    "pre-batch kernel": (("--sim-pre-batch",), Expected(
        flags=SERVING | CONTEXT_MAP, host_path=PATH_ALIAS, max_entries=ALIAS_RANGES)),
    "alias on a batch kernel": (("--userptr-host-path", "alias"), Expected(
        host_path=PATH_ALIAS, max_entries=ALIAS_RANGES)),
    "per-range": (("--userptr-host-path", "per-range"), Expected(
        host_path=PATH_PER_RANGE, max_entries=PER_RANGE_RANGES)),
    "per-range below the limit": (("--userptr-host-path", "per-range",
                                   "--max-userptr-entries", "100"), Expected(
        host_path=PATH_PER_RANGE, max_entries=100)),
    "no compute": (("--no-compute",), Expected(flags=SERVING | BATCH_SUPPORTED,
                                                others=frozenset())),
    "protocol v3": (("--userptr-protocol", "v3"), Expected(protocol=3)),
    "protocol off": (("--userptr-protocol", "off"), None),
    "context isolation": (("--kfd-isolation", "context"),
                          Expected(flags=0, host_path=0, max_entries=None,
                                   others=frozenset())),
    "three GPUs": (("--sim-gpus", "3"), Expected(num_gpus=3)),
    "KFD 1.17": (("--sim-kfd-minor", "17"), Expected(kfd_minor=17)),
    "limits": (("--max-userptr-entries", "77", "--max-userptr-bytes", str(3 << 20)),
               Expected(max_entries=77, max_bytes=3 << 20)),
    "capset ids": (("--userptr-capset-id", "50", "--compute-capset-id", "51"),
                   Expected(capset_id=50, others=frozenset({51}))),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_userptr_capset(start_vm: VmFactory, config: str) -> None:
    """Every field of the capset, the capset list, and feature bit 5 only for v3."""
    args, want = CONFIGS[config]
    vm = start_vm(*args)
    capsets = read_capsets(vm)
    bit5 = bool(vm.s.neg.offered_features & Feature.RESOURCE_USERPTR_V3)
    assert bit5 == (want is not None and want.protocol == 3)
    if want is None:
        assert set(capsets) == {COMPUTE_ID}
        return
    assert set(capsets) == {want.capset_id} | want.others
    info, data = capsets[want.capset_id]
    assert (info.capset_max_version, info.capset_max_size) == (1, CAPSET_LAYOUT.size)
    got = CAPSET_LAYOUT.unpack(data)
    max_entries = got[8] if want.max_entries is None else want.max_entries
    assert got == (MAGIC, 1, CAPSET_LAYOUT.size, want.protocol, want.flags, want.host_path,
                   BACKEND_SIM, 4096, max_entries, want.max_bytes, want.num_gpus,
                   1 << 16 | want.kfd_minor, BLOB_MEMS, 0)


def test_capset_version_and_id_checks(start_vm: VmFactory) -> None:
    """Version 0 and 1 are served; version 2 and an unknown id are INVALID_PARAMETER."""
    vm = start_vm()
    size = 24 + CAPSET_LAYOUT.size
    assert vm.s.gpu.get_capset(USERPTR_ID, 0, size).expect(Resp.OK_CAPSET).raw[24:28] == \
        struct.pack("<I", MAGIC)
    vm.s.gpu.get_capset(USERPTR_ID, 2, size).expect(Resp.ERR_INVALID_PARAMETER)
    vm.s.gpu.get_capset(USERPTR_ID - 1, 1, size).expect(Resp.ERR_INVALID_PARAMETER)
