"""The modern virtio-pci transport (virtio 1.x, 4.1.4) from userspace.

The vendor capabilities (0x09) locate the common configuration, notification, ISR and
device configuration structures inside the BARs; this class maps those BARs and speaks
the device-status protocol: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queues,
DRIVER_OK.  Interrupts stay off (INTx masked, no MSI-X vectors): the driver polls.
"""

from __future__ import annotations

import time
from enum import IntEnum, IntFlag
from typing import Final, NamedTuple

from guest_tests.userspace.pci import Bar, PciFunction, VirtioPciCap
from protocol.wire import U8, U16, U32, layout, wire

__all__ = ["CfgType", "CommonCfg", "DeviceStatus", "TransportError", "VirtioPciTransport"]

NO_VECTOR: Final = 0xFFFF
_NOTIFY_MULTIPLIER_AT: Final = layout(VirtioPciCap).size


class TransportError(RuntimeError):
    """The device did not behave as the virtio-pci transport requires."""


class CfgType(IntEnum):
    """``virtio_pci_cap.cfg_type``."""

    COMMON = 1
    NOTIFY = 2
    ISR = 3
    DEVICE = 4
    PCI = 5
    SHARED_MEMORY = 8


class DeviceStatus(IntFlag):
    """``device_status`` bits."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    NEEDS_RESET = 0x40
    FAILED = 0x80


@wire("struct virtio_pci_common_cfg")
class CommonCfg(NamedTuple):
    """``struct virtio_pci_common_cfg { le32 device_feature_select; le32 device_feature;
    le32 driver_feature_select; le32 driver_feature; le16 config_msix_vector;
    le16 num_queues; u8 device_status; u8 config_generation; le16 queue_select;
    le16 queue_size; le16 queue_msix_vector; le16 queue_enable; le16 queue_notify_off;
    le64 queue_desc; le64 queue_driver; le64 queue_device; };`` -- the 64-bit
    addresses as lo/hi halves, written with two 32-bit stores as the spec allows."""

    device_feature_select: U32
    device_feature: U32
    driver_feature_select: U32
    driver_feature: U32
    config_msix_vector: U16
    num_queues: U16
    device_status: U8
    config_generation: U8
    queue_select: U16
    queue_size: U16
    queue_msix_vector: U16
    queue_enable: U16
    queue_notify_off: U16
    queue_desc_lo: U32
    queue_desc_hi: U32
    queue_driver_lo: U32
    queue_driver_hi: U32
    queue_device_lo: U32
    queue_device_hi: U32


#: field name -> (offset, width) in the common configuration structure
_FIELDS: Final = {name: (int(spec[1]), spec[0].itemsize)
                  for name, spec in (layout(CommonCfg).dtype.fields or {}).items()}


class _Window(NamedTuple):
    bar: Bar
    offset: int
    length: int


class VirtioPciTransport:
    """A modern virtio-pci function: capabilities parsed, BARs mapped, bus mastering on."""

    def __init__(self, function: PciFunction) -> None:
        self.function = function
        found: dict[int, tuple[VirtioPciCap, bytes]] = {}
        for cap, raw in function.virtio_capabilities():
            found.setdefault(cap.cfg_type, (cap, raw))  # the first of each type is preferred
        missing = [t.name for t in (CfgType.COMMON, CfgType.NOTIFY, CfgType.ISR, CfgType.DEVICE)
                   if t not in found]
        if missing:
            raise TransportError(f"{function.address}: no virtio {', '.join(missing)} "
                                 "capability (not a modern virtio-pci device?)")
        self.capabilities = {CfgType(t): cap for t, (cap, _) in found.items() if t in
                             CfgType._value2member_map_}
        notify_raw = found[CfgType.NOTIFY][1]
        self.notify_multiplier = int.from_bytes(
            notify_raw[_NOTIFY_MULTIPLIER_AT:_NOTIFY_MULTIPLIER_AT + 4], "little")
        self.command = function.enable()
        self._bars: dict[int, Bar] = {}
        try:
            self._common = self._window(CfgType.COMMON)
            self._notify = self._window(CfgType.NOTIFY)
            self._isr = self._window(CfgType.ISR)
            self._device = self._window(CfgType.DEVICE)
        except BaseException:
            self.close()
            raise
        self._notify_offsets: dict[int, int] = {}

    def _window(self, cfg_type: CfgType) -> _Window:
        cap = self.capabilities[cfg_type]
        if cap.bar not in self._bars:
            self._bars[cap.bar] = self.function.map_bar(cap.bar)
        bar = self._bars[cap.bar]
        if cap.offset + cap.length > bar.size:
            raise TransportError(f"{cfg_type.name} structure {cap.offset:#x}+{cap.length:#x} "
                                 f"is outside BAR{cap.bar} ({bar.size:#x} bytes)")
        return _Window(bar, cap.offset, cap.length)

    # --- common configuration ------------------------------------------------------

    def read(self, name: str) -> int:
        """Read a ``virtio_pci_common_cfg`` field."""
        offset, width = _FIELDS[name]
        return self._common.bar.read(self._common.offset + offset, width)

    def write(self, name: str, value: int) -> None:
        """Write a ``virtio_pci_common_cfg`` field."""
        offset, width = _FIELDS[name]
        self._common.bar.write(self._common.offset + offset, width, value)

    @property
    def status(self) -> DeviceStatus:
        """``device_status``."""
        return DeviceStatus(self.read("device_status"))

    def add_status(self, bits: DeviceStatus) -> None:
        """Set more status bits (never clears one)."""
        self.write("device_status", int(self.status | bits))

    def reset(self, timeout: float = 10.0) -> None:
        """Write 0 to ``device_status`` and wait until the device reads back 0."""
        self.write("device_status", 0)
        deadline = time.monotonic() + timeout
        while self.read("device_status") != 0:
            if time.monotonic() > deadline:
                raise TransportError(f"{self.function.address}: reset did not complete")
            time.sleep(0.001)
        self._notify_offsets.clear()

    def device_features(self) -> int:
        """The 64 feature bits the device offers."""
        bits = 0
        for select in (0, 1):
            self.write("device_feature_select", select)
            bits |= self.read("device_feature") << (32 * select)
        return bits

    def set_driver_features(self, bits: int) -> None:
        """Write the 64 feature bits the driver accepts."""
        for select in (0, 1):
            self.write("driver_feature_select", select)
            self.write("driver_feature", (bits >> (32 * select)) & 0xFFFF_FFFF)

    @property
    def num_queues(self) -> int:
        """Queues the device has."""
        return self.read("num_queues")

    def queue_max_size(self, index: int) -> int:
        """The size the device proposes for queue ``index`` (0: unavailable)."""
        self.write("queue_select", index)
        return self.read("queue_size")

    def setup_queue(self, index: int, size: int, desc: int, driver: int, device: int) -> None:
        """Program and enable queue ``index`` (guest-physical ring addresses)."""
        self.write("queue_select", index)
        if self.read("queue_enable"):
            raise TransportError(f"queue {index} is already enabled (reset the device first)")
        self.write("queue_size", size)
        self.write("queue_msix_vector", NO_VECTOR)
        for name, address in (("queue_desc", desc), ("queue_driver", driver),
                              ("queue_device", device)):
            self.write(f"{name}_lo", address & 0xFFFF_FFFF)
            self.write(f"{name}_hi", address >> 32)
        self._notify_offsets[index] = self.read("queue_notify_off") * self.notify_multiplier
        self.write("queue_enable", 1)

    def notify(self, index: int) -> None:
        """Tell the device queue ``index`` has new buffers."""
        offset = self._notify.offset + self._notify_offsets[index]
        self._notify.bar.write(offset, 2, index)

    def read_isr(self) -> int:
        """Read (and thereby clear) the ISR status byte."""
        return self._isr.bar.read(self._isr.offset, 1)

    # --- device configuration ------------------------------------------------------

    def config_read(self, offset: int, width: int = 4) -> int:
        """Read the device-specific configuration, consistent across config_generation."""
        if offset + width > self._device.length:
            raise ValueError(f"device config {offset}+{width} beyond {self._device.length}")
        while True:
            generation = self.read("config_generation")
            value = self._device.bar.read(self._device.offset + offset, width)
            if self.read("config_generation") == generation:
                return value

    def close(self) -> None:
        """Unmap the BARs."""
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
