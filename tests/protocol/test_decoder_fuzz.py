"""Fuzz every decoder: malformed input raises only the protocol's own error type.

``BackendConnection`` and the ``decode_*`` payload functions may raise only
:class:`FrontendProtocolError`; the display ``MessageReader`` and its payload decoders
only :class:`DisplayProtocolError`.  Framing must not depend on how the stream is cut.
"""

from __future__ import annotations

import contextlib
import itertools
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.display import DisplayMessage, MessageReader, decode_display_info
from protocol.errors import DisplayProtocolError, FrontendProtocolError
from protocol.limits import DEFAULT_LIMITS, Limits
from protocol.vhost_user import FrontendReq
from protocol.vhost_user_connection import (
    BackendConnection,
    Request,
    decode_config,
    decode_mem_table,
    decode_single_region,
    decode_u64,
    decode_vring_addr,
    decode_vring_file,
    decode_vring_state,
)

_HEADER = struct.Struct("<III")
FDS = st.lists(st.integers(0, 1 << 20), max_size=10).map(tuple)


def well_formed_message(max_size: int = 64) -> st.SearchStrategy[bytes]:
    """A front-end message with valid flags (so fuzzing reaches the payload path)."""
    return st.builds(
        lambda code, need_reply, payload: _HEADER.pack(code, 0x9 if need_reply else 0x1,
                                                       len(payload)) + payload,
        st.integers(0, 50), st.booleans(), st.binary(max_size=max_size))


STREAMS = st.one_of(
    st.binary(max_size=300),
    st.lists(well_formed_message(), max_size=8).map(b"".join),
    st.lists(st.one_of(well_formed_message(), st.binary(max_size=16)), max_size=8).map(b"".join),
)


def cut(stream: bytes, points: list[int]) -> list[bytes]:
    """``stream`` split at ``points`` (positions modulo its length)."""
    marks = sorted({p % (len(stream) + 1) for p in points} | {0, len(stream)})
    return [stream[a:b] for a, b in itertools.pairwise(marks)]


@settings(max_examples=300, deadline=None)
@given(stream=STREAMS, points=st.lists(st.integers(0, 400), max_size=12),
       fds=st.lists(FDS, max_size=12))
def test_backend_connection_raises_only_frontend_protocol_errors(
        stream: bytes, points: list[int], fds: list[tuple[int, ...]]) -> None:
    conn = BackendConnection()
    chunks = cut(stream, points)
    try:
        for i, chunk in enumerate(chunks):
            for request in conn.receive(chunk, fds[i] if i < len(fds) else ()):
                assert len(request.payload) <= DEFAULT_LIMITS.max_vhost_payload
                assert request.flags & 0x3 == 1 and not request.flags & 0x4
    except FrontendProtocolError:
        return
    assert conn.bytes_wanted() > 0


@settings(max_examples=200, deadline=None)
@given(messages=st.lists(well_formed_message(max_size=40), max_size=10),
       points=st.lists(st.integers(0, 600), max_size=20))
def test_framing_does_not_depend_on_chunking(messages: list[bytes], points: list[int]) -> None:
    stream = b"".join(messages)
    whole = BackendConnection().receive(stream)
    conn = BackendConnection()
    pieces = [r for chunk in cut(stream, points) for r in conn.receive(chunk)]
    assert pieces == whole
    assert [_HEADER.pack(r.code, r.flags, len(r.payload)) + r.payload for r in whole] == messages


@settings(max_examples=100, deadline=None)
@given(messages=st.lists(well_formed_message(max_size=40), min_size=1, max_size=6),
       fd_counts=st.lists(st.integers(0, 8), min_size=6, max_size=6))
def test_fds_stay_with_their_message_when_reading_bytes_wanted(
        messages: list[bytes], fd_counts: list[int]) -> None:
    conn = BackendConnection()
    got: list[Request] = []
    next_fd = 0
    expected_fds = []
    for message, count in zip(messages, fd_counts, strict=False):
        fds = tuple(range(next_fd, next_fd + count))
        next_fd += count
        expected_fds.append(fds)
        pos, first = 0, True
        while True:
            want = conn.bytes_wanted()
            got += conn.receive(message[pos:pos + want], fds if first else ())
            first, pos = False, pos + want
            if pos >= len(message) and conn.bytes_wanted() == 12 and not conn.pending_fds():
                break
    assert [r.fds for r in got] == expected_fds


@pytest.mark.parametrize("header, problem", [
    (_HEADER.pack(1, 0x0, 0), "version"),
    (_HEADER.pack(1, 0x2, 0), "version"),
    (_HEADER.pack(1, 0x3, 0), "version"),  # version bits 3
    (_HEADER.pack(1, 0x5, 8), "REPLY"),
    (_HEADER.pack(1, 0x1, 4097), "exceeds"),
])
def test_bad_headers_are_refused_and_their_fds_returned(header: bytes, problem: str) -> None:
    conn = BackendConnection()
    with pytest.raises(FrontendProtocolError, match=problem) as info:
        conn.receive(header, (7, 8))
    assert info.value.fds == (7, 8)
    assert conn.pending_fds() == ()



