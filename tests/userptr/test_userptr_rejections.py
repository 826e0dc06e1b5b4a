"""Every RESOURCE_CREATE_BLOB rejection rule, each with its own response code.

After a rejection the resource id is still free (a valid blob can take it) and the
device keeps serving; at the end of the module each back-end must exit 0 (nothing of the
rejected blobs stayed registered on the host GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from protocol.limits import DEFAULT_LIMITS
from protocol.virtio_gpu_codes import BlobFlag, BlobMem, Format, Resp
from tests.frontend.guest_ram import PAGE_SIZE, Segment
from tests.userptr.fixtures import VmPool
from tests.userptr.guest_buffer import scattered_buffer
from tests.userptr.vm import Vm

MiB = 1 << 20
USERPTR = int(BlobFlag.USE_USERPTR)
TOP_OF_U64 = 1 << 64
#: the per-range path allocates one BO per host range: at most 4096 ranges per blob
PER_RANGE = ("--userptr-host-path", "per-range")
PER_RANGE_RANGES = DEFAULT_LIMITS.max_per_range_ranges
PER_RANGE_RAM = {"ram_size": 128 * MiB}


@dataclass(frozen=True, slots=True)
class BlobRequest:
    """The fields of one RESOURCE_CREATE_BLOB (``resource_id`` None: a fresh id)."""

    entries: list[Segment]
    size: int
    flags: int = USERPTR
    blob_mem: int = BlobMem.HOST3D_GUEST
    ctx_id: int | None = None  # None: the test's context
    nr_entries: int | None = None
    resource_id: int | None = None


def pages(vm: Vm, count: int) -> list[Segment]:
    """``count`` scattered guest pages as entries."""
    return scattered_buffer(vm.ram, count * PAGE_SIZE).entries


def top(vm: Vm) -> int:
    """One past the highest guest-physical RAM address."""
    return vm.ram.regions[-1].end


def id_in_use(vm: Vm) -> BlobRequest:
    """A valid request for an id a 2D resource already has."""
    rid = vm.new_resource_id()
    vm.s.gpu.create_2d(rid, Format.B8G8R8X8_UNORM, 4, 4).expect(Resp.OK_NODATA)
    return BlobRequest(pages(vm, 1), PAGE_SIZE, resource_id=rid)


def id_of_a_userptr_blob(vm: Vm) -> BlobRequest:
    """A valid request for an id a userptr blob already has."""
    existing = vm.userptr_blob(PAGE_SIZE)
    return BlobRequest(pages(vm, 1), PAGE_SIZE, resource_id=existing.resource_id)


def with_entry(vm: Vm, bad: Segment) -> BlobRequest:
    """Two good pages with ``bad`` between them."""
    good = pages(vm, 2)
    return BlobRequest([good[0], bad, good[1]], 3 * PAGE_SIZE)


@dataclass(frozen=True, slots=True)
class Case:
    """One rejection rule: the request, the response, the back-end's options."""

    build: Callable[[Vm], BlobRequest]
    code: Resp
    args: tuple[str, ...] = ()
    ram: dict[str, int] = field(default_factory=dict)
    #: whether the id stays free afterwards (not for ids that were never free)
    id_free_after: bool = True


