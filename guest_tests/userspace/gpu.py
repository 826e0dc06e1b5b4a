"""virtio-gpu on the userspace transport: bring-up, submission, polled completions, commands.

Each request is a chain in the control (or cursor) ring: the command, an optional
payload descriptor (mem entries, a command stream: a second readable buffer, as Linux
sends them) and the response buffer, all in DMA pages.  Completions may arrive out of
order (fenced work is answered when it is done), so requests are matched by head.

Failure handling: :meth:`VirtioGpu.initialize` starts with a device reset, so whatever a
crashed earlier user left behind is gone; :meth:`VirtioGpu.close` resets the device
before any DMA page or pinned buffer is released, so the device never writes into
memory that was handed back to the kernel.  A request that times out leaves the ring
in an unknown state: :meth:`VirtioGpu.reinitialize` (reset + bring-up, rings in fresh
memory) recovers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Final

from guest_tests.userspace.dma import DmaArena, DmaBuffer
from guest_tests.userspace.pci import find_unbound_function
from guest_tests.userspace.pinned import PinnedBuffer
from guest_tests.userspace.transport import DeviceStatus, TransportError, VirtioPciTransport
from guest_tests.userspace.vring import RingBuffer, SplitRing, ring_bytes
from protocol.virtio_gpu import (
    CTRL_HDR_SIZE,
    MAX_SCANOUTS,
    CtrlHdr,
    CtxCreate,
    CtxResource,
    DisplayOne,
    GetCapset,
    GetCapsetInfo,
    GpuConfig,
    ResourceCreateBlob,
    ResourceUnref,
    RespCapsetInfo,
    Submit3d,
)
from protocol.virtio_gpu_codes import BlobFlag, BlobMem, Cmd, CtrlFlag, Feature, Resp
from protocol.wire import decode, encode, layout

__all__ = [
    "CONTROL_QUEUE",
    "CURSOR_QUEUE",
    "CommandError",
    "DeviceTimeout",
    "DriverStats",
    "GpuResponse",
    "Pending",
    "UserptrBlob",
    "VirtioGpu",
    "command_header",
]

VIRTIO_VENDOR: Final = 0x1AF4
VIRTIO_GPU_DEVICE: Final = 0x1050  # 0x1040 + device type 16
CONTROL_QUEUE: Final = 0
CURSOR_QUEUE: Final = 1
#: what the driver accepts when offered (QEMU's vhost-user-gpu-pci offers a subset)
WANTED_FEATURES: Final = int(Feature.VERSION_1 | Feature.RING_INDIRECT_DESC | Feature.EDID
                             | Feature.RESOURCE_UUID | Feature.RESOURCE_BLOB
                             | Feature.CONTEXT_INIT)
DEFAULT_TIMEOUT: Final = 60.0
_CONFIG_FIELDS: Final = {name: int(spec[1])
                         for name, spec in (layout(GpuConfig).dtype.fields or {}).items()}
_DISPLAY_ONE: Final = layout(DisplayOne).size


class DeviceTimeout(TimeoutError):
    """The device did not complete a request in time."""


class CommandError(RuntimeError):
    """A command was answered with something other than what the caller needs."""

    def __init__(self, what: str, response: GpuResponse) -> None:
        super().__init__(f"{what}: {response.name}")
        self.response = response


@dataclass(frozen=True)
class GpuResponse:
    """A decoded response: the header fields, the bytes after it, the used length."""

    type: int
    flags: int
    fence_id: int
    ctx_id: int
    ring_idx: int
    body: bytes
    written: int

    @classmethod
    def parse(cls, data: bytes, written: int) -> GpuResponse:
        """From the response buffer and the device's used length."""
        if written < CTRL_HDR_SIZE:
            return cls(0, 0, 0, 0, 0, b"", written)
        hdr = decode(CtrlHdr, data)
        return cls(hdr.type, hdr.flags, hdr.fence_id, hdr.ctx_id, hdr.ring_idx,
                   data[CTRL_HDR_SIZE:written], written)

    @property
    def name(self) -> str:
        """The response type's name (or its number)."""
        if self.written < CTRL_HDR_SIZE:
            return f"no response header ({self.written} bytes written)"
        try:
            return Resp(self.type).name
        except ValueError:
            return f"response {self.type:#x}"

    def expect(self, wanted: Resp, what: str = "command") -> GpuResponse:
        """This response, if it is ``wanted``; else :class:`CommandError`."""
        if self.written < CTRL_HDR_SIZE or self.type != wanted:
            raise CommandError(f"{what}: expected {wanted.name}", self)
        return self


