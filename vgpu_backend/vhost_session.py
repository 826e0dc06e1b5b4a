"""The vhost-user back-end session with QEMU: requests in, replies out, fds owned.

Framing is done by the sans-IO :class:`~protocol.vhost_user_connection.BackendConnection`;
this module does the socket I/O and applies each request to the guest memory, the
virtqueues and the device.  A malformed stream ends the session; a bad request gets
a failure reply (when one is owed) and the session goes on.

Run states::

    CONNECTED --SET_OWNER--> OWNED --rings started--> RUNNING --GET_VRING_BASE--> STOPPED
        (any) --EOF--> CLOSED
"""

from __future__ import annotations

import enum
import logging
import os
import socket
from collections.abc import Callable

from protocol.errors import FrontendProtocolError, GuestProtocolError
from protocol.limits import Limits
from protocol.vhost_user import FrontendReq, ProtocolFeature, VringState
from protocol.vhost_user_connection import (
    REQUESTS_WITH_REPLY,
    BackendConnection,
    Request,
    VringFile,
    decode_config,
    decode_mem_table,
    decode_single_region,
    decode_u64,
    decode_vring_addr,
    decode_vring_file,
    decode_vring_state,
    encode_config,
)
from protocol.virtio_gpu_codes import Feature
from protocol.wire import encode
from vgpu_backend.device import VirtioGpuDevice
from vgpu_backend.eventloop import EventLoop
from vgpu_backend.guest_memory import GuestMemory
from vgpu_backend.virtqueue import Virtqueue

__all__ = ["PROTOCOL_FEATURES", "SessionState", "VhostUserSession", "get_features_answer"]

log = logging.getLogger(__name__)

#: vhost-user protocol features we offer
PROTOCOL_FEATURES = int(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
                        | ProtocolFeature.CONFIG | ProtocolFeature.CONFIGURE_MEM_SLOTS)
NUM_QUEUES = 2


def get_features_answer(device: VirtioGpuDevice) -> int:
    """GET_FEATURES' answer: the device's virtio feature bits and vhost-user's
    PROTOCOL_FEATURES bit (30)."""
    return device.offered_features() | int(Feature.PROTOCOL_FEATURES)


class SessionState(enum.Enum):
    """Run state of the session."""

    CONNECTED = "connected"
    OWNED = "owned"
    RUNNING = "running"
    STOPPED = "stopped"
    CLOSED = "closed"