INVALID = Resp.ERR_INVALID_PARAMETER
CASES: dict[str, Case] = {
    "RDONLY without USERPTR": Case(lambda vm: BlobRequest(
        pages(vm, 1), PAGE_SIZE, flags=int(BlobFlag.USERPTR_RDONLY)), INVALID),
    "RDONLY without USERPTR, GUEST": Case(lambda vm: BlobRequest(
        pages(vm, 1), PAGE_SIZE, flags=int(BlobFlag.USERPTR_RDONLY), blob_mem=BlobMem.GUEST,
        ctx_id=0), INVALID),
    "USERPTR with HOST3D": Case(lambda vm: BlobRequest(
        pages(vm, 1), PAGE_SIZE, blob_mem=BlobMem.HOST3D), INVALID),
    "USERPTR with HOST3D and no entries": Case(lambda vm: BlobRequest(
        [], PAGE_SIZE, blob_mem=BlobMem.HOST3D), INVALID),
    "USERPTR without entries": Case(lambda vm: BlobRequest([], PAGE_SIZE), INVALID),
    "USERPTR GUEST without entries": Case(lambda vm: BlobRequest(
        [], PAGE_SIZE, blob_mem=BlobMem.GUEST, ctx_id=0), INVALID),
    "zero-length entry": Case(lambda vm: with_entry(vm, Segment(pages(vm, 1)[0].gpa, 0)),
                              INVALID),
    "entry address not page aligned": Case(lambda vm: with_entry(
        vm, Segment(pages(vm, 1)[0].gpa + 512, PAGE_SIZE)), INVALID),
    "entry length not page aligned": Case(lambda vm: with_entry(
        vm, Segment(vm.ram.alloc_contiguous(2 * PAGE_SIZE), PAGE_SIZE + 512)), INVALID),
    "entry outside guest RAM": Case(lambda vm: with_entry(
        vm, Segment(vm.ram.unbacked_gpa(), PAGE_SIZE)), INVALID),
    "entry crossing the end of RAM": Case(lambda vm: with_entry(
        vm, Segment(top(vm) - PAGE_SIZE, 2 * PAGE_SIZE)), INVALID),
    "entry wrapping 2^64": Case(lambda vm: with_entry(
        vm, Segment(TOP_OF_U64 - PAGE_SIZE, 2 * PAGE_SIZE)), INVALID),
    "entry in the hole between regions": Case(lambda vm: with_entry(
        vm, Segment(vm.ram.regions[0].end, PAGE_SIZE)), INVALID, ram={"split_at": 32 * MiB}),
    "entry running into the hole": Case(lambda vm: with_entry(
        vm, Segment(vm.ram.regions[0].end - PAGE_SIZE, 2 * PAGE_SIZE)), INVALID,
        ram={"split_at": 32 * MiB}),
    "entries one byte short of size": Case(lambda vm: BlobRequest(
        pages(vm, 3), 3 * PAGE_SIZE + 1), INVALID),
    "entries a page short of size": Case(lambda vm: BlobRequest(
        pages(vm, 3), 4 * PAGE_SIZE), INVALID),
    "GUEST entries a page short of size": Case(lambda vm: BlobRequest(
        pages(vm, 2), 3 * PAGE_SIZE, flags=0, blob_mem=BlobMem.GUEST, ctx_id=0), INVALID),
    "entry address half a page in": Case(lambda vm: with_entry(
        vm, Segment(pages(vm, 1)[0].gpa + 0x800, PAGE_SIZE)), INVALID),
    "entry length one and a half pages": Case(lambda vm: with_entry(
        vm, Segment(vm.ram.alloc_contiguous(2 * PAGE_SIZE), 0x1800)), INVALID),
    "size 0": Case(lambda vm: BlobRequest(pages(vm, 1), 0), INVALID),
    "resource id 0": Case(lambda vm: BlobRequest(pages(vm, 1), PAGE_SIZE, resource_id=0),
                          Resp.ERR_INVALID_RESOURCE_ID, id_free_after=False),
    "id of a 2D resource": Case(id_in_use, Resp.ERR_INVALID_RESOURCE_ID, id_free_after=False),
    "id of a userptr blob": Case(id_of_a_userptr_blob, Resp.ERR_INVALID_RESOURCE_ID,
                                 id_free_after=False),
    "too many entries": Case(lambda vm: BlobRequest(pages(vm, 5), PAGE_SIZE), INVALID,
                             args=("--max-userptr-entries", "4")),
    "too many bytes": Case(lambda vm: BlobRequest(pages(vm, 5), PAGE_SIZE),
                           Resp.ERR_OUT_OF_MEMORY, args=("--max-userptr-bytes", "16384")),
    "more host ranges than the per-range path takes": Case(lambda vm: BlobRequest(
        pages(vm, PER_RANGE_RANGES + 1), PAGE_SIZE), Resp.ERR_OUT_OF_MEMORY,
        args=PER_RANGE, ram=PER_RANGE_RAM),
    "more host ranges than --max-per-range-ranges": Case(lambda vm: BlobRequest(
        pages(vm, 9), PAGE_SIZE), Resp.ERR_OUT_OF_MEMORY,
        args=(*PER_RANGE, "--max-per-range-ranges", "8")),
    "GUEST blob beyond --max-blob-bytes": Case(lambda vm: BlobRequest(
        pages(vm, 5), 5 * PAGE_SIZE, flags=0, blob_mem=BlobMem.GUEST, ctx_id=0),
        Resp.ERR_OUT_OF_MEMORY, args=("--max-blob-bytes", "16384")),
    "GUEST blob one byte beyond --max-blob-bytes": Case(lambda vm: BlobRequest(
        pages(vm, 5), 4 * PAGE_SIZE + 1, flags=0, blob_mem=BlobMem.GUEST, ctx_id=0),
        Resp.ERR_OUT_OF_MEMORY, args=("--max-blob-bytes", "16384")),
    "GUEST blob beyond --max-blob-bytes, entries to come": Case(lambda vm: BlobRequest(
        [], 5 * PAGE_SIZE, flags=0, blob_mem=BlobMem.GUEST, ctx_id=0),
        Resp.ERR_OUT_OF_MEMORY, args=("--max-blob-bytes", "16384")),
    "entry count beyond the chain": Case(lambda vm: BlobRequest(
        pages(vm, 2), PAGE_SIZE, nr_entries=3), INVALID),
    "entry count at the limit, beyond the chain": Case(lambda vm: BlobRequest(
        pages(vm, 2), PAGE_SIZE, nr_entries=1 << 20), INVALID),
    "entry count 2^32-1": Case(lambda vm: BlobRequest(
        pages(vm, 2), PAGE_SIZE, nr_entries=0xFFFFFFFF), INVALID),
    "unknown blob flag 0x20": Case(lambda vm: BlobRequest(
        pages(vm, 1), PAGE_SIZE, flags=USERPTR | 0x20), INVALID),
    "unknown blob flag 1<<31": Case(lambda vm: BlobRequest(
        pages(vm, 1), PAGE_SIZE, flags=1 << 31), INVALID),
    "blob_mem 0": Case(lambda vm: BlobRequest(pages(vm, 1), PAGE_SIZE, blob_mem=0), INVALID),
    "blob_mem 4": Case(lambda vm: BlobRequest(pages(vm, 1), PAGE_SIZE, blob_mem=4), INVALID),
    "blob_mem 2^32-1": Case(lambda vm: BlobRequest(pages(vm, 1), PAGE_SIZE,
                                                   blob_mem=0xFFFFFFFF), INVALID),
    "HOST3D_GUEST in an unknown context": Case(lambda vm: BlobRequest(
        pages(vm, 1), PAGE_SIZE, ctx_id=999), Resp.ERR_INVALID_CONTEXT_ID),
    "HOST3D_GUEST with context 0": Case(lambda vm: BlobRequest(
        pages(vm, 1), PAGE_SIZE, ctx_id=0), Resp.ERR_INVALID_CONTEXT_ID),
    "USERPTR with --userptr-protocol off": Case(lambda vm: BlobRequest(
        pages(vm, 1), PAGE_SIZE, blob_mem=BlobMem.GUEST, ctx_id=0), INVALID,
        args=("--userptr-protocol", "off")),
}


