"""Submissions refused as a whole (ERR_INVALID_PARAMETER unless noted) before anything
runs: malformed streams (also commands longer than their parts and non-zero reserved
fields), bad result blobs, bad contexts, oversized submissions, in-fences.  Each refused
stream starts with a FILL of a mapped blob: the blob and the result record must stay
untouched, and the device keeps serving."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from protocol.capsets import DEFAULT_COMPUTE_CAPSET, DEFAULT_USERPTR_CAPSET
from protocol.compute import (
    STREAM_MAGIC,
    ArgKind,
    Dispatch,
    FillCmd,
    Kernel,
    KernelArg,
    MapResource,
    Op,
    UnmapResource,
    buffer_arg,
    encode_command,
    encode_stream,
    f32_arg,
    u64_arg,
)
from protocol.virtio_gpu_codes import Cmd, Resp
from protocol.wire import encode
from tests.frontend.gpu_driver import POISON
from tests.userptr import guest_commands as gc
from tests.userptr.compute_stream import fill_cmd, results_size, signal_cmd, unmap_cmd
from tests.userptr.fixtures import VmPool
from tests.userptr.vm import Blob, ComputeContext, Vm

PAGE = 4096
HEADER = struct.Struct("<IHHIIQ")  # struct vgpu_compute_stream


@dataclass(slots=True)
class Target:
    """A context, a mapped blob the refused streams would FILL, and its VA."""

    vm: Vm
    ctx: ComputeContext
    blob: Blob
    va: int

    def fill(self) -> bytes:
        """A FILL of the blob's first 64 bytes."""
        return fill_cmd(self.va, 64, 0x5A5A5A5A)

    def stream(self, *commands: bytes) -> bytes:
        """A well-formed stream: the FILL, then ``commands``, results to the ctx's blob."""
        return encode_stream([self.fill(), *commands], self.ctx.results.resource_id)


def target_in(vm: Vm) -> Target:
    """A fresh context and mapped blob in ``vm``."""
    ctx = vm.compute_context()
    blob = ctx.blob(PAGE)
    (va,) = ctx.map(blob)
    return Target(vm, ctx, blob, va)


def with_header(stream: bytes, **fields: int) -> bytes:
    """``stream`` with some header fields replaced."""
    names = ("magic", "version", "num_cmds", "size", "result_resource_id", "result_offset")
    values = dict(zip(names, HEADER.unpack_from(stream), strict=True))
    values.update(fields)
    return HEADER.pack(*(values[n] for n in names)) + stream[HEADER.size:]


def command(opcode: int, length: int, body: bytes, cmd_id: int = 0) -> bytes:
    """A command with a chosen opcode and length field."""
    return struct.pack("<HHI", opcode, length, cmd_id) + body


def padded(cmd: bytes, extra: int) -> bytes:
    """``cmd`` with ``extra`` zero bytes after its body, counted in its length field."""
    opcode, length, cmd_id = struct.unpack_from("<HHI", cmd)
    return struct.pack("<HHI", opcode, length + extra, cmd_id) + cmd[8:] + bytes(extra)


def too_many(t: Target) -> bytes:
    """4097 commands (the limit is 4096)."""
    return encode_stream([t.fill()] + [unmap_cmd(0)] * 4096, t.ctx.results.resource_id)


def stream_with(t: Target, **header: int) -> bytes:
    """The FILL stream with header fields replaced."""
    return with_header(t.stream(), **header)


def bad_arg(kernel: Kernel, args: tuple[KernelArg, ...], num_args: int | None = None
            ) -> Callable[[Target], bytes]:
    """A stream dispatching ``kernel`` with these arguments (and ``num_args`` claimed)."""
    def build(t: Target) -> bytes:
        claimed = len(args) if num_args is None else num_args
        return t.stream(encode_command(Op.DISPATCH, Dispatch(kernel, claimed), 0, args))
    return build


