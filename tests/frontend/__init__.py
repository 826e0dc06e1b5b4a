"""A front-end simulator that plays QEMU against a real vhost-user-gpu back-end process.

Layers, bottom up: :mod:`~tests.frontend.guest_ram` (memfd guest RAM, regions, page
allocator), :mod:`~tests.frontend.virtqueue_driver` (split rings, driver side),
:mod:`~tests.frontend.gpu_commands` / :mod:`~tests.frontend.gpu_driver` (the virtio-gpu
guest driver), :mod:`~tests.frontend.display_peer` (QEMU's display socket and console),
:mod:`~tests.frontend.vhost_frontend` (vhost-user requests, replies checked like QEMU),
:mod:`~tests.frontend.backend_process` (process control) and
:mod:`~tests.frontend.session` (whole-VM sequences).  Scripts import it after putting
the repository root on ``sys.path``.
"""

from tests.frontend.backend_process import OURS_COMMAND, REFERENCE_COMMAND, BackendProcess
from tests.frontend.flavour import FLAVOURS, QEMU_7_2, QEMU_10, QemuFlavour
from tests.frontend.session import Session, SessionConfig

__all__ = [
    "FLAVOURS",
    "OURS_COMMAND",
    "QEMU_7_2",
    "QEMU_10",
    "REFERENCE_COMMAND",
    "BackendProcess",
    "QemuFlavour",
    "Session",
    "SessionConfig",
]
