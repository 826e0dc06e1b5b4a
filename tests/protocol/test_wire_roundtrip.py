"""Every ``@wire`` struct: codec round trips, codec agreement, and C struct sizes."""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import display, vhost_user, virtio_gpu, virtqueue
from protocol.virtio_gpu import CTRL_HDR_SIZE
from protocol.wire import U8, U16, U64, decode, encode, layout, wire
from tests.protocol.wire_records import declared_wire_names, record_strategy, wire_classes

#: sizeof() of each C struct, from the reference (``vhost-user-gpu-protocol.md`` §1.2
#: and §3.2, ``userptr-kfd-uapi.md``, ``virtio_gpu.h``).  Command bodies are declared
#: without the 24-byte ctrl header: their C size includes it.
C_SIZES: dict[type[Any], tuple[int, bool]] = {
    # vhost-user
    vhost_user.Header: (12, False),
    vhost_user.VringState: (8, False),
    vhost_user.VringAddr: (40, False),
    vhost_user.MemRegion: (32, False),
    vhost_user.MemTableHeader: (8, False),
    vhost_user.SingleMemRegion: (40, False),
    vhost_user.ConfigHeader: (12, False),
    # display socket
    display.VhostUserGpuCursorPos: (12, False),
    display.VhostUserGpuCursorUpdate: (16404 - 64 * 64 * 4, False),
    display.VhostUserGpuScanout: (12, False),
    display.VhostUserGpuUpdate: (20, False),
    display.VhostUserGpuEdidRequest: (4, False),
    display.VhostUserGpuDmabufScanout: (40, False),
    display.DmabufModifier: (48 - 40, False),
    # split virtqueue
    virtqueue.VirtqDesc: (16, False),
    virtqueue.VirtqUsedElem: (8, False),
    # virtio-gpu
    virtio_gpu.CtrlHdr: (24, False),
    virtio_gpu.GpuConfig: (16, False),
    virtio_gpu.DisplayOne: (24, False),
    virtio_gpu.MemEntry: (16, False),
    virtio_gpu.CursorPos: (16, False),
    virtio_gpu.ResourceCreate2d: (40, True),
    virtio_gpu.ResourceUnref: (32, True),
    virtio_gpu.SetScanout: (48, True),
    virtio_gpu.ResourceFlush: (48, True),
    virtio_gpu.TransferToHost2d: (56, True),
    virtio_gpu.ResourceAttachBacking: (32, True),
    virtio_gpu.ResourceDetachBacking: (32, True),
    virtio_gpu.GetCapsetInfo: (32, True),
    virtio_gpu.RespCapsetInfo: (40, True),
    virtio_gpu.GetCapset: (32, True),
    virtio_gpu.GetEdid: (32, True),
    virtio_gpu.RespEdidHeader: (1056 - 1024, True),
    virtio_gpu.ResourceAssignUuid: (32, True),
    virtio_gpu.RespResourceUuid: (40, True),
    virtio_gpu.ResourceCreateBlob: (56, True),
    virtio_gpu.SetScanoutBlob: (96, True),
    virtio_gpu.CtxCreate: (96, True),
    virtio_gpu.CtxResource: (32, True),
    virtio_gpu.ResourceCreate3d: (72, True),
    virtio_gpu.TransferHost3d: (72, True),
    virtio_gpu.Submit3d: (32, True),
    virtio_gpu.ResourceMapBlob: (40, True),
    virtio_gpu.RespMapInfo: (32, True),
    virtio_gpu.ResourceUnmapBlob: (32, True),
    virtio_gpu.UpdateCursor: (56, True),
}
#: modules declaring upstream C structs (our own formats, like the capsets and the
#: compute stream, are round-tripped below but sized by their owners' tests)
UPSTREAM_MODULES = frozenset({vhost_user.__name__, display.__name__, virtio_gpu.__name__,
                              virtqueue.__name__})

CLASSES = wire_classes()


def name(cls: type[Any]) -> str:
    return cls.__name__


def test_every_wire_declaration_is_found() -> None:
    assert {cls.__name__ for cls in CLASSES} == declared_wire_names()
    assert len(CLASSES) >= 45


def test_every_upstream_wire_struct_has_a_documented_c_size() -> None:
    missing = sorted(cls.__name__ for cls in CLASSES
                     if cls.__module__ in UPSTREAM_MODULES and cls not in C_SIZES)
    assert missing == []


