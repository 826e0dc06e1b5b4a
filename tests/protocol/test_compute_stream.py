"""``protocol.compute.decode_stream``: the canonical-form rules (exact command lengths,
reserved fields 0) and a fuzz of the decoder.

Whatever the bytes, ``decode_stream`` raises only :class:`GuestProtocolError`; a stream
it accepts has every reserved field 0 and is byte for byte what ``encode_stream`` makes
of its decoded header and commands (so no byte of it goes unchecked).
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.compute import (
    COMPUTE_CAPSET_MAGIC,
    KERNEL_SIGNATURES,
    RESULT_MAGIC,
    STREAM_MAGIC,
    STREAM_VERSION,
    ArgKind,
    Command,
    CopyCmd,
    Dispatch,
    FillCmd,
    Kernel,
    KernelArg,
    MapResource,
    Op,
    SignalCmd,
    StreamHeader,
    UnmapResource,
    buffer_arg,
    decode_stream,
    encode_command,
    encode_stream,
    f32_arg,
    u64_arg,
)
from protocol.errors import GuestProtocolError
from protocol.virtio_gpu_codes import Resp
from protocol.wire import encode, layout

HEADER = struct.Struct("<IHHIIQ")  # struct vgpu_compute_stream
CMD = struct.Struct("<HHI")  # opcode, length, cmd_id
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1

SAXPY = (buffer_arg(0x1000), buffer_arg(0x2000), u64_arg(16), f32_arg(2.5))
#: one of each command (the one under test goes after it, at index 1)
VALID = [
    encode_command(Op.MAP_RESOURCE, MapResource(7), 1),
    encode_command(Op.UNMAP_RESOURCE, UnmapResource(7), 2),
    encode_command(Op.DISPATCH, Dispatch(Kernel.SAXPY_F32, 4), 3, SAXPY),
    encode_command(Op.FILL, FillCmd(0x1000, 64, 0xA5A5A5A5), 4),
    encode_command(Op.COPY, CopyCmd(0x1000, 0x2000, 64), 5),
    encode_command(Op.SIGNAL, SignalCmd(0x3000, U64_MAX), 6),
]
LEAD = encode_command(Op.FILL, FillCmd(0x1000, 8, 0), 0)


def reencoded(head: StreamHeader, commands: list[Command]) -> bytes:
    """What the encoders make of a decoded stream."""
    return encode_stream([encode_command(c.op, c.body, c.cmd_id, c.args) for c in commands],
                         head.result_resource_id, head.result_offset)


def refused(stream: bytes, *words: str) -> GuestProtocolError:
    """``stream`` is refused with ERR_INVALID_PARAMETER and a message naming ``words``."""
    with pytest.raises(GuestProtocolError) as info:
        decode_stream(stream)
    for word in words:
        assert word in info.value.message, info.value.message
    assert info.value.resp_code == Resp.ERR_INVALID_PARAMETER
    assert not info.value.ring_fatal
    return info.value


def grown(cmd: bytes, extra: int) -> bytes:
    """``cmd`` with ``extra`` zero bytes after it, counted in its length field."""
    opcode, length, cmd_id = CMD.unpack_from(cmd)
    return CMD.pack(opcode, length + extra, cmd_id) + cmd[CMD.size:] + bytes(extra)


def test_one_of_each_command_decodes_and_reencodes() -> None:
    stream = encode_stream(VALID, 9, 4096)
    head, commands = decode_stream(stream)
    assert [c.op for c in commands] == list(Op)
    assert [c.cmd_id for c in commands] == [1, 2, 3, 4, 5, 6]
    assert commands[2].args == SAXPY and commands[2].arg_value(3) == 2.5
    assert reencoded(head, commands) == stream


# --- reserved fields ---------------------------------------------------------------------

def dispatch_with(args: tuple[KernelArg, ...], kernel: Kernel = Kernel.SAXPY_F32) -> bytes:
    """A DISPATCH of ``kernel`` with ``args`` (as many as given)."""
    return encode_command(Op.DISPATCH, Dispatch(kernel, len(args)), 0, args)


RESERVED: dict[str, tuple[bytes, tuple[str, ...]]] = {
    "MAP flags 1": (encode_command(Op.MAP_RESOURCE, MapResource(7, 1)),
                    ("MAP_RESOURCE", "flags", "0x1")),
    "MAP flags 2^31": (encode_command(Op.MAP_RESOURCE, MapResource(7, 1 << 31)),
                       ("MAP_RESOURCE", "flags", "0x80000000")),
    "UNMAP padding": (encode_command(Op.UNMAP_RESOURCE, UnmapResource(7, 4)),
                      ("UNMAP_RESOURCE", "padding", "0x4")),
    "FILL padding": (encode_command(Op.FILL, FillCmd(0x1000, 8, 1, U32_MAX)),
                     ("FILL", "padding", "0xffffffff")),
    "argument padding (first)": (dispatch_with((KernelArg(ArgKind.BUFFER, 1, 0x1000),
                                                *SAXPY[1:])), ("argument 0", "padding")),
    "argument padding (F32)": (dispatch_with((*SAXPY[:3], KernelArg(ArgKind.F32, 8, 0))),
                               ("argument 3", "padding", "0x8")),
    "F32 upper bits": (dispatch_with((*SAXPY[:3], KernelArg(
        ArgKind.F32, 0, (1 << 32) | SAXPY[3].value))), ("argument 3", "F32", "upper", "0x1")),
    "F32 top bit": (dispatch_with((*SAXPY[:3], KernelArg(ArgKind.F32, 0, 1 << 63))),
                    ("argument 3", "upper", "0x80000000")),
}


@pytest.mark.parametrize("case", list(RESERVED))
def test_reserved_fields_must_be_zero(case: str) -> None:
    """Named by command index and field; the command before it is not blamed."""
    cmd, words = RESERVED[case]
    refused(encode_stream([LEAD, cmd]), "command 1", *words)


def test_full_64_bit_values_are_not_reserved() -> None:
    """BUFFER and U64 arguments use all 64 bits; a SIGNAL value too."""
    args = (buffer_arg(U64_MAX), u64_arg(U64_MAX))
    stream = encode_stream([dispatch_with(args, Kernel.CHECKSUM_CRC32),
                            encode_command(Op.SIGNAL, SignalCmd(U64_MAX, U64_MAX))])
    _, commands = decode_stream(stream)
    assert commands[0].arg_value(0) == commands[0].arg_value(1) == U64_MAX


def test_f32_arguments_carry_the_low_32_bits() -> None:
    for value in (0.0, -0.0, 1.5, float("inf"), -3.25e38):
        args = (*SAXPY[:3], f32_arg(value))
        _, commands = decode_stream(encode_stream([dispatch_with(args)]))
        assert commands[0].args[3].value >> 32 == 0
        assert struct.pack("<f", commands[0].arg_value(3)) == struct.pack("<f", value)


# --- exact command lengths ---------------------------------------------------------------

@pytest.mark.parametrize("extra", [8, 16, 64])
@pytest.mark.parametrize("index", range(len(VALID)), ids=[op.name for op in Op])
def test_no_command_has_bytes_beyond_its_parts(index: int, extra: int) -> None:
    """Every command is exactly header + body (+ arguments): longer ones are refused,
    even when the extra bytes are zero."""
    cmd = VALID[index]
    want = len(cmd)
    refused(encode_stream([LEAD, grown(cmd, extra)]), "command 1", Op(index + 1).name,
            f"length {want + extra}", f"take {want}")


@pytest.mark.parametrize("kernel", list(Kernel), ids=lambda k: k.name)
def test_dispatch_length_is_exactly_its_arguments(kernel: Kernel) -> None:
    """For each kernel: its arguments and nothing after them; one argument's worth of
    bytes more (as if num_args were one short) or less is refused."""
    args = tuple(KernelArg(kind, 0, 0) for kind in KERNEL_SIGNATURES[kernel])
    exact = dispatch_with(args, kernel)
    assert len(exact) == 16 + 16 * len(args)
    decode_stream(encode_stream([exact]))
    refused(encode_stream([LEAD, grown(exact, 16)]), "command 1", "DISPATCH", "length")
    refused(encode_stream([LEAD, grown(exact, 8)]), "command 1", "DISPATCH", "length")
    opcode, length, cmd_id = CMD.unpack_from(exact)
    short = CMD.pack(opcode, length - 16, cmd_id) + exact[CMD.size:-16]
    refused(encode_stream([LEAD, short]), "command 1", kernel.name)


def test_extra_arguments_are_refused_even_when_num_args_matches() -> None:
    """A well-formed fifth argument after SAXPY's four (num_args = 4) is not ignored."""
    cmd = dispatch_with(SAXPY)
    extra = encode(buffer_arg(0x9000))
    opcode, length, cmd_id = CMD.unpack_from(cmd)
    refused(encode_stream([LEAD, CMD.pack(opcode, length + 16, cmd_id) + cmd[8:] + extra]),
            "command 1", "DISPATCH", f"length {length + 16}")


