"""Guest artifacts under ${VGPU_CACHE_DIR:-~/.cache/vgpu-backend}, rebuilt when an input changes.

Every artifact's file name carries a hash of its recipe (the builder's source and its
inputs), so editing the init script, the module list or the image's package list rebuilds
exactly what depends on it.  Builds hold an flock on the cache directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import initramfs, kernel, rootfs
from .kernel import GuestKernel


@dataclass(frozen=True)
class GuestArtifacts:
    """What QEMU boots: kernel image, initramfs and (for --guest-root image) the root disk."""

    kernel: GuestKernel
    initramfs: Path
    root_image: Path | None
    built: tuple[str, ...]  # names of the artifacts built by this call (empty: all cached)


def cache_dir() -> Path:
    """The artifact cache directory (created if needed)."""
    default = Path.home() / ".cache" / "vgpu-backend"
    path = Path(os.environ.get("VGPU_CACHE_DIR") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


def recipe_hash(*parts: bytes | str) -> str:
    """A short stable hash of the given recipe parts."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:16]


def _source(module: object) -> bytes:
    return Path(str(getattr(module, "__file__", ""))).read_bytes()


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with (directory / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"vm: waiting for another build in {directory} to finish", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _drop_stale(directory: Path, pattern: str, keep: Path) -> None:
    for stale in directory.glob(pattern):
        if stale != keep and stale.is_file():
            stale.unlink()


def prepare_artifacts(root_kind: str, kernel_package: str | None = None,
                      log: bool = True) -> GuestArtifacts:
    """Cached artifacts for `root_kind` ("host", "image" or "none"), building what is missing."""
    directory = cache_dir()
    built: list[str] = []
    with _locked(directory):
        kernel_key = recipe_hash(_source(kernel), " ".join(kernel.GUEST_MODULES))
        guest_kernel, fetched = kernel.fetch_kernel(directory, kernel_key, kernel_package)
        if fetched:
            built.append(f"kernel {guest_kernel.release}")

        inputs = initramfs.initramfs_inputs()
        initramfs_key = recipe_hash(_source(initramfs), guest_kernel.release,
                                    guest_kernel.package_version, kernel_key,
                                    *guest_kernel.load_order,
                                    *(name.encode() + data for name, data in inputs.items()))
        initramfs_path = directory / f"initramfs-{initramfs_key}.cpio"
        if not initramfs_path.exists():
            initramfs.build_initramfs(guest_kernel, initramfs_path)
            _drop_stale(directory, "initramfs-*.cpio", initramfs_path)
            built.append("initramfs")

        root_image = None
        if root_kind == "image":
            image_key = recipe_hash(_source(rootfs), rootfs.image_recipe())
            root_image = directory / f"rootfs-{rootfs.DEBIAN_SUITE}-{image_key}.ext4"
            if not root_image.exists():
                if log:
                    print("vm: building the Debian guest image with debootstrap "
                          "(about 2 minutes)", flush=True)
                rootfs.build_debian_image(root_image)
                _drop_stale(directory, "rootfs-*.ext4", root_image)
                built.append("debian image")
        elif root_kind == "host":
            rootfs.check_host_root()
    return GuestArtifacts(guest_kernel, initramfs_path, root_image, tuple(built))