B = buffer_arg(0)
N = u64_arg(4)
#: name -> stream builder
STREAMS: dict[str, Callable[[Target], bytes]] = {
    "bad magic": lambda t: stream_with(t, magic=STREAM_MAGIC ^ 1),
    "version 0": lambda t: stream_with(t, version=0),
    "version 2": lambda t: stream_with(t, version=2),
    "size field too large": lambda t: stream_with(t, size=len(t.stream()) + 8),
    "size field too small": lambda t: stream_with(t, size=len(t.stream()) - 8),
    "shorter than the header": lambda t: t.stream()[:HEADER.size - 1],
    "empty": lambda t: b"",
    "more commands claimed than present": lambda t: stream_with(t, num_cmds=2),
    "fewer commands claimed than present": lambda t: with_header(t.stream(t.fill()),
                                                                 num_cmds=1),
    "command length below its header": lambda t: t.stream(command(Op.SIGNAL, 0, b"")),
    "command length not a multiple of 8": lambda t: t.stream(
        command(Op.SIGNAL, 28, bytes(20) + bytes(4))),
    "command length beyond the stream": lambda t: t.stream(command(Op.SIGNAL, 64, bytes(16))),
    "opcode 0": lambda t: t.stream(command(0, 24, bytes(16))),
    "opcode 7": lambda t: t.stream(command(7, 24, bytes(16))),
    "opcode 0xffff": lambda t: t.stream(command(0xFFFF, 24, bytes(16))),
    "body shorter than its struct": lambda t: t.stream(
        command(Op.FILL, 16, encode(FillCmd(t.va, 8, 0))[:8])),
    "kernel 0": lambda t: t.stream(encode_command(Op.DISPATCH, Dispatch(0, 0), 0)),
    "kernel 8": lambda t: t.stream(encode_command(Op.DISPATCH, Dispatch(8, 0), 0)),
    "too few arguments": bad_arg(Kernel.SAXPY_F32, (B, B, N)),
    "too many arguments": bad_arg(Kernel.CHECKSUM_CRC32, (B, N, N)),
    "num_args beyond the command": bad_arg(Kernel.CHECKSUM_CRC32, (B, N), num_args=3),
    "F32 where a buffer goes": bad_arg(Kernel.CHECKSUM_CRC32, (f32_arg(1.0), N)),
    "buffer where a count goes": bad_arg(Kernel.FILL_U32, (B, B, N)),
    "U64 where an F32 goes": bad_arg(Kernel.SAXPY_F32, (B, B, N, N)),
    "unknown argument kind": bad_arg(Kernel.CHECKSUM_CRC32, (KernelArg(9, 0, 0), N)),
    "trailing bytes": lambda t: with_header(t.stream() + bytes(8), size=len(t.stream()) + 8),
    "SIGNAL with bytes after its body": lambda t: t.stream(padded(signal_cmd(t.va, 1), 8)),
    "FILL with bytes after its body": lambda t: t.stream(padded(t.fill(), 16)),
    "DISPATCH with bytes after its arguments": lambda t: t.stream(padded(encode_command(
        Op.DISPATCH, Dispatch(Kernel.CHECKSUM_CRC32, 2), 0, (buffer_arg(t.va), N)), 16)),
    "MAP flags 1": lambda t: t.stream(encode_command(Op.MAP_RESOURCE,
                                                     MapResource(t.blob.resource_id, 1))),
    "UNMAP padding": lambda t: t.stream(encode_command(Op.UNMAP_RESOURCE,
                                                       UnmapResource(0xBAD, 1))),
    "FILL padding": lambda t: t.stream(encode_command(Op.FILL, FillCmd(t.va, 8, 0, 1))),
    "argument padding": bad_arg(Kernel.CHECKSUM_CRC32, (KernelArg(ArgKind.BUFFER, 1, 0), N)),
    "F32 argument with upper bits": bad_arg(Kernel.SAXPY_F32, (
        B, B, N, KernelArg(ArgKind.F32, 0, (1 << 32) | f32_arg(1.0).value))),
    "4097 commands": too_many,
    "result blob unknown": lambda t: stream_with(t, result_resource_id=0xBAD),
    "result record beyond the blob": lambda t: stream_with(
        t, result_offset=t.ctx.results.buffer.size - results_size(1) + 16),
    "result offset 2^64-1": lambda t: stream_with(t, result_offset=(1 << 64) - 1),
}


@pytest.mark.parametrize("case", list(STREAMS))
def test_malformed_stream(vm_pool: VmPool, case: str) -> None:
    """Refused before running: nothing written, not even results."""
    vm = vm_pool.get()
    t = target_in(vm)
    stream = STREAMS[case](t)
    assert_refused(t, gc.submit_3d(t.ctx.ctx_id, len(stream), fence_id=vm.next_fence()),
                   stream, Resp.ERR_INVALID_PARAMETER)


