"""The copy path: RESOURCE_CREATE_3D (PIPE_BUFFER) + ATTACH_BACKING +
TRANSFER_TO_HOST_3D + compute + TRANSFER_FROM_HOST_3D gives the same results as the
zero-copy USERPTR path over the same inputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest

from protocol.compute import Kernel, buffer_arg, f32_arg, u64_arg
from protocol.virtio_gpu import ResourceCreate3d, TransferHost3d
from protocol.virtio_gpu_codes import Cmd, Resp
from protocol.wire import encode
from tests.compute.busy_work import BusyBlob
from tests.frontend.gpu_driver import PreparedCommand
from tests.userptr import guest_commands as gc
from tests.userptr.compute_stream import dispatch, fill_cmd, map_cmd
from tests.userptr.fixtures import VmFactory, VmPool
from tests.userptr.guest_buffer import GuestBuffer, scattered_buffer
from tests.userptr.vm import ComputeContext, Vm

F32 = np.float32
M, N, K = 24, 20, 16
COUNT = M * K  # vector length of the element-wise kernels


@dataclass(slots=True)
class Buffer3d:
    """A PIPE_BUFFER resource and its guest backing."""

    resource_id: int
    backing: GuestBuffer
    size: int

@pytest.fixture
def vm(vm_pool: VmPool) -> Vm:
    """The tests of this module share one back-end with room for their busy blobs."""
    return vm_pool.get(ram_size=256 << 20)



def create_buffer(vm: Vm, ctx: ComputeContext, nbytes: int) -> Buffer3d:
    """RESOURCE_CREATE_3D in the context + ATTACH_BACKING over scattered pages."""
    rid = vm.new_resource_id()
    vm.run(gc.create_buffer_3d(rid, nbytes, ctx_id=ctx.ctx_id)).expect(Resp.OK_NODATA)
    backing = scattered_buffer(vm.ram, nbytes)
    vm.s.gpu.attach_backing(rid, backing.entries).expect(Resp.OK_NODATA)
    return Buffer3d(rid, backing, nbytes)


def to_host(vm: Vm, buf: Buffer3d, data: npt.NDArray[np.generic]) -> None:
    """Write the guest backing, TRANSFER_TO_HOST_3D all of it."""
    buf.backing.write(vm.ram, data)
    vm.run(gc.transfer_3d(Cmd.TRANSFER_TO_HOST_3D, buf.resource_id, 0, buf.size)
           ).expect(Resp.OK_NODATA)


def from_host(vm: Vm, buf: Buffer3d) -> npt.NDArray[np.float32]:
    """TRANSFER_FROM_HOST_3D all of it; the guest backing as float32."""
    vm.run(gc.transfer_3d(Cmd.TRANSFER_FROM_HOST_3D, buf.resource_id, 0, buf.size)
           ).expect(Resp.OK_NODATA)
    return np.frombuffer(buf.backing.read(vm.ram, buf.size), F32)


def workload(vx: int, vy: int, va: int, vb: int, vc: int, vs: int) -> list[bytes]:
    """SAXPY, VADD, MATMUL, REDUCE over buffers at those VAs."""
    return [
        dispatch(Kernel.SAXPY_F32, buffer_arg(vy), buffer_arg(vx), u64_arg(COUNT),
                 f32_arg(1.5)),
        dispatch(Kernel.VADD_F32, buffer_arg(vx), buffer_arg(vx), buffer_arg(vy),
                 u64_arg(COUNT)),
        dispatch(Kernel.MATMUL_F32, buffer_arg(vc), buffer_arg(va), buffer_arg(vb),
                 u64_arg(M), u64_arg(N), u64_arg(K)),
        dispatch(Kernel.REDUCE_SUM_F32, buffer_arg(vc), u64_arg(M * N), buffer_arg(vs)),
    ]


def inputs() -> dict[str, npt.NDArray[np.float32]]:
    """The same inputs for both paths."""
    rng = np.random.default_rng(99)
    return {"x": rng.standard_normal(COUNT).astype(F32),
            "y": rng.standard_normal(COUNT).astype(F32),
            "a": rng.standard_normal(M * K).astype(F32),
            "b": rng.standard_normal(K * N).astype(F32),
            "c": np.zeros(M * N, F32), "s": np.zeros(1, F32)}


def run_copy_path(vm: Vm) -> dict[str, npt.NDArray[np.float32]]:
    """The workload on host buffers with transfers."""
    ctx = vm.compute_context()
    data = inputs()
    bufs = {name: create_buffer(vm, ctx, arr.nbytes) for name, arr in data.items()}
    for name, buf in bufs.items():
        to_host(vm, buf, data[name])
    done = ctx.run([map_cmd(buf.resource_id) for buf in bufs.values()])
    done.response.expect(Resp.OK_NODATA)
    vas = dict(zip(bufs, done.results.values(), strict=True))
    before = {name: buf.backing.read(vm.ram) for name, buf in bufs.items()}
    ctx.run(workload(*vas.values())).response.expect(Resp.OK_NODATA)
    for name, buf in bufs.items():  # a copy: the guest sees nothing before TRANSFER_FROM
        assert buf.backing.read(vm.ram) == before[name]
    return {name: from_host(vm, buf) for name, buf in bufs.items()}


def run_userptr_path(vm: Vm) -> dict[str, npt.NDArray[np.float32]]:
    """The same workload on USERPTR blobs."""
    ctx = vm.compute_context()
    data = inputs()
    blobs = {name: ctx.blob(arr.nbytes, data=arr.tobytes()) for name, arr in data.items()}
    vas = ctx.map(*blobs.values())
    ctx.run(workload(*vas)).response.expect(Resp.OK_NODATA)
    return {name: np.frombuffer(blob.buffer.read(vm.ram, data[name].nbytes), F32)
            for name, blob in blobs.items()}


def test_copy_path_matches_userptr_path(vm: Vm) -> None:
    """Bit-identical results from both paths, and right by numpy."""
    copied, zero_copy = run_copy_path(vm), run_userptr_path(vm)
    for name in copied:
        assert np.array_equal(copied[name], zero_copy[name]), name
    data = inputs()
    y = F32(1.5) * data["x"] + data["y"]
    np.testing.assert_allclose(copied["y"], y, rtol=1e-6)
    np.testing.assert_allclose(copied["x"], data["x"] + y, rtol=1e-5, atol=1e-6)
    c = data["a"].reshape(M, K) @ data["b"].reshape(K, N)
    np.testing.assert_allclose(copied["c"].reshape(M, N), c, rtol=1e-4, atol=1e-4)


def test_partial_transfers(vm: Vm) -> None:
    """Transfers of a window (x, w) at a backing offset move exactly those bytes."""
    ctx = vm.compute_context()
    buf = create_buffer(vm, ctx, 3 * 4096)
    data = np.frombuffer(vm.random_bytes(buf.size), np.uint8)
    to_host(vm, buf, data)
    (va,) = ctx.run([map_cmd(buf.resource_id)]).results.values()
    ctx.run([fill_cmd(va + 1000, 2000, 0x55555555)]).response.expect(Resp.OK_NODATA)
    buf.backing.write(vm.ram, bytes(buf.size))
    vm.run(gc.transfer_3d(Cmd.TRANSFER_FROM_HOST_3D, buf.resource_id, 900, 2200, offset=4096)
           ).expect(Resp.OK_NODATA)
    want = bytearray(buf.size)
    host = bytearray(data.tobytes())
    host[1000:3000] = b"\x55" * 2000
    want[4096:4096 + 2200] = host[900:3100]
    assert buf.backing.read(vm.ram) == bytes(want)


def test_partial_transfer_to_host(vm: Vm) -> None:
    """TRANSFER_TO_HOST_3D of a window (x, w) from a backing offset moves exactly those
    bytes into the host buffer."""
    ctx = vm.compute_context()
    buf = create_buffer(vm, ctx, 3 * 4096)
    to_host(vm, buf, np.zeros(buf.size, np.uint8))
    data = vm.random_bytes(buf.size)
    buf.backing.write(vm.ram, data)
    vm.run(gc.transfer_3d(Cmd.TRANSFER_TO_HOST_3D, buf.resource_id, 900, 2200, offset=4096)
           ).expect(Resp.OK_NODATA)
    want = bytearray(buf.size)
    want[900:3100] = data[4096:4096 + 2200]
    assert from_host(vm, buf).tobytes() == bytes(want)


def test_transfer_waits_for_compute(vm: Vm) -> None:
    """TRANSFER_FROM_HOST_3D after an unfenced job writing the buffer gets its result."""
    ctx = vm.compute_context()
    busy = BusyBlob(ctx)
    buf = create_buffer(vm, ctx, 4096)
    (va,) = ctx.run([map_cmd(buf.resource_id)]).results.values()
    vm.submit(ctx.ctx_id, [*busy.work(60), fill_cmd(va, 4096, 0x0BADCAFE)], fence=False
              ).expect(Resp.OK_NODATA)
    got = from_host(vm, buf)
    assert got.view(np.uint32).tolist() == [0x0BADCAFE] * 1024


CREATE_3D_FIELDS = ("target", "height", "depth", "array_size", "last_level", "nr_samples")


def create_3d(resource_id: int, nbytes: int, **fields: int) -> bytes:
    """RESOURCE_CREATE_3D of a buffer (R8_UNORM) with any of :data:`CREATE_3D_FIELDS`."""
    values = {"target": 0, "height": 1, "depth": 1, "array_size": 1, "last_level": 0,
              "nr_samples": 0, **fields}
    return gc.header(Cmd.RESOURCE_CREATE_3D) + encode(ResourceCreate3d(
        resource_id, values["target"], 64, 0, nbytes, values["height"], values["depth"],
        values["array_size"], values["last_level"], values["nr_samples"], 0))


@pytest.mark.parametrize(("field", "value"), [
    ("target", 2), ("height", 2), ("nbytes", 0), ("depth", 2), ("depth", 0),
    ("array_size", 2), ("array_size", 0), ("last_level", 1), ("nr_samples", 2)])
def test_create_3d_rejections(vm: Vm, field: str, value: int) -> None:
    """Only buffers (PIPE_BUFFER, width x 1 x 1, one level and sample, width > 0):
    INVALID_PARAMETER; the id stays free."""
    rid = vm.new_resource_id()
    nbytes = value if field == "nbytes" else 4096
    shape = {} if field == "nbytes" else {field: value}
    vm.run(create_3d(rid, nbytes, **shape)).expect(Resp.ERR_INVALID_PARAMETER)
    vm.run(create_3d(rid, 4096)).expect(Resp.OK_NODATA)
    vm.unref(rid).expect(Resp.OK_NODATA)
    vm.still_serving()


@pytest.mark.parametrize("nr_samples", [0, 1])
def test_create_3d_single_sample(vm: Vm, nr_samples: int) -> None:
    """nr_samples 0 and 1 both mean one sample."""
    rid = vm.new_resource_id()
    vm.run(create_3d(rid, 4096, nr_samples=nr_samples)).expect(Resp.OK_NODATA)
    vm.unref(rid).expect(Resp.OK_NODATA)


def test_create_3d_resource_ids(vm: Vm) -> None:
    """Id 0 and an id in use are INVALID_RESOURCE_ID; the buffer holding the id keeps
    its contents."""
    ctx = vm.compute_context()
    buf = create_buffer(vm, ctx, 4096)
    data = np.frombuffer(vm.random_bytes(buf.size), np.uint8)
    to_host(vm, buf, data)
    vm.run(create_3d(0, 4096)).expect(Resp.ERR_INVALID_RESOURCE_ID)
    vm.run(create_3d(buf.resource_id, 8192)).expect(Resp.ERR_INVALID_RESOURCE_ID)
    buf.backing.write(vm.ram, bytes(buf.size))
    assert from_host(vm, buf).tobytes() == data.tobytes()


def transfers(vm: Vm, buf: Buffer3d, blob_id: int) -> dict[str, tuple[PreparedCommand, Resp]]:
    """Bad transfers and their codes."""
    def prep(rid: int, x: int, w: int) -> PreparedCommand:
        return vm.prepare(gc.transfer_3d(Cmd.TRANSFER_TO_HOST_3D, rid, x, w))
    return {"beyond the buffer": (prep(buf.resource_id, 4000, 97), Resp.ERR_INVALID_PARAMETER),
            "unknown resource": (prep(0xABC, 0, 1), Resp.ERR_INVALID_RESOURCE_ID),
            "a blob": (prep(blob_id, 0, 1), Resp.ERR_INVALID_PARAMETER)}


def test_transfer_rejections(vm: Vm) -> None:
    """Transfers outside the buffer, of unknown ids or of blobs; and without backing."""
    ctx = vm.compute_context()
    buf = create_buffer(vm, ctx, 4096)
    blob = ctx.blob(4096)
    for name, (prepared, code) in transfers(vm, buf, blob.resource_id).items():
        assert vm.submit_all([prepared])[0].type == code, name
    bare = vm.new_resource_id()
    vm.run(gc.create_buffer_3d(bare, 4096)).expect(Resp.OK_NODATA)
    vm.run(gc.transfer_3d(Cmd.TRANSFER_TO_HOST_3D, bare, 0, 16)).expect(Resp.ERR_UNSPEC)
    vm.unref(bare).expect(Resp.OK_NODATA)


@pytest.mark.parametrize("box", [{"y": 1}, {"z": 1}, {"h": 0}, {"h": 2}, {"d": 0}, {"d": 2},
                                 {"level": 1}])
def test_transfer_box_rejections(vm: Vm, box: dict[str, int]) -> None:
    """A buffer transfer box is (x, 0, 0, w, 1, 1) at level 0: anything else is
    INVALID_PARAMETER, in either direction."""
    ctx = vm.compute_context()
    buf = create_buffer(vm, ctx, 4096)
    fields = {"x": 0, "y": 0, "z": 0, "w": 16, "h": 1, "d": 1, "offset": 0,
              "resource_id": buf.resource_id, "level": 0, "stride": 0, "layer_stride": 0,
              **box}
    for cmd in (Cmd.TRANSFER_TO_HOST_3D, Cmd.TRANSFER_FROM_HOST_3D):
        vm.run(gc.header(cmd) + encode(TransferHost3d(**fields))).expect(
            Resp.ERR_INVALID_PARAMETER)


def test_host_buffer_budget(start_vm: VmFactory) -> None:
    """--max-host-buffers: a buffer beyond the budget is ERR_OUT_OF_MEMORY; freeing one
    makes room."""
    vm = start_vm("--max-host-buffers", str(8192))
    first, second = vm.new_resource_id(), vm.new_resource_id()
    vm.run(gc.create_buffer_3d(first, 8000)).expect(Resp.OK_NODATA)
    vm.run(gc.create_buffer_3d(second, 1)).expect(Resp.ERR_OUT_OF_MEMORY)
    vm.unref(first).expect(Resp.OK_NODATA)
    vm.run(gc.create_buffer_3d(second, 4097)).expect(Resp.OK_NODATA)
