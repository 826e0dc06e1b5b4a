"""The compute engine in process (:mod:`.engine_harness`: the simulated GPU's page table
over a host arena): the result record and every command's value, cancellation and the
job time limit between commands and pieces, released mappings, page-table faults, and
the bounds, alignment and count limits of every buffer argument."""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Iterator

import numpy as np
import pytest

from protocol.compute import (
    RESULT_MAGIC,
    CmdResult,
    Kernel,
    KernelArg,
    ResultHeader,
    Status,
    buffer_arg,
    f32_arg,
    u64_arg,
)
from tests.compute.engine_harness import GPU_ID, PAGE, EngineScene
from tests.userptr.compute_stream import (
    SubmissionResults,
    copy_cmd,
    dispatch,
    fill_cmd,
    map_cmd,
    results_size,
    signal_cmd,
    unmap_cmd,
)
from vgpu_backend.compute.engine import Mapping, ResultTarget
from vgpu_backend.hostgpu.base import GpuMapping, UserptrPath
from vgpu_backend.hostgpu.sim_vm import SimBo

NONE_FAILED = 0xFFFFFFFF
MAX_COUNT = 1 << 40  # the largest element or byte count of a kernel
MAX_DIM = 1 << 20  # the largest matmul dimension


@pytest.fixture
def scene() -> Iterator[EngineScene]:
    """A context over a fresh arena."""
    s = EngineScene()
    yield s
    s.close()


def results_of(scene: EngineScene, target: ResultTarget, count: int) -> SubmissionResults:
    """The result record at ``target``."""
    return SubmissionResults.decode(scene.read(target.gpu_va, results_size(count)), count)


def result_target(scene: EngineScene, count: int) -> ResultTarget:
    """A result record in a blob of its own."""
    return ResultTarget(scene.blob(1).gpu_va + 64, results_size(count))


def test_result_record_and_the_value_of_every_command(scene: EngineScene) -> None:
    """The record holds the header (magic, status, no failure, completed, elapsed time)
    and each command's cmd_id, status and value: MAP the GPU VA, UNMAP 0, FILL/COPY
    their bytes, SIGNAL its value, kernels their counts, CHECKSUM the CRC-32."""
    data = scene.blob(2)
    later = scene.blob(1, mapped=False)
    va = data.gpu_va
    scene.write(va, np.arange(16, dtype="<f4").tobytes())  # the float operands
    commands = [
        map_cmd(later.resource_id, 1), fill_cmd(va, 12, 0x01020304, 2),
        copy_cmd(va + 101, va + 3, 33, 3), signal_cmd(later.gpu_va + 8, 0xFEDCBA9876543210, 4),
        dispatch(Kernel.FILL_U32, buffer_arg(va + 256), u64_arg(5), u64_arg(7), cmd_id=5),
        dispatch(Kernel.COPY, buffer_arg(va + 512), buffer_arg(va + 1), u64_arg(17), cmd_id=6),
        dispatch(Kernel.VADD_F32, buffer_arg(va + 1024), buffer_arg(va), buffer_arg(va),
                 u64_arg(6), cmd_id=7),
        dispatch(Kernel.SAXPY_F32, buffer_arg(va + 1024), buffer_arg(va), u64_arg(3),
                 f32_arg(0.0), cmd_id=8),
        dispatch(Kernel.MATMUL_F32, buffer_arg(va + 2048), buffer_arg(va), buffer_arg(va),
                 u64_arg(3), u64_arg(2), u64_arg(4), cmd_id=9),
        dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(va + 5), u64_arg(PAGE), cmd_id=10),
        unmap_cmd(later.resource_id, 11),
    ]
    target = result_target(scene, len(commands))
    outcome = scene.run(commands, target=target, prepared={0: later})
    crc = zlib.crc32(scene.read(va + 5, PAGE))
    assert outcome.status == Status.OK
    got = results_of(scene, target, len(commands))
    assert got.header == ResultHeader(RESULT_MAGIC, Status.OK, NONE_FAILED, len(commands), 0,
                                      outcome.elapsed_ns)
    assert outcome.elapsed_ns > 0
    assert got.commands == [CmdResult(i + 1, Status.OK, value) for i, value in enumerate(
        [later.gpu_va, 12, 33, 0xFEDCBA9876543210, 5, 17, 6, 3, 6, crc, 0])]
    assert later.resource_id not in scene.vm.mappings