def send(vm: Vm, ctx_id: int, resource_id: int, req: BlobRequest) -> Resp:
    """Send ``req`` for ``resource_id``; the response code."""
    return Resp(vm.create_blob(resource_id, req.entries, req.size, blob_mem=req.blob_mem,
                               flags=req.flags, ctx_id=ctx_id if req.ctx_id is None
                               else req.ctx_id, nr_entries=req.nr_entries).type)


@pytest.mark.parametrize("case", list(CASES))
def test_rejection(vm_pool: VmPool, case: str) -> None:
    """The rule's response code; the id stays free; the device keeps serving."""
    rule = CASES[case]
    vm = vm_pool.get(*rule.args, **rule.ram)
    ctx_id = vm.create_context()
    req = rule.build(vm)
    rid = vm.new_resource_id() if req.resource_id is None else req.resource_id
    got = send(vm, ctx_id, rid, req)
    assert got == rule.code, f"{case}: expected {rule.code.name}, got {got.name}"
    if rule.id_free_after:
        good = BlobRequest(pages(vm, 1), PAGE_SIZE, flags=0, blob_mem=BlobMem.GUEST, ctx_id=0)
        assert send(vm, ctx_id, rid, good) == Resp.OK_NODATA
        vm.unref(rid).expect(Resp.OK_NODATA)
    vm.still_serving()


