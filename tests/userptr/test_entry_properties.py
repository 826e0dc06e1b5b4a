"""Hypothesis: random USERPTR entry lists (aligned or not, in or out of guest RAM, in
holes, wrapping, crossing regions, repeated) -> the device answers what the reference
model (:mod:`tests.userptr.entry_model`) says, and every accepted blob reads, through a
compute CHECKSUM, exactly the guest bytes of its entries in order.

One back-end per setup (RAM layout, host path) serves all its examples; it must exit 0
at the end.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from protocol.compute import Kernel, Status, buffer_arg, u64_arg
from protocol.virtio_gpu_codes import BlobFlag, BlobMem, Resp
from tests.frontend.guest_ram import PAGE_SIZE, Segment
from tests.userptr.compute_stream import dispatch, map_cmd
from tests.userptr.entry_model import EntryRules, expected_response
from tests.userptr.fixtures import VmPool
from tests.userptr.vm import ComputeContext, Vm

MiB = 1 << 20
MAX_ENTRIES = 6
MAX_BYTES = 12 * PAGE_SIZE
LIMITS = ("--max-userptr-entries", str(MAX_ENTRIES), "--max-userptr-bytes", str(MAX_BYTES))
LAYOUTS = {"two regions with a hole": {"ram_size": 32 * MiB, "split_at": 16 * MiB},
           "two adjacent regions": {"ram_size": 32 * MiB, "split_at": 16 * MiB,
                                    "high_gpa": 16 * MiB}}
#: entries that are valid by themselves ("boundary" only when the regions are adjacent)
GOOD_KINDS = ["ram", "ram", "high ram", "repeat", "boundary"]
BAD_KINDS = ["unaligned address", "unaligned length", "zero length", "outside", "end of RAM",
             "wrap"]

EXAMPLES = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@dataclass(slots=True)
class Allocations:
    """Guest pages taken for one example (given back afterwards)."""

    vm: Vm
    runs: list[Segment] = field(default_factory=list)

    def take(self, pages: int, region: int) -> int:
        gpa = self.vm.ram.alloc_contiguous(pages * PAGE_SIZE, region=region)
        self.runs.append(Segment(gpa, pages * PAGE_SIZE))
        self.vm.ram.write(gpa, self.vm.random_bytes(pages * PAGE_SIZE))
        return gpa

    def release(self) -> None:
        for run in self.runs:
            for page in range(run.gpa, run.gpa + run.length, PAGE_SIZE):
                self.vm.ram.free(page, PAGE_SIZE)


def build_entry(kind: str, pages: int, skew: int, alloc: Allocations,
                made: list[Segment]) -> Segment:
    """One entry of ``kind`` (``pages`` long, ``skew`` bytes off where that applies)."""
    vm = alloc.vm
    regions = vm.ram.regions
    if kind == "repeat" and made:
        return made[skew % len(made)]
    if kind in ("ram", "repeat"):
        return Segment(alloc.take(pages, 0), pages * PAGE_SIZE)
    if kind == "high ram":
        return Segment(alloc.take(pages, 1), pages * PAGE_SIZE)
    if kind == "unaligned address":
        return Segment(alloc.take(pages + 1, 0) + skew, pages * PAGE_SIZE)
    if kind == "unaligned length":
        return Segment(alloc.take(pages + 1, 0), pages * PAGE_SIZE + skew)
    if kind == "zero length":
        return Segment(alloc.take(1, 0), 0)
    if kind == "outside":
        return Segment(vm.ram.unbacked_gpa(), pages * PAGE_SIZE)
    if kind == "end of RAM":
        return Segment(regions[-1].end - PAGE_SIZE, (pages + 1) * PAGE_SIZE)
    if kind == "wrap":
        return Segment((1 << 64) - pages * PAGE_SIZE, (pages + 1) * PAGE_SIZE)
    # "boundary": the two pages reserved around the end of region 0 (the second one is
    # region 1's first page, or in the hole)
    return Segment(regions[0].end - PAGE_SIZE, 2 * PAGE_SIZE)


def reserve_boundary(vm: Vm) -> None:
    """Take the last page of region 0 (and the first of region 1 when adjacent) for the
    "boundary" entries, with random contents."""
    boundary = vm.ram.regions[0].end
    pages = [boundary - PAGE_SIZE]
    if vm.ram.regions[1].guest_phys_addr == boundary:
        pages.append(boundary)
    for page in pages:
        with contextlib.suppress(MemoryError):  # reserved by an earlier test on this VM
            vm.ram.alloc_at(page, PAGE_SIZE)
        vm.ram.write(page, vm.random_bytes(PAGE_SIZE))


@dataclass(frozen=True, slots=True)
class Plan:
    """One example: entry specs ``(kind, pages, skew)``, how ``size`` relates to the
    entries' total, and how many entries ``nr_entries`` claims beyond those present."""

    specs: list[tuple[str, int, int]]
    size_mode: str
    size_skew: int
    extra_claimed: int


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    """A valid list, a valid list with one bad entry, or one with any other defect (size,
    count, emptiness), in equal parts."""
    spec = st.tuples(st.sampled_from(GOOD_KINDS), st.sampled_from([1, 1, 2, 2, 6]),
                     st.integers(1, PAGE_SIZE - 1))
    specs = draw(st.lists(spec, min_size=1, max_size=MAX_ENTRIES))
    mode = draw(st.sampled_from(["valid", "bad entry", "other"]))
    if mode == "bad entry":
        specs.insert(draw(st.integers(0, len(specs))),
                     (draw(st.sampled_from(BAD_KINDS)), draw(st.integers(1, 3)),
                      draw(st.integers(1, PAGE_SIZE - 1))))
    if mode != "other":
        return Plan(specs, "fits", draw(st.integers(0, PAGE_SIZE - 1)), 0)
    if draw(st.booleans()):
        specs = draw(st.sampled_from([[], specs * 2]))
    return Plan(specs, draw(st.sampled_from(["fits", "short", "zero"])),
                draw(st.integers(0, PAGE_SIZE - 1)), draw(st.sampled_from([0, 1, 7])))


