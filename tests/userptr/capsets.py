"""Reading capsets the way a guest driver does: GET_CAPSET_INFO for every index the config
space announces, then GET_CAPSET of each."""

from __future__ import annotations

import struct

from protocol.virtio_gpu import CTRL_HDR_SIZE, RespCapsetInfo
from protocol.virtio_gpu_codes import Resp
from tests.userptr.vm import Vm

__all__ = ["ALIAS_RANGES", "CAPSET_LAYOUT", "read_capsets"]

#: ``struct vgpu_userptr_capset`` version 1, little-endian, 56 bytes
CAPSET_LAYOUT = struct.Struct("<IHHIIIIIIQIIII")
#: host ranges per buffer on the alias path: it maps each range (half of
#: vm.max_map_count)
with open("/proc/sys/vm/max_map_count", encoding="ascii") as _f:
    ALIAS_RANGES = int(_f.read()) // 2


def read_capsets(vm: Vm) -> dict[int, tuple[RespCapsetInfo, bytes]]:
    """capset id -> (its info, its bytes at its max version)."""
    count = vm.s.neg.config_reads[-1].num_capsets
    out: dict[int, tuple[RespCapsetInfo, bytes]] = {}
    for index in range(count):
        info = vm.s.gpu.get_capset_info(index).capset_info()
        assert info.capset_id not in out, f"capset {info.capset_id} listed twice"
        got = vm.s.gpu.get_capset(info.capset_id, info.capset_max_version,
                                  CTRL_HDR_SIZE + info.capset_max_size).expect(Resp.OK_CAPSET)
        assert got.used_len == CTRL_HDR_SIZE + info.capset_max_size
        out[info.capset_id] = (info, got.raw[CTRL_HDR_SIZE:])
    vm.s.gpu.get_capset_info(count).expect(Resp.ERR_INVALID_PARAMETER)
    return out