def test_the_stream_header_has_no_slack() -> None:
    """The stream header has no reserved field; its size and count must match exactly
    (one more or fewer byte, command or a trailing pad is refused)."""
    stream = encode_stream(VALID)
    assert layout(StreamHeader).names == ("magic", "version", "num_cmds", "size",
                                          "result_resource_id", "result_offset")
    magic, version, num, size, rid, offset = HEADER.unpack_from(stream)
    body = stream[HEADER.size:]
    refused(HEADER.pack(magic, version, num, size + 8, rid, offset) + body + bytes(8),
            "trailing")
    refused(HEADER.pack(magic, version, num - 1, size, rid, offset) + body, "trailing")
    refused(HEADER.pack(magic, version, num + 1, size, rid, offset) + body, "beyond")



@pytest.mark.parametrize("index", range(len(VALID)), ids=[op.name for op in Op])
@pytest.mark.parametrize("keep", ["all but 8 bytes", "only its header"])
def test_a_command_cut_short_by_the_end_of_the_stream_is_refused(index: int, keep: str) -> None:
    """The last command's length runs past the end of the submission (the header's
    size matches the bytes present): refused by its length, nothing read past the end."""
    stream = encode_stream([LEAD, VALID[index]])
    truncated = stream[:-8] if keep == "all but 8 bytes" else stream[:-len(VALID[index]) + 8]
    fixed = truncated[:8] + struct.pack("<I", len(truncated)) + truncated[12:]
    refused(fixed, "command 1", "length")