def test_cancelled_before_a_command(scene: EngineScene) -> None:
    """A job cancelled before it starts (device reset, disconnect): the first command is
    ABORTED (failed_index 0) even if it has no pieces, the rest NOT_RUN; nothing is
    written, not even the result record."""
    blob = scene.blob(1)
    target = result_target(scene, 2)
    before = scene.read(blob.gpu_va, PAGE), scene.read(target.gpu_va, target.size)
    cancel = threading.Event()
    cancel.set()
    outcome = scene.run([signal_cmd(blob.gpu_va, 1, 1), fill_cmd(blob.gpu_va, 8, 2, 2)],
                        target=target, cancel=cancel)
    assert (outcome.status, outcome.failed_index, outcome.completed) == (Status.ABORTED, 0, 0)
    assert outcome.results == [CmdResult(1, Status.ABORTED, 0), CmdResult(2, Status.NOT_RUN, 0)]
    assert (scene.read(blob.gpu_va, PAGE), scene.read(target.gpu_va, target.size)) == before


class CancelledOnceStarted(threading.Event):
    """Not cancelled when the engine looks before a command, cancelled whenever it looks
    again (a reset while the command's first piece runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    def is_set(self) -> bool:
        self.asked += 1
        return self.asked > 1


def test_cancelled_while_a_kernel_runs(scene: EngineScene) -> None:
    """The kernel stops at its next piece: ABORTED at that command, later ones NOT_RUN
    (the SIGNAL does not write)."""
    blob = scene.blob(2)
    before = scene.read(blob.gpu_va, 2 * PAGE)
    outcome = scene.run([dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(blob.gpu_va),
                                  u64_arg(PAGE)), signal_cmd(blob.gpu_va + PAGE, 1)],
                        cancel=CancelledOnceStarted())
    assert (outcome.status, outcome.failed_index, outcome.completed) == (Status.ABORTED, 0, 0)
    assert [r.status for r in outcome.results] == [Status.ABORTED, Status.NOT_RUN]
    assert scene.read(blob.gpu_va, 2 * PAGE) == before


def test_a_job_over_its_time_limit() -> None:
    """Past the job's time limit the first command with a piece is ABORTED (failed_index
    is that command), the ones before it ran, later ones did not; the result record is
    written."""
    over = EngineScene(job_timeout=-1.0)
    try:
        va = over.blob(1).gpu_va
        target = result_target(over, 3)
        before = over.read(va + 8, 8)
        outcome = over.run([signal_cmd(va, 5, 1), fill_cmd(va + 64, 64, 0, 2),
                            signal_cmd(va + 8, 6, 3)], target=target)
        assert (outcome.status, outcome.failed_index, outcome.completed) == \
            (Status.ABORTED, 1, 1)
        got = results_of(over, target, 3)
        assert (got.header.status, got.header.failed_index, got.header.completed) == \
            (Status.ABORTED, 1, 1)
        assert got.commands == [CmdResult(1, Status.OK, 5), CmdResult(2, Status.ABORTED, 0),
                                CmdResult(3, Status.NOT_RUN, 0)]
        assert over.read(va, 16) == struct.pack("<Q", 5) + before
    finally:
        over.close()


def test_results_the_page_table_refuses_are_dropped(scene: EngineScene) -> None:
    """The record is written through the page table for writing: into a RDONLY blob it
    is refused (logged), the blob stays as it was, the outcome stands."""
    blob, ro = scene.blob(1), scene.blob(1, readonly=True)
    before = scene.read(ro.gpu_va, PAGE)
    outcome = scene.run([signal_cmd(blob.gpu_va, 9)], target=ResultTarget(ro.gpu_va, 64))
    assert outcome.status == Status.OK
    assert scene.read(ro.gpu_va, PAGE) == before


def test_released_mappings(scene: EngineScene) -> None:
    """A mapping whose host GPU mapping was released (its VA may belong to another
    buffer) faults at the buffer's VA, although the page table still maps it; MAP of a
    resource whose mapping was released after the submission was checked is
    INVALID_RESOURCE."""
    blob, other = scene.blob(1), scene.blob(1, mapped=False)
    assert blob.host is not None and other.host is not None
    blob.host.invalidated = other.host.invalidated = True
    before = scene.read(blob.gpu_va, PAGE)
    outcome = scene.run([fill_cmd(blob.gpu_va + 8, 8, 1)])
    assert (outcome.status, outcome.fault_address) == (Status.FAULT, blob.gpu_va + 8)
    assert scene.read(blob.gpu_va, PAGE) == before
    outcome = scene.run([map_cmd(other.resource_id)], prepared={0: other})
    assert outcome.status == Status.INVALID_RESOURCE
    assert other.resource_id not in scene.vm.mappings


def test_page_table_fault_address(scene: EngineScene) -> None:
    """A blob of two BOs at consecutive VAs (the per-range host path) whose second BO the
    MMU notifier invalidated: a FILL over both faults where the page table faults (the
    second BO's VA), nothing written."""
    va = 0x4000_0000
    pages, scene.free = scene.free[:2], scene.free[2:]
    for i, page in enumerate(pages):
        scene.table.map(SimBo(handle=100 + i, gpu_id=GPU_ID, va=va + i * PAGE, size=PAGE,
                              flags=0, writable=True,
                              host_starts=np.array([scene.base + page * PAGE], np.int64),
                              host_sizes=np.array([PAGE], np.int64), charged=0,
                              mmap_offset=0, invalid=i == 1))
    mapping = GpuMapping(va, 2 * PAGE, False, UserptrPath.PER_RANGE, (GPU_ID,))
    scene.vm.mappings[100] = Mapping(100, va, 2 * PAGE, False, mapping)
    before = scene.read(va, PAGE)
    outcome = scene.run([fill_cmd(va + 16, PAGE, 3)])
    assert (outcome.status, outcome.fault_address) == (Status.FAULT, va + PAGE)
    assert outcome.results[0].value == va + PAGE
    assert scene.read(va, PAGE) == before


def test_an_empty_buffer_must_start_inside_a_mapping(scene: EngineScene) -> None:
    """A zero-byte buffer at a mapping's first byte is fine (CRC 0); right after its
    last byte (unmapped VA) it faults there."""
    blob = scene.blob(1)
    outcome = scene.run([dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(blob.gpu_va), u64_arg(0))])
    assert outcome.results == [CmdResult(0, Status.OK, 0)]
    end = blob.gpu_va + blob.size
    outcome = scene.run([dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(end), u64_arg(0))])
    assert (outcome.status, outcome.fault_address) == (Status.FAULT, end)


