"""Host-side tests of the VM runner's guest artifacts (scripts/vmrunner): the kernel's
modules and fetch cache, the initramfs, host huge pages and the host root; no VM is
booted."""

from __future__ import annotations

import dataclasses
import lzma
import os
import re
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from vmrunner import hugepages, initramfs, rootfs
from vmrunner import kernel as vmkernel
from vmrunner.errors import HarnessError
from vmrunner.initramfs import CpioEntry, build_initramfs, write_newc
from vmrunner.kernel import GuestKernel, extract_vmlinux, modinfo_depends, resolve_load_order


def test_extract_vmlinux_finds_the_elf_after_a_false_magic() -> None:
    payload = b"\x7fELF" + bytes(range(256)) * 64
    packed = lzma.compress(payload, format=lzma.FORMAT_XZ)
    bzimage = b"MZ" + bytes(100) + b"\xfd7zXZ\x00garbage" + bytes(50) + packed + bytes(30)
    assert extract_vmlinux(bzimage) == payload
    not_elf = lzma.compress(b"firmware blob" * 100, format=lzma.FORMAT_XZ)
    assert extract_vmlinux(b"MZ" + not_elf + bytes(10) + packed) == payload
    assert extract_vmlinux(b"MZ" + bytes(100)) is None


def _module_elf(modinfo: bytes) -> bytes:
    """A minimal ELF64 with a section-name table and a .modinfo section."""
    names = b"\0.shstrtab\0.modinfo\0"
    body_offset = 64
    shoff = body_offset + len(names) + len(modinfo)
    header = bytearray(64)
    header[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HHH", header, 0x3A, 64, 3, 1)

    def section(name: int, offset: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, 1, 0, 0, offset, size, 0, 0, 1, 0)

    return (bytes(header) + names + modinfo + bytes(64)
            + section(1, body_offset, len(names))
            + section(11, body_offset + len(names), len(modinfo)))


def test_modinfo_depends() -> None:
    ko = _module_elf(b"license=GPL\0depends=drm,drm_kms_helper\0name=virtio_gpu\0")
    assert modinfo_depends(ko) == ["drm", "drm_kms_helper"]
    assert modinfo_depends(_module_elf(b"depends=\0")) == []
    assert modinfo_depends(_module_elf(b"license=GPL\0name=virtio_pci\0")) == []
    with pytest.raises(HarnessError):
        modinfo_depends(b"not an elf")


def test_newc_archive_lists_with_cpio(tmp_path: Path) -> None:
    archive = tmp_path / "initrd.cpio"
    write_newc([CpioEntry("bin", stat.S_IFDIR | 0o755),
                CpioEntry("bin/busybox", stat.S_IFREG | 0o755, b"x" * 5),
                CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
                CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))], archive)
    assert archive.stat().st_size % 4 == 0
    listing = subprocess.run(["cpio", "-itv", "--quiet"], stdin=archive.open("rb"),
                             capture_output=True, text=True, check=True).stdout
    assert "bin/sh -> busybox" in listing
    assert "5, " in listing and "dev/console" in listing
    nlinks = {line.split()[-1]: line.split()[1] for line in listing.splitlines()
              if "->" not in line}
    assert nlinks["bin"] == "2" and nlinks["bin/busybox"] == "1"


def _modules_tree(root: Path, depends: dict[str, str]) -> None:
    for index, (name, deps) in enumerate(depends.items()):
        path = root / "kernel" / f"dir{index % 2}" / f"{name}.ko"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_module_elf(f"license=GPL\0depends={deps}\0".encode()))


def test_resolve_load_order_puts_dependencies_first_once(tmp_path: Path) -> None:
    # module file names may use dashes where the depends= lists use underscores and back
    _modules_tree(tmp_path, {"virtio_gpu": "drm,virtio-dma-buf", "drm": "virtio_dma_buf",
                             "virtio-dma-buf": "", "unrelated": ""})
    order = resolve_load_order(tmp_path, ("virtio_gpu", "drm"))
    assert [p.name for p in order] == ["virtio-dma-buf.ko", "drm.ko", "virtio_gpu.ko"]
    assert all(p.is_file() for p in order)
    with pytest.raises(HarnessError, match="kernel module nonesuch not found"):
        resolve_load_order(tmp_path, ("nonesuch",))


def test_resolve_load_order_refuses_a_dependency_cycle(tmp_path: Path) -> None:
    _modules_tree(tmp_path, {"a": "b", "b": "a"})
    with pytest.raises(HarnessError, match="cycle"):
        resolve_load_order(tmp_path, ("a",))


