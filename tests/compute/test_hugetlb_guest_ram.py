"""Guest RAM on 2 MiB huge pages (QEMU's ``memory-backend-memfd,hugetlb=on``, which the
README recommends for compute): USERPTR blobs of scattered 4 KiB guest pages on every
host path, and a kernel on them, checked in guest memory."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from protocol.capsets import DEFAULT_USERPTR_CAPSET
from protocol.compute import Kernel, Status, buffer_arg, f32_arg, u64_arg
from protocol.limits import DEFAULT_LIMITS
from protocol.virtio_gpu_codes import Resp
from tests.frontend.guest_ram import Segment
from tests.userptr.capsets import ALIAS_RANGES, CAPSET_LAYOUT, read_capsets
from tests.userptr.compute_stream import dispatch
from tests.userptr.fixtures import VmFactory
from tests.userptr.guest_buffer import GuestBuffer, scattered_buffer
from tests.userptr.vm import ComputeContext, Vm

MiB = 1 << 20
HUGE = 2 * MiB
RAM = 64 * MiB
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


def free_huge_pages() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
    return 0


@pytest.fixture(scope="module")
def huge_pages() -> Iterator[None]:
    """Enough free 2 MiB pages for one guest RAM; reserved (and given back) when this
    runs as root, else the tests skip with the reason."""
    needed = RAM // HUGE
    before = int(NR_HUGEPAGES.read_text())
    raised = False
    if free_huge_pages() < 3 * needed and os.geteuid() == 0:
        # room for a guest RAM whose back-end is still exiting while the next starts
        with contextlib.suppress(OSError):
            NR_HUGEPAGES.write_text(str(before + 3 * needed))
            raised = True
    if free_huge_pages() < needed:
        pytest.skip(f"needs {needed} free 2 MiB huge pages (vm.nr_hugepages): "
                    f"{free_huge_pages()} free and not root or the kernel has no more")
    yield
    if raised:
        NR_HUGEPAGES.write_text(str(before))


def saxpy_checked(vm: Vm, ctx: ComputeContext, x_buffer: GuestBuffer | None = None,
                  y_buffer: GuestBuffer | None = None) -> None:
    """y += 0.5 * x on USERPTR blobs (over the buffers given, default scattered 4 KiB
    pages); the result checked in guest memory."""
    count = 300_000  # 1.2 MB per vector
    rng = np.random.default_rng(5)
    x = rng.standard_normal(count).astype(np.float32)
    y = rng.standard_normal(count).astype(np.float32)
    bx = ctx.blob(x.nbytes, data=x.tobytes(), buffer=x_buffer)
    by = ctx.blob(y.nbytes, data=y.tobytes(), buffer=y_buffer)
    va_x, va_y = ctx.map(bx, by)
    done = ctx.run([dispatch(Kernel.SAXPY_F32, buffer_arg(va_y), buffer_arg(va_x),
                             u64_arg(count), f32_arg(0.5))])
    done.response.expect(Resp.OK_NODATA)
    assert done.results.statuses() == [Status.OK]
    got = np.frombuffer(by.buffer.read(vm.ram, y.nbytes), np.float32)
    np.testing.assert_array_equal(got, y + np.float32(0.5) * x)


def huge_page_buffer(vm: Vm, pages: int) -> GuestBuffer:
    """``pages`` whole 2 MiB guest pages, in reverse order (two runs or more)."""
    span = vm.ram.alloc_contiguous((pages + 1) * HUGE)
    first = -(-span // HUGE) * HUGE
    return GuestBuffer([Segment(first + k * HUGE, HUGE) for k in reversed(range(pages))])


pytestmark = pytest.mark.usefixtures("huge_pages")


@pytest.mark.parametrize("args", [("--userptr-host-path", "batch"),
                                  ("--userptr-host-path", "per-range"),
                                  ("--sim-pre-batch",)],
                         ids=["batch", "per-range", "auto without batch"])
def test_saxpy_on_scattered_4k_pages(start_vm: VmFactory, args: tuple[str, ...]) -> None:
    """Every path that can register 4 KiB pieces of huge pages does; auto on a kernel
    without batch falls back from alias to per-range."""
    vm = start_vm(*args, ram_size=RAM, hugetlb=True)
    saxpy_checked(vm, vm.compute_context())


def test_alias_maps_whole_huge_pages(start_vm: VmFactory) -> None:
    vm = start_vm("--userptr-host-path", "alias", ram_size=RAM, hugetlb=True)
    ctx = vm.compute_context(buffer=huge_page_buffer(vm, 1))
    saxpy_checked(vm, ctx, huge_page_buffer(vm, 2), huge_page_buffer(vm, 3))


def test_alias_refuses_pieces_of_huge_pages_and_keeps_serving(start_vm: VmFactory) -> None:
    """mmap maps a hugetlb file only in whole huge pages: a blob of 4 KiB pieces cannot
    be aliased; the device says so (ERR_UNSPEC, logged) and serves on."""
    vm = start_vm("--userptr-host-path", "alias", ram_size=RAM, hugetlb=True)
    ctx = vm.compute_context(buffer=huge_page_buffer(vm, 1))
    pieces = scattered_buffer(vm.ram, 64 * 4096)
    vm.create_blob(vm.new_resource_id(), pieces.entries, pieces.size,
                   ctx_id=ctx.ctx_id).expect(Resp.ERR_UNSPEC)
    assert vm.s.backend.wait_stderr("(hugetlb) and mmap maps only whole ones")
    saxpy_checked(vm, ctx, huge_page_buffer(vm, 2), huge_page_buffer(vm, 3))


@pytest.mark.parametrize(("args", "max_entries"), [
    (("--sim-pre-batch",), DEFAULT_LIMITS.max_per_range_ranges),
    (("--sim-pre-batch", "--max-per-range-ranges", "100"), 100),
    (("--userptr-host-path", "alias"), ALIAS_RANGES),
    ((), DEFAULT_LIMITS.max_userptr_entries),
], ids=["auto without batch", "auto without batch, lower limit", "alias", "batch"])
def test_capset_entry_limit_on_huge_pages(start_vm: VmFactory, args: tuple[str, ...],
                                          max_entries: int) -> None:
    """Where auto registers on per-range because alias cannot map pieces of huge pages,
    the capset's max_entries is per-range's limit, and that many ranges are taken."""
    vm = start_vm(*args, ram_size=RAM, hugetlb=True)
    _, data = read_capsets(vm)[DEFAULT_USERPTR_CAPSET]
    assert CAPSET_LAYOUT.unpack(data)[8] == max_entries
    if max_entries == 100:
        ctx = vm.compute_context()
        for count, code in ((100, Resp.OK_NODATA), (101, Resp.ERR_OUT_OF_MEMORY)):
            pages = scattered_buffer(vm.ram, count * 4096)
            assert len(pages.entries) == count
            vm.create_blob(vm.new_resource_id(), pages.entries, pages.size,
                           ctx_id=ctx.ctx_id).expect(code)
    vm.still_serving()