@pytest.mark.parametrize("max_cmds", [1, 3])
def test_the_command_limit_is_inclusive(max_cmds: int) -> None:
    """Exactly ``max_cmds`` commands are accepted, one more is refused."""
    _, commands = decode_stream(encode_stream([LEAD] * max_cmds), max_cmds)
    assert len(commands) == max_cmds
    with pytest.raises(GuestProtocolError) as info:
        decode_stream(encode_stream([LEAD] * (max_cmds + 1)), max_cmds)
    assert f"limit {max_cmds}" in info.value.message


def test_magic_numbers_are_the_documented_ascii_tags() -> None:
    """The stream, result and capset magics read "VGCS", "VGCR" and "VGCC" in memory."""
    assert encode_stream([])[:4] == b"VGCS"
    assert struct.pack("<I", RESULT_MAGIC) == b"VGCR"
    assert struct.pack("<I", COMPUTE_CAPSET_MAGIC) == b"VGCC"
    assert encode_stream([])[4:6] == struct.pack("<H", 1)  # stream version 1


# --- fuzz --------------------------------------------------------------------------------

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, U32_MAX)
u64 = st.integers(0, U64_MAX)


def arg_of(kind: ArgKind) -> st.SearchStrategy[KernelArg]:
    """A valid argument of ``kind``."""
    return st.builds(KernelArg, st.just(int(kind)), st.just(0),
                     u32 if kind == ArgKind.F32 else u64)


def dispatches() -> st.SearchStrategy[bytes]:
    """A valid DISPATCH of any kernel."""
    return st.sampled_from(list(Kernel)).flatmap(lambda kernel: st.builds(
        lambda cmd_id, args: encode_command(Op.DISPATCH, Dispatch(kernel, len(args)),
                                            cmd_id, tuple(args)),
        u32, st.tuples(*(arg_of(kind) for kind in KERNEL_SIGNATURES[kernel]))))


COMMANDS = st.one_of(
    st.builds(lambda r, i: encode_command(Op.MAP_RESOURCE, MapResource(r), i), u32, u32),
    st.builds(lambda r, i: encode_command(Op.UNMAP_RESOURCE, UnmapResource(r), i), u32, u32),
    st.builds(lambda va, n, p, i: encode_command(Op.FILL, FillCmd(va, n, p), i),
              u64, u64, u32, u32),
    st.builds(lambda d, s, n, i: encode_command(Op.COPY, CopyCmd(d, s, n), i),
              u64, u64, u64, u32),
    st.builds(lambda va, v, i: encode_command(Op.SIGNAL, SignalCmd(va, v), i), u64, u64, u32),
    dispatches(),
)
STREAMS = st.builds(encode_stream, st.lists(COMMANDS, max_size=8), u32, u64)

#: reserved fields of each body type
_RESERVED_FIELDS: dict[type[Any], tuple[str, ...]] = {
    MapResource: ("flags",), UnmapResource: ("padding",), FillCmd: ("padding",)}


def check_accepted(stream: bytes, max_cmds: int = 4096) -> None:
    """Decode ``stream``: refused with GuestProtocolError (anything else fails the test),
    or accepted, and then canonical."""
    try:
        head, commands = decode_stream(stream, max_cmds)
    except GuestProtocolError as err:
        assert err.resp_code == Resp.ERR_INVALID_PARAMETER and not err.ring_fatal
        return
    assert len(commands) == head.num_cmds <= max_cmds
    body: NamedTuple
    for command in commands:
        body = command.body
        assert all(getattr(body, name) == 0 for name in _RESERVED_FIELDS.get(type(body), ()))
        for arg in command.args:
            assert arg.padding == 0
            assert arg.kind != ArgKind.F32 or arg.value >> 32 == 0
    assert reencoded(head, commands) == stream


