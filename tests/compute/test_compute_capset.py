"""The compute capset (``struct vgpu_compute_capset`` + kernel descriptors), checked
field by field against the documented stream ABI; and its id as the context type."""

from __future__ import annotations

import struct

import pytest

from protocol.capsets import DEFAULT_COMPUTE_CAPSET as COMPUTE_ID
from protocol.virtio_gpu_codes import Resp
from tests.userptr import guest_commands as gc
from tests.userptr.capsets import read_capsets
from tests.userptr.fixtures import VmFactory

HEADER = struct.Struct("<IHHIIIIII")  # magic, version, size, stream_version, num_kernels,
#                                       max_submit_bytes, num_rings, engine, flags
KERNEL = struct.Struct("<IIII")  # kernel_id, num_args, arg_kinds (4 bits each), padding
MAGIC = 0x43434756  # "VGCC"
ENGINE_SIMULATED = 1
BUFFER, U64, F32 = 1, 2, 3
#: kernel id -> argument kinds, as protocol/compute.py documents them
KERNELS = {
    1: (BUFFER, U64, U64),                        # FILL_U32 dst, count, value
    2: (BUFFER, BUFFER, U64),                     # COPY dst, src, bytes
    3: (BUFFER, BUFFER, BUFFER, U64),             # VADD_F32 dst, a, b, count
    4: (BUFFER, BUFFER, U64, F32),                # SAXPY_F32 y, x, count, a
    5: (BUFFER, U64, BUFFER),                     # REDUCE_SUM_F32 x, count, out
    6: (BUFFER, BUFFER, BUFFER, U64, U64, U64),   # MATMUL_F32 c, a, b, m, n, k
    7: (BUFFER, U64),                             # CHECKSUM_CRC32 buffer, bytes
}


def packed(kinds: tuple[int, ...]) -> int:
    """4 bits per argument, first argument in the low bits."""
    return sum(kind << (4 * i) for i, kind in enumerate(kinds))


@pytest.mark.parametrize(("args", "capset_id", "max_submit"), [
    ((), COMPUTE_ID, 1 << 20),
    (("--compute-capset-id", "33", "--max-submit-bytes", "65536"), 33, 65536),
])
def test_compute_capset(start_vm: VmFactory, args: tuple[str, ...], capset_id: int,
                        max_submit: int) -> None:
    """Header, limits, 64 rings, the simulated engine and the seven kernels."""
    vm = start_vm(*args)
    capsets = read_capsets(vm)
    info, data = capsets[capset_id]
    assert info.capset_max_version == 1
    assert len(data) == info.capset_max_size == HEADER.size + len(KERNELS) * KERNEL.size
    assert HEADER.unpack_from(data) == (MAGIC, 1, HEADER.size, 1, len(KERNELS), max_submit,
                                        64, ENGINE_SIMULATED, 0)
    table = {k[0]: k[1:] for k in KERNEL.iter_unpack(data[HEADER.size:])}
    assert table == {kid: (len(kinds), packed(kinds), 0) for kid, kinds in KERNELS.items()}
    vm.run(gc.ctx_create(1, context_init=capset_id)).expect(Resp.OK_NODATA)
    vm.run(gc.ctx_create(2, context_init=0)).expect(Resp.OK_NODATA)
    vm.run(gc.ctx_create(3, context_init=capset_id + 1)).expect(Resp.ERR_INVALID_PARAMETER)


@pytest.mark.parametrize("args", [("--no-compute",), ("--kfd-isolation", "context")])
def test_no_compute_capset(start_vm: VmFactory, args: tuple[str, ...]) -> None:
    """Without compute contexts (disabled, or no simulated page table in context
    isolation) there is no compute capset and no context type."""
    vm = start_vm(*args)
    assert COMPUTE_ID not in read_capsets(vm)
    vm.run(gc.ctx_create(1)).expect(Resp.ERR_UNSPEC)