@pytest.mark.parametrize("side", ["below", "above"])
def test_a_buffer_one_byte_outside_the_context_faults_next_to_another_resource(
        scene: EngineScene, side: str) -> None:
    """The GPU VM maps another resource right next to the context's blob (no gap), but
    the context never mapped it: a byte-aligned buffer reaching one byte into it faults,
    and nothing of the neighbour is read (context isolation, to the byte)."""
    if side == "below":
        scene.blob(1, mapped=False, guard=False)
        blob = scene.blob(1)
        va = blob.gpu_va - 1
    else:
        blob = scene.blob(1, guard=False)
        scene.blob(1, mapped=False)
        va = blob.gpu_va + blob.size - 1
    outcome = scene.run([dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(va), u64_arg(2))])
    assert outcome.status == Status.FAULT
    inside = blob.gpu_va if side == "below" else va
    outcome = scene.run([dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(inside), u64_arg(1))])
    assert outcome.status == Status.OK  # the blob's own byte at that edge is fine


@pytest.mark.parametrize(("offset", "size", "status"), [
    (0, 4, Status.OK), (4, 12, Status.OK), (2, 8, Status.INVALID_ARGUMENT),
    (0, 6, Status.INVALID_ARGUMENT), (1, 3, Status.INVALID_ARGUMENT)])
