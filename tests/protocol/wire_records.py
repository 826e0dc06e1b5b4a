"""Every ``@wire`` struct of the ``protocol`` package, and hypothesis values for them."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from functools import cache
from pathlib import Path
from typing import Any

from construct import Bytes, FormatField
from hypothesis import strategies as st

import protocol
from protocol.wire import WireLayout, layout

__all__ = ["declared_wire_names", "record_strategy", "wire_classes"]

_INT_RANGES = {"<B": (0, 0xFF), "<H": (0, 0xFFFF), "<L": (0, 0xFFFF_FFFF),
               "<I": (0, 0xFFFF_FFFF), "<Q": (0, (1 << 64) - 1),
               "<l": (-(1 << 31), (1 << 31) - 1), "<i": (-(1 << 31), (1 << 31) - 1),
               "<q": (-(1 << 63), (1 << 63) - 1)}


@cache
def wire_classes() -> tuple[type[Any], ...]:
    """Every class of a ``protocol`` module registered with ``@wire``."""
    found: list[type[Any]] = []
    for info in pkgutil.iter_modules(protocol.__path__):
        module = importlib.import_module(f"protocol.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__ or not hasattr(cls, "_fields"):
                continue
            try:
                layout(cls)
            except KeyError:
                continue
            found.append(cls)
    return tuple(found)


def declared_wire_names() -> set[str]:
    """Names of the classes decorated ``@wire(...)`` in the sources (an AST scan)."""
    names: set[str] = set()
    for path in Path(protocol.__path__[0]).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(d, ast.Call) and isinstance(d.func, ast.Name)
                    and d.func.id == "wire" for d in node.decorator_list):
                names.add(node.name)
    return names


def _field_strategy(con: Any) -> st.SearchStrategy[Any]:
    if isinstance(con, FormatField):
        low, high = _INT_RANGES[con.fmtstr]
        return st.integers(low, high)
    if isinstance(con, Bytes) and isinstance(con.length, int):
        return st.binary(min_size=con.length, max_size=con.length)
    raise TypeError(f"no strategy for {con!r}")


def record_strategy(cls: type[Any]) -> st.SearchStrategy[Any]:
    """Records of ``cls`` with every field drawn over its whole range."""
    lay: WireLayout = layout(cls)
    fields = [_field_strategy(sub.subcon) for sub in lay.construct.subcons]
    return st.tuples(*fields).map(cls._make)