def assert_refused(t: Target, submit: bytes, stream: bytes, code: Resp) -> None:
    """The submission gets ``code``; the blob and the result record stay as they were;
    the same context then runs a valid stream."""
    vm = t.vm
    vm.poison_results(t.ctx.results, 1)
    before = t.blob.buffer.read(vm.ram)
    vm.run(submit, stream).expect(code)
    assert t.blob.buffer.read(vm.ram) == before
    assert t.ctx.results.buffer.read(vm.ram, results_size(1)) == bytes([POISON]) * \
        results_size(1)
    done = t.ctx.run([t.fill()])
    done.response.expect(Resp.OK_NODATA)
    assert t.blob.buffer.read(vm.ram, 4) == b"\x5a" * 4


def test_result_blob_read_only(vm_pool: VmPool) -> None:
    """A RDONLY result blob cannot take results."""
    vm = vm_pool.get()
    t = target_in(vm)
    rdonly = t.ctx.blob(PAGE, readonly=True)
    stream = with_header(t.stream(), result_resource_id=rdonly.resource_id)
    assert_refused(t, gc.submit_3d(t.ctx.ctx_id, len(stream), fence_id=1), stream,
                   Resp.ERR_INVALID_PARAMETER)


def test_result_blob_too_small(vm_pool: VmPool) -> None:
    """A result blob smaller than the record (a one-page blob, 300 commands)."""
    vm = vm_pool.get()
    t = target_in(vm)
    small = t.ctx.blob(PAGE)
    stream = encode_stream([t.fill()] * 300, small.resource_id)
    assert_refused(t, gc.submit_3d(t.ctx.ctx_id, len(stream), fence_id=1), stream,
                   Resp.ERR_INVALID_PARAMETER)


@pytest.mark.parametrize("attached", [False, True])
def test_result_blob_not_usable(vm_pool: VmPool, attached: bool) -> None:
    """A result blob not attached to the context, or without a GPU mapping (a plain
    GUEST blob)."""
    vm = vm_pool.get()
    t = target_in(vm)
    if attached:
        rid = vm.new_resource_id()
        vm.create_blob(rid, t.blob.buffer.entries, PAGE, blob_mem=1, flags=0
                       ).expect(Resp.OK_NODATA)
        vm.attach(t.ctx.ctx_id, rid).expect(Resp.OK_NODATA)
    else:
        rid = vm.userptr_blob(PAGE).resource_id
    stream = with_header(t.stream(), result_resource_id=rid)
    assert_refused(t, gc.submit_3d(t.ctx.ctx_id, len(stream), fence_id=1), stream,
                   Resp.ERR_INVALID_PARAMETER)


SUBMITS: dict[str, tuple[Callable[[Target, bytes], bytes], Resp]] = {
    "unknown context": (lambda t, s: gc.submit_3d(999, len(s), fence_id=1),
                        Resp.ERR_INVALID_CONTEXT_ID),
    "context 0": (lambda t, s: gc.submit_3d(0, len(s), fence_id=1),
                  Resp.ERR_INVALID_CONTEXT_ID),
    "num_in_fences 1": (lambda t, s: gc.submit_3d(t.ctx.ctx_id, len(s), num_in_fences=1),
                        Resp.ERR_INVALID_PARAMETER),
    "size beyond the chain": (lambda t, s: gc.submit_3d(t.ctx.ctx_id, len(s) + 8),
                              Resp.ERR_INVALID_PARAMETER),
    "size 2^32-1": (lambda t, s: gc.submit_3d(t.ctx.ctx_id, 0xFFFFFFFF),
                    Resp.ERR_INVALID_PARAMETER),
    "ring_idx 64": (lambda t, s: gc.submit_3d(t.ctx.ctx_id, len(s), fence_id=1, ring_idx=64),
                    Resp.ERR_INVALID_PARAMETER),
    "ring_idx 255": (lambda t, s: gc.submit_3d(t.ctx.ctx_id, len(s), fence_id=1,
                                               ring_idx=255), Resp.ERR_INVALID_PARAMETER),
    "command shorter than SUBMIT_3D": (lambda t, s: gc.header(Cmd.SUBMIT_3D,
                                                              ctx_id=t.ctx.ctx_id),
                                       Resp.ERR_INVALID_PARAMETER),
}