@pytest.mark.parametrize("cls", list(C_SIZES), ids=name)
def test_size_equals_the_c_struct(cls: type[Any]) -> None:
    c_size, with_header = C_SIZES[cls]
    lay = layout(cls)
    expected = c_size - CTRL_HDR_SIZE if with_header else c_size
    assert lay.size == lay.struct.size == lay.dtype.itemsize == expected
    assert lay.compiled.sizeof() == expected


def _as_python(value: Any) -> Any:
    if isinstance(value, np.void | np.ndarray):
        return bytes(value.tobytes())
    if isinstance(value, np.integer):
        return int(value)
    return value


@settings(max_examples=25, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("cls", CLASSES, ids=name)
def test_codecs_round_trip_and_agree(cls: type[Any], data: st.DataObject) -> None:
    record = data.draw(record_strategy(cls))
    lay = layout(cls)
    raw = encode(record)
    assert len(raw) == lay.size
    assert decode(cls, raw) == record
    # at an offset inside a larger buffer
    assert decode(cls, b"\xAA" * 3 + raw + b"\x55", 3) == record
    # construct, compiled, against the struct fast path
    as_dict = dict(zip(lay.names, record, strict=True))
    assert lay.compiled.build(as_dict) == raw
    parsed = lay.compiled.parse(raw)
    assert tuple(parsed[n] for n in lay.names) == record
    assert lay.construct.build(as_dict) == raw
    # numpy dtype views of the same bytes
    row = np.frombuffer(raw, dtype=lay.dtype)[0]
    assert tuple(_as_python(row[n]) for n in lay.names) == record


@settings(max_examples=20, deadline=None)
@given(records=st.lists(record_strategy(virtqueue.VirtqDesc), min_size=0, max_size=20))
def test_dtype_views_arrays_of_records(records: list[virtqueue.VirtqDesc]) -> None:
    raw = b"".join(encode(r) for r in records)
    table = np.frombuffer(raw, dtype=layout(virtqueue.VirtqDesc).dtype)
    assert [tuple(int(v) for v in row.item()) for row in table] == [tuple(r) for r in records]


@settings(max_examples=20, deadline=None)
@given(records=st.lists(record_strategy(virtio_gpu.MemEntry), min_size=1, max_size=20))
def test_mem_entry_dtype_fields(records: list[virtio_gpu.MemEntry]) -> None:
    entries = np.frombuffer(b"".join(encode(r) for r in records),
                            dtype=layout(virtio_gpu.MemEntry).dtype)
    assert entries["addr"].tolist() == [r.addr for r in records]
    assert entries["length"].tolist() == [r.length for r in records]


def test_decode_of_a_short_buffer_raises_struct_error() -> None:
    raw = encode(vhost_user.VringAddr(1, 2, 3, 4, 5, 6))
    with pytest.raises(struct.error):
        decode(vhost_user.VringAddr, raw[:-1])
    with pytest.raises(struct.error):
        decode(vhost_user.VringAddr, raw, 1)


def test_defaults_encode_padding_as_zeros() -> None:
    assert encode(virtio_gpu.CtrlHdr(0x0101)) == struct.pack("<IIQIB3x", 0x0101, 0, 0, 0, 0)
    assert encode(virtio_gpu.MemEntry(0x1000, 4096)) == struct.pack("<QII", 0x1000, 4096, 0)


def test_field_order_follows_the_declaration() -> None:
    raw = encode(vhost_user.VringAddr(queue=1, flags=2, desc_user_addr=3, used_user_addr=4,
                                      avail_user_addr=5, log_guest_addr=6))
    assert struct.unpack("<IIQQQQ", raw) == (1, 2, 3, 4, 5, 6)
    hdr = encode(virtio_gpu.CtrlHdr(type=7, flags=1, fence_id=9, ctx_id=3, ring_idx=2))
    assert struct.unpack("<IIQIB3x", hdr) == (7, 1, 9, 3, 2)


class _Mixed(NamedTuple):
    """``struct mixed { u8 a; u16 b; u64 c; }`` (packed: declared for this test)"""

    a: U8
    b: U16
    c: U64


def test_wire_declares_a_packed_layout() -> None:
    wire("struct mixed")(_Mixed)
    lay = layout(_Mixed)
    assert lay.size == 11 and lay.c_name == "struct mixed"
    assert encode(_Mixed(1, 0x0203, 0x0405060708090A0B)) == bytes.fromhex("0103020b0a090807060504")
    assert lay.dtype.names == ("a", "b", "c")
    assert repr(lay) == "WireLayout(struct mixed, size=11)"