class VhostUserSession:
    """Serve one front-end connection until it closes.

    :param on_closed: called once when the session ends (EOF or fatal error).
    """

    def __init__(self, loop: EventLoop, sock: socket.socket, device: VirtioGpuDevice,
                 memory: GuestMemory, limits: Limits, on_closed: Callable[[], None]) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._device = device
        self._memory = memory
        self._limits = limits
        self._on_closed = on_closed
        self._conn = BackendConnection(limits)
        self._out = bytearray()
        self.state = SessionState.CONNECTED
        self.features = 0
        self.protocol_features = 0
        self._backend_req_fd: int | None = None
        self._stopped_at: dict[int, tuple[int, tuple[int, int, int] | None]] = {}
        self._adopted = False
        self._started_once = False
        self._logged_features = False
        sock.setblocking(False)
        loop.add_reader(self._fd, self._readable)
        self._handlers: dict[int, Callable[[Request], bytes | bool | None]] = {
            FrontendReq.GET_FEATURES: self._get_features,
            FrontendReq.SET_FEATURES: self._set_features,
            FrontendReq.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            FrontendReq.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            FrontendReq.GET_QUEUE_NUM: lambda r: self._conn.reply_u64(r, NUM_QUEUES),
            FrontendReq.GET_MAX_MEM_SLOTS:
                lambda r: self._conn.reply_u64(r, self._limits.max_mem_slots),
            FrontendReq.SET_OWNER: self._set_owner,
            FrontendReq.RESET_OWNER: self._reset_owner,
            FrontendReq.RESET_DEVICE: self._reset_owner,
            FrontendReq.SET_MEM_TABLE: self._set_mem_table,
            FrontendReq.ADD_MEM_REG: self._add_mem_reg,
            FrontendReq.REM_MEM_REG: self._rem_mem_reg,
            FrontendReq.SET_VRING_NUM: self._set_vring_num,
            FrontendReq.SET_VRING_ADDR: self._set_vring_addr,
            FrontendReq.SET_VRING_BASE: self._set_vring_base,
            FrontendReq.GET_VRING_BASE: self._get_vring_base,
            FrontendReq.SET_VRING_KICK: self._set_vring_kick,
            FrontendReq.SET_VRING_CALL: self._set_vring_call,
            FrontendReq.SET_VRING_ERR: self._set_vring_err,
            FrontendReq.SET_VRING_ENABLE: self._set_vring_enable,
            FrontendReq.GET_CONFIG: self._get_config,
            FrontendReq.SET_CONFIG: self._set_config,
            FrontendReq.GPU_SET_SOCKET: self._gpu_set_socket,
            FrontendReq.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
        }

    # --- I/O -----------------------------------------------------------------------

    def _readable(self) -> None:
        while self.state is not SessionState.CLOSED:
            try:
                data, fds, flags, _ = socket.recv_fds(
                    self._sock, self._conn.bytes_wanted(), self._limits.max_fds_per_message)
            except BlockingIOError:
                return
            except OSError as err:
                log.error("vhost-user socket: %s", err)
                self.close()
                return
            if not data:
                for fd in fds + list(self._conn.pending_fds()):
                    os.close(fd)
                log.info("front-end disconnected")
                self.close()
                return
            try:
                if flags & socket.MSG_CTRUNC:
                    raise FrontendProtocolError("too many fds with one message", tuple(fds))
                requests = self._conn.receive(data, fds)
            except FrontendProtocolError as err:
                for fd in err.fds:
                    os.close(fd)
                log.error("front-end broke the protocol (%s); closing the session", err)
                self.close()
                return
            for request in requests:
                self._handle(request)

    def _send(self, data: bytes) -> None:
        if self._out:
            self._out += data
            return
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as err:
            log.error("vhost-user socket: %s", err)
            self.close()
            return
        if sent < len(data):
            self._out += data[sent:]
            self._loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        try:
            sent = self._sock.send(self._out)
        except BlockingIOError:
            return
        except OSError as err:
            log.error("vhost-user socket: %s", err)
            self.close()
            return
        del self._out[:sent]
        if not self._out:
            self._loop.remove_writer(self._fd)

    # --- dispatch ------------------------------------------------------------------

    def _handle(self, req: Request) -> None:
        log.debug("<- %s flags=%#x size=%d fds=%d", req.name, req.flags, len(req.payload),
                  len(req.fds))
        reply_ack = bool(self.protocol_features & ProtocolFeature.REPLY_ACK)
        handler = self._handlers.get(req.code)
        if handler is None:
            log.warning("unsupported vhost-user request %s (flags %#x, %d bytes, %d fds)",
                        req.name, req.flags, len(req.payload), len(req.fds))
            for fd in req.fds:
                os.close(fd)
            if req.code in REQUESTS_WITH_REPLY:
                self._send(self._conn.reply(req, b""))  # an empty reply reports failure
            elif req.need_reply:
                self._send(self._conn.reply_u64(req, 1))
            return
        self._adopted = False  # handlers set it when they take the request's fds
        try:
            result = handler(req)
        except (FrontendProtocolError, GuestProtocolError) as err:
            log.error("%s failed: %s", req.name, err)
            # a request with a reply body gets an empty one, which reports failure
            result = self._conn.reply(req, b"") if req.code in REQUESTS_WITH_REPLY else False
        finally:
            if not self._adopted:
                for fd in req.fds:
                    os.close(fd)
        if isinstance(result, bytes):
            self._send(result)
            return
        ack = self._conn.ack(req, result is not False, reply_ack)
        if ack is not None:
            self._send(ack)

    # --- features ------------------------------------------------------------------

    def _get_features(self, req: Request) -> bytes:
        return self._conn.reply_u64(req, get_features_answer(self._device))

    def _set_features(self, req: Request) -> None:
        value = decode_u64(req)
        if value & Feature.RING_PACKED:
            raise FrontendProtocolError("packed virtqueues are not supported "
                                        "(do not set packed=on on the device)")
        self.features = value
        self._device.set_features(value)
        if not self._logged_features:
            self._logged_features = True
            log.info("negotiated virtio features %#x (offered %#x), protocol features %#x "
                     "(offered %#x)", value, get_features_answer(self._device),
                     self.protocol_features, PROTOCOL_FEATURES)

    def _get_protocol_features(self, req: Request) -> bytes:
        return self._conn.reply_u64(req, PROTOCOL_FEATURES)

    def _set_protocol_features(self, req: Request) -> None:
        self.protocol_features = decode_u64(req) & PROTOCOL_FEATURES

    def _set_owner(self, req: Request) -> None:
        if self.state is SessionState.CONNECTED:
            self.state = SessionState.OWNED

    def _reset_owner(self, req: Request) -> None:
        log.info("%s: resetting the device and dropping guest memory", req.name)
        for queue in self._device.queues:
            queue.stop()
        self._device.reset()
        self._memory.clear()
        self.state = SessionState.OWNED

    # --- memory ----------------------------------------------------------------------

    def _set_mem_table(self, req: Request) -> None:
        regions = decode_mem_table(req)
        self._adopted = True  # replace_all owns them now, also when it fails
        self._memory.replace_all(regions, list(req.fds), self._limits.max_mem_slots)
        self._remap_rings()

    def _add_mem_reg(self, req: Request) -> None:
        if len(req.fds) != 1:
            raise FrontendProtocolError(f"ADD_MEM_REG with {len(req.fds)} fds")
        region = decode_single_region(req)
        self._adopted = True  # GuestMemory.add owns it now, also when it fails
        self._memory.add(region, req.fds[0], self._limits.max_mem_slots)
        self._remap_rings()

    def _rem_mem_reg(self, req: Request) -> bool:
        # (QEMU may attach the region's fd: unused, closed by _handle; we match by address)
        found = self._memory.remove(decode_single_region(req))
        if not found:
            log.warning("REM_MEM_REG for a region we do not have")
        self._remap_rings()
        return found

    def _remap_rings(self) -> None:
        for queue in self._device.queues:
            queue.map_rings()
        for queue in self._device.queues:
            self._device.process(queue.index)

    # --- rings -----------------------------------------------------------------------

    def _queue(self, index: int) -> Virtqueue:
        if index >= NUM_QUEUES:
            raise FrontendProtocolError(f"queue index {index} (the device has {NUM_QUEUES})")
        return self._device.queues[index]

    def _set_vring_num(self, req: Request) -> None:
        state = decode_vring_state(req)
        self._queue(state.queue).set_num(state.num)

    def _set_vring_addr(self, req: Request) -> None:
        addr = decode_vring_addr(req)
        self._queue(addr.queue).set_addr(addr.desc_user_addr, addr.used_user_addr,
                                         addr.avail_user_addr)

    def _set_vring_base(self, req: Request) -> None:
        state = decode_vring_state(req)
        self._queue(state.queue).set_base(state.num)

    def _get_vring_base(self, req: Request) -> bytes:
        state = decode_vring_state(req)
        queue = self._queue(state.queue)
        if state.queue == 0:
            self._device.quiesce()
        base = queue.stop()
        self._stopped_at[state.queue] = (base, queue.addr)
        self._close_ring_fd(queue, "kick_fd")
        self.state = SessionState.STOPPED
        log.info("queue %d stopped at avail index %d", state.queue, base)
        return self._conn.reply(req, encode(VringState(state.queue, base)))

    def _close_ring_fd(self, queue: Virtqueue, attr: str) -> None:
        fd = getattr(queue, attr)
        if fd is not None:
            self._loop.forget_fd(fd)
            os.close(fd)
            setattr(queue, attr, None)

    def _ring_file(self, req: Request) -> tuple[VringFile, Virtqueue]:
        """SET_VRING_KICK/CALL/ERR: the request and its queue; the fd, if any, is an
        eventfd (QEMU's event notifiers).  Another kind of fd would fail later, out of
        the event loop: epoll refuses a regular file, a pipe's short read is an error, a
        write to a full pipe blocks.

        :raise FrontendProtocolError: not an eventfd (the request fails; the fd is
            closed and the ring keeps what it had).
        """
        vfile = decode_vring_file(req)
        queue = self._queue(vfile.index)
        if vfile.fd is not None:
            try:
                kind = os.readlink(f"/proc/self/fd/{vfile.fd}")
            except OSError as err:
                raise FrontendProtocolError(
                    f"{req.name}: fd {vfile.fd}: {err.strerror or err}") from None
            if kind != "anon_inode:[eventfd]":
                raise FrontendProtocolError(
                    f"{req.name}: fd {vfile.fd} is not an eventfd ({kind})")
        return vfile, queue

    def _set_vring_kick(self, req: Request) -> None:
        vfile, queue = self._ring_file(req)
        device = self._device
        self._close_ring_fd(queue, "kick_fd")
        self._adopted = True
        if vfile.index == 0 and self._started_once and \
                self._stopped_at.get(0) != (queue.last_avail, queue.addr):
            # The control ring restarts elsewhere than where it stopped: the guest reset
            # the device (VM stop/cont resumes at the saved index and addresses).
            log.info("control ring restarts at %d (stopped at %s): guest device reset",
                     queue.last_avail, self._stopped_at.get(0))
            device.reset()
        queue.kick_fd = vfile.fd
        queue.started = True
        self._started_once = True
        self.state = SessionState.RUNNING
        if not self.features & Feature.PROTOCOL_FEATURES:
            queue.enabled = True  # without protocol features rings start enabled
        if vfile.fd is not None:
            os.set_blocking(vfile.fd, False)

            def kicked() -> None:
                queue.drain_kick()
                device.process(queue.index)
            self._loop.add_reader(vfile.fd, kicked)
        else:
            log.warning("queue %d has no kick fd (polling is not supported)", vfile.index)
        device.process(queue.index)

    def _set_vring_call(self, req: Request) -> None:
        vfile, queue = self._ring_file(req)
        self._close_ring_fd(queue, "call_fd")
        queue.call_fd = vfile.fd
        self._adopted = True

    def _set_vring_err(self, req: Request) -> None:
        vfile, queue = self._ring_file(req)
        self._close_ring_fd(queue, "err_fd")
        queue.err_fd = vfile.fd
        self._adopted = True

    def _set_vring_enable(self, req: Request) -> None:
        state = decode_vring_state(req)
        self._queue(state.queue).enabled = bool(state.num)
        if state.num:
            self._device.process(state.queue)

    # --- config, display, back-end channel ----------------------------------------------

    def _get_config(self, req: Request) -> bytes:
        cfg = decode_config(req)
        space = self._device.config_space()
        if cfg.offset + cfg.size > len(space):
            log.warning("GET_CONFIG of %d bytes at %d: our config has %d", cfg.size,
                        cfg.offset, len(space))
            return self._conn.reply(req, b"")
        return self._conn.reply(
            req, encode_config(cfg.offset, cfg.flags, space[cfg.offset:cfg.offset + cfg.size]))

    def _set_config(self, req: Request) -> None:
        decode_config(req)  # events_clear: QEMU owns events_read; nothing to keep

    def _gpu_set_socket(self, req: Request) -> None:
        if len(req.fds) != 1:
            raise FrontendProtocolError(f"GPU_SET_SOCKET with {len(req.fds)} fds")
        self._adopted = True
        self._device.attach_display(req.fds[0])

    def _set_backend_req_fd(self, req: Request) -> None:
        if len(req.fds) != 1:
            raise FrontendProtocolError(f"SET_BACKEND_REQ_FD with {len(req.fds)} fds")
        if self._backend_req_fd is not None:
            os.close(self._backend_req_fd)
        self._backend_req_fd = req.fds[0]
        self._adopted = True

    # --- teardown ------------------------------------------------------------------

    def close(self) -> None:
        """End the session: free every resource, guest memory and fd.  Idempotent."""
        if self.state is SessionState.CLOSED:
            return
        self.state = SessionState.CLOSED
        self._loop.forget_fd(self._fd)
        self._device.close()
        for queue in self._device.queues:
            for attr in ("kick_fd", "call_fd", "err_fd"):
                self._close_ring_fd(queue, attr)
            queue.drop_memory()
        self._memory.clear()
        if self._backend_req_fd is not None:
            os.close(self._backend_req_fd)
            self._backend_req_fd = None
        self._sock.close()
        self._on_closed()
