"""Failures while a submission runs: the result record names the status, the failed
command and the fault address; later commands are NOT_RUN; a faulting command leaves
guest memory as it was; a fenced submission is answered with an error (FAULT:
ERR_UNSPEC, the others: ERR_INVALID_PARAMETER)."""

from __future__ import annotations

import pytest

from protocol.compute import Kernel, Status, buffer_arg, f32_arg, u64_arg
from protocol.virtio_gpu_codes import BlobMem, Resp
from tests.userptr.compute_stream import copy_cmd, dispatch, fill_cmd, map_cmd, signal_cmd
from tests.userptr.fixtures import VmFactory
from tests.userptr.vm import ComputeContext, Vm

PAGE = 4096
NONE_FAILED = 0xFFFFFFFF


@pytest.fixture
def vm(shared_vm: Vm) -> Vm:
    """The tests of this module share one back-end (each uses its own context)."""
    return shared_vm


class Scene:
    """A context with two mapped blobs: ``a`` (2 pages) and ``b`` (1 page)."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.ctx: ComputeContext = vm.compute_context()
        self.a = self.ctx.blob(2 * PAGE)
        self.b = self.ctx.blob(PAGE)
        self.va_a, self.va_b = self.ctx.map(self.a, self.b)
        self.unmapped = max(self.va_a + 2 * PAGE, self.va_b + PAGE) + (1 << 30)

    def snapshot(self) -> tuple[bytes, bytes]:
        """The guest bytes of both blobs."""
        return self.a.buffer.read(self.vm.ram), self.b.buffer.read(self.vm.ram)


def failing_run(scene: Scene, bad: bytes, status: Status, response: Resp,
                fault_range: tuple[int, int]) -> None:
    """Run [FILL a (ok), ``bad``, SIGNAL b]: the FILL happened, ``bad`` failed with
    ``status`` at an address in ``fault_range`` (inclusive), SIGNAL did not run, nothing
    else changed."""
    vm = scene.vm
    a_before, b_before = scene.snapshot()
    done = scene.ctx.run([fill_cmd(scene.va_a, 16, 0x77777777, 1), bad,
                          signal_cmd(scene.va_b, 0xABCDEF, 3)])
    done.response.expect(response)
    head = done.results.header
    assert (head.status, head.failed_index, head.completed) == (status, 1, 1)
    assert fault_range[0] <= head.fault_address <= fault_range[1]
    assert done.results.statuses() == [Status.OK, status, Status.NOT_RUN]
    assert done.results.commands[1].value == head.fault_address
    assert [c.cmd_id for c in done.results.commands] == [1, 0, 3]
    a_after, b_after = scene.snapshot()
    assert a_after == b"\x77" * 16 + a_before[16:]
    assert b_after == b_before, "a command after the failure (or the failing one) wrote"
    assert vm.s.backend.alive()


def test_buffer_outside_every_mapping(vm: Vm) -> None:
    """A kernel buffer at a GPU VA nothing is mapped at: FAULT at that address."""
    s = Scene(vm)
    failing_run(s, dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(s.unmapped), u64_arg(8)),
                Status.FAULT, Resp.ERR_UNSPEC, (s.unmapped, s.unmapped))


def test_argument_beyond_its_mapping(vm: Vm) -> None:
    """A buffer that starts in ``b`` and runs past its end: FAULT, nothing written (the
    write to ``b`` would have started inside the mapping)."""
    s = Scene(vm)
    start = s.va_b + PAGE - 64
    failing_run(s, dispatch(Kernel.FILL_U32, buffer_arg(start), u64_arg(32), u64_arg(1)),
                Status.FAULT, Resp.ERR_UNSPEC, (start, s.va_b + PAGE))


def test_source_beyond_its_mapping_leaves_destination(vm: Vm) -> None:
    """COPY into ``b`` from a range running past ``a``: FAULT, ``b`` untouched."""
    s = Scene(vm)
    src = s.va_a + 2 * PAGE - 100
    failing_run(s, dispatch(Kernel.COPY, buffer_arg(s.va_b), buffer_arg(src), u64_arg(200)),
                Status.FAULT, Resp.ERR_UNSPEC, (src, s.va_a + 2 * PAGE))


def test_copy_command_source_beyond_its_mapping(vm: Vm) -> None:
    """The COPY command (not the kernel) likewise checks its source before writing."""
    s = Scene(vm)
    src = s.va_a + 2 * PAGE - 100
    failing_run(s, copy_cmd(s.va_b, src, 200), Status.FAULT, Resp.ERR_UNSPEC,
                (src, s.va_a + 2 * PAGE))


def test_buffer_spanning_two_mappings(vm: Vm) -> None:
    """One buffer may not run from one mapping into another, even when their VAs touch."""
    s = Scene(vm)
    low, high = sorted([(s.va_a, 2 * PAGE), (s.va_b, PAGE)])
    if low[0] + low[1] != high[0]:
        pytest.skip("the two blobs did not get adjacent GPU VAs")
    start = low[0] + low[1] - 8
    failing_run(s, dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(start), u64_arg(16)),
                Status.FAULT, Resp.ERR_UNSPEC, (start, low[0] + low[1]))


def test_mapped_in_another_context_only(vm: Vm) -> None:
    """A VA mapped in another context faults in this one."""
    s = Scene(vm)
    other = vm.compute_context()
    blob = other.blob(PAGE)
    (va,) = other.map(blob)
    failing_run(s, signal_cmd(va, 1), Status.FAULT, Resp.ERR_UNSPEC, (va, va))


def test_attached_but_never_mapped(vm: Vm) -> None:
    """A blob attached to the context but not mapped: its VA (known from elsewhere)
    faults here."""
    s = Scene(vm)
    other = vm.compute_context()
    blob = other.blob(PAGE)
    (va,) = other.map(blob)
    vm.attach(s.ctx.ctx_id, blob.resource_id).expect(Resp.OK_NODATA)
    failing_run(s, dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(va), u64_arg(8)),
                Status.FAULT, Resp.ERR_UNSPEC, (va, va))


@pytest.mark.parametrize("what", ["unknown", "not attached", "no GPU mapping"])
def test_map_of_an_unusable_resource(vm: Vm, what: str) -> None:
    """MAP_RESOURCE of an unknown, unattached or non-userptr resource: INVALID_RESOURCE."""
    s = Scene(vm)
    if what == "unknown":
        rid = 0xFEED
    elif what == "not attached":
        rid = vm.userptr_blob(PAGE).resource_id
    else:
        rid = vm.new_resource_id()
        vm.create_blob(rid, s.b.buffer.entries, PAGE, blob_mem=BlobMem.HOST3D_GUEST, flags=0,
                       ctx_id=s.ctx.ctx_id).expect(Resp.OK_NODATA)
    failing_run(s, map_cmd(rid), Status.INVALID_RESOURCE, Resp.ERR_INVALID_PARAMETER, (0, 0))


@pytest.mark.parametrize("case", ["unaligned f32", "FILL size", "SIGNAL alignment",
                                  "huge count", "huge matmul"])
def test_invalid_arguments(vm: Vm, case: str) -> None:
    """Bad arguments found while running: INVALID_ARGUMENT."""
    s = Scene(vm)
    va = s.va_b
    bad = {
        "unaligned f32": (dispatch(Kernel.SAXPY_F32, buffer_arg(va + 2), buffer_arg(s.va_a),
                                   u64_arg(4), f32_arg(1.0)), (0, va + 2)),
        "FILL size": (fill_cmd(va, 6, 0), (0, va)),
        "SIGNAL alignment": (signal_cmd(va + 4, 1), (0, va + 4)),
        "huge count": (dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(va), u64_arg(1 << 62)),
                       (0, va)),
        "huge matmul": (dispatch(Kernel.MATMUL_F32, buffer_arg(va), buffer_arg(va),
                                 buffer_arg(va), u64_arg(1 << 21), u64_arg(1), u64_arg(1)),
                        (0, va)),
    }
    command, fault_range = bad[case]
    failing_run(s, command, Status.INVALID_ARGUMENT, Resp.ERR_INVALID_PARAMETER, fault_range)


def test_unfenced_failure_is_recorded(vm: Vm) -> None:
    """An unfenced submission is answered OK at once; its failure shows in the result
    record (read after a later fenced submission on the same timeline)."""
    s = Scene(vm)
    vm.poison_results(s.ctx.results, 2)
    vm.submit(s.ctx.ctx_id, [signal_cmd(s.va_b, 5), signal_cmd(s.unmapped, 6)],
              result=s.ctx.results, fence=False).expect(Resp.OK_NODATA)
    vm.submit(s.ctx.ctx_id, []).expect(Resp.OK_NODATA)
    results = vm.results(s.ctx.results, 2)
    assert results.statuses() == [Status.OK, Status.FAULT]
    assert (results.header.failed_index, results.header.fault_address) == (1, s.unmapped)


def test_failure_without_result_blob(vm: Vm) -> None:
    """No result blob: the fenced response still reports the failure."""
    s = Scene(vm)
    vm.submit(s.ctx.ctx_id, [signal_cmd(s.unmapped, 1)]).expect(Resp.ERR_UNSPEC)
    vm.submit(s.ctx.ctx_id, [map_cmd(0xFEED)]).expect(Resp.ERR_INVALID_PARAMETER)
    vm.submit(s.ctx.ctx_id, [signal_cmd(s.va_b, 1)]).expect(Resp.OK_NODATA)


def test_a_job_over_its_time_limit_is_aborted(start_vm: VmFactory) -> None:
    """--compute-job-timeout: the job stops at its next piece, ABORTED (as a GPU's job
    timeout); the context keeps working."""
    vm = start_vm("--compute-job-timeout", "1e-9")
    s = Scene(vm)
    done = s.ctx.run([dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(s.va_a), u64_arg(2 * PAGE)),
                      signal_cmd(s.va_b, 1, 2)])
    done.response.expect(Resp.ERR_INVALID_PARAMETER)
    assert done.results.statuses() == [Status.ABORTED, Status.NOT_RUN]
    s.ctx.run([signal_cmd(s.va_b, 7)]).response.expect(Resp.OK_NODATA)  # no piece: no limit
    vm.still_serving()


def test_a_matmul_beyond_the_staging_limit_is_refused(start_vm: VmFactory) -> None:
    """--max-compute-staging: a right operand over scattered pages larger than it cannot
    be staged: INVALID_ARGUMENT, nothing written."""
    vm = start_vm("--max-compute-staging", str(PAGE))
    s = Scene(vm)
    k, n = 8, 256  # b: 8 KiB over the two scattered pages of blob a
    bad = dispatch(Kernel.MATMUL_F32, buffer_arg(s.va_b), buffer_arg(s.va_a),
                   buffer_arg(s.va_a), u64_arg(1), u64_arg(n), u64_arg(k))
    failing_run(s, bad, Status.INVALID_ARGUMENT, Resp.ERR_INVALID_PARAMETER, (0, 0))


def test_a_copy_beyond_the_staging_limit_is_refused(start_vm: VmFactory) -> None:
    """--max-compute-staging: COPY between two blobs over the same pages stages its
    source whole; larger than the limit it is INVALID_ARGUMENT, nothing written."""
    vm = start_vm("--max-compute-staging", str(PAGE))
    s = Scene(vm)
    alias = s.ctx.blob(2 * PAGE, buffer=s.a.buffer)
    (va_alias,) = s.ctx.map(alias)
    failing_run(s, copy_cmd(va_alias, s.va_a + 16, PAGE + 1), Status.INVALID_ARGUMENT,
                Resp.ERR_INVALID_PARAMETER, (0, 0))
