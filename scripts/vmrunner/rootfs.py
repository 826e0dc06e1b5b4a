"""The guest root filesystem that runs pytest: the host's own root over 9p, or a Debian image.

``host``: the host's ``/`` exported read-only over virtio-9p; needs Debian's python3-numpy,
python3-pytest and python3-construct (the guest tests import ``protocol``) on the host
(scripts/setup-host.sh installs them, and python3-pytest-timeout for the optional per-test
timeout).  Nothing to build.

``image``: ``debootstrap --variant=minbase`` of bookworm with python3, pytest,
pytest-timeout, numpy and construct, packed into an ext4 image by ``mke2fs -d`` (no loop
mount) and attached read-only as virtio-blk.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from .errors import HarnessError

ROOT_KINDS = ("host", "image")
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
IMAGE_PACKAGES = ("python3", "python3-pytest", "python3-pytest-timeout", "python3-numpy",
                  "python3-construct")
HOST_ROOT_REQUIREMENTS = (
    Path("/usr/bin/python3"),
    Path("/usr/lib/python3/dist-packages/numpy"),
    Path("/usr/lib/python3/dist-packages/pytest"),
    Path("/usr/lib/python3/dist-packages/construct"),
)
# Trimmed from the image: documentation and caches nobody reads in the guest.
IMAGE_PRUNE = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
               "var/cache/apt", "var/lib/apt/lists")


def image_recipe() -> str:
    """Everything that decides the image's content (part of its cache key)."""
    return f"{DEBIAN_SUITE} {DEBIAN_MIRROR} minbase {' '.join(IMAGE_PACKAGES)} " \
           f"prune {' '.join(IMAGE_PRUNE)}"


def check_host_root() -> None:
    """Raise unless the host root can serve as the guest root."""
    missing = [str(p) for p in HOST_ROOT_REQUIREMENTS if not p.exists()]
    if missing:
        raise HarnessError(f"host root lacks {', '.join(missing)}: run scripts/setup-host.sh "
                           "(python3-numpy, python3-pytest, python3-construct) or use --guest-root "
                           "image")


def _directory_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-sb", "--apparent-size", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def build_debian_image(path: Path) -> None:
    """debootstrap a minimal bookworm with IMAGE_PACKAGES into the ext4 image `path`."""
    for tool in ("debootstrap", "mke2fs"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            raise HarnessError(f"{tool} is missing: run scripts/setup-host.sh")
    with tempfile.TemporaryDirectory(dir=path.parent, prefix="rootfs-build-") as tmp:
        root = Path(tmp) / "root"
        log = path.parent / "debootstrap.log"
        with log.open("w") as log_file:
            done = subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={','.join(IMAGE_PACKAGES)}",
                 DEBIAN_SUITE, str(root), DEBIAN_MIRROR],
                stdout=log_file, stderr=subprocess.STDOUT, check=False)
        if done.returncode != 0:
            raise HarnessError(f"debootstrap failed (exit {done.returncode}), see {log}")
        for relative in IMAGE_PRUNE:
            shutil.rmtree(root / relative, ignore_errors=True)
            (root / relative).mkdir(parents=True, exist_ok=True)
        size_mib = _directory_bytes(root) * 5 // 4 // 2**20 + 64
        tmp_image = Path(tmp) / "root.ext4"
        tmp_image.touch()  # else mke2fs announces that it creates the file
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal",
                        "-L", "vgpu-root", "-d", str(root), str(tmp_image), f"{size_mib}M"],
                       check=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        tmp_image.rename(path)
