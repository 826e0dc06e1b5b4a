"""A whole simulated VM: QEMU's message sequences over one back-end connection.

:class:`Session` owns the guest RAM, the eventfds, the two queue drivers, the guest
GPU driver, the display peer(s) and the vhost-user front-end, and plays the sequences
of the protocol doc §2 (recorded in ``qemu-7.2-vhost-user-gpu-trace.txt``):
:meth:`realize` (device init), :meth:`probe` (guest config reads), :meth:`driver_ok`
(start), :meth:`stop` / :meth:`cont` (VM stop/cont), :meth:`restart_queue` (queue
reset), :meth:`close` (QEMU exits; the back-end must exit 0).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from protocol.display import DisplayReq
from protocol.vhost_user import FrontendReq, ProtocolFeature
from protocol.virtio_gpu import DisplayOne, GpuConfig
from protocol.virtio_gpu_codes import Feature
from protocol.wire import decode
from tests.frontend.backend_process import BackendProcess
from tests.frontend.display_peer import DisplayPeer, SimulatedConsole, default_modes
from tests.frontend.flavour import QEMU_10, QemuFlavour
from tests.frontend.gpu_driver import GpuDriver
from tests.frontend.guest_ram import GuestRam
from tests.frontend.vhost_frontend import ReplyError, VhostUserFrontend
from tests.frontend.virtqueue_driver import SplitQueueDriver

__all__ = ["Session", "SessionConfig", "close_sessions"]

MiB = 1024 * 1024
CTRL, CURSOR = 0, 1


@dataclass(slots=True)
class SessionConfig:
    """How the simulated VM is set up."""

    flavour: QemuFlavour = QEMU_10
    ram_size: int = 64 * MiB
    #: two vhost-user regions, split at this offset (QEMU's below/above-4G layout)
    split_at: int | None = None
    #: guest-physical start of the second region (default 4 GiB; = split_at: adjacent)
    high_gpa: int | None = None
    ctrl_size: int = 64
    cursor_size: int = 16
    num_scanouts: int = 1
    modes: Sequence[DisplayOne] | None = None
    #: feature bits the guest does not ack although offered (e.g. EDID)
    drop_guest_features: int = 0
    #: feature bits acked on top (the back-end must tolerate bits it never offered)
    extra_guest_features: int = 0
    #: protocol feature bits the front-end refuses (e.g. CONFIGURE_MEM_SLOTS)
    refuse_protocol: int = 0
    indirect: bool = False
    #: back guest RAM with 2 MiB huge pages (``memory-backend-memfd,hugetlb=on``)
    hugetlb: bool = False
    need_reply_everywhere: bool = False
    #: seconds to wait for any reply or completion (generous: CI machines are loaded)
    timeout: float = 15.0


@dataclass(slots=True)
class Negotiated:
    """What the handshake established."""

    offered_features: int = 0
    offered_protocol: int = 0
    protocol: int = 0
    queue_num: int | None = None
    max_mem_slots: int | None = None
    acked_features: int = 0
    config_reads: list[GpuConfig] = field(default_factory=list)


class Session:
    """One simulated VM connected to one back-end process."""

    def __init__(self, backend: BackendProcess, config: SessionConfig | None = None) -> None:
        self.backend = backend
        self.config = cfg = config or SessionConfig()
        self.flavour = cfg.flavour
        self.frontend = VhostUserFrontend(backend.sock, cfg.flavour, timeout=cfg.timeout,
                                          need_reply_everywhere=cfg.need_reply_everywhere)
        self.ram = GuestRam(cfg.ram_size, split_at=cfg.split_at, high_gpa=cfg.high_gpa,
                            hugetlb=cfg.hugetlb)
        self.console = SimulatedConsole(cfg.num_scanouts)
        self.modes = list(cfg.modes or default_modes(cfg.num_scanouts))
        self.neg = Negotiated()
        self._display: DisplayPeer | None = None
        self.old_displays: list[DisplayPeer] = []
        self._fds: list[int] = []
        self.masked_call = [self._eventfd(), self._eventfd()]
        self.err = [self._eventfd(), self._eventfd()]
        self.kick = [self._eventfd(), self._eventfd()]
        self.irq = [self._eventfd(), self._eventfd()]
        self.backend_req: socket.socket | None = None
        self.queues: list[SplitQueueDriver] = []
        self.gpu: GpuDriver
        self.regions_sent: list[int] = []
        self.bases = [0, 0]
        self.started = False
        self.closed = False
        self._sync_marker = 0

    @property
    def display(self) -> DisplayPeer:
        """QEMU's end of the current display socket (exists after :meth:`driver_ok`)."""
        if self._display is None:
            raise AssertionError("no GPU_SET_SOCKET was sent yet")
        return self._display

    def _eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fds.append(fd)
        return fd

    # --- device realize -----------------------------------------------------------------

    def realize(self) -> Negotiated:
        """``vhost_user_backend_init`` + ``vhost_dev_init`` (trace lines 1-20)."""
        fe, neg = self.frontend, self.neg
        neg.offered_features = fe.get_u64(FrontendReq.GET_FEATURES)
        if neg.offered_features & Feature.PROTOCOL_FEATURES:
            neg.offered_protocol = fe.get_u64(FrontendReq.GET_PROTOCOL_FEATURES)
            neg.protocol = (neg.offered_protocol & self.flavour.protocol_mask
                            & ~self.config.refuse_protocol)
            fe.set_u64(FrontendReq.SET_PROTOCOL_FEATURES, neg.protocol)
            fe.protocol_features = neg.protocol
            if not neg.protocol & ProtocolFeature.CONFIG:
                raise ReplyError("Device expects VHOST_USER_PROTOCOL_F_CONFIG but backend "
                                 "does not support it.")
            if neg.protocol & ProtocolFeature.MQ:
                neg.queue_num = fe.get_u64(FrontendReq.GET_QUEUE_NUM)
                if neg.queue_num < 2:
                    raise ReplyError(f"back-end supports {neg.queue_num} queues, need 2")
            if neg.protocol & ProtocolFeature.CONFIGURE_MEM_SLOTS:
                neg.max_mem_slots = fe.get_u64(FrontendReq.GET_MAX_MEM_SLOTS)
                if neg.max_mem_slots < len(self.ram.regions):
                    raise ReplyError(f"{neg.max_mem_slots} memory slots are too few")
            if neg.protocol & ProtocolFeature.BACKEND_REQ:
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                self.backend_req = ours
                fe.request(FrontendReq.SET_BACKEND_REQ_FD, b"", (theirs.fileno(),))
                theirs.close()
        fe.request(FrontendReq.SET_OWNER)
        again = fe.get_u64(FrontendReq.GET_FEATURES)
        if again != neg.offered_features:
            raise ReplyError(f"GET_FEATURES changed from {neg.offered_features:#x} to "
                             f"{again:#x}")
        for q in (CTRL, CURSOR):
            fe.set_vring_file(FrontendReq.SET_VRING_CALL, q, self.masked_call[q])
            fe.set_vring_file(FrontendReq.SET_VRING_ERR, q, self.err[q])
        return neg

    def probe(self, reads: int = 2) -> GpuConfig:
        """The guest driver reads the config space (one GET_CONFIG per read)."""
        for _ in range(reads):
            self.neg.config_reads.append(decode(GpuConfig, self.frontend.get_config()))
        return self.neg.config_reads[-1]

    # --- start / stop ----------------------------------------------------------------------

    @property
    def event_idx(self) -> bool:
        """EVENT_IDX is in the acked features."""
        return bool(self.neg.acked_features & Feature.RING_EVENT_IDX)

    def guest_features(self) -> int:
        """What the guest acks (SET_FEATURES carries it plus bit 30)."""
        acked = self.flavour.guest_features(self.neg.offered_features)
        return (acked & ~self.config.drop_guest_features) | self.config.extra_guest_features

    def new_display_socket(self) -> DisplayPeer:
        """GPU_SET_SOCKET with a fresh socketpair; the old peer stays for inspection."""
        if self._display is not None:
            self.old_displays.append(self._display)
        qemu_end, backend_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._display = DisplayPeer(qemu_end, self.flavour, self.console, self.modes)
        self.frontend.gpu_set_socket(backend_end.fileno())
        backend_end.close()
        return self._display

    def driver_ok(self) -> None:
        """``vhost_user_gpu_set_status(DRIVER_OK)``: new display socket, then start."""
        fe, cfg = self.frontend, self.config
        self.new_display_socket()
        for index in (CTRL, CURSOR):
            fe.set_vring_file(FrontendReq.SET_VRING_CALL, index, self.masked_call[index])
        self.neg.acked_features = self.guest_features()
        bit30 = self.neg.offered_features & Feature.PROTOCOL_FEATURES
        fe.set_u64(FrontendReq.SET_FEATURES, self.neg.acked_features | bit30)
        self.send_memory()
        if not self.queues:
            self.queues = [
                SplitQueueDriver(self.ram, CTRL, cfg.ctrl_size, event_idx=self.event_idx),
                SplitQueueDriver(self.ram, CURSOR, cfg.cursor_size, event_idx=self.event_idx),
            ]
            for q in self.queues:
                q.kick_fd, q.call_fd = self.kick[q.index], self.irq[q.index]
            self.gpu = GpuDriver(self.ram, self.queues[CTRL], self.queues[CURSOR],
                                 indirect=cfg.indirect, timeout=cfg.timeout)
        for q in self.queues:
            self._program_ring(q, self.bases[q.index])
        if bit30:
            for q in self.queues:
                fe.set_vring_state(FrontendReq.SET_VRING_ENABLE, q.index, 1)
        for q in self.queues:
            fe.set_vring_file(FrontendReq.SET_VRING_CALL, q.index, self.irq[q.index])
        self.started = True

    def send_memory(self) -> None:
        """ADD_MEM_REG for regions the back-end lacks, or a full SET_MEM_TABLE."""
        if self.neg.protocol & ProtocolFeature.CONFIGURE_MEM_SLOTS:
            for i, region in enumerate(self.ram.regions):
                if i not in self.regions_sent:
                    self.frontend.add_mem_reg(region, self.ram.fd)
                    self.regions_sent.append(i)
        else:
            self.frontend.set_mem_table(self.ram.regions, self.ram.fd)
            self.regions_sent = list(range(len(self.ram.regions)))

    def _program_ring(self, q: SplitQueueDriver, base: int) -> None:
        fe = self.frontend
        fe.set_vring_state(FrontendReq.SET_VRING_NUM, q.index, q.num)
        fe.set_vring_state(FrontendReq.SET_VRING_BASE, q.index, base)
        desc, avail, used = q.addresses
        fe.set_vring_addr(q.index, self.ram.qva(desc), self.ram.qva(used), self.ram.qva(avail),
                          used)
        fe.set_vring_file(FrontendReq.SET_VRING_KICK, q.index, q.kick_fd)

    def stop(self) -> list[int]:
        """VM stop / device reset: close the display socket, stop both rings."""
        fe = self.frontend
        if self._display is not None:
            self._display.close()
        bit30 = self.neg.offered_features & Feature.PROTOCOL_FEATURES
        if bit30:
            for q in (CTRL, CURSOR):
                fe.set_vring_state(FrontendReq.SET_VRING_ENABLE, q, 0)
        self.bases = [fe.get_vring_base(q) for q in (CTRL, CURSOR)]
        for q in (CTRL, CURSOR):
            fe.set_vring_file(FrontendReq.SET_VRING_CALL, q, self.masked_call[q])
        self.started = False
        return self.bases

    def cont(self) -> None:
        """VM cont after :meth:`stop`: everything again, rings resume at the saved base."""
        self.driver_ok()

    def restart_queue(self, index: int) -> int:
        """Reset one ring (QEMU's queue reset path) and start it again from index 0.

        Returns the base the back-end reported when the ring was stopped.
        """
        fe, q = self.frontend, self.queues[index]
        fe.set_vring_state(FrontendReq.SET_VRING_ENABLE, index, 0)
        stopped_at = fe.get_vring_base(index)
        q.reset()
        self._program_ring(q, 0)
        fe.set_vring_state(FrontendReq.SET_VRING_ENABLE, index, 1)
        fe.set_vring_file(FrontendReq.SET_VRING_CALL, index, self.irq[index])
        return stopped_at

    def sync_display(self, timeout: float = 15.0) -> None:
        """Wait until every display message of the completed commands has arrived.

        A hidden-cursor MOVE_CURSOR at a unique position travels through the same display
        socket behind everything the back-end produced before it (its output is FIFO).
        """
        self._sync_marker += 1
        marker = (0, self._sync_marker, 0xFFFF)
        self.gpu.move_cursor(0, marker[1], marker[2], resource_id=0)
        peer = self.display
        peer.wait_for(lambda: any(e.request == DisplayReq.CURSOR_POS_HIDE and e.fields == marker
                                  for e in peer.events[-8:]), timeout, "the sync marker")

    def remove_region(self, index: int) -> None:
        """REM_MEM_REG for one region (memory unplug)."""
        self.frontend.rem_mem_reg(self.ram.regions[index])
        self.regions_sent.remove(index)

    # --- the end -------------------------------------------------------------------------

    def check_display(self) -> None:
        """Raise on any display-socket violation, on every socket used so far."""
        for peer in [*self.old_displays, *([self._display] if self._display else [])]:
            peer.check()

    def disconnect(self) -> None:
        """QEMU exits: display socket and vhost-user socket close, no goodbye."""
        if self._display is not None:
            self._display.close()
        self.frontend.close()
        if self.backend_req is not None:
            self.backend_req.close()
            self.backend_req = None

    def close(self, *, expect_exit: int | None = 0, exit_timeout: float = 20.0) -> int | None:
        """Disconnect, then require the back-end to exit with ``expect_exit``.

        ``expect_exit=None`` only reaps the process (used after a failed test).  A second
        call does nothing.
        """
        if self.closed:
            return None
        self.closed = True
        try:
            self.disconnect()
            if expect_exit is None:
                self.backend.kill()
                return None
            code = self.backend.wait_exit(exit_timeout)
            if code != expect_exit:
                raise AssertionError(f"{self.backend.name} exited with {code}, expected "
                                     f"{expect_exit}; stderr: {self.backend.stderr[-3000:]}")
            return code
        finally:
            for fd in self._fds:
                os.close(fd)
            self._fds.clear()
            self.queues.clear()
            self.ram.close()
            self.backend.cleanup()


def close_sessions(sessions: Sequence[Session], *, passed: bool) -> list[str]:
    """Disconnect every open session.  After a passed test each back-end must have
    nothing unsolicited pending, a clean display protocol and exit 0: what is wrong is
    returned.  After a failed one the processes are only stopped."""
    problems = []
    for session in sessions:
        if session.closed:
            continue
        if not passed:
            session.close(expect_exit=None)
            continue
        try:
            if session.frontend.pending():
                problems.append("back-end sent an unsolicited message or closed the "
                                "vhost-user socket")
            session.check_display()
            session.close()
        except AssertionError as exc:
            problems.append(str(exc))
            session.close(expect_exit=None)
    return problems