@settings(max_examples=300, deadline=None)
@given(stream=STREAMS)
def test_valid_streams_decode_to_what_was_encoded(stream: bytes) -> None:
    head, commands = decode_stream(stream)
    assert reencoded(head, commands) == stream


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(
    st.binary(max_size=400),
    st.builds(lambda num, size, rest: HEADER.pack(STREAM_MAGIC, STREAM_VERSION, num,
                                                  size, 0, 0) + rest,
              u16, u32, st.binary(max_size=200)),
    # a header that matches the bytes behind it, which are random
    st.builds(lambda num, rest: HEADER.pack(STREAM_MAGIC, STREAM_VERSION, num,
                                            HEADER.size + len(rest), 0, 0) + rest,
              st.integers(0, 12), st.binary(max_size=300)),
), max_cmds=st.sampled_from([0, 1, 3, 4096]))
def test_arbitrary_bytes_raise_only_guest_protocol_errors(data: bytes, max_cmds: int) -> None:
    check_accepted(data, max_cmds)


def with_size(stream: bytes, fix: bool) -> bytes:
    """``stream`` with its header's size field set to its length (when ``fix``)."""
    if not fix or len(stream) < HEADER.size:
        return stream
    return stream[:8] + struct.pack("<I", len(stream)) + stream[12:]


def command_offsets(stream: bytes) -> list[int]:
    """Where each command starts, following the length fields while they make sense."""
    offsets, at = [], HEADER.size
    while at + CMD.size <= len(stream):
        offsets.append(at)
        length = CMD.unpack_from(stream, at)[1]
        if length < CMD.size:
            break
        at += length
    return offsets


@st.composite
def mutated_streams(draw: st.DrawFn) -> bytes:
    """A valid stream with a few bit flips, truncations, insertions, deletions or
    command-length changes (the header size field fixed up or not)."""
    stream = bytearray(draw(STREAMS))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "length",
                                     "grow", "word"]))
        offsets = command_offsets(bytes(stream)) if kind in ("length", "grow") else []
        if kind in ("length", "grow") and not offsets:
            kind = "flip"
        if kind == "flip" and stream:
            bit = draw(st.integers(0, 8 * len(stream) - 1))
            stream[bit // 8] ^= 1 << (bit % 8)
        elif kind == "truncate":
            del stream[draw(st.integers(0, len(stream))):]
        elif kind == "insert":
            at = draw(st.integers(0, len(stream)))
            stream[at:at] = draw(st.binary(min_size=1, max_size=24))
        elif kind == "delete":
            at = draw(st.integers(0, len(stream)))
            del stream[at:at + draw(st.integers(1, 24))]
        elif kind == "word" and len(stream) >= 4:
            at = draw(st.integers(0, len(stream) - 4))
            stream[at:at + 4] = struct.pack("<I", draw(u32))
        elif kind == "length":
            at = draw(st.sampled_from(offsets))
            stream[at + 2:at + 4] = struct.pack("<H", draw(u16))
        elif kind == "grow":  # well-formed extra bytes after a command, counted in it
            at = draw(st.sampled_from(offsets))
            opcode, length, cmd_id = CMD.unpack_from(stream, at)
            extra = draw(st.sampled_from([8, 16, 24]))
            if length + extra <= 0xFFFF:
                stream[at:at + CMD.size] = CMD.pack(opcode, length + extra, cmd_id)
                stream[at + length:at + length] = draw(st.binary(min_size=extra,
                                                                 max_size=extra))
        stream = bytearray(with_size(bytes(stream), draw(st.booleans())))
    return bytes(stream)


@settings(max_examples=500, deadline=None)
@given(stream=mutated_streams())
def test_mutated_streams_raise_only_guest_protocol_errors(stream: bytes) -> None:
    """Refused, or (a mutation that kept the stream valid) canonical."""
    check_accepted(stream)


@settings(max_examples=200, deadline=None)
@given(stream=STREAMS.filter(lambda s: len(s) > HEADER.size), data=st.data())
def test_growing_any_command_is_refused(stream: bytes, data: st.DataObject) -> None:
    """Extra bytes after any command, counted in its length and the stream size, are
    refused whatever they contain."""
    offsets = command_offsets(stream)
    at = data.draw(st.sampled_from(offsets))
    index = offsets.index(at)
    opcode, length, cmd_id = CMD.unpack_from(stream, at)
    extra = data.draw(st.sampled_from([8, 16, 32]))
    filler = data.draw(st.binary(min_size=extra, max_size=extra))
    grown_stream = with_size(stream[:at] + CMD.pack(opcode, length + extra, cmd_id)
                             + stream[at + CMD.size:at + length] + filler
                             + stream[at + length:], True)
    refused(grown_stream, f"command {index}")
