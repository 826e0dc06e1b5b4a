"""The 2D virtio-gpu commands: display info, EDID, 2D resources, scanouts, capsets.

Every bad parameter raises :class:`GuestProtocolError` with its specific response code
(see the table in README.rst); the device turns it into the error response.
"""

from __future__ import annotations

import logging
import struct

import numpy as np

from protocol.display import DisplayMessage, DisplayReq, decode_display_info, encode_display_info
from protocol.edid import build_edid
from protocol.errors import DisplayProtocolError, GuestProtocolError
from protocol.virtio_gpu import (
    CTRL_HDR_SIZE,
    EDID_BLOB_SIZE,
    CtrlHdr,
    DisplayOne,
    GetCapset,
    GetCapsetInfo,
    GetEdid,
    ResourceAssignUuid,
    ResourceAttachBacking,
    ResourceCreate2d,
    ResourceDetachBacking,
    ResourceFlush,
    ResourceUnref,
    RespCapsetInfo,
    RespEdidHeader,
    RespResourceUuid,
    SetScanout,
    TransferToHost2d,
    UpdateCursor,
)
from protocol.virtio_gpu_codes import Cmd, Format, Resp
from protocol.wire import encode, layout
from vgpu_backend.backing import Backing, read_mem_entries
from vgpu_backend.chains import DescriptorChain
from vgpu_backend.device_state import (
    OK,
    ChainHandler,
    Deferred,
    DeviceState,
    Handler,
    Reply,
    with_body,
    with_body_and_chain,
)
from vgpu_backend.display import DisplayState
from vgpu_backend.resources import BlobResource, Image2D, Resource
from vgpu_backend.scanout import image_source

__all__ = ["Commands2D"]

log = logging.getLogger(__name__)

_ATTACH_SIZE = CTRL_HDR_SIZE + layout(ResourceAttachBacking).size
_FORMATS = {int(f): f for f in Format}


def rect_fits(x: int, y: int, width: int, height: int, res_w: int, res_h: int) -> bool:
    """The rectangle lies inside ``res_w`` x ``res_h`` (Python ints: no overflow)."""
    return x + width <= res_w and y + height <= res_h


def check_rect(x: int, y: int, width: int, height: int, res_w: int, res_h: int) -> None:
    """The rectangle lies inside a ``res_w`` x ``res_h`` resource."""
    if not rect_fits(x, y, width, height, res_w, res_h):
        raise GuestProtocolError(
            f"rect {x},{y} {width}x{height} outside the {res_w}x{res_h} resource")


