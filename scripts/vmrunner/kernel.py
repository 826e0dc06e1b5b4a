"""Fetch a Debian 6.1 kernel, extract the PVH-bootable vmlinux and the modules we need."""

from __future__ import annotations

import json
import lzma
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import HarnessError

_RELEASE = r"6\.1\.0-(\d+)-amd64"  # Debian 12's kernel series; group 1 is the ABI
KERNEL_PACKAGE_RE = re.compile(rf"^linux-image-{_RELEASE}$")
_CACHED_KERNEL_RE = re.compile(rf"^kernel-{_RELEASE}-")  # its unpacked cache directory
XZ_MAGIC = b"\xfd7zXZ\x00"
ELF_MAGIC = b"\x7fELF"

# Modules the guest init loads (their dependencies are added from each module's modinfo).
GUEST_MODULES = (
    "virtio_pci",
    "virtio_console",  # control channel (virtio-serial port)
    "virtio_gpu",
    "9pnet_virtio",  # project, results and (default) root shares
    "9p",
    "virtio_blk",  # the debootstrap root image
    "crc32c_generic",  # ext4 asks the crypto API for crc32c: not a modinfo dependency
    "ext4",
)


@dataclass(frozen=True)
class GuestKernel:
    """An unpacked kernel: the image QEMU boots and the modules the initramfs carries."""

    release: str  # uname -r, e.g. "6.1.0-56-amd64"
    package_version: str
    image: Path  # ELF vmlinux when extraction worked (PVH entry), else the bzImage
    bzimage: Path
    modules_dir: Path  # holds <relpath>.ko files as listed in load_order
    load_order: tuple[str, ...]  # module paths relative to modules_dir, dependencies first


def newest_kernel_package() -> str | None:
    """Newest linux-image-6.1.0-N-amd64 known to apt's package lists, or None."""
    try:
        listing = subprocess.run(
            ["apt-cache", "pkgnames", "linux-image-6.1.0-"],
            check=True, capture_output=True, text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    abis = [int(m.group(1)) for line in listing.split() if (m := KERNEL_PACKAGE_RE.match(line))]
    return f"linux-image-6.1.0-{max(abis)}-amd64" if abis else None


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The uncompressed ELF kernel from a bzImage's xz payload, or None if not found."""
    start = bzimage.find(XZ_MAGIC)
    while start >= 0:
        try:
            payload = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
        except lzma.LZMAError:
            payload = b""
        if payload.startswith(ELF_MAGIC):
            return payload
        start = bzimage.find(XZ_MAGIC, start + 1)
    return None


def modinfo_depends(ko: bytes) -> list[str]:
    """The `depends=` list of a kernel module, read from its ELF .modinfo section."""
    if ko[:4] != ELF_MAGIC or ko[4] != 2:  # ELFCLASS64 only
        raise HarnessError("not a 64-bit ELF kernel module")
    shoff, = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", ko, shoff + index * shentsize)
        return name, offset, size

    _, strtab_offset, _ = section(shstrndx)
    for index in range(shnum):
        name_offset, offset, size = section(index)
        name_end = ko.index(b"\0", strtab_offset + name_offset)
        if ko[strtab_offset + name_offset:name_end] == b".modinfo":
            for entry in ko[offset:offset + size].split(b"\0"):
                if entry.startswith(b"depends="):
                    return [d for d in entry[8:].decode().split(",") if d]
            return []
    raise HarnessError("kernel module without a .modinfo section")


def module_name(path: Path) -> str:
    """Kernel module name of a .ko file (dashes and underscores are the same)."""
    return path.name.removesuffix(".ko").replace("-", "_")


def resolve_load_order(modules_root: Path, wanted: tuple[str, ...]) -> list[Path]:
    """The .ko files for `wanted` plus their dependencies, each after its dependencies."""
    by_name = {module_name(p): p for p in modules_root.rglob("*.ko")}
    order: list[Path] = []
    visiting: set[str] = set()
    done: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in done:
            return
        if name in visiting:
            raise HarnessError(f"module dependency cycle at {name}")
        if name not in by_name:
            raise HarnessError(f"kernel module {name} not found under {modules_root}")
        visiting.add(name)
        for dep in modinfo_depends(by_name[name].read_bytes()):
            visit(dep)
        visiting.discard(name)
        done.add(name)
        order.append(by_name[name])

    for name in wanted:
        visit(name)
    return order


def _cached_abi(meta: Path) -> int:
    """The ABI number N of a cached kernel-6.1.0-N-amd64-KEY/kernel.json (newest sorts last)."""
    match = _CACHED_KERNEL_RE.match(meta.parent.name)
    return int(match.group(1)) if match else -1


def fetch_kernel(cache_dir: Path, recipe_key: str,
                 package: str | None = None) -> tuple[GuestKernel, bool]:
    """Download and unpack `package` (default: the newest) unless cached; True if fetched."""
    package = package or newest_kernel_package()
    if package is None:
        cached = sorted(cache_dir.glob(f"kernel-*-{recipe_key}/kernel.json"), key=_cached_abi)
        if not cached:
            raise HarnessError("apt knows no linux-image-6.1.0-*-amd64 package and none is "
                               "cached: run scripts/setup-host.sh (it runs apt-get update)")
        return load_kernel(cached[-1].parent), False
    target = cache_dir / f"kernel-{package.removeprefix('linux-image-')}-{recipe_key}"
    if (target / "kernel.json").exists():
        return load_kernel(target), False
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix="kernel-build-") as tmp:
        build = Path(tmp)
        subprocess.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package],
                       cwd=build, check=True, stdout=subprocess.DEVNULL)
        deb, = build.glob("*.deb")
        version = deb.name.split("_")[1]
        unpacked = build / "unpacked"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        staging = build / "kernel"
        staging.mkdir()
        bzimage, = (unpacked / "boot").glob("vmlinuz-*")
        release = bzimage.name.removeprefix("vmlinuz-")
        shutil.copy(bzimage, staging / "bzImage")
        vmlinux = extract_vmlinux(bzimage.read_bytes())
        if vmlinux is not None:
            (staging / "vmlinux").write_bytes(vmlinux)
        modules_root = unpacked / "lib" / "modules" / release
        load_order = []
        for ko in resolve_load_order(modules_root, GUEST_MODULES):
            relative = ko.relative_to(modules_root)
            (staging / "modules" / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ko, staging / "modules" / relative)
            load_order.append(str(relative))
        (staging / "kernel.json").write_text(json.dumps({
            "release": release, "package_version": version, "load_order": load_order,
        }, indent=1))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    for stale in cache_dir.glob("kernel-*/kernel.json"):  # older ABIs or recipes
        if stale.parent != target:
            shutil.rmtree(stale.parent, ignore_errors=True)
    return load_kernel(target), True


def load_kernel(directory: Path) -> GuestKernel:
    """A kernel previously unpacked by fetch_kernel."""
    meta = json.loads((directory / "kernel.json").read_text())
    vmlinux = directory / "vmlinux"
    return GuestKernel(
        release=meta["release"],
        package_version=meta["package_version"],
        image=vmlinux if vmlinux.exists() else directory / "bzImage",
        bzimage=directory / "bzImage",
        modules_dir=directory / "modules",
        load_order=tuple(meta["load_order"]),
    )