@dataclass(eq=False)
class Pending:
    """A request in a ring, and (once completed) what the device wrote."""

    queue: int
    head: int
    buffers: list[DmaBuffer]
    response: DmaBuffer | None
    generation: int
    written: int | None = None
    data: bytes = b""


@dataclass
class DriverStats:
    """What went over the rings (the zero-copy claim is checked against these)."""

    commands: int = 0
    #: device-readable bytes of commands and payloads (headers, entries, streams)
    command_bytes: int = 0
    #: bytes transfer commands asked the device to copy between guest and host memory
    transfer_bytes: int = 0


@dataclass(eq=False)
class UserptrBlob:
    """A USERPTR blob the device holds: the pinned buffer stays alive until UNREF/reset."""

    resource_id: int
    buffer: PinnedBuffer
    blob_mem: BlobMem
    ctx_id: int
    readonly: bool
    entries: int


def command_header(cmd: int, *, fence_id: int | None = None, ctx_id: int = 0,
                   ring_idx: int | None = None) -> bytes:
    """A ``virtio_gpu_ctrl_hdr`` (FENCE with ``fence_id``, INFO_RING_IDX with ``ring_idx``)."""
    flags = 0
    if fence_id is not None:
        flags |= int(CtrlFlag.FENCE)
    if ring_idx is not None:
        flags |= int(CtrlFlag.INFO_RING_IDX)
    return encode(CtrlHdr(cmd, flags, fence_id or 0, ctx_id, ring_idx or 0))


