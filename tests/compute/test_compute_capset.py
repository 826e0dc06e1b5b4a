"""The compute capset (``struct vgpu_compute_capset`` + kernel descriptors), checked
field by field against the documented stream ABI; and its id as the context type."""

from __future__ import annotations

import os
import struct

import pytest

from protocol.capsets import DEFAULT_COMPUTE_CAPSET as COMPUTE_ID
from protocol.capsets import DEFAULT_USERPTR_CAPSET as USERPTR_ID
from protocol.limits import Limits
from protocol.vhost_user import MemRegion
from protocol.virtio_gpu import CtrlHdr, CtxCreate
from protocol.virtio_gpu_codes import Cmd, Resp
from tests.userptr import guest_commands as gc
from tests.userptr.capsets import read_capsets
from tests.userptr.fixtures import VmFactory
from tests.userptr.guest_buffer import scattered_buffer
from vgpu_backend.device import VirtioGpuDevice
from vgpu_backend.device_state import DeviceOptions
from vgpu_backend.eventloop import EventLoop
from vgpu_backend.guest_memory import GuestMemory
from vgpu_backend.hostgpu.factory import HostGpuOptions, create_host_gpu
from vgpu_backend.hostgpu.sim_kfd import SimTransport

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
def test_without_compute_contexts_are_userptr_contexts(start_vm: VmFactory,
                                                       args: tuple[str, ...]) -> None:
    """Without the compute engine (disabled, or no simulated page table in context
    isolation) there is no compute capset; contexts are userptr contexts, which own
    HOST3D_GUEST USERPTR blobs and take no SUBMIT_3D."""
    vm = start_vm(*args)
    assert COMPUTE_ID not in read_capsets(vm)
    assert USERPTR_ID in read_capsets(vm)
    vm.run(gc.ctx_create(1)).expect(Resp.OK_NODATA)
    vm.run(gc.ctx_create(2, context_init=USERPTR_ID)).expect(Resp.OK_NODATA)
    vm.run(gc.ctx_create(3, context_init=COMPUTE_ID)).expect(Resp.ERR_INVALID_PARAMETER)
    vm.submit(1, []).expect(Resp.ERR_UNSPEC)  # no engine: SUBMIT_3D is not served
    buf = scattered_buffer(vm.ram, 3 * 4096)
    created = vm.create_blob(vm.new_resource_id(), buf.entries, buf.size, ctx_id=1,
                             blob_id=1)
    if "context" in args:  # a secondary KFD process per context: no USERPTR (README)
        created.expect(Resp.ERR_UNSPEC)
    else:
        created.expect(Resp.OK_NODATA)
    vm.destroy_context(2).expect(Resp.OK_NODATA)
    vm.destroy_context(1).expect(Resp.OK_NODATA)
    vm.still_serving()


def test_userptr_context_next_to_compute(start_vm: VmFactory) -> None:
    """With the engine, ``context_init`` = the userptr capset makes a userptr context:
    its blobs are HOST3D_GUEST USERPTR blobs, but it is not a compute context."""
    vm = start_vm()
    vm.run(gc.ctx_create(1, context_init=USERPTR_ID)).expect(Resp.OK_NODATA)
    blob = vm.userptr_blob(8192, ctx_id=1)
    vm.submit(1, []).expect(Resp.ERR_INVALID_PARAMETER)
    vm.unref(blob.resource_id).expect(Resp.OK_NODATA)
    vm.still_serving()


def test_real_kfd_without_page_table_still_has_contexts() -> None:
    """On real hardware the KFD layer has no simulated page table: the engine is off,
    and contexts are userptr contexts (the ROCm UMD creates HOST3D_GUEST blobs in one)."""
    fd = os.memfd_create("ram")
    os.ftruncate(fd, 1 << 20)
    memory, loop = GuestMemory(), EventLoop()
    memory.add(MemRegion(0, 1 << 20, 0x7F00_0000_0000, 0), fd, 8)
    gpu = create_host_gpu(HostGpuOptions(gpu="sim"), transport=_HardwareLikeTransport())
    try:
        device = VirtioGpuDevice(loop, memory, Limits(), DeviceOptions(), gpu)
        assert device.compute is None
        assert [c.capset_id for c in device.state.capsets] == [USERPTR_ID]
        device.contexts.create(CtrlHdr(Cmd.CTX_CREATE, ctx_id=5), CtxCreate(0, 0, b""))
        assert device.contexts.get(5).capset_id == USERPTR_ID
    finally:
        gpu.close()
        memory.clear()
        loop.close()


class _HardwareLikeTransport(SimTransport):
    """The simulated kernel, but with no page table to hand out (as real hardware)."""

    def gpu_memory(self, kfd_fd: int, gpu_id: int) -> None:
        return None
