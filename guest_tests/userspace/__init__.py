"""A userspace virtio-gpu driver for the scripts/vm.py guest (pure Python, no kernel driver).

It drives the PCI function that ``vm.py --second-gpu`` keeps away from every kernel driver,
through sysfs: config space and capabilities (:mod:`.pci`), the modern virtio-pci
transport (:mod:`.transport`), split rings in a hugetlbfs page (:mod:`.dma`,
:mod:`.vring`), virtio-gpu commands (:mod:`.gpu`), USERPTR blobs made of a program's own
pinned pages (:mod:`.pinned`) and compute streams on the host engine (:mod:`.compute`).
Nothing raises interrupts: completions are found by polling the used ring.

Runs under the guest's Debian python3 (3.11, numpy 1.24) as root (pagemap PFNs, sysfs
resource files and mlock need it).
"""

from guest_tests.userspace.gpu import (
    DeviceTimeout,
    GpuResponse,
    UserptrBlob,
    VirtioGpu,
)
from guest_tests.userspace.pinned import PinnedBuffer, coalesce_pages

__all__ = [
    "DeviceTimeout",
    "GpuResponse",
    "PinnedBuffer",
    "UserptrBlob",
    "VirtioGpu",
    "coalesce_pages",
]
