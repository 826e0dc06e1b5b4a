"""Build the guest initramfs: busybox-static, the init script, the kernel modules.

The archive is an uncompressed newc cpio written here (deterministic: every mtime is 0), so
the guest spends no TCG time decompressing it.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .console_check import PATTERN_HEIGHT, PATTERN_WIDTH, console_tty_bytes, pattern_bgrx
from .errors import HarnessError
from .kernel import GuestKernel

BUSYBOX = Path("/bin/busybox")
BOOT_DIR = Path(__file__).resolve().parents[2] / "guest_tests" / "boot"
INIT_SCRIPT = BOOT_DIR / "init"
DIRECTORIES = ("bin", "dev", "etc", "etc/vgpu", "lib", "mnt", "newroot", "proc", "run",
               "sbin", "sys", "tmp", "usr", "usr/bin", "usr/sbin")


@dataclass(frozen=True)
class CpioEntry:
    """One archive member: a directory, regular file, symlink or device node."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _newc_header(ino: int, entry: CpioEntry, name_size: int) -> bytes:
    fields = (ino, entry.mode, 0, 0, 2 if stat.S_ISDIR(entry.mode) else 1, 0, len(entry.data),
              0, 0, entry.rdev[0], entry.rdev[1], name_size, 0)
    return b"070701" + b"".join(b"%08X" % value for value in fields)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def write_newc(entries: list[CpioEntry], path: Path) -> None:
    """Write `entries` as a newc ("070701") cpio archive, the initramfs format."""
    with path.open("wb") as out:
        for ino, entry in enumerate([*entries, CpioEntry("TRAILER!!!", 0)], start=1):
            name = entry.name.encode() + b"\0"
            header = _newc_header(ino, entry, len(name))
            out.write(header + name + _pad4(len(header) + len(name)))
            out.write(entry.data + _pad4(len(entry.data)))


def _directory(name: str) -> CpioEntry:
    return CpioEntry(name, stat.S_IFDIR | 0o755)


def _file(name: str, data: bytes, mode: int = 0o644) -> CpioEntry:
    return CpioEntry(name, stat.S_IFREG | mode, data)


def _parents(relative: str) -> Iterator[str]:
    parts = relative.split("/")[:-1]
    for depth in range(1, len(parts) + 1):
        yield "/".join(parts[:depth])


def initramfs_inputs() -> dict[str, bytes]:
    """The files (besides kernel modules) that go into the archive; the cache key hashes them."""
    if not BUSYBOX.exists():
        raise HarnessError(f"{BUSYBOX} is missing: run scripts/setup-host.sh (busybox-static)")
    return {
        "init": INIT_SCRIPT.read_bytes(),
        "bin/busybox": BUSYBOX.read_bytes(),
        "etc/vgpu/console.tty": console_tty_bytes(),
        "etc/vgpu/pattern.bgrx": pattern_bgrx(),
        "etc/vgpu/pattern.size": f"{PATTERN_WIDTH} {PATTERN_HEIGHT}\n".encode(),
    }


def build_initramfs(kernel: GuestKernel, path: Path) -> None:
    """Write the guest initramfs for `kernel` to `path`."""
    inputs = initramfs_inputs()
    entries = [_directory(name) for name in DIRECTORIES]
    entries.append(CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(_file("init", inputs.pop("init"), 0o755))
    entries.append(_file("bin/busybox", inputs.pop("bin/busybox"), 0o755))
    entries.append(CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"))
    entries.extend(_file(name, data) for name, data in inputs.items())

    module_root = f"lib/modules/{kernel.release}"
    seen = {"lib"}
    for relative in (f"{module_root}/{module}" for module in kernel.load_order):
        for parent in _parents(relative):
            if parent not in seen:
                seen.add(parent)
                entries.append(_directory(parent))
    order = []
    for module in kernel.load_order:
        entries.append(_file(f"{module_root}/{module}", (kernel.modules_dir / module).read_bytes()))
        order.append(f"/{module_root}/{module}")
    entries.append(_file("etc/vgpu/modules", ("\n".join(order) + "\n").encode()))
    tmp = path.with_suffix(".tmp")
    write_newc(entries, tmp)
    tmp.rename(path)