@pytest.mark.parametrize("case", list(SUBMITS))
def test_bad_submit(vm_pool: VmPool, case: str) -> None:
    """SUBMIT_3D itself is bad: refused with its code, nothing runs."""
    vm = vm_pool.get()
    t = target_in(vm)
    stream = t.stream()
    build, code = SUBMITS[case]
    assert_refused(t, build(t, stream), stream, code)


def test_oversized_submission(vm_pool: VmPool) -> None:
    """A stream over --max-submit-bytes is refused; one exactly at the limit runs (its
    commands are 24-byte SIGNALs and 32-byte FILLs: no command may carry extra bytes)."""
    vm = vm_pool.get("--max-submit-bytes", "4096")
    t = target_in(vm)
    filler = signal_cmd(t.va + 64, 1)
    room = 4096 - HEADER.size - len(t.fill())
    count, pad = divmod(room, len(filler))
    assert pad == len(t.fill()) - len(filler)  # one SIGNAL less, one FILL more
    fits = encode_stream([t.fill()] + [filler] * (count - 1) + [t.fill()])
    assert len(fits) == 4096
    over = encode_stream([t.fill()] + [filler] * (count + 1))
    assert_refused(t, gc.submit_3d(t.ctx.ctx_id, len(over), fence_id=1), over,
                   Resp.ERR_INVALID_PARAMETER)
    vm.run(gc.submit_3d(t.ctx.ctx_id, len(fits), fence_id=2), fits).expect(Resp.OK_NODATA)
    assert t.blob.buffer.read(vm.ram, 8, 64) == struct.pack("<Q", 1)


def test_context_of_another_type(vm_pool: VmPool) -> None:
    """A userptr context (``context_init`` = the userptr capset) is no compute context:
    its SUBMIT_3D is refused; a compute context's runs."""
    vm = vm_pool.get()
    vm.run(gc.ctx_create(77, context_init=DEFAULT_USERPTR_CAPSET)).expect(Resp.OK_NODATA)
    stream = encode_stream([])
    vm.run(gc.submit_3d(77, len(stream)), stream).expect(Resp.ERR_INVALID_PARAMETER)
    vm.run(gc.ctx_create(78, context_init=DEFAULT_COMPUTE_CAPSET)).expect(Resp.OK_NODATA)
    vm.run(gc.submit_3d(78, len(stream), fence_id=1), stream).expect(Resp.OK_NODATA)
    vm.destroy_context(77).expect(Resp.OK_NODATA)
    vm.destroy_context(78).expect(Resp.OK_NODATA)


def test_no_compute(vm_pool: VmPool) -> None:
    """With --no-compute contexts are userptr contexts and SUBMIT_3D is an unknown
    command."""
    vm = vm_pool.get("--no-compute")
    vm.run(gc.ctx_create(1)).expect(Resp.OK_NODATA)
    stream = encode_stream([])
    vm.run(gc.submit_3d(1, len(stream)), stream).expect(Resp.ERR_UNSPEC)
    vm.still_serving()


def test_dispatch_argument_kinds_are_checked_per_kernel(vm_pool: VmPool) -> None:
    """Every kernel refuses a stream where one argument has the wrong kind."""
    vm = vm_pool.get()
    t = target_in(vm)
    before = t.blob.buffer.read(vm.ram)
    signatures = {Kernel.FILL_U32: "BNN", Kernel.COPY: "BBN", Kernel.VADD_F32: "BBBN",
                  Kernel.SAXPY_F32: "BBNF", Kernel.REDUCE_SUM_F32: "BNB",
                  Kernel.MATMUL_F32: "BBBNNN", Kernel.CHECKSUM_CRC32: "BN"}
    kinds = {"B": ArgKind.BUFFER, "N": ArgKind.U64, "F": ArgKind.F32}
    for kernel, sig in signatures.items():
        for wrong in range(len(sig)):
            args = tuple(KernelArg(kinds[c] if i != wrong else
                                   (ArgKind.U64 if c == "B" else ArgKind.BUFFER), 0, 0)
                         for i, c in enumerate(sig))
            stream = t.stream(encode_command(Op.DISPATCH, Dispatch(kernel, len(args)), 0,
                                             args))
            vm.run(gc.submit_3d(t.ctx.ctx_id, len(stream), fence_id=1), stream).expect(
                Resp.ERR_INVALID_PARAMETER)
    assert t.blob.buffer.read(vm.ram) == before