def test_a_payload_of_exactly_the_limit_is_accepted() -> None:
    size = DEFAULT_LIMITS.max_vhost_payload
    requests = BackendConnection().receive(_HEADER.pack(FrontendReq.SET_CONFIG, 1, size)
                                           + bytes(size))
    assert [(r.code, len(r.payload)) for r in requests] == [(FrontendReq.SET_CONFIG, size)]

def test_too_many_fds_with_one_message() -> None:
    conn = BackendConnection(Limits(max_fds_per_message=2))
    with pytest.raises(FrontendProtocolError, match="3 fds") as info:
        conn.receive(_HEADER.pack(FrontendReq.SET_MEM_TABLE, 1, 0), (1, 2, 3))
    assert info.value.fds == (1, 2, 3)
    assert conn.pending_fds() == ()  # handed over once: the caller closes them once


def test_fds_arriving_with_the_payload_count_against_the_limit() -> None:
    conn = BackendConnection(Limits(max_fds_per_message=2))
    assert conn.receive(_HEADER.pack(FrontendReq.SET_VRING_CALL, 1, 8), (1,)) == []
    with pytest.raises(FrontendProtocolError, match="fds"):
        conn.receive(struct.pack("<Q", 0), (2, 3))


def test_pending_fds_of_an_incomplete_message() -> None:
    conn = BackendConnection()
    assert conn.receive(_HEADER.pack(FrontendReq.ADD_MEM_REG, 1, 40)[:5], (42,)) == []
    assert conn.pending_fds() == (42,)
    assert conn.bytes_wanted() == 7


PAYLOAD_DECODERS: list[Callable[[Request], object]] = [
    decode_u64, decode_vring_state, decode_vring_addr, decode_vring_file, decode_mem_table,
    decode_single_region, decode_config]


def mem_table_like() -> st.SearchStrategy[bytes]:
    return st.builds(lambda n, rest: struct.pack("<II", n, 0) + rest,
                     st.integers(0, 10), st.binary(max_size=8 + 32 * 9))


@settings(max_examples=300, deadline=None)
@given(payload=st.one_of(st.binary(max_size=320), mem_table_like(),
                         st.builds(lambda size, rest: struct.pack("<III", 0, size, 0) + rest,
                                   st.integers(0, (1 << 32) - 1), st.binary(max_size=40))),
       fds=FDS, flags=st.integers(0, 0xFFFF_FFFF))
@pytest.mark.parametrize("decoder", PAYLOAD_DECODERS, ids=lambda d: d.__name__)
def test_payload_decoders_raise_only_frontend_protocol_errors(
        decoder: Callable[[Request], object], payload: bytes, fds: tuple[int, ...],
        flags: int) -> None:
    with contextlib.suppress(FrontendProtocolError):
        decoder(Request(FrontendReq.SET_MEM_TABLE, flags, payload, fds))



@pytest.mark.parametrize(("decoder", "size"), [
    (decode_u64, 8), (decode_vring_state, 8), (decode_vring_addr, 40),
    (decode_single_region, 40)], ids=lambda d: getattr(d, "__name__", str(d)))
def test_fixed_size_payloads_must_be_exactly_their_size(
        decoder: Callable[[Request], object], size: int) -> None:
    decoder(Request(FrontendReq.SET_VRING_ADDR, 1, bytes(size), ()))
    for wrong in (size - 1, size + 1, size + 8):
        with pytest.raises(FrontendProtocolError, match=f"expected {size}"):
            decoder(Request(FrontendReq.SET_VRING_ADDR, 1, bytes(wrong), ()))

def test_mem_table_decoder_checks_count_size_and_fds() -> None:
    region = struct.pack("<QQQQ", 0x1000, 0x2000, 0x7F00_0000_0000, 0x10)
    good = struct.pack("<II", 2, 0) + region * 2
    assert len(decode_mem_table(Request(5, 1, good, (3, 4)))) == 2
    for payload, fds in [(good, (3,)), (good[:-1], (3, 4)), (good + b"\0", (3, 4)),
                         (struct.pack("<II", 0, 0), ()),
                         (struct.pack("<II", 9, 0) + region * 9, tuple(range(9)))]:
        with pytest.raises(FrontendProtocolError):
            decode_mem_table(Request(5, 1, payload, fds))


def test_mem_table_takes_up_to_eight_regions_with_exactly_one_fd_each() -> None:
    region = struct.pack("<QQQQ", 0x1000, 0x2000, 0x7F00_0000_0000, 0x10)
    eight = struct.pack("<II", 8, 0) + region * 8
    assert len(decode_mem_table(Request(5, 1, eight, tuple(range(8))))) == 8
    with pytest.raises(FrontendProtocolError, match="8 regions but 9 fds"):
        decode_mem_table(Request(5, 1, eight, tuple(range(9))))