class VirtioGpu:
    """The userspace driver of one virtio-gpu PCI function (see the module docstring)."""

    def __init__(self, address: str = "", *, dma_pages: int = 2) -> None:
        self.function = find_unbound_function(VIRTIO_VENDOR, VIRTIO_GPU_DEVICE, address)
        self.transport = VirtioPciTransport(self.function)
        self.arena: DmaArena | None = None
        self.rings: list[SplitRing] = []
        self._ring_memory: list[DmaBuffer] = []
        self._pending: dict[tuple[int, int], Pending] = {}
        self.generation = 0
        self.stats = DriverStats()
        self.userptrs: dict[int, UserptrBlob] = {}
        self.offered_features = self.features = 0
        self.num_scanouts = self.num_capsets = 0
        self._next_resource = self._next_context = self._next_fence = 1
        try:
            self.arena = DmaArena(dma_pages)
            self.initialize()
        except BaseException:
            self.close()
            raise

    # --- bring-up and teardown -----------------------------------------------------------

    def initialize(self) -> None:
        """Reset, negotiate features, set up both queues in fresh memory, DRIVER_OK."""
        transport, arena = self.transport, self._arena()
        self.reset()
        transport.add_status(DeviceStatus.ACKNOWLEDGE)
        transport.add_status(DeviceStatus.DRIVER)
        self.offered_features = transport.device_features()
        if not self.offered_features & Feature.VERSION_1:
            transport.add_status(DeviceStatus.FAILED)
            raise TransportError(f"device offers {self.offered_features:#x}, no VERSION_1")
        self.features = self.offered_features & WANTED_FEATURES
        transport.set_driver_features(self.features)
        transport.add_status(DeviceStatus.FEATURES_OK)
        if not transport.status & DeviceStatus.FEATURES_OK:
            raise TransportError(f"device refused features {self.features:#x}")
        if transport.num_queues < 2:
            raise TransportError(f"device has {transport.num_queues} queues, needs 2")
        old, rings, memory = self._ring_memory, [], []
        for index in (CONTROL_QUEUE, CURSOR_QUEUE):
            size = transport.queue_max_size(index)
            if size == 0:
                raise TransportError(f"queue {index} is not available")
            buffer = arena.allocate(ring_bytes(size), align=4096)  # never where the old was
            memory.append(buffer)
            rings.append(SplitRing(index, size, buffer))
            transport.setup_queue(index, size, *rings[-1].addresses)
        for buffer in old:
            arena.free(buffer)
        self.rings, self._ring_memory = rings, memory
        transport.add_status(DeviceStatus.DRIVER_OK)
        self.num_scanouts = transport.config_read(_CONFIG_FIELDS["num_scanouts"])
        self.num_capsets = transport.config_read(_CONFIG_FIELDS["num_capsets"])
        self.generation += 1

    def reset(self) -> None:
        """Reset the device: it stops using every ring, buffer and resource of ours."""
        self.transport.reset()
        for pending in self._pending.values():
            self._free(pending)
        self._pending.clear()
        self.userptrs.clear()  # the device dropped them with everything else

    def reinitialize(self) -> None:
        """Recover from a broken ring or a timeout: reset and bring the device up again."""
        self.initialize()

    def close(self) -> None:
        """Reset the device, then release DMA memory and the BAR mappings (idempotent)."""
        if self.arena is not None:
            try:
                self.reset()
            finally:
                self.rings.clear()
                self._ring_memory.clear()
                self.arena.close()
                self.arena = None
        self.transport.close()

    def __enter__(self) -> VirtioGpu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _arena(self) -> DmaArena:
        if self.arena is None:
            raise RuntimeError("the driver is closed")
        return self.arena

    # --- requests ----------------------------------------------------------------------

    def submit(self, command: bytes, payload: bytes = b"", response_size: int = CTRL_HDR_SIZE,
               *, queue: int = CONTROL_QUEUE, indirect: bool = False) -> Pending:
        """Put one request in a ring and notify the device; :meth:`wait` collects it."""
        arena, buffers, parts = self._arena(), [], []
        try:
            for data in (command, payload):
                if data:
                    buffers.append(arena.allocate(len(data)))
                    buffers[-1].write(data)
                    parts.append(RingBuffer(buffers[-1].phys, len(data)))
            response = arena.allocate(response_size) if response_size else None
            if response is not None:
                buffers.append(response)
                parts.append(RingBuffer(response.phys, response_size, writable=True))
            ring = self.rings[queue]
            if indirect:
                buffers.append(arena.allocate(16 * len(parts)))
                head = ring.add_indirect(buffers[-1], parts)
            else:
                head = ring.add(parts)
        except BaseException:
            for buffer in buffers:
                arena.free(buffer)
            raise
        self.stats.commands += 1
        self.stats.command_bytes += len(command) + len(payload)
        return self.publish(queue, head, buffers, response)

    def publish(self, queue: int, head: int, buffers: list[DmaBuffer],
                response: DmaBuffer | None) -> Pending:
        """Make a prepared chain available and notify (raw chains come here directly)."""
        pending = Pending(queue, head, buffers, response, self.generation)
        self._pending[(queue, head)] = pending
        self.rings[queue].publish(head)
        self.transport.notify(queue)
        return pending

    def poll(self) -> int:
        """Collect every completed request; returns how many there were."""
        count = 0
        for ring in self.rings:
            for head, written in ring.completions():
                pending = self._pending.pop((ring.index, head))
                pending.written = written
                if pending.response is not None:
                    pending.data = pending.response.read(min(written, pending.response.size))
                self._free(pending)
                count += 1
        return count

    def _free(self, pending: Pending) -> None:
        if self.arena is not None:
            for buffer in pending.buffers:
                self.arena.free(buffer)
        pending.buffers = []

    def wait(self, pending: Pending, timeout: float = DEFAULT_TIMEOUT) -> GpuResponse:
        """Poll until ``pending`` completes.

        :raise DeviceTimeout: not completed within ``timeout`` seconds.
        """
        deadline, delay = time.monotonic() + timeout, 0.0
        while pending.written is None:
            if pending.generation != self.generation:
                raise DeviceTimeout("the device was reset while the request was queued")
            if self.poll():
                continue
            if time.monotonic() > deadline:
                raise DeviceTimeout(f"queue {pending.queue}: head {pending.head} not completed "
                                    f"in {timeout:.1f} s (used index "
                                    f"{self.rings[pending.queue].used_index})")
            time.sleep(delay)
            delay = min(0.002, delay * 2 or 0.00005)
        return GpuResponse.parse(pending.data, pending.written)

    def call(self, command: bytes, payload: bytes = b"", response_size: int = CTRL_HDR_SIZE,
             *, timeout: float = DEFAULT_TIMEOUT, **options: Any) -> GpuResponse:
        """Submit one request and wait for its response."""
        return self.wait(self.submit(command, payload, response_size, **options), timeout)

    def command(self, cmd: Cmd, body: tuple[Any, ...] | None = None, *, payload: bytes = b"",
                response_size: int = CTRL_HDR_SIZE, fence_id: int | None = None,
                ctx_id: int = 0, ring_idx: int | None = None,
                timeout: float = DEFAULT_TIMEOUT) -> GpuResponse:
        """Send ``cmd`` with a header and a wire-struct body; wait for the response."""
        data = command_header(cmd, fence_id=fence_id, ctx_id=ctx_id, ring_idx=ring_idx)
        if body is not None:
            data += encode(body)
        return self.call(data, payload, response_size, timeout=timeout)

    def new_fence(self) -> int:
        """A fresh fence id."""
        self._next_fence += 1
        return self._next_fence - 1

    def new_resource_id(self) -> int:
        """A resource id this driver has not used yet."""
        self._next_resource += 1
        return self._next_resource - 1

    def new_context_id(self) -> int:
        """A context id this driver has not used yet."""
        self._next_context += 1
        return self._next_context - 1

    # --- commands ----------------------------------------------------------------------

    def display_info(self) -> list[DisplayOne]:
        """GET_DISPLAY_INFO: the 16 scanout modes."""
        response = self.command(Cmd.GET_DISPLAY_INFO,
                                response_size=CTRL_HDR_SIZE + MAX_SCANOUTS * _DISPLAY_ONE)
        response.expect(Resp.OK_DISPLAY_INFO, "GET_DISPLAY_INFO")
        return [decode(DisplayOne, response.body, i * _DISPLAY_ONE) for i in range(MAX_SCANOUTS)]

    def capset_info(self, index: int) -> RespCapsetInfo:
        """GET_CAPSET_INFO for capset ``index`` (< num_capsets)."""
        response = self.command(Cmd.GET_CAPSET_INFO, GetCapsetInfo(index),
                                response_size=CTRL_HDR_SIZE + layout(RespCapsetInfo).size)
        response.expect(Resp.OK_CAPSET_INFO, f"GET_CAPSET_INFO {index}")
        return decode(RespCapsetInfo, response.body)

    def capset(self, capset_id: int, version: int, size: int) -> bytes:
        """GET_CAPSET: the capset's bytes (``size`` from its info)."""
        response = self.command(Cmd.GET_CAPSET, GetCapset(capset_id, version),
                                response_size=CTRL_HDR_SIZE + size)
        response.expect(Resp.OK_CAPSET, f"GET_CAPSET {capset_id}")
        return response.body

    def capsets(self) -> dict[int, bytes]:
        """Every capset the device publishes (its latest version), by id."""
        found = {}
        for index in range(self.num_capsets):
            info = self.capset_info(index)
            found[info.capset_id] = self.capset(info.capset_id, info.capset_max_version,
                                                info.capset_max_size)
        return found

    def create_context(self, name: str = "userspace", capset_id: int = 0,
                       ctx_id: int | None = None) -> int:
        """CTX_CREATE (``capset_id`` = context type, 0 = the device's default)."""
        ctx_id = self.new_context_id() if ctx_id is None else ctx_id
        encoded = name.encode()[:64]
        self.command(Cmd.CTX_CREATE, CtxCreate(len(encoded), capset_id & 0xFF,
                                               encoded.ljust(64, b"\0")),
                     ctx_id=ctx_id).expect(Resp.OK_NODATA, f"CTX_CREATE {ctx_id}")
        return ctx_id

    def destroy_context(self, ctx_id: int) -> GpuResponse:
        """CTX_DESTROY."""
        return self.command(Cmd.CTX_DESTROY, ctx_id=ctx_id)

    def attach(self, ctx_id: int, resource_id: int) -> GpuResponse:
        """CTX_ATTACH_RESOURCE."""
        return self.command(Cmd.CTX_ATTACH_RESOURCE, CtxResource(resource_id), ctx_id=ctx_id)

    def unref(self, resource_id: int, timeout: float = DEFAULT_TIMEOUT) -> GpuResponse:
        """RESOURCE_UNREF (a userptr blob's buffer is released by its owner afterwards)."""
        response = self.command(Cmd.RESOURCE_UNREF, ResourceUnref(resource_id),
                                timeout=timeout)
        if response.type == Resp.OK_NODATA:
            self.userptrs.pop(resource_id, None)
        return response

    def create_blob(self, resource_id: int, blob_mem: int, blob_flags: int, size: int,
                    entries: bytes = b"", *, nr_entries: int | None = None, ctx_id: int = 0,
                    blob_id: int = 0) -> GpuResponse:
        """RESOURCE_CREATE_BLOB as given (``nr_entries`` defaults to what ``entries`` holds)."""
        count = len(entries) // 16 if nr_entries is None else nr_entries
        body = ResourceCreateBlob(resource_id, blob_mem, blob_flags, count, blob_id, size)
        return self.command(Cmd.RESOURCE_CREATE_BLOB, body, payload=entries, ctx_id=ctx_id)

    def register_userptr(self, buffer: PinnedBuffer, *, ctx_id: int = 0,
                         readonly: bool = False, blob_mem: BlobMem | None = None,
                         blob_id: int = 0) -> UserptrBlob:
        """Make ``buffer`` a USERPTR blob (HOST3D_GUEST in ``ctx_id``, else GUEST)."""
        blob_mem = blob_mem or (BlobMem.HOST3D_GUEST if ctx_id else BlobMem.GUEST)
        flags = BlobFlag.USE_USERPTR | (BlobFlag.USERPTR_RDONLY if readonly else 0)
        entries = buffer.entry_bytes()
        resource_id = self.new_resource_id()
        self.create_blob(resource_id, blob_mem, int(flags), buffer.size, entries,
                         ctx_id=ctx_id, blob_id=blob_id).expect(
            Resp.OK_NODATA, f"USERPTR blob {resource_id}")
        blob = UserptrBlob(resource_id, buffer, blob_mem, ctx_id, readonly, len(entries) // 16)
        self.userptrs[resource_id] = blob
        return blob

    def submit_3d(self, ctx_id: int, stream: bytes, *, fence_id: int | None = None,
                  ring_idx: int | None = None) -> Pending:
        """Queue SUBMIT_3D with ``stream`` as its payload (fenced if ``fence_id``)."""
        data = command_header(Cmd.SUBMIT_3D, fence_id=fence_id, ctx_id=ctx_id, ring_idx=ring_idx)
        return self.submit(data + encode(Submit3d(len(stream))), stream)

    @property
    def device_status(self) -> DeviceStatus:
        """The transport's device status."""
        return self.transport.status

    @property
    def inflight(self) -> int:
        """Requests the device has not completed."""
        return len(self._pending)