def blob_size(plan: Plan, total: int) -> int:
    """``size`` for the plan: within the last page of the entries, beyond them, or 0."""
    if plan.size_mode == "zero":
        return 0
    if plan.size_mode == "short":
        return total + 1 + plan.size_skew
    return max(1, total - plan.size_skew)


#: (layout, host path): both layouts on the default path, the fallbacks on one layout
SETUPS = [("two regions with a hole", "auto"), ("two adjacent regions", "auto"),
          ("two adjacent regions", "alias"), ("two adjacent regions", "per-range")]


@pytest.fixture(params=SETUPS, ids=[f"{layout}, {path}" for layout, path in SETUPS])
def layout(request: pytest.FixtureRequest, vm_pool: VmPool) -> Iterator[
        tuple[Vm, ComputeContext]]:
    """The setup's VM (shared by all examples) and a compute context in it."""
    ram, path = request.param
    vm = vm_pool.get(*LIMITS, "--userptr-host-path", path, **LAYOUTS[ram])
    reserve_boundary(vm)
    yield vm, vm.compute_context(regions=[0])


def one_bad_entry(kind: str) -> Plan:
    """Good pages around one ``kind`` entry; ``size`` a page below the total, so that only
    the bad entry is wrong."""
    return Plan([("ram", 1, 1), (kind, 1, 512), ("high ram", 2, 1)], "fits", PAGE_SIZE, 0)


#: over --max-userptr-bytes (13 pages), also with an entry outside RAM (still OOM: the
#: byte limit is checked before the addresses); a valid list repeating pages
FIXED_PLANS = [
    Plan([("ram", 6, 1), ("high ram", 6, 1), ("ram", 1, 1)], "fits", 0, 0),
    Plan([("ram", 6, 1), ("outside", 6, 1), ("ram", 1, 1)], "fits", 0, 0),
    Plan([("ram", 2, 1), ("repeat", 1, 0), ("boundary", 1, 1), ("repeat", 1, 0)], "fits",
         100, 0),
]


def with_fixed_examples(test: Callable[..., None]) -> Callable[..., None]:
    """Every bad kind alone, and :data:`FIXED_PLANS`, whatever the random examples are."""
    for kind in [*BAD_KINDS, "boundary"]:
        test = example(plan=one_bad_entry(kind))(test)
    for plan in FIXED_PLANS:
        test = example(plan=plan)(test)
    return test


@EXAMPLES
@with_fixed_examples
@given(plan=plans())
def test_random_entry_lists(layout: tuple[Vm, ComputeContext], plan: Plan) -> None:
    """The device's answer is the model's; accepted blobs read the guest bytes."""
    vm, ctx = layout
    alloc = Allocations(vm)
    try:
        entries: list[Segment] = []
        for kind, pages, skew in plan.specs:
            entries.append(build_entry(kind, pages, skew, alloc, entries))
        size = blob_size(plan, sum(e.length for e in entries))
        nr_entries = len(entries) + plan.extra_claimed
        rules = EntryRules(vm.ram.regions, MAX_ENTRIES, MAX_BYTES)
        want = expected_response(rules, entries, size, nr_entries)
        event(f"model: {want.name}")
        rid = vm.new_resource_id()
        got = vm.create_blob(rid, entries, size, blob_mem=BlobMem.HOST3D_GUEST,
                             flags=BlobFlag.USE_USERPTR, ctx_id=ctx.ctx_id,
                             nr_entries=nr_entries)
        assert got.type == want, f"{entries} size {size}: {got.type_name}, model {want.name}"
        if want != Resp.OK_NODATA:
            vm.unref(rid).expect(Resp.ERR_INVALID_RESOURCE_ID)
            return
        total = sum(e.length for e in entries)
        mapped = ctx.run([map_cmd(rid)])
        mapped.response.expect(Resp.OK_NODATA)
        (va,) = mapped.results.values()
        read = ctx.run([dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(va), u64_arg(total))])
        read.response.expect(Resp.OK_NODATA)
        assert read.results.statuses() == [Status.OK]
        guest = b"".join(vm.ram.read(e.gpa, e.length) for e in entries)
        assert read.results.values()[0] == zlib.crc32(guest)
        vm.unref(rid).expect(Resp.OK_NODATA)
    finally:
        alloc.release()