def test_vring_file_nofd_rules() -> None:
    nofd = struct.pack("<Q", 0x101)
    assert decode_vring_file(Request(13, 1, nofd, ())).fd is None
    assert decode_vring_file(Request(13, 1, nofd, ())).index == 1
    with pytest.raises(FrontendProtocolError):
        decode_vring_file(Request(13, 1, nofd, (5,)))
    with pytest.raises(FrontendProtocolError):
        decode_vring_file(Request(13, 1, struct.pack("<Q", 1), ()))
    with pytest.raises(FrontendProtocolError):
        decode_vring_file(Request(13, 1, struct.pack("<Q", 1), (5, 6)))


def test_config_decoder_needs_exactly_size_bytes() -> None:
    head = struct.pack("<III", 0, 16, 0)
    assert decode_config(Request(24, 1, head + bytes(16), ())).data == bytes(16)
    for payload in (head + bytes(15), head + bytes(17), head[:11]):
        with pytest.raises(FrontendProtocolError):
            decode_config(Request(24, 1, payload, ()))


# --- the display socket ------------------------------------------------------------


def display_message() -> st.SearchStrategy[bytes]:
    return st.builds(lambda req, flags, payload: _HEADER.pack(req, flags, len(payload)) + payload,
                     st.integers(0, 20), st.sampled_from([0, 4, 0xFFFF_FFFF]),
                     st.binary(max_size=48))


DISPLAY_STREAMS = st.one_of(st.binary(max_size=300),
                            st.lists(display_message(), max_size=8).map(b"".join))


@settings(max_examples=300, deadline=None)
@given(stream=DISPLAY_STREAMS, points=st.lists(st.integers(0, 400), max_size=12),
       max_payload=st.integers(0, 64))
def test_message_reader_raises_only_display_protocol_errors(
        stream: bytes, points: list[int], max_payload: int) -> None:
    reader = MessageReader(max_payload)
    try:
        for chunk in cut(stream, points):
            for message in reader.receive(chunk, ()):
                assert len(message.payload) <= max_payload
                with contextlib.suppress(DisplayProtocolError):
                    message.u64()
                with contextlib.suppress(DisplayProtocolError):
                    decode_display_info(message.payload)
    except DisplayProtocolError:
        return  # the socket is dropped: the reader's state no longer matters
    assert reader.bytes_wanted() > 0


@settings(max_examples=150, deadline=None)
@given(messages=st.lists(display_message(), max_size=8),
       points=st.lists(st.integers(0, 500), max_size=20))
def test_display_framing_does_not_depend_on_chunking(messages: list[bytes],
                                                     points: list[int]) -> None:
    stream = b"".join(messages)
    whole = list(MessageReader(64).receive(stream))
    reader = MessageReader(64)
    pieces = [m for chunk in cut(stream, points) for m in reader.receive(chunk)]
    assert pieces == whole
    assert [_HEADER.pack(m.request, m.flags, len(m.payload)) + m.payload
            for m in whole] == messages


def test_message_reader_refuses_oversized_payloads() -> None:
    reader = MessageReader(8)
    with pytest.raises(DisplayProtocolError):
        list(reader.receive(_HEADER.pack(3, 4, 9)))


def test_message_reader_bytes_wanted_stops_at_the_boundary() -> None:
    reader = MessageReader(64)
    assert reader.bytes_wanted() == 12
    assert list(reader.receive(_HEADER.pack(1, 4, 8)[:4])) == []
    assert reader.bytes_wanted() == 8
    assert list(reader.receive(_HEADER.pack(1, 4, 8)[4:])) == []
    assert reader.bytes_wanted() == 8
    msgs = list(reader.receive(struct.pack("<Q", 3), (9,)))
    assert msgs == [DisplayMessage(1, 4, struct.pack("<Q", 3), (9,))]
    assert msgs[0].u64() == 3 and msgs[0].is_reply


@pytest.mark.parametrize("size", [0, 7, 9, 407, 409])
def test_display_payload_decoders_check_sizes(size: int) -> None:
    with pytest.raises(DisplayProtocolError):
        decode_display_info(bytes(size))
    if size != 8:
        with pytest.raises(DisplayProtocolError):
            DisplayMessage(1, 4, bytes(size)).u64()


def test_message_reader_accepts_a_payload_of_exactly_max_payload() -> None:
    assert list(MessageReader(8).receive(_HEADER.pack(3, 4, 8) + bytes(8))) == [
        DisplayMessage(3, 4, bytes(8))]


def test_display_fds_go_only_to_the_message_they_arrived_with() -> None:
    reader = MessageReader(64)
    first = list(reader.receive(_HEADER.pack(1, 4, 8) + bytes(8), (5, 6)))
    second = list(reader.receive(_HEADER.pack(2, 4, 0)))
    assert [m.fds for m in first + second] == [(5, 6), ()]
