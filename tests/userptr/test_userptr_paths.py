"""USERPTR success paths: every host path (batch, alias, per-range, a pre-batch kernel
falling back), entry lists scattered, contiguous and crossing regions, RDONLY, several
GPUs.  Reads go through a compute CHECKSUM, writes through a COPY into the blob; both
are compared with the guest's own bytes."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pytest

from protocol.compute import Kernel, Status, buffer_arg, u64_arg
from protocol.virtio_gpu_codes import Resp
from tests.frontend.guest_ram import PAGE_SIZE
from tests.userptr.backend_log import DEBUG, registered_path
from tests.userptr.compute_stream import copy_cmd, dispatch
from tests.userptr.fixtures import VmFactory, VmPool
from tests.userptr.guest_buffer import (
    GuestBuffer,
    contiguous_buffer,
    crossing_buffer,
    scattered_buffer,
)
from tests.userptr.vm import ComputeContext, Vm

MiB = 1 << 20

#: (command-line arguments, the path the back-end must log)
PATHS = {
    "batch": (("--userptr-host-path", "batch"), "batch"),
    "alias": (("--userptr-host-path", "alias"), "alias"),
    "per-range": (("--userptr-host-path", "per-range"), "per-range"),
    "auto": ((), "batch"),
    "pre-batch kernel": (("--sim-pre-batch",), "alias"),
}

Layout = Callable[[Vm], GuestBuffer]
#: RAM configuration -> the buffers to try in it
LAYOUTS: dict[str, tuple[dict[str, int], dict[str, Layout]]] = {
    "one region": ({}, {
        "scattered": lambda vm: scattered_buffer(vm.ram, 9 * PAGE_SIZE),
        "contiguous": lambda vm: contiguous_buffer(vm.ram, 6 * PAGE_SIZE),
    }),
    "two regions 4G apart": ({"split_at": 32 * MiB}, {
        "scattered over both": lambda vm: scattered_buffer(vm.ram, 8 * PAGE_SIZE,
                                                           regions=[0, 1]),
        "contiguous high": lambda vm: contiguous_buffer(vm.ram, 5 * PAGE_SIZE, region=1),
    }),
    "two adjacent regions": ({"split_at": 32 * MiB, "high_gpa": 32 * MiB}, {
        "entry crossing the boundary": lambda vm: crossing_buffer(vm.ram, 3, 4),
        "scattered over both": lambda vm: scattered_buffer(vm.ram, 8 * PAGE_SIZE,
                                                           regions=[1, 0]),
    }),
}


def check_read_write(vm: Vm, ctx: ComputeContext, buffer: GuestBuffer, *,
                     readonly: bool = False) -> int:
    """Create a userptr blob over ``buffer``; the device must read exactly the guest
    bytes, and (unless ``readonly``) write into exactly the guest pages.  Returns the
    blob's resource id."""
    blob = ctx.blob(buffer.size, buffer=buffer, readonly=readonly)
    source = ctx.blob(buffer.size)
    va, src_va = ctx.map(blob, source)
    done = ctx.run([dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(va), u64_arg(buffer.size))])
    done.response.expect(Resp.OK_NODATA)
    assert done.results.values()[0] == zlib.crc32(buffer.read(vm.ram))
    before = buffer.read(vm.ram)
    written = ctx.run([copy_cmd(va, src_va, buffer.size)])
    if readonly:
        written.response.expect(Resp.ERR_UNSPEC)
        assert written.results.status == Status.FAULT
        assert buffer.read(vm.ram) == before
    else:
        written.response.expect(Resp.OK_NODATA)
        assert buffer.read(vm.ram) == source.buffer.read(vm.ram)
    return blob.resource_id


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("path", list(PATHS))
def test_path_and_layout(vm_pool: VmPool, path: str, layout: str) -> None:
    """Every buffer layout works on every host path, which the back-end really took."""
    args, logged = PATHS[path]
    ram, buffers = LAYOUTS[layout]
    vm = vm_pool.get(*args, *DEBUG, **ram)
    ctx = vm.compute_context(regions=[0])
    for make in buffers.values():
        rid = check_read_write(vm, ctx, make(vm))
        assert registered_path(vm, rid) == logged


@pytest.mark.parametrize("path", list(PATHS))
def test_rdonly_on_every_path(vm_pool: VmPool, path: str) -> None:
    """USERPTR_RDONLY: reads work, a write faults and leaves the guest pages alone."""
    args, logged = PATHS[path]
    vm = vm_pool.get(*args, *DEBUG)
    ctx = vm.compute_context()
    rid = check_read_write(vm, ctx, scattered_buffer(vm.ram, 4 * PAGE_SIZE), readonly=True)
    assert registered_path(vm, rid) == logged


@pytest.mark.parametrize("path", ["auto", "alias", "per-range"])
def test_several_gpus(start_vm: VmFactory, path: str) -> None:
    """With three simulated GPUs every blob is mapped on all of them and works."""
    args, logged = PATHS[path]
    vm = start_vm("--sim-gpus", "3", *args, *DEBUG)
    ctx = vm.compute_context()
    for buffer in (scattered_buffer(vm.ram, 6 * PAGE_SIZE),
                   contiguous_buffer(vm.ram, 3 * PAGE_SIZE)):
        rid = check_read_write(vm, ctx, buffer)
        assert registered_path(vm, rid) == logged


def test_batch_path_refused_on_a_pre_batch_kernel(start_vm: VmFactory) -> None:
    """Asking for the batch path on a kernel without it: the back-end does not start."""
    with pytest.raises(RuntimeError, match="exited with 1 before listening"):
        start_vm("--sim-pre-batch", "--userptr-host-path", "batch")
