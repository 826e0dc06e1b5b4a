"""The compute command stream (version 1), carried by SUBMIT_3D for compute contexts.

A submission is one stream::

    struct vgpu_compute_stream {        /* 24 bytes */
        le32 magic;                     /* "VGCS" */
        le16 version;                   /* 1 */
        le16 num_cmds;
        le32 size;                      /* bytes of the whole stream */
        le32 result_resource_id;        /* blob attached to the context, or 0 */
        le64 result_offset;             /* where results go in that blob */
    };
    then num_cmds commands, each { le16 opcode; le16 length; le32 cmd_id; body },
    length = bytes of the command including its 8-byte header, a multiple of 8.

Each command is exactly as long as its parts, rounded up to a multiple of 8 (what
:func:`encode_command` produces): ``length`` = 8 + the body struct, plus
``num_args * 16`` for DISPATCH (in version 1 every part is a multiple of 8, so no
command has pad bytes); a longer or shorter command is refused, and so are bytes after
the last command.  Reserved fields must be 0 (a later stream version may give them a
meaning): MAP_RESOURCE ``flags`` (no flag is defined), UNMAP_RESOURCE and FILL
``padding``, every kernel argument's ``padding`` and, for an F32 argument, the upper 32
bits of ``value``.  So an accepted stream is byte for byte what :func:`encode_stream`
makes of its decoded header and commands.

The device decodes and checks the whole stream before running any of it; then it runs
the commands in order and stops at the first failure.  If ``result_resource_id`` is
set, it writes a :class:`ResultHeader` and one :class:`CmdResult` per command (MAP
returns the GPU VA, REDUCE_SUM the sum, CHECKSUM the CRC-32, faults their address)
into that blob before the submission's fence completes.

Kernels take typed arguments (:data:`KERNEL_SIGNATURES`); buffers are GPU virtual
addresses inside resources mapped into the context -- an empty buffer too: the device
checks every buffer argument's address, whatever its length, before the kernel runs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, NamedTuple

from protocol.errors import GuestProtocolError
from protocol.wire import U16, U32, U64, decode, layout, wire

__all__ = [
    "COMPUTE_CAPSET_MAGIC",
    "KERNEL_SIGNATURES",
    "RESULT_MAGIC",
    "STREAM_MAGIC",
    "STREAM_VERSION",
    "ArgKind",
    "CmdHeader",
    "CmdResult",
    "Command",
    "ComputeCapsetHeader",
    "CopyCmd",
    "Dispatch",
    "FillCmd",
    "Kernel",
    "KernelArg",
    "KernelDescriptor",
    "MapResource",
    "Op",
    "ResultHeader",
    "SignalCmd",
    "Status",
    "StreamHeader",
    "UnmapResource",
    "buffer_arg",
    "decode_stream",
    "encode_command",
    "encode_stream",
    "f32_arg",
    "u64_arg",
]

STREAM_MAGIC: Final = 0x53434756  # "VGCS"
RESULT_MAGIC: Final = 0x52434756  # "VGCR"
COMPUTE_CAPSET_MAGIC: Final = 0x43434756  # "VGCC"
STREAM_VERSION: Final = 1


class Op(IntEnum):
    """Command opcodes."""

    MAP_RESOURCE = 1
    UNMAP_RESOURCE = 2
    DISPATCH = 3
    FILL = 4
    COPY = 5
    SIGNAL = 6


class Kernel(IntEnum):
    """Kernel ids for DISPATCH."""

    FILL_U32 = 1
    COPY = 2
    VADD_F32 = 3
    SAXPY_F32 = 4
    REDUCE_SUM_F32 = 5
    MATMUL_F32 = 6
    CHECKSUM_CRC32 = 7


class ArgKind(IntEnum):
    """Kernel argument kinds."""

    BUFFER = 1  # a GPU virtual address
    U64 = 2
    F32 = 3  # IEEE single in the low 32 bits of value


class Status(IntEnum):
    """Per-command and per-submission status."""

    OK = 0
    INVALID_COMMAND = 1
    INVALID_RESOURCE = 2
    INVALID_ARGUMENT = 3
    FAULT = 4
    NOT_RUN = 5
    ABORTED = 6


B, N, F = ArgKind.BUFFER, ArgKind.U64, ArgKind.F32
#: argument kinds of each kernel, in order
KERNEL_SIGNATURES: Final[dict[Kernel, tuple[ArgKind, ...]]] = {
    Kernel.FILL_U32: (B, N, N),             # dst, count (u32 words), value
    Kernel.COPY: (B, B, N),                 # dst, src, bytes
    Kernel.VADD_F32: (B, B, B, N),          # dst, a, b, count: dst = a + b
    Kernel.SAXPY_F32: (B, B, N, F),         # y, x, count, a: y = a * x + y
    Kernel.REDUCE_SUM_F32: (B, N, B),       # x, count, out (one f32; also the result)
    Kernel.MATMUL_F32: (B, B, B, N, N, N),  # c, a, b, m, n, k: c[m,n] = a[m,k] @ b[k,n]
    Kernel.CHECKSUM_CRC32: (B, N),          # buffer, bytes -> CRC-32 in the result
}


@wire("struct vgpu_compute_stream")
class StreamHeader(NamedTuple):
    """The 24-byte stream header (see the module docstring)."""

    magic: U32
    version: U16
    num_cmds: U16
    size: U32
    result_resource_id: U32
    result_offset: U64


@wire("struct vgpu_compute_cmd")
class CmdHeader(NamedTuple):
    """``{ le16 opcode; le16 length; le32 cmd_id; }`` before every command body."""

    opcode: U16
    length: U16
    cmd_id: U32


@wire("struct vgpu_compute_map")
class MapResource(NamedTuple):
    """MAP_RESOURCE: ``{ le32 resource_id; le32 flags; }`` -> result value = GPU VA.
    No flag is defined: ``flags`` must be 0."""

    resource_id: U32
    flags: U32 = 0


@wire("struct vgpu_compute_unmap")
class UnmapResource(NamedTuple):
    """UNMAP_RESOURCE: ``{ le32 resource_id; le32 padding; }`` (padding 0)"""

    resource_id: U32
    padding: U32 = 0


@wire("struct vgpu_compute_dispatch")
class Dispatch(NamedTuple):
    """DISPATCH: ``{ le32 kernel_id; le32 num_args; struct vgpu_compute_arg args[]; }``
    (exactly num_args arguments, no bytes after them)"""

    kernel_id: U32
    num_args: U32


@wire("struct vgpu_compute_arg")
class KernelArg(NamedTuple):
    """``{ le32 kind; le32 padding; le64 value; }`` (padding 0; F32: upper 32 bits of
    value 0)"""

    kind: U32
    padding: U32
    value: U64


@wire("struct vgpu_compute_fill")
class FillCmd(NamedTuple):
    """FILL: ``{ le64 va; le64 size; le32 pattern; le32 padding; }`` (size % 4 == 0,
    padding 0)"""

    va: U64
    size: U64
    pattern: U32
    padding: U32 = 0


@wire("struct vgpu_compute_copy")
class CopyCmd(NamedTuple):
    """COPY: ``{ le64 dst; le64 src; le64 size; }``"""

    dst: U64
    src: U64
    size: U64


@wire("struct vgpu_compute_signal")
class SignalCmd(NamedTuple):
    """SIGNAL: ``{ le64 va; le64 value; }`` -- store ``value`` (u64) at ``va``."""

    va: U64
    value: U64


@wire("struct vgpu_compute_result_header")
class ResultHeader(NamedTuple):
    """Results: ``{ le32 magic; le32 status; le32 failed_index; le32 completed;
    le64 fault_address; le64 elapsed_ns; }`` followed by one CmdResult per command."""

    magic: U32
    status: U32
    failed_index: U32
    completed: U32
    fault_address: U64
    elapsed_ns: U64


@wire("struct vgpu_compute_cmd_result")
class CmdResult(NamedTuple):
    """``{ le32 cmd_id; le32 status; le64 value; }``"""

    cmd_id: U32
    status: U32
    value: U64


@wire("struct vgpu_compute_capset")
class ComputeCapsetHeader(NamedTuple):
    """The compute capset: ``{ le32 magic; le16 version; le16 size; le32 stream_version;
    le32 num_kernels; le32 max_submit_bytes; le32 num_rings; le32 engine;
    le32 flags; }`` followed by num_kernels KernelDescriptor.  engine: 1 = simulated
    GPU (numpy on the mapped guest pages)."""

    magic: U32
    version: U16
    size: U16
    stream_version: U32
    num_kernels: U32
    max_submit_bytes: U32
    num_rings: U32
    engine: U32
    flags: U32


@wire("struct vgpu_compute_kernel_desc")
class KernelDescriptor(NamedTuple):
    """``{ le32 kernel_id; le32 num_args; le32 arg_kinds; le32 padding; }`` --
    arg_kinds packs 4 bits per argument, first argument in the low bits."""

    kernel_id: U32
    num_args: U32
    arg_kinds: U32
    padding: U32 = 0


_BODIES: Final[dict[Op, type[NamedTuple]]] = {
    Op.MAP_RESOURCE: MapResource, Op.UNMAP_RESOURCE: UnmapResource, Op.DISPATCH: Dispatch,
    Op.FILL: FillCmd, Op.COPY: CopyCmd, Op.SIGNAL: SignalCmd,
}
#: reserved fields of each command body: they must be 0
_RESERVED: Final[dict[Op, tuple[str, ...]]] = {
    Op.MAP_RESOURCE: ("flags",), Op.UNMAP_RESOURCE: ("padding",), Op.FILL: ("padding",),
}
_STREAM_SIZE: Final = layout(StreamHeader).size
_CMD_SIZE: Final = layout(CmdHeader).size
_ARG_SIZE: Final = layout(KernelArg).size
_F32: Final = struct.Struct("<f")


@dataclass(frozen=True, slots=True)
class Command:
    """One decoded command: its header, its body and (DISPATCH) its arguments."""

    index: int
    cmd_id: int
    op: Op
    body: NamedTuple
    args: tuple[KernelArg, ...] = ()

    def arg_value(self, i: int) -> int | float:
        """Argument ``i`` as int (BUFFER, U64) or float (F32)."""
        arg = self.args[i]
        if arg.kind == ArgKind.F32:
            return float(_F32.unpack(struct.pack("<I", arg.value & 0xFFFFFFFF))[0])
        return int(arg.value)


def _fail(message: str) -> GuestProtocolError:
    return GuestProtocolError(f"compute stream: {message}")


def _padded(size: int) -> int:
    """``size`` rounded up to a multiple of 8 (as :func:`encode_command` pads)."""
    return -(-size // 8) * 8


def decode_stream(data: bytes, max_cmds: int = 4096) -> tuple[StreamHeader, list[Command]]:
    """Decode and check a whole stream.

    :raise GuestProtocolError: anything malformed (the only exception it raises).
    """
    if len(data) < _STREAM_SIZE:
        raise _fail(f"{len(data)} bytes, the header needs {_STREAM_SIZE}")
    head = decode(StreamHeader, data)
    if head.magic != STREAM_MAGIC or head.version != STREAM_VERSION:
        raise _fail(f"bad magic {head.magic:#x} or version {head.version}")
    if head.size != len(data):
        raise _fail(f"header says {head.size} bytes, the submission has {len(data)}")
    if head.num_cmds > max_cmds:
        raise _fail(f"{head.num_cmds} commands (limit {max_cmds})")
    commands: list[Command] = []
    offset = _STREAM_SIZE
    for index in range(head.num_cmds):
        if offset + _CMD_SIZE > len(data):
            raise _fail(f"command {index} starts beyond the stream")
        cmd = decode(CmdHeader, data, offset)
        if cmd.length < _CMD_SIZE or cmd.length % 8 or offset + cmd.length > len(data):
            raise _fail(f"command {index} has length {cmd.length}")
        try:
            op = Op(cmd.opcode)
        except ValueError:
            raise _fail(f"command {index} has unknown opcode {cmd.opcode}") from None
        body_type = _BODIES[op]
        body_size = layout(body_type).size
        if _CMD_SIZE + body_size > cmd.length:
            raise _fail(f"command {index} ({op.name}) is shorter than its body")
        body = decode(body_type, data, offset + _CMD_SIZE)
        for name in _RESERVED.get(op, ()):
            if value := getattr(body, name):
                raise _fail(f"command {index} ({op.name}): reserved field {name} is "
                            f"{value:#x}, must be 0")
        args: tuple[KernelArg, ...] = ()
        if isinstance(body, Dispatch):
            args = _decode_args(index, body, data, offset + _CMD_SIZE + body_size,
                                cmd.length - _CMD_SIZE - body_size)
        expected = _padded(_CMD_SIZE + body_size + len(args) * _ARG_SIZE)
        if cmd.length != expected:
            raise _fail(f"command {index} ({op.name}) has length {cmd.length}, "
                        f"its parts take {expected}")
        commands.append(Command(index, cmd.cmd_id, op, body, args))
        offset += cmd.length
    if offset != len(data):
        raise _fail(f"{len(data) - offset} trailing bytes after the last command")
    return head, commands


def _decode_args(index: int, body: Dispatch, data: bytes, start: int,
                 room: int) -> tuple[KernelArg, ...]:
    try:
        kernel = Kernel(body.kernel_id)
    except ValueError:
        raise _fail(f"command {index} dispatches unknown kernel {body.kernel_id}") from None
    signature = KERNEL_SIGNATURES[kernel]
    if body.num_args != len(signature) or body.num_args * _ARG_SIZE > room:
        raise _fail(f"command {index}: {kernel.name} takes {len(signature)} arguments, "
                    f"got {body.num_args} in {room} bytes")
    args = tuple(decode(KernelArg, data, start + i * _ARG_SIZE) for i in range(body.num_args))
    for i, (arg, kind) in enumerate(zip(args, signature, strict=True)):
        if arg.kind != kind:
            raise _fail(f"command {index}: {kernel.name} argument {i} must be {kind.name}")
        if arg.padding:
            raise _fail(f"command {index}: {kernel.name} argument {i}: reserved field "
                        f"padding is {arg.padding:#x}, must be 0")
        if kind == ArgKind.F32 and arg.value >> 32:
            raise _fail(f"command {index}: {kernel.name} argument {i} (F32): the upper "
                        f"32 bits of value are {arg.value >> 32:#x}, must be 0")
    return args


# --- encoding (guest side, tests) -------------------------------------------------------


def encode_command(op: Op, body: NamedTuple, cmd_id: int = 0,
                   args: tuple[KernelArg, ...] = ()) -> bytes:
    """One command with its header (padded to a multiple of 8)."""
    payload = layout(type(body)).struct.pack(*body) + b"".join(
        layout(KernelArg).struct.pack(*a) for a in args)
    payload += bytes(-(len(payload)) % 8)
    return layout(CmdHeader).struct.pack(op, _CMD_SIZE + len(payload), cmd_id) + payload


def encode_stream(commands: list[bytes], result_resource_id: int = 0,
                  result_offset: int = 0) -> bytes:
    """A stream around already encoded commands."""
    body = b"".join(commands)
    head = StreamHeader(STREAM_MAGIC, STREAM_VERSION, len(commands), _STREAM_SIZE + len(body),
                        result_resource_id, result_offset)
    return layout(StreamHeader).struct.pack(*head) + body


def f32_arg(value: float) -> KernelArg:
    """An F32 kernel argument."""
    return KernelArg(ArgKind.F32, 0, struct.unpack("<I", _F32.pack(value))[0])


def u64_arg(value: int) -> KernelArg:
    """A U64 kernel argument."""
    return KernelArg(ArgKind.U64, 0, value & 0xFFFF_FFFF_FFFF_FFFF)


def buffer_arg(gpu_va: int) -> KernelArg:
    """A BUFFER kernel argument."""
    return KernelArg(ArgKind.BUFFER, 0, gpu_va)