@pytest.mark.parametrize(("size", "entries", "code"), [
    (3 * PAGE_SIZE, 3, Resp.OK_NODATA),
    (2 * PAGE_SIZE + 1, 3, Resp.OK_NODATA),
    (1, 3, Resp.OK_NODATA),
    (3 * PAGE_SIZE + 1, 3, INVALID),
])
def test_size_against_entries(vm_pool: VmPool, size: int, entries: int, code: Resp) -> None:
    """``size`` may be unaligned and smaller than the entries, never above them rounded up
    to a page."""
    vm = vm_pool.get()
    rid = vm.new_resource_id()
    assert send(vm, 0, rid, BlobRequest(pages(vm, entries), size, blob_mem=BlobMem.GUEST,
                                        ctx_id=0)) == code


@pytest.mark.parametrize(("option", "value"), [("--max-userptr-entries", 4),
                                               ("--max-userptr-bytes", 4 * PAGE_SIZE)])
def test_limits_are_inclusive(vm_pool: VmPool, option: str, value: int) -> None:
    """Exactly at the limit (4 entries / 16 KiB: four scattered pages) is accepted."""
    vm = vm_pool.get(option, str(value))
    req = BlobRequest(pages(vm, 4), PAGE_SIZE, blob_mem=BlobMem.GUEST, ctx_id=0)
    assert send(vm, 0, vm.new_resource_id(), req) == Resp.OK_NODATA


def test_per_range_path_takes_its_maximum(vm_pool: VmPool) -> None:
    """4096 scattered pages (4096 host ranges) on the per-range path: accepted."""
    vm = vm_pool.get(*PER_RANGE, **PER_RANGE_RAM)
    req = BlobRequest(pages(vm, PER_RANGE_RANGES), PAGE_SIZE, blob_mem=BlobMem.GUEST,
                      ctx_id=0)
    assert send(vm, 0, vm.new_resource_id(), req) == Resp.OK_NODATA


def adjacent_pages(vm: Vm, count: int) -> list[Segment]:
    """``count`` physically adjacent pages sent as one entry each (not coalesced)."""
    start = vm.ram.alloc_contiguous(count * PAGE_SIZE)
    return [Segment(start + i * PAGE_SIZE, PAGE_SIZE) for i in range(count)]


ACCEPTED: dict[str, Case] = {
    "USERPTR blob beyond --max-blob-bytes (not its limit)": Case(lambda vm: BlobRequest(
        pages(vm, 5), 5 * PAGE_SIZE, blob_mem=BlobMem.GUEST, ctx_id=0),
        Resp.OK_NODATA, args=("--max-blob-bytes", "16384")),
    "GUEST blob of exactly --max-blob-bytes": Case(lambda vm: BlobRequest(
        pages(vm, 4), 4 * PAGE_SIZE, flags=0, blob_mem=BlobMem.GUEST, ctx_id=0),
        Resp.OK_NODATA, args=("--max-blob-bytes", "16384")),
    "adjacent entries are one host range": Case(lambda vm: BlobRequest(
        adjacent_pages(vm, 3), 3 * PAGE_SIZE, blob_mem=BlobMem.GUEST, ctx_id=0),
        Resp.OK_NODATA, args=(*PER_RANGE, "--max-per-range-ranges", "1")),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_accepted_at_the_edges(vm_pool: VmPool, case: str) -> None:
    """Requests next to a rejection rule that must not trip it: accepted, and the blob
    is a live resource (a second create of its id is INVALID_RESOURCE_ID)."""
    rule = ACCEPTED[case]
    vm = vm_pool.get(*rule.args, **rule.ram)
    req = rule.build(vm)
    rid = vm.new_resource_id()
    got = send(vm, 0, rid, req)
    assert got == rule.code, f"{case}: expected {rule.code.name}, got {got.name}"
    again = BlobRequest(pages(vm, 1), PAGE_SIZE, flags=0, blob_mem=BlobMem.GUEST, ctx_id=0)
    assert send(vm, 0, rid, again) == Resp.ERR_INVALID_RESOURCE_ID
    vm.unref(rid).expect(Resp.OK_NODATA)
    vm.still_serving()
