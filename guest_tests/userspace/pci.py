"""A PCI function seen through sysfs: config space, capabilities, BAR mappings.

Config space is read and written through ``/sys/bus/pci/devices/ADDR/config`` with the
access width asked for; BARs are mapped from ``resourceN``.  Register accesses on a
mapped BAR go through ctypes at an exact width (one load or store each), as MMIO needs:
a ``memcpy`` may split or repeat accesses.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

from protocol.wire import U8, U32, decode, layout, wire

__all__ = [
    "PCI_DEVICES",
    "Bar",
    "Capability",
    "PciFunction",
    "VirtioPciCap",
    "buffer_address",
    "find_unbound_function",
]

PCI_DEVICES: Final = Path("/sys/bus/pci/devices")
PCI_COMMAND: Final = 0x04
PCI_STATUS: Final = 0x06
PCI_CAPABILITY_LIST: Final = 0x34
PCI_STATUS_CAP_LIST: Final = 0x10
CMD_MEMORY: Final = 0x0002
CMD_BUS_MASTER: Final = 0x0004
CMD_INTX_DISABLE: Final = 0x0400
CAP_VENDOR_SPECIFIC: Final = 0x09


@wire("struct virtio_pci_cap")
class VirtioPciCap(NamedTuple):
    """``struct virtio_pci_cap { u8 cap_vndr; u8 cap_next; u8 cap_len; u8 cfg_type;
    u8 bar; u8 id; u8 padding[2]; le32 offset; le32 length; };`` (virtio 1.x, 4.1.4);
    the notify capability appends ``le32 notify_off_multiplier``."""

    cap_vndr: U8
    cap_next: U8
    cap_len: U8
    cfg_type: U8
    bar: U8
    id: U8
    padding0: U8
    padding1: U8
    offset: U32
    length: U32


@dataclass(frozen=True)
class Capability:
    """One entry of the capability list: its id, config offset and raw bytes."""

    cap_id: int
    offset: int
    data: bytes


def buffer_address(buffer: mmap.mmap) -> int:
    """The virtual address of a writable mapping (the temporary export is released)."""
    anchor = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


class Bar:
    """A mapped memory BAR; every access is one load or store of the given width."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size
        fd = os.open(path, os.O_RDWR | os.O_SYNC)
        try:
            self._map = mmap.mmap(fd, self.size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.address = buffer_address(self._map)

    _TYPES: Final = {1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32}

    def _at(self, offset: int, width: int) -> ctypes._SimpleCData[int]:
        if offset < 0 or offset + width > self.size or offset % width:
            raise ValueError(f"{width}-byte access at {offset:#x} of a {self.size:#x}-byte BAR")
        return self._TYPES[width].from_address(self.address + offset)

    def read(self, offset: int, width: int) -> int:
        """Load ``width`` (1, 2 or 4) bytes at ``offset``."""
        return int(self._at(offset, width).value)

    def write(self, offset: int, width: int, value: int) -> None:
        """Store ``width`` (1, 2 or 4) bytes at ``offset``."""
        self._at(offset, width).value = value

    def close(self) -> None:
        """Unmap (accesses afterwards are refused by the closed mapping)."""
        self.address = 0
        self._map.close()


class PciFunction:
    """One PCI function by its sysfs address (``0000:00:0a.0``)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sysfs = PCI_DEVICES / address
        if not self.sysfs.is_dir():
            raise FileNotFoundError(f"no PCI function {address}")

    def _attribute(self, name: str) -> int:
        return int((self.sysfs / name).read_text().strip(), 16)

    @property
    def vendor(self) -> int:
        """PCI vendor id."""
        return self._attribute("vendor")

    @property
    def device(self) -> int:
        """PCI device id."""
        return self._attribute("device")

    @property
    def driver(self) -> str | None:
        """The bound kernel driver's name, if any."""
        link = self.sysfs / "driver"
        return link.resolve().name if link.exists() else None

    def config_read(self, offset: int, width: int) -> int:
        """Read ``width`` bytes of config space."""
        fd = os.open(self.sysfs / "config", os.O_RDONLY)
        try:
            data = os.pread(fd, width, offset)
        finally:
            os.close(fd)
        if len(data) != width:
            raise OSError(f"{self.address}: config read at {offset:#x} returned {len(data)}")
        return int.from_bytes(data, "little")

    def config_write(self, offset: int, width: int, value: int) -> None:
        """Write ``width`` bytes of config space."""
        fd = os.open(self.sysfs / "config", os.O_WRONLY)
        try:
            written = os.pwrite(fd, value.to_bytes(width, "little"), offset)
        finally:
            os.close(fd)
        if written != width:
            raise OSError(f"{self.address}: config write at {offset:#x} wrote {written}")

    def config_bytes(self, size: int = 256) -> bytes:
        """The first ``size`` bytes of config space."""
        return (self.sysfs / "config").read_bytes()[:size]

    def capabilities(self) -> Iterator[Capability]:
        """The standard capability list (ids, offsets, bytes up to the next 256 limit)."""
        config = self.config_bytes()
        if not int.from_bytes(config[PCI_STATUS:PCI_STATUS + 2], "little") & PCI_STATUS_CAP_LIST:
            return
        pointer, seen = config[PCI_CAPABILITY_LIST] & ~3, 0
        while pointer and seen < 48:  # 48 = (256 - 64) / 4: a loop guard
            yield Capability(config[pointer], pointer, config[pointer:])
            pointer, seen = config[pointer + 1] & ~3, seen + 1

    def virtio_capabilities(self) -> Iterator[tuple[VirtioPciCap, bytes]]:
        """Every virtio vendor capability, decoded, with its raw bytes."""
        size = layout(VirtioPciCap).size
        for cap in self.capabilities():
            if cap.cap_id == CAP_VENDOR_SPECIFIC and len(cap.data) >= size:
                record = decode(VirtioPciCap, cap.data)
                yield record, cap.data[:max(record.cap_len, size)]

    def enable(self) -> int:
        """Enable memory decoding and bus mastering, mask INTx; returns the command word."""
        command = self.config_read(PCI_COMMAND, 2)
        command |= CMD_MEMORY | CMD_BUS_MASTER | CMD_INTX_DISABLE
        self.config_write(PCI_COMMAND, 2, command)
        return self.config_read(PCI_COMMAND, 2)

    def map_bar(self, index: int) -> Bar:
        """Map memory BAR ``index`` through ``resourceN``."""
        return Bar(self.sysfs / f"resource{index}")


def find_unbound_function(vendor: int, device: int, preferred: str = "") -> PciFunction:
    """The PCI function with these ids and no kernel driver (``preferred`` if given)."""
    candidates = [preferred] if preferred else sorted(p.name for p in PCI_DEVICES.iterdir())
    for address in candidates:
        function = PciFunction(address)
        if function.vendor == vendor and function.device == device and function.driver is None:
            return function
    where = preferred or "any PCI slot"
    raise FileNotFoundError(f"no unbound PCI function {vendor:04x}:{device:04x} at {where}")