def test_build_initramfs_carries_init_busybox_and_modules_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(initramfs, "initramfs_inputs", lambda: {
        "init": b"#!/bin/sh\n", "bin/busybox": b"\x7fELF", "etc/vgpu/console.tty": b"hi"})
    modules = tmp_path / "modules"
    load_order = ("kernel/drivers/virtio/virtio_pci.ko", "kernel/fs/9p/9p.ko")
    for module in load_order:
        (modules / module).parent.mkdir(parents=True, exist_ok=True)
        (modules / module).write_bytes(module.encode())
    kernel = GuestKernel("6.1.0-9-amd64", "6.1.99-1", tmp_path / "vmlinux",
                         tmp_path / "bzImage", modules, load_order)
    archive = tmp_path / "initramfs.cpio"
    build_initramfs(kernel, archive)
    assert not archive.with_suffix(".tmp").exists()
    listing = subprocess.run(["cpio", "-itv", "--quiet"], stdin=archive.open("rb"),
                             capture_output=True, text=True, check=True).stdout.splitlines()
    entries = {line.split()[-1] if "->" not in line else line.split()[-3]: line.split()[0]
               for line in listing}
    names = [line.split()[-1] if "->" not in line else line.split()[-3] for line in listing]
    assert len(names) == len(set(names))  # every directory once
    assert entries["init"] == "-rwxr-xr-x" and entries["bin/busybox"] == "-rwxr-xr-x"
    assert entries["dev/console"] == "crw-------"
    assert any(re.match(r"crw.* 5,\s+1 .* dev/console$", line) for line in listing)
    assert any(line.endswith("bin/sh -> busybox") for line in listing)
    root = "lib/modules/6.1.0-9-amd64"
    for directory in ("lib", "lib/modules", root, f"{root}/kernel/drivers/virtio",
                      f"{root}/kernel/fs/9p"):
        assert entries[directory].startswith("d"), directory
    for module in load_order:  # a directory comes before what is in it
        assert names.index(f"{root}/{Path(module).parent}") < names.index(f"{root}/{module}")
    extract = tmp_path / "x"
    extract.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], stdin=archive.open("rb"), cwd=extract,
                   check=True)
    assert (extract / "etc/vgpu/modules").read_text() == \
        f"/{root}/kernel/drivers/virtio/virtio_pci.ko\n/{root}/kernel/fs/9p/9p.ko\n"
    assert (extract / root / load_order[1]).read_bytes() == load_order[1].encode()
    assert (extract / "etc/vgpu/console.tty").read_bytes() == b"hi"


