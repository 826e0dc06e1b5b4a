"""How the KFD driver reaches the kernel: device nodes, ioctls and sysfs.

:class:`KfdTransport` is everything :class:`~vgpu_backend.hostgpu.kfd.KfdHostGpu` may
do to the outside world; :class:`OsTransport` does it for real (``os.open``,
``fcntl.ioctl`` on a mutable buffer, ``/sys``), and
:class:`~vgpu_backend.hostgpu.sim_kfd.SimTransport` does it against the simulated KFD.
Pointers inside ioctl structs (range lists, device-id arrays, aperture arrays) are real
addresses of buffers in this process in both cases.
"""

from __future__ import annotations

import abc
import fcntl
import os

from vgpu_backend.hostgpu.base import GpuMemory

__all__ = ["KFD_TOPOLOGY", "KfdTransport", "OsTransport"]

#: sysfs directory holding one sub-directory per KFD topology node
KFD_TOPOLOGY = "/sys/devices/virtual/kfd/kfd/topology/nodes"


class KfdTransport(abc.ABC):
    """Device nodes, ioctls and sysfs, as the KFD driver needs them."""

    #: "kfd" or "sim", for logs
    name: str = "?"

    @abc.abstractmethod
    def open(self, path: str) -> int:
        """Open a device node read-write, close-on-exec; raise ``OSError`` on failure."""

    @abc.abstractmethod
    def close(self, fd: int) -> None:
        """Close a descriptor returned by :meth:`open`."""

    @abc.abstractmethod
    def ioctl(self, fd: int, request: int, arg: bytearray | None) -> None:
        """Issue ``ioctl(fd, request, arg)``; ``arg`` is updated in place with what the
        kernel copied back, *also when the call fails*.  ``None`` passes 0.

        :raise OSError: the ioctl failed (``errno`` set).
        """

    @abc.abstractmethod
    def exists(self, path: str) -> bool:
        """A device node or sysfs entry exists."""

    @abc.abstractmethod
    def read_text(self, path: str) -> str:
        """Contents of a sysfs text file."""

    @abc.abstractmethod
    def list_dir(self, path: str) -> list[str]:
        """Entries of a sysfs directory."""

    def mmu_notify(self, addr: int, length: int) -> None:  # noqa: B027 - real kernels do it
        """Host memory ``[addr, addr+length)`` is about to be unmapped.

        A real kernel learns this through its MMU notifier by itself; the simulated
        kernel is told here so that it can invalidate userptr BOs in time.
        """

    def gpu_memory(self, kfd_fd: int, gpu_id: int) -> GpuMemory | None:
        """The GPU page table of the KFD process behind ``kfd_fd`` on ``gpu_id``, when
        the GPU is simulated; ``None`` for real hardware."""
        return None


class OsTransport(KfdTransport):
    """The real kernel: ``/dev/kfd``, ``/dev/dri/renderD*`` and ``/sys``."""

    name = "kfd"

    def open(self, path: str) -> int:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def close(self, fd: int) -> None:
        os.close(fd)

    def ioctl(self, fd: int, request: int, arg: bytearray | None) -> None:
        # With a mutable buffer of <= 1024 bytes CPython copies the kernel's result back
        # into ``arg`` before raising OSError, which MAP/UNMAP's n_success relies on.
        if arg is None:
            fcntl.ioctl(fd, request, 0)
        else:
            fcntl.ioctl(fd, request, arg, True)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def read_text(self, path: str) -> str:
        with open(path, encoding="ascii") as f:
            return f.read()

    def list_dir(self, path: str) -> list[str]:
        return os.listdir(path)
