"""The QEMU 10 command line: TCG q35 guest, vhost-user-gpu device(s), shares, control port
(and one QMP command with the runner's time limit).

Every PCI function sits at a fixed address on pcie.0, so the guest sees the same layout
on every run: the DRM GPU at 00:02.0, the userspace-driver GPU (--second-gpu) at 00:0a.0.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import HarnessError

if TYPE_CHECKING:
    from qemu.qmp import QMPClient

QEMU_BINARY = "qemu-system-x86_64"
#: older QEMU (Debian 12's 7.2) refuses vhost-user devices without KVM
MIN_QEMU_VERSION = (8, 0)
QEMU_VERSION_RE = re.compile(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?")
CONTROL_PORT_NAME = "org.vgpu.control"
GPU_IDS = ("gpu0", "gpu1")
#: DIMM slots and the room above the boot RAM for the guest's memory hotplug requests
HOTPLUG_SLOTS = 2
HOTPLUG_MAX_MIB = 1024
#: how long the runner waits for QEMU to answer one QMP command
QMP_TIMEOUT = 30.0


async def qmp_execute(qmp: QMPClient, command: str,
                      arguments: dict[str, Any] | None = None) -> Any:
    """QEMU's answer to one QMP command (TimeoutError after QMP_TIMEOUT)."""
    return await asyncio.wait_for(qmp.execute(command, arguments), QMP_TIMEOUT)
#: QEMU's vhost-user GPU front-ends: the PCI display device, and the VGA-class one
#: (what libvirt creates for a primary video device); both speak the same vhost-user
GPU_DEVICES = ("vhost-user-gpu-pci", "vhost-user-vga")
GPU_SLOTS = ("02.0", "0a.0")
DRM_GPU_PCI = "0000:00:02.0"
USERSPACE_GPU_PCI = "0000:00:0a.0"
CONTROL_SLOT = "03.0"
SHARE_SLOTS = {"results": "04.0", "project": "05.0", "hostroot": "06.0"}
ROOT_DISK_SLOT = "06.0"  # the image root replaces the hostroot share


@dataclass(frozen=True)
class Share:
    """A host directory exported to the guest over virtio-9p as mount tag `tag`."""

    tag: str
    path: Path
    readonly: bool


@dataclass(frozen=True)
class VmLayout:
    """Everything the QEMU command line is made of."""

    kernel_image: Path
    initramfs: Path
    cmdline: str
    gpu_sockets: tuple[Path, ...]
    control_socket: Path
    qmp_socket: Path
    serial_log: Path
    shares: tuple[Share, ...] = ()
    root_image: Path | None = None
    memory_mib: int = 2048
    smp: int = 1
    #: guest RAM on the host's 2 MiB huge pages (recommended for compute)
    host_hugetlb: bool = False
    #: QEMU's device for the guest's own GPU (gpu0); a second GPU is always the PCI one
    gpu_device: str = "vhost-user-gpu-pci"
    #: outputs (heads) of gpu0: its max_outputs property
    heads: int = 1


def kernel_cmdline(mode: str, root: str, userspace_pci: str | None, hugepages: int,
                   extra: str = "") -> str:
    """The guest kernel command line read by guest_tests/boot/init."""
    words = ["console=ttyS0", "panic=-1", "quiet", "loglevel=4", f"hugepages={hugepages}",
             f"vgpu.mode={mode}", f"vgpu.root={root}"]
    if userspace_pci:
        words.append(f"vgpu.userspace_pci={userspace_pci}")
    return " ".join([*words, extra]).strip()


def parse_qemu_version(text: str) -> tuple[int, int, int]:
    """(major, minor, micro) from `qemu-system-x86_64 -version` output."""
    match = QEMU_VERSION_RE.search(text)
    if match is None:
        raise HarnessError(f"cannot read a QEMU version from {text.strip()[:200]!r}")
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def check_qemu_version(qemu: str, version: tuple[int, int, int]) -> None:
    """Raise unless `version` can run vhost-user-gpu under TCG."""
    if version[:2] < MIN_QEMU_VERSION:
        wanted = ".".join(map(str, MIN_QEMU_VERSION))
        raise HarnessError(
            f"{qemu} is QEMU {'.'.join(map(str, version))}, but vhost-user-gpu without KVM "
            f"needs QEMU >= {wanted} (Debian 12's 7.2 refuses vhost-user without KVM): run "
            "scripts/setup-host.sh, which installs QEMU 10 from bookworm-backports")


def find_qemu() -> str:
    """Path of a new enough qemu-system-x86_64, or a HarnessError telling how to get it."""
    found = shutil.which(QEMU_BINARY)
    if found is None:
        raise HarnessError(f"{QEMU_BINARY} not found: run scripts/setup-host.sh")
    try:
        done = subprocess.run([found, "-version"], capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise HarnessError(f"{found} -version failed: {error}") from error
    if done.returncode != 0:
        raise HarnessError(f"{found} -version exited with status {done.returncode}: "
                           f"{(done.stderr or done.stdout).strip()[:200]}")
    check_qemu_version(found, parse_qemu_version(done.stdout))
    return found


def qemu_command(layout: VmLayout, qemu: str = QEMU_BINARY) -> list[str]:
    """The argv that boots `layout`."""
    memory = f"{layout.memory_mib}M"
    argv = [
        qemu, "-machine", "q35,accel=tcg", "-cpu", "max", "-smp", str(layout.smp),
        "-m", f"{memory},slots={HOTPLUG_SLOTS},maxmem={layout.memory_mib + HOTPLUG_MAX_MIB}M",
        "-object", f"memory-backend-memfd,id=mem,size={memory},share=on" + (
            ",hugetlb=on,hugetlbsize=2M" if layout.host_hugetlb else ""),
        "-numa", "node,memdev=mem",
        "-nodefaults", "-display", "none", "-no-reboot",
        "-kernel", str(layout.kernel_image), "-initrd", str(layout.initramfs),
        "-append", layout.cmdline,
        "-chardev", f"file,id=serial0,path={layout.serial_log}", "-serial", "chardev:serial0",
        "-chardev", f"socket,id=qmp,path={layout.qmp_socket},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", f"socket,id=control,path={layout.control_socket}",
        "-device", f"virtio-serial-pci,id=vserial,addr={CONTROL_SLOT}",
        "-device", f"virtserialport,bus=vserial.0,chardev=control,name={CONTROL_PORT_NAME}",
    ]
    for index, socket in enumerate(layout.gpu_sockets):
        argv += ["-chardev", f"socket,id=vgpu{index},path={socket}",
                 "-device", f"{layout.gpu_device if index == 0 else GPU_DEVICES[0]},"
                            f"chardev=vgpu{index},id={GPU_IDS[index]},addr={GPU_SLOTS[index]}"
                            + (f",max_outputs={layout.heads}"
                               if index == 0 and layout.heads > 1 else "")]
    for share in layout.shares:
        options = f"local,id=fs-{share.tag},path={share.path},security_model=none"
        if share.readonly:
            options += ",readonly=on"
        if share.tag == "hostroot":
            options += ",multidevs=remap"
        argv += ["-fsdev", options,
                 "-device", f"virtio-9p-pci,fsdev=fs-{share.tag},mount_tag={share.tag},"
                            f"addr={SHARE_SLOTS[share.tag]}"]
    if layout.root_image is not None:
        argv += ["-drive", f"file={layout.root_image},if=none,id=root,format=raw,readonly=on",
                 "-device", f"virtio-blk-pci,drive=root,addr={ROOT_DISK_SLOT}"]
    return argv
