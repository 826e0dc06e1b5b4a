"""``protocol`` is sans-IO: it never imports an I/O module or ``vgpu_backend``.

Two checks: an AST scan of every ``protocol`` source file (``os`` included, which the
stdlib itself imports, so ``sys.modules`` cannot tell), and a fresh interpreter that
imports every ``protocol`` module and then looks at ``sys.modules``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROTOCOL_DIR = REPO / "protocol"

#: top-level modules a protocol source file must not import
FORBIDDEN_IMPORTS = frozenset({"os", "socket", "mmap", "select", "selectors", "asyncio",
                               "fcntl", "subprocess", "vgpu_backend"})
#: modules that must not be loaded at all after importing every protocol module
FORBIDDEN_LOADED = frozenset({"socket", "mmap", "select", "selectors", "asyncio", "fcntl",
                              "subprocess", "vgpu_backend"})


def protocol_sources() -> list[Path]:
    """Every Python source file of the ``protocol`` package."""
    return sorted(PROTOCOL_DIR.rglob("*.py"))


def protocol_module_names() -> list[str]:
    """Dotted names of every ``protocol`` module, the package included."""
    names = []
    for path in protocol_sources():
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def forbidden_imports(source: str) -> list[str]:
    """Top-level names of forbidden modules that ``source`` imports (statically or
    through ``__import__``/``importlib.import_module`` with a literal name)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and \
                isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else \
                func.attr if isinstance(func, ast.Attribute) else ""
            if called in ("__import__", "import_module"):
                names = [node.args[0].value]
        found += [n for n in names if n.split(".")[0] in FORBIDDEN_IMPORTS]
    return found


def modules_loaded_after_import(modules: list[str]) -> set[str]:
    """``sys.modules`` of a fresh interpreter after importing ``modules``."""
    script = textwrap.dedent(f"""
        import importlib, sys
        for name in {modules!r}:
            importlib.import_module(name)
        sys.stdout.write(repr(sorted(sys.modules)))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=60, check=True)
    loaded = ast.literal_eval(result.stdout)
    assert isinstance(loaded, list)
    return {str(name) for name in loaded}


def test_protocol_package_has_the_expected_modules() -> None:
    names = set(protocol_module_names())
    expected = {"protocol", "protocol.wire", "protocol.errors", "protocol.limits",
                "protocol.vhost_user", "protocol.vhost_user_connection", "protocol.display",
                "protocol.virtio_gpu", "protocol.virtio_gpu_codes", "protocol.virtqueue",
                "protocol.edid"}
    assert expected <= names


@pytest.mark.parametrize("path", protocol_sources(), ids=lambda p: p.name)
def test_protocol_module_imports_no_io_module(path: Path) -> None:
    assert forbidden_imports(path.read_text()) == []


@pytest.mark.parametrize("source, expected", [
    ("import os", ["os"]),
    ("import os.path as p", ["os.path"]),
    ("from socket import socketpair", ["socket"]),
    ("import numpy, mmap", ["mmap"]),
    ("def f():\n    import selectors", ["selectors"]),
    ("from vgpu_backend.guest_memory import GuestMemory", ["vgpu_backend.guest_memory"]),
    ("importlib.import_module('fcntl')", ["fcntl"]),
    ("__import__('asyncio')", ["asyncio"]),
    ("import struct\nfrom . import wire\nfrom protocol.wire import U8", []),
])
def test_the_import_scanner_finds_forbidden_imports(source: str, expected: list[str]) -> None:
    assert forbidden_imports(source) == expected


def test_importing_every_protocol_module_loads_no_io_module() -> None:
    modules = protocol_module_names()
    loaded = modules_loaded_after_import(modules)
    assert set(modules) <= loaded  # they really were imported
    assert sorted(FORBIDDEN_LOADED & loaded) == []


def test_the_fresh_interpreter_check_sees_io_modules() -> None:
    loaded = modules_loaded_after_import(["protocol.wire", "selectors"])
    assert {"selectors", "select"} <= loaded
