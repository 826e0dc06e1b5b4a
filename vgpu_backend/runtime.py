"""Wiring: guest memory, host GPU, device and vhost-user session on one event loop."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket

from vgpu_backend import __version__
from vgpu_backend.config import BackendConfig, ConfigError, host_gpu_error
from vgpu_backend.device import VirtioGpuDevice
from vgpu_backend.device_state import UserptrProtocol
from vgpu_backend.eventloop import EventLoop
from vgpu_backend.guest_memory import GuestMemory
from vgpu_backend.hostgpu.base import HostGpu, HostGpuError
from vgpu_backend.vhost_session import PROTOCOL_FEATURES, VhostUserSession, get_features_answer

__all__ = ["Backend"]

log = logging.getLogger("vgpu_backend")


def open_host_gpu(config: BackendConfig) -> HostGpu | None:
    """The host GPU the configuration asks for (None when nothing needs one)."""
    if config.device.userptr_protocol is UserptrProtocol.OFF and not config.device.compute:
        return None
    from vgpu_backend.hostgpu.factory import create_host_gpu, host_gpu_options
    try:
        gpu = create_host_gpu(host_gpu_options(config.host_gpu))
    except (HostGpuError, ValueError) as err:
        raise host_gpu_error(err) from err
    info = gpu.info()
    if config.userptr_required and not info.userptr_available:
        gpu.close()
        raise ConfigError(f"--userptr-protocol {config.device.userptr_protocol.value}: "
                          f"this host GPU cannot register USERPTR memory "
                          f"({info.userptr_detail}); leave --userptr-protocol out to serve "
                          "without it (USERPTR blobs answered ERR_UNSPEC)")
    return gpu


def open_fds() -> set[int]:
    """This process's open file descriptors (not the one listing them)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:  # listdir's own directory fd, closed by now
            continue
        fds.add(int(name))
    return fds


class Backend:
    """One back-end instance: serves a single front-end connection.

    :ivar leaks: what :meth:`close` found still allocated (empty when clean).
    """

    def __init__(self, loop: EventLoop, config: BackendConfig) -> None:
        self.loop = loop
        self.config = config
        self.memory = GuestMemory()
        self.leaks: list[str] = []
        self._fds_at_start = open_fds()
        self.host_gpu = open_host_gpu(config)
        self.device = VirtioGpuDevice(loop, self.memory, config.limits, config.device,
                                      self.host_gpu)
        self.session: VhostUserSession | None = None
        self._listener: socket.socket | None = None
        self._owned: tuple[str, int, int] | None = None  # path, st_dev, st_ino
        self._fds_with_gpu = open_fds()
        log.info("vgpu-backend %s: offering virtio features %#x, protocol features %#x; "
                 "userptr protocol %s; host GPU %s; %s", __version__,
                 get_features_answer(self.device), PROTOCOL_FEATURES,
                 config.device.userptr_protocol.value, _describe(self.host_gpu),
                 f"busy-polls up to {config.poll_max_us} us" if config.poll_max_us
                 else "no busy-polling")

    def listen(self, listener: socket.socket, owned_path: str | None = None) -> None:
        """Accept one connection on ``listener``, then stop listening.  ``owned_path``:
        the socket file this back-end created, removed when listening stops (unless
        something else has replaced it meanwhile)."""
        self._listener = listener
        self._owned = None
        if owned_path is not None:
            st = os.stat(owned_path)
            self._owned = (owned_path, st.st_dev, st.st_ino)
        listener.setblocking(False)
        log.info("listening on %s", listener.getsockname())
        self.loop.add_reader(listener.fileno(), self._accept)

    def _stop_listening(self) -> None:
        if self._listener is None:
            return
        self.loop.forget_fd(self._listener.fileno())
        self._listener.close()
        self._listener = None
        if self._owned is not None:
            path, dev, ino = self._owned
            self._owned = None
            with contextlib.suppress(OSError):
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == (dev, ino):
                    os.unlink(path)

    def _accept(self) -> None:
        if self._listener is None:
            return
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        self._stop_listening()
        log.info("front-end connected")
        self.serve(conn)

    def serve(self, conn: socket.socket) -> None:
        """Serve ``conn``; the loop stops when the front-end disconnects."""
        self.session = VhostUserSession(self.loop, conn, self.device, self.memory,
                                        self.config.limits, self.loop.stop)

    def close(self) -> None:
        """Free everything (session, guest memory, host GPU) and check that nothing is
        left: no host GPU mapping, no guest memory, no fd beyond those at start-up."""
        self._stop_listening()
        if self.session is not None:
            self.session.close()
        else:
            self.device.close()
            self.memory.clear()
        gc.collect()  # garbage cycles may still hold views of guest memory
        if self.device.leaked_mappings:
            self.leaks.append(f"{self.device.leaked_mappings} host GPU mapping(s) outlived "
                              "their resources")
        compute = self.device.compute
        if compute is not None and compute.queued_bytes:
            self.leaks.append(f"{compute.queued_bytes} bytes of compute submissions still "
                              "counted as queued")
        if self.host_gpu is not None and self.host_gpu.live_mappings():
            self.leaks.append(f"{self.host_gpu.live_mappings()} host GPU mapping(s)")
        if self.memory.regions:
            self.leaks.append(f"{len(self.memory.regions)} guest memory region(s)")
        extra = open_fds() - self._fds_with_gpu
        if self.host_gpu is not None:
            self.host_gpu.close()
            self.host_gpu = None
        extra |= open_fds() - self._fds_at_start
        if extra:
            self.leaks.append(f"fds {sorted(extra)} ({_describe_fds(extra)})")
        if self.leaks:
            log.error("leak check failed: %s", "; ".join(self.leaks))
        else:
            log.info("back-end stopped; leak check: no host GPU mapping, guest memory or "
                     "fd left")


def _describe(host_gpu: HostGpu | None) -> str:
    """The host GPU for the start-up line: back-end, USERPTR path and GPUs."""
    if host_gpu is None:
        return "none"
    info = host_gpu.info()
    path = f"{info.userptr_path.value} path" if info.userptr_available else \
        "USERPTR unavailable"
    return f"{info.backend} ({path}, GPUs {', '.join(hex(g) for g in info.gpu_ids)})"


def _describe_fds(fds: set[int]) -> str:
    out = []
    for fd in sorted(fds):
        try:
            out.append(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            out.append(f"{fd}->?")
    return ", ".join(out)