def test_fill_takes_whole_aligned_words(scene: EngineScene, offset: int, size: int,
                                        status: Status) -> None:
    """FILL: any number of 32-bit words at a 4-aligned VA; else INVALID_ARGUMENT and
    nothing written."""
    va = scene.blob(1).gpu_va
    before = scene.read(va, 64)
    outcome = scene.run([fill_cmd(va + offset, size, 0xA1B2C3D4)])
    assert outcome.status == status
    expected = bytearray(before)
    if status == Status.OK:
        expected[offset:offset + size] = struct.pack("<I", 0xA1B2C3D4) * (size // 4)
    assert scene.read(va, 64) == bytes(expected)


def test_fill_u32_stores_the_low_32_bits_of_its_value(scene: EngineScene) -> None:
    """FILL_U32's value is a U64 argument: each word gets its low 32 bits."""
    va = scene.blob(1).gpu_va
    outcome = scene.run([dispatch(Kernel.FILL_U32, buffer_arg(va), u64_arg(3),
                                  u64_arg(0xFFFF_FFFF_CAFE_F00D))])
    assert outcome.status == Status.OK
    assert scene.read(va, 12) == struct.pack("<I", 0xCAFEF00D) * 3


# --- the buffer and count arguments of every kernel ---------------------------------------

COUNT = 16  # elements (bytes for COPY and CHECKSUM)
MM, MN, MK = 3, 2, 5  # a matmul's m, n, k: all different, so sizes mixing them up differ
#: per kernel, each argument: ("B", bytes of the buffer) or (kind, value)
SPECS: dict[Kernel, list[tuple[str, float]]] = {
    Kernel.FILL_U32: [("B", 4 * COUNT), ("N", COUNT), ("N", 7)],
    Kernel.COPY: [("B", COUNT), ("B", COUNT), ("N", COUNT)],
    Kernel.VADD_F32: [("B", 4 * COUNT), ("B", 4 * COUNT), ("B", 4 * COUNT), ("N", COUNT)],
    Kernel.SAXPY_F32: [("B", 4 * COUNT), ("B", 4 * COUNT), ("N", COUNT), ("F", 2.0)],
    Kernel.REDUCE_SUM_F32: [("B", 4 * COUNT), ("N", COUNT), ("B", 4)],
    Kernel.MATMUL_F32: [("B", 4 * MM * MN), ("B", 4 * MM * MK), ("B", 4 * MK * MN),
                        ("N", MM), ("N", MN), ("N", MK)],
    Kernel.CHECKSUM_CRC32: [("B", COUNT), ("N", COUNT)],
}
BYTE_BUFFERS = {Kernel.COPY, Kernel.CHECKSUM_CRC32}  # any alignment; the others: 4
BUFFER_ARGS = [(k, i) for k, spec in SPECS.items() for i, (kind, _) in enumerate(spec)
               if kind == "B"]
#: the element or byte count of every kernel but MATMUL
COUNT_ARGS = [(Kernel.FILL_U32, 1), (Kernel.COPY, 2), (Kernel.VADD_F32, 3),
              (Kernel.SAXPY_F32, 2), (Kernel.REDUCE_SUM_F32, 1), (Kernel.CHECKSUM_CRC32, 1)]


def kernel_args(kernel: Kernel, home: int, **at: int) -> tuple[KernelArg, ...]:
    """The arguments of ``kernel``: buffer ``i`` at ``home + i * PAGE`` unless ``at``
    says (``b<i>=va``); scalar ``i`` from SPECS unless ``at`` says (``v<i>=value``)."""
    args: list[KernelArg] = []
    for i, (kind, value) in enumerate(SPECS[kernel]):
        if kind == "B":
            args.append(buffer_arg(at.get(f"b{i}", home + i * PAGE)))
        elif kind == "F":
            args.append(f32_arg(float(value)))
        else:
            args.append(u64_arg(at.get(f"v{i}", int(value))))
    return tuple(args)


def zeroed(scene: EngineScene, pages: int) -> int:
    """The VA of a blob of zero bytes (float operands without overflow)."""
    va = scene.blob(pages).gpu_va
    scene.write(va, bytes(pages * PAGE))
    return va


@pytest.mark.parametrize(("kernel", "index"), BUFFER_ARGS,
                         ids=[f"{k.name}-{i}" for k, i in BUFFER_ARGS])
def test_a_buffer_argument_ends_inside_its_mapping(scene: EngineScene, kernel: Kernel,
                                                   index: int) -> None:
    """Argument ``index`` may end at its blob's last byte; 4 bytes further (the VA after
    the blob is unmapped) the command faults at its VA and writes nothing."""
    home = zeroed(scene, 4)
    edge = scene.blob(1)
    scene.write(edge.gpu_va, bytes(PAGE))
    size = int(SPECS[kernel][index][1])
    last = edge.gpu_va + edge.size - size
    done = scene.run([dispatch(kernel, *kernel_args(kernel, home, **{f"b{index}": last}))])
    assert done.status == Status.OK
    before = scene.read(home, 4 * PAGE), scene.read(edge.gpu_va, PAGE)
    done = scene.run([dispatch(kernel, *kernel_args(kernel, home, **{f"b{index}": last + 4}))])
    assert (done.status, done.fault_address) == (Status.FAULT, last + 4)
    assert (scene.read(home, 4 * PAGE), scene.read(edge.gpu_va, PAGE)) == before


@pytest.mark.parametrize(("kernel", "index"), BUFFER_ARGS,
                         ids=[f"{k.name}-{i}" for k, i in BUFFER_ARGS])
def test_buffer_alignment(scene: EngineScene, kernel: Kernel, index: int) -> None:
    """Buffers of 32-bit elements must be 4-aligned (else INVALID_ARGUMENT at that VA,
    nothing written); COPY and CHECKSUM take any byte address."""
    home = zeroed(scene, 4)
    before = scene.read(home, 4 * PAGE)
    odd = home + index * PAGE + (1 if kernel in BYTE_BUFFERS else 2)
    done = scene.run([dispatch(kernel, *kernel_args(kernel, home, **{f"b{index}": odd}))])
    if kernel in BYTE_BUFFERS:
        assert done.status == Status.OK
    else:
        assert (done.status, done.fault_address) == (Status.INVALID_ARGUMENT, odd)
        assert scene.read(home, 4 * PAGE) == before


@pytest.mark.parametrize(("kernel", "index"), COUNT_ARGS,
                         ids=[f"{k.name}-{i}" for k, i in COUNT_ARGS])
def test_count_limit(scene: EngineScene, kernel: Kernel, index: int) -> None:
    """A count up to 2^40 is taken (then the buffers are not mapped: FAULT); beyond, it
    is INVALID_ARGUMENT."""
    home = zeroed(scene, 4)
    done = scene.run([dispatch(kernel, *kernel_args(kernel, home, **{f"v{index}": MAX_COUNT}))])
    assert done.status == Status.FAULT
    done = scene.run([dispatch(kernel, *kernel_args(kernel, home,
                                                    **{f"v{index}": MAX_COUNT + 1}))])
    assert done.status == Status.INVALID_ARGUMENT


@pytest.mark.parametrize("dim", ["m", "n", "k"])
def test_matmul_dimension_limit(scene: EngineScene, dim: str) -> None:
    """Each matmul dimension may be up to 2^20 (with another one 0: an empty product,
    OK), not beyond (INVALID_ARGUMENT)."""
    home = zeroed(scene, 4)
    index = 3 + "mnk".index(dim)
    zero = {f"v{i}": 0 for i in (3, 4, 5) if i != index}
    for value, status in ((MAX_DIM, Status.OK), (MAX_DIM + 1, Status.INVALID_ARGUMENT)):
        done = scene.run([dispatch(Kernel.MATMUL_F32, *kernel_args(
            Kernel.MATMUL_F32, home, **zero, **{f"v{index}": value}))])
        assert done.status == status, value
