"""Error hierarchy.

::

    VgpuError                      root of everything this project raises on purpose
    ├── GuestProtocolError         the ONLY error a guest can cause; carries a virtio-gpu
    │                              response code and becomes an error response (or, when
    │                              ``ring_fatal``, marks one virtqueue broken)
    ├── FrontendProtocolError      QEMU (the vhost-user front-end) broke the protocol;
    │                              the session ends
    ├── DisplayProtocolError       the display-socket peer sent something malformed;
    │                              the display socket is dropped
    └── StateError                 an operation was attempted in the wrong run state

Host-side failures (host GPU, KFD) have their own branch in ``vgpu_backend``.
"""

from __future__ import annotations

from protocol.virtio_gpu_codes import Resp

__all__ = [
    "DisplayProtocolError",
    "FrontendProtocolError",
    "GuestProtocolError",
    "StateError",
    "VgpuError",
]


class VgpuError(Exception):
    """Root of the project's error hierarchy."""


class GuestProtocolError(VgpuError):
    """The guest sent something invalid.

    :param message: what was wrong, for the log.
    :param resp_code: the ``VIRTIO_GPU_RESP_ERR_*`` code the guest receives.
    :param ring_fatal: the virtqueue itself is corrupt (loop in ``next``, head out of
        range, ...): no response can be written and the ring is marked broken.
    """

    def __init__(self, message: str, resp_code: Resp = Resp.ERR_INVALID_PARAMETER,
                 *, ring_fatal: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.resp_code = resp_code
        self.ring_fatal = ring_fatal

    def __str__(self) -> str:
        return f"{self.message} [{self.resp_code.name}]"


class FrontendProtocolError(VgpuError):
    """The vhost-user front-end sent a malformed or impossible request.

    :param fds: fds that arrived with the offending message; the I/O layer closes them.
    """

    def __init__(self, message: str, fds: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.fds = fds


class DisplayProtocolError(VgpuError):
    """The display socket peer sent a malformed message."""


class StateError(VgpuError):
    """An operation is not valid in the current run state.

    :param state: the state we are in.
    :param required: the state(s) the operation needs.
    """

    def __init__(self, message: str, state: object = None, required: object = None) -> None:
        super().__init__(message)
        self.state = state
        self.required = required