def test_initramfs_inputs_need_busybox(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(initramfs, "BUSYBOX", tmp_path / "busybox")
    with pytest.raises(HarnessError, match="busybox-static"):
        initramfs.initramfs_inputs()


@dataclasses.dataclass
class FakeHugePool:
    """/proc/sys/vm/nr_hugepages and HugePages_Free: `in_use` pages are taken, and the
    kernel finds at most `limit` pages in all."""

    nr: Path
    in_use: int = 0
    limit: int = 10_000

    def free(self) -> int:
        return min(int(self.nr.read_text()), self.limit) - self.in_use


@pytest.fixture
def huge_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHugePool:
    pool = FakeHugePool(tmp_path / "nr_hugepages")
    pool.nr.write_text("8\n")
    monkeypatch.setattr(hugepages, "NR_HUGEPAGES", pool.nr)
    monkeypatch.setattr(hugepages, "free_huge_pages", pool.free)
    return pool


def test_free_huge_pages_reads_meminfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemFree: 100 kB\nHugePages_Total:      12\nHugePages_Free:       7\n")
    monkeypatch.setattr(hugepages, "MEMINFO", meminfo)
    assert hugepages.free_huge_pages() == 7


def test_huge_pages_are_added_for_the_run_and_given_back(huge_pool: FakeHugePool) -> None:
    huge_pool.in_use = 3  # 5 of 8 free
    reservation = hugepages.HugePageReservation(20)  # 10 pages
    assert int(huge_pool.nr.read_text()) == 13 and huge_pool.free() == 10
    reservation.release()
    assert int(huge_pool.nr.read_text()) == 8
    reservation.release()  # twice is harmless
    assert int(huge_pool.nr.read_text()) == 8


def test_enough_free_huge_pages_leave_the_pool_alone(huge_pool: FakeHugePool) -> None:
    hugepages.HugePageReservation(16).release()
    assert huge_pool.nr.read_text() == "8\n"


def test_huge_pages_the_kernel_cannot_find_are_an_error(huge_pool: FakeHugePool) -> None:
    huge_pool.limit = 9
    with pytest.raises(HarnessError, match="found only 9 of 10 2 MiB pages"):
        hugepages.HugePageReservation(20)
    assert int(huge_pool.nr.read_text()) == 8  # given back at once
    with pytest.raises(HarnessError, match="not a multiple of 2 MiB"):
        hugepages.HugePageReservation(21)


def test_host_root_check_names_what_is_missing(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    present = tmp_path / "python3"
    present.touch()
    monkeypatch.setattr(rootfs, "HOST_ROOT_REQUIREMENTS", (present,))
    rootfs.check_host_root()
    monkeypatch.setattr(rootfs, "HOST_ROOT_REQUIREMENTS", (present, tmp_path / "numpy"))
    with pytest.raises(HarnessError, match=f"host root lacks {tmp_path / 'numpy'}: run"):
        rootfs.check_host_root()


def _fake_tool(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
    (bin_dir / name).chmod(0o755)


def test_the_newest_kernel_abi_is_picked_numerically(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["linux-image-6.1.0-9-amd64", "linux-image-6.1.0-10-amd64",
             "linux-image-6.1.0-10-amd64-dbg", "linux-image-6.1.0-11-cloud-amd64"]
    _fake_tool(tmp_path / "bin", "apt-cache", f"echo '{chr(10).join(names)}'")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert vmkernel.newest_kernel_package() == "linux-image-6.1.0-10-amd64"
    _fake_tool(tmp_path / "bin", "apt-cache", "exit 100")
    assert vmkernel.newest_kernel_package() is None


def test_fetch_kernel_unpacks_once_and_drops_older_kernels(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = tmp_path / "deb-tree"
    modules = tree / "lib" / "modules" / "6.1.0-7-amd64" / "kernel" / "drivers" / "gpu"
    modules.mkdir(parents=True)
    (modules / "virtio-gpu.ko").write_bytes(_module_elf(b"depends=drm\0"))
    (modules / "drm.ko").write_bytes(_module_elf(b"depends=\0"))
    (modules / "unused.ko").write_bytes(_module_elf(b"depends=\0"))
    vmlinux = b"\x7fELF" + bytes(range(256)) * 8
    (tree / "boot").mkdir()
    (tree / "boot" / "vmlinuz-6.1.0-7-amd64").write_bytes(
        b"MZ" + bytes(64) + lzma.compress(vmlinux, format=lzma.FORMAT_XZ))
    downloads = tmp_path / "downloads"
    _fake_tool(tmp_path / "bin", "apt-get",
               f'echo "$@" >> {downloads}; touch linux-image-6.1.0-7-amd64_6.1.99-1_amd64.deb')
    _fake_tool(tmp_path / "bin", "dpkg-deb",
               f'[ "$1" = -x ] && mkdir -p "$3" && cp -r {tree}/. "$3"')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(vmkernel, "GUEST_MODULES", ("virtio_gpu",))
    cache = tmp_path / "cache"
    older = cache / "kernel-6.1.0-6-amd64-k1"
    older.mkdir(parents=True)
    (older / "kernel.json").write_text("{}")

    fetched_kernel, fetched = vmkernel.fetch_kernel(cache, "k1", "linux-image-6.1.0-7-amd64")
    assert fetched
    target = cache / "kernel-6.1.0-7-amd64-k1"
    assert fetched_kernel == GuestKernel(
        "6.1.0-7-amd64", "6.1.99-1", target / "vmlinux", target / "bzImage", target / "modules",
        ("kernel/drivers/gpu/drm.ko", "kernel/drivers/gpu/virtio-gpu.ko"))
    assert fetched_kernel.image.read_bytes() == vmlinux
    assert fetched_kernel.bzimage.read_bytes() == \
        (tree / "boot" / "vmlinuz-6.1.0-7-amd64").read_bytes()
    assert (target / "modules" / "kernel/drivers/gpu/virtio-gpu.ko").is_file()
    assert sorted(p.name for p in cache.iterdir()) == [target.name]  # older and temp gone

    again, fetched = vmkernel.fetch_kernel(cache, "k1", "linux-image-6.1.0-7-amd64")
    assert not fetched and again == fetched_kernel
    assert downloads.read_text().count("download") == 1


# --- console-check's judge --------------------------------------------------------------
