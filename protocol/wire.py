"""Wire structs declared once, with construct, on typed records.

A wire struct is a ``NamedTuple`` whose fields are annotated with a construct
field type (``U32 = Annotated[int, Int32ul]``).  :func:`wire` reads those
annotations and builds, from that single declaration:

* the construct ``Struct`` (compiled), the reference codec used by golden and
  round-trip tests and for variable-length messages;
* a ``struct.Struct`` fast path with the same layout, for the per-command hot
  path (compiled construct costs ~3 us per parse, ``struct`` ~0.1 us);
* a numpy structured dtype with the same layout, for arrays that live in guest
  memory (descriptor tables, scatter-gather entry lists).

Padding is declared as an ordinary field whose name starts with ``padding``;
it defaults to 0 and is encoded as zeros.
"""

from __future__ import annotations

import struct
import sys
import typing
from collections.abc import Callable
from typing import Annotated, Any, Final, TypeVar

import numpy as np
from construct import (
    Bytes,
    Construct,
    FormatField,
    Int8ul,
    Int16ul,
    Int32sl,
    Int32ul,
    Int64ul,
    Struct,
)

__all__ = [
    "I32",
    "U8",
    "U16",
    "U32",
    "U64",
    "WireLayout",
    "decode",
    "encode",
    "layout",
    "wire",
]

U8 = Annotated[int, Int8ul]
U16 = Annotated[int, Int16ul]
U32 = Annotated[int, Int32ul]
I32 = Annotated[int, Int32sl]
U64 = Annotated[int, Int64ul]

_NP_CODE: Final = {"<B": "u1", "<H": "<u2", "<L": "<u4", "<I": "<u4", "<l": "<i4",
                   "<i": "<i4", "<Q": "<u8", "<q": "<i8"}


R = TypeVar("R", bound=tuple[Any, ...])


class WireLayout:
    """Every codec of one wire struct, derived from its single declaration."""

    __slots__ = (
        "_compiled",
        "c_name",
        "construct",
        "dtype",
        "names",
        "record",
        "size",
        "struct",
    )

    def __init__(self, record: type[Any], c_name: str, fields: list[tuple[str, Construct]]):
        self.record = record
        self.c_name = c_name
        self.names = tuple(name for name, _ in fields)
        self.construct: Construct = Struct(*[name / con for name, con in fields])
        self._compiled: Construct | None = None
        fmt = ["<"]
        np_fields: list[tuple[str, str]] = []
        for name, con in fields:
            if isinstance(con, FormatField):
                fmt.append(con.fmtstr[1:])
                np_fields.append((name, _NP_CODE[con.fmtstr]))
            elif isinstance(con, Bytes) and isinstance(con.length, int):
                fmt.append(f"{con.length}s")
                np_fields.append((name, f"V{con.length}"))
            else:  # pragma: no cover - declaration error, caught at import
                raise TypeError(f"{c_name}.{name}: unsupported wire field {con!r}")
        self.struct = struct.Struct("".join(fmt))
        self.size: int = self.struct.size
        self.dtype = np.dtype(np_fields)
        if self.dtype.itemsize != self.size:  # pragma: no cover - declaration error
            raise TypeError(f"{c_name}: dtype size {self.dtype.itemsize} != {self.size}")

    @property
    def compiled(self) -> Construct:
        """The compiled construct codec (compiled lazily: compiling costs ~10 ms)."""
        if self._compiled is None:
            self._compiled = self.construct.compile()
        return self._compiled

    def __repr__(self) -> str:
        return f"WireLayout({self.c_name}, size={self.size})"


_LAYOUTS: dict[type[Any], WireLayout] = {}


def wire(c_name: str) -> Callable[[type[R]], type[R]]:
    """Class decorator registering a ``NamedTuple`` as the wire struct ``c_name``."""

    def register(cls: type[R]) -> type[R]:
        module = sys.modules[cls.__module__]
        hints = typing.get_type_hints(cls, globalns=vars(module), include_extras=True)
        fields: list[tuple[str, Construct]] = []
        for name in cls._fields:  # type: ignore[attr-defined]
            meta = getattr(hints[name], "__metadata__", ())
            cons = [m for m in meta if isinstance(m, Construct)]
            if len(cons) != 1:  # pragma: no cover - declaration error
                raise TypeError(f"{c_name}.{name} needs exactly one construct annotation")
            fields.append((name, cons[0]))
        _LAYOUTS[cls] = WireLayout(cls, c_name, fields)
        return cls

    return register


def layout(cls: type[Any]) -> WireLayout:
    """The :class:`WireLayout` of a registered wire record class."""
    return _LAYOUTS[cls]


def decode(cls: type[R], buf: bytes | bytearray | memoryview, offset: int = 0) -> R:
    """Decode ``cls`` from ``buf`` at ``offset``; raises ``struct.error`` if short."""
    lay = _LAYOUTS[cls]
    return cls._make(lay.struct.unpack_from(buf, offset))  # type: ignore[attr-defined, no-any-return]


def encode(record: tuple[Any, ...]) -> bytes:
    """Encode a registered wire record to bytes."""
    return _LAYOUTS[type(record)].struct.pack(*record)