class Commands2D:
    """Handlers for the 2D command set."""

    def __init__(self, state: DeviceState) -> None:
        self.s = state
        self._last_info = b""  # QEMU's last display-info reply (decoded once per change)

    def handlers(self) -> dict[int, Handler]:
        """Command type -> handler."""
        return {
            Cmd.GET_DISPLAY_INFO: self.get_display_info,
            Cmd.GET_EDID: with_body(GetEdid, self.get_edid),
            Cmd.RESOURCE_CREATE_2D: with_body(ResourceCreate2d, self.resource_create_2d),
            Cmd.RESOURCE_UNREF: with_body(ResourceUnref, self.resource_unref),
            Cmd.RESOURCE_DETACH_BACKING: with_body(ResourceDetachBacking, self.detach_backing),
            Cmd.TRANSFER_TO_HOST_2D: with_body(TransferToHost2d, self.transfer_to_host_2d),
            Cmd.SET_SCANOUT: with_body(SetScanout, self.set_scanout),
            Cmd.RESOURCE_FLUSH: with_body(ResourceFlush, self.resource_flush),
            Cmd.GET_CAPSET_INFO: with_body(GetCapsetInfo, self.get_capset_info),
            Cmd.GET_CAPSET: with_body(GetCapset, self.get_capset),
            Cmd.RESOURCE_ASSIGN_UUID: with_body(ResourceAssignUuid, self.assign_uuid),
        }

    def chain_handlers(self) -> dict[int, ChainHandler]:
        """Command type -> handler, for the commands with entries after their struct."""
        return {Cmd.RESOURCE_ATTACH_BACKING: with_body_and_chain(ResourceAttachBacking,
                                                                 self.attach_backing)}

    # --- display information ---------------------------------------------------------

    def get_display_info(self, hdr: CtrlHdr, data: bytes) -> Reply | Deferred:
        """Ask QEMU over the display socket; fall back to the last known modes."""
        display = self.s.scanouts.display
        if display is None or display.state is DisplayState.CLOSED:
            return self._display_info_reply()
        deferred = Deferred(pause=True, fallback=self._display_info_reply)

        def got(reply: DisplayMessage | None) -> None:
            if reply is not None and reply.payload != self._last_info:
                try:
                    self.s.set_modes(decode_display_info(reply.payload), reply.payload)
                    self._last_info = reply.payload
                except DisplayProtocolError as err:
                    log.warning("display info: %s", err)
            deferred.resolve(self._display_info_reply())

        display.request(DisplayReq.GET_DISPLAY_INFO, b"", got)
        return deferred

    def _display_info_reply(self) -> Reply:
        if not self.s.modes:
            w, h = self.s.options.default_mode
            modes = [DisplayOne(0, 0, w, h, 1, 0)]
            self.s.set_modes(modes, encode_display_info(modes))
        return Reply(Resp.OK_DISPLAY_INFO, self.s.display_info_body)

    def get_edid(self, hdr: CtrlHdr, body: GetEdid) -> Reply:
        """An EDID built from the scanout's current mode (never asks QEMU)."""
        if body.scanout >= self.s.num_scanouts:
            raise GuestProtocolError(f"GET_EDID for scanout {body.scanout}")
        width, height = self.s.options.default_mode
        limit = self.s.limits.max_dimension
        if body.scanout < len(self.s.modes):  # QEMU's mode, when it is a sane one
            mode = self.s.modes[body.scanout]
            if 0 < mode.width <= limit and 0 < mode.height <= limit:
                width, height = mode.width, mode.height
        edid = build_edid(width, height, serial=body.scanout)
        return Reply(Resp.OK_EDID, encode(RespEdidHeader(len(edid)))
                     + edid.ljust(EDID_BLOB_SIZE, b"\0"))

    # --- 2D resources ------------------------------------------------------------

    def resource_create_2d(self, hdr: CtrlHdr, body: ResourceCreate2d) -> Reply:
        """A host image of ``width`` x ``height`` in ``format``."""
        resources = self.s.resources
        resources.check_new_id(body.resource_id)
        fmt = _FORMATS.get(body.format)
        if fmt is None:
            raise GuestProtocolError(f"unknown format {body.format}")
        limit = self.s.limits.max_dimension
        if not (0 < body.width <= limit and 0 < body.height <= limit):
            raise GuestProtocolError(f"size {body.width}x{body.height} (limit {limit})")
        nbytes = body.height * body.width * 4
        resources.reserve_hostmem(nbytes)
        try:
            image = np.zeros((body.height, body.width * 4), dtype=np.uint8)
        except MemoryError:
            resources.hostmem_used -= nbytes
            raise GuestProtocolError("host out of memory", Resp.ERR_OUT_OF_MEMORY) from None
        resources.add(Image2D(body.resource_id, format=fmt, width=body.width,
                              height=body.height, image=image))
        return OK

    def resource_unref(self, hdr: CtrlHdr, body: ResourceUnref) -> Reply | Deferred:
        """Destroy a resource (blobs release their host GPU mapping first).  While compute
        work that may use it is in flight, the queue waits for that work first."""
        res = self.s.resources.get(body.resource_id)
        if not res.contexts:  # no compute work can use it
            return self._unref_now(res)
        return self.s.after_compute(res.contexts, lambda: self._unref_now(
            self.s.resources.get(body.resource_id)))  # it may be gone by then

    def _unref_now(self, res: Resource) -> Reply:
        for hook in self.s.release_hooks[type(res)]:
            hook(res)
        self.destroy(res)
        return OK

    def destroy(self, res: Resource) -> None:
        """Tear a resource down completely (UNREF, reset, disconnect)."""
        if res.scanouts:
            self.s.scanouts.forget_resource(res)
        for hook in self.s.destroy_hooks[type(res)]:
            hook(res)
        res.backing = None
        self.s.resources.remove(res.resource_id)

    def attach_backing(self, hdr: CtrlHdr, body: ResourceAttachBacking,
                       chain: DescriptorChain) -> Reply:
        """Give a resource its guest pages (entries follow the struct in the chain)."""
        res = self.s.resources.get(body.resource_id)
        if res.backing is not None:
            raise GuestProtocolError(f"resource {body.resource_id} already has backing",
                                     Resp.ERR_UNSPEC)
        if isinstance(res, BlobResource) and res.userptr:  # its GPU mapping is not redone
            raise GuestProtocolError(f"USERPTR blob {body.resource_id} gets its memory at "
                                     "creation only", Resp.ERR_UNSPEC)
        addr, length = read_mem_entries(chain, _ATTACH_SIZE, body.nr_entries,
                                        self.s.limits.max_backing_entries)
        if body.nr_entries == 0:
            raise GuestProtocolError("ATTACH_BACKING with no entries")
        segments = self.s.memory.translate(addr, length).coalesced()
        if isinstance(res, BlobResource) and segments.total < res.size:
            raise GuestProtocolError(f"entries cover {segments.total} bytes of a "
                                     f"{res.size}-byte blob")
        res.backing = Backing(self.s.memory, segments)
        return OK

    def detach_backing(self, hdr: CtrlHdr, body: ResourceDetachBacking) -> Reply | Deferred:
        """Forget a resource's guest pages (no backing: nothing to do).  While compute
        work that may use them is in flight, the queue waits for that work first."""
        res = self.s.resources.get(body.resource_id)
        return self.s.after_compute(res.contexts, lambda: self._detach_now(body.resource_id))

    def _detach_now(self, resource_id: int) -> Reply:
        res = self.s.resources.get(resource_id)
        for hook in self.s.release_hooks[type(res)]:
            hook(res)
        for hook in self.s.detach_hooks[type(res)]:
            hook(res)
        res.backing = None
        return OK

    def transfer_to_host_2d(self, hdr: CtrlHdr, body: TransferToHost2d) -> Reply:
        """Copy a rectangle from the linear guest backing into the host image."""
        res = self.s.resources.get_2d(body.resource_id)
        if res.backing is None:
            raise GuestProtocolError(f"resource {body.resource_id} has no backing",
                                     Resp.ERR_UNSPEC)
        check_rect(body.x, body.y, body.width, body.height, res.width, res.height)
        if body.width == 0 or body.height == 0:
            return OK
        stride, row = res.stride, body.width * 4
        if body.x == 0 and body.width == res.width:  # whole rows: gather straight in
            rows = res.image[body.y:body.y + body.height].reshape(-1)
            res.backing.read_into(body.offset, rows)
        else:
            res.image[body.y:body.y + body.height, body.x * 4:body.x * 4 + row] = \
                res.backing.read_rows(body.offset, stride, row, body.height)
        return OK

    # --- scanouts ------------------------------------------------------------------

    def set_scanout(self, hdr: CtrlHdr, body: SetScanout) -> Reply:
        """Show a rectangle of a 2D resource on a scanout (resource 0 disables it)."""
        if body.scanout_id >= self.s.num_scanouts:
            raise GuestProtocolError(f"scanout {body.scanout_id}", Resp.ERR_INVALID_SCANOUT_ID)
        if body.resource_id == 0:
            self.s.scanouts.disable(body.scanout_id)
            return OK
        res = self.s.resources.get_2d(body.resource_id)
        if body.width == 0 or body.height == 0:
            raise GuestProtocolError("SET_SCANOUT with an empty rectangle")
        check_rect(body.x, body.y, body.width, body.height, res.width, res.height)
        self.s.scanouts.show(body.scanout_id, res, (body.x, body.y, body.width, body.height),
                             image_source(res), (res.width, res.height))
        return OK

    def resource_flush(self, hdr: CtrlHdr, body: ResourceFlush) -> Reply:
        """Send the damaged rectangle to the scanouts showing the resource."""
        res = self.s.resources.get(body.resource_id)
        if isinstance(res, BlobResource) and res.invalidated:
            raise GuestProtocolError(f"blob {body.resource_id}: {res.invalidated}",
                                     Resp.ERR_UNSPEC)
        extent = res.extent()
        if extent is None:
            raise GuestProtocolError(f"resource {body.resource_id} is not displayable")
        # a blob may be shown with a framebuffer of another size on each scanout: the
        # rectangle must fit one of them (each scanout gets its part); shown nowhere,
        # it must fit the last one
        sizes = self.s.scanouts.framebuffer_sizes(res) or [extent]
        x, y, width, height = body.x, body.y, body.width, body.height
        if not any(rect_fits(x, y, width, height, *size) for size in sizes):
            shown = " / ".join(f"{w}x{h}" for w, h in dict.fromkeys(sizes))
            raise GuestProtocolError(f"rect {x},{y} {width}x{height} outside the {shown} "
                                     f"framebuffer of resource {body.resource_id}")
        self.s.scanouts.flush(res, (body.x, body.y, body.width, body.height))
        return OK

    # --- capsets, uuids ------------------------------------------------------------

    def get_capset_info(self, hdr: CtrlHdr, body: GetCapsetInfo) -> Reply:
        """Id, version and size of capset number ``capset_index``."""
        if body.capset_index >= len(self.s.capsets):
            raise GuestProtocolError(f"capset index {body.capset_index}")
        cap = self.s.capsets[body.capset_index]
        return Reply(Resp.OK_CAPSET_INFO,
                     encode(RespCapsetInfo(cap.capset_id, cap.version, len(cap.data))))

    def get_capset(self, hdr: CtrlHdr, body: GetCapset) -> Reply:
        """The bytes of a capset (id and version must match one we publish)."""
        for cap in self.s.capsets:
            if cap.capset_id == body.capset_id and body.capset_version <= cap.version:
                return Reply(Resp.OK_CAPSET, cap.current())
        raise GuestProtocolError(f"no capset {body.capset_id} v{body.capset_version}")

    def assign_uuid(self, hdr: CtrlHdr, body: ResourceAssignUuid) -> Reply:
        """A UUID naming the resource for cross-device sharing."""
        return Reply(Resp.OK_RESOURCE_UUID,
                     encode(RespResourceUuid(self.s.resources.assign_uuid(body.resource_id))))

    # --- cursor queue ------------------------------------------------------------

    def cursor(self, data: bytes) -> None:
        """UPDATE_CURSOR / MOVE_CURSOR (the cursor queue has no responses)."""
        if len(data) < CTRL_HDR_SIZE + layout(UpdateCursor).size:
            raise GuestProtocolError(f"cursor command of {len(data)} bytes")
        cmd = struct.unpack_from("<I", data)[0]
        body = UpdateCursor._make(layout(UpdateCursor).struct.unpack_from(data, CTRL_HDR_SIZE))
        if body.scanout_id >= self.s.num_scanouts:
            raise GuestProtocolError(f"cursor on scanout {body.scanout_id}",
                                     Resp.ERR_INVALID_SCANOUT_ID)
        if cmd == Cmd.MOVE_CURSOR:
            self.s.scanouts.cursor_move(body.scanout_id, body.x, body.y,
                                        visible=body.resource_id != 0)
        elif cmd == Cmd.UPDATE_CURSOR:
            if body.resource_id == 0:
                self.s.scanouts.cursor_move(body.scanout_id, body.x, body.y, visible=False)
                return
            res = self.s.resources.get_2d(body.resource_id)
            if (res.width, res.height) != (64, 64):
                raise GuestProtocolError(f"cursor resource is {res.width}x{res.height}")
            self.s.scanouts.cursor_image(body.scanout_id, res, body.x, body.y,
                                         body.hot_x, body.hot_y)
        else:
            raise GuestProtocolError(f"command {cmd:#x} on the cursor queue", Resp.ERR_UNSPEC)

