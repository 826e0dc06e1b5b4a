"""DRM/KMS and virtio-gpu ioctls on /dev/dri/cardN with fcntl and struct (no libdrm).

Struct layouts are those of include/uapi/drm/drm.h, drm_mode.h and virtgpu_drm.h on
x86-64; the comment above each format names the C struct.  Runs inside the vm.py guest
under Debian's python3 (numpy 1.24).
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import select
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

Image = npt.NDArray[np.uint8]


def _ioc(direction: int, nr: int, size: int) -> int:
    """Linux _IOC(dir, 'd', nr, size)."""
    return (direction << 30) | (size << 16) | (ord("d") << 8) | nr


def _iowr(nr: int, size: int) -> int:
    return _ioc(3, nr, size)


# struct drm_version; drm_get_cap
_VERSION = struct.Struct("<iii4xQQQQQQ")
_CAP = struct.Struct("<QQ")
# struct drm_mode_card_res
_CARD_RES = struct.Struct("<QQQQ8I")
# struct drm_mode_modeinfo
_MODEINFO = struct.Struct("<I10HIII32s")
# struct drm_mode_crtc (the mode info follows the fixed part)
_CRTC = struct.Struct("<QIIIIIII")
# struct drm_mode_cursor; drm_mode_cursor2
_CURSOR = struct.Struct("<IIiiIII")
_CURSOR2 = struct.Struct("<IIiiIIIii")
# struct drm_mode_get_encoder; drm_mode_get_connector; drm_mode_get_property
_ENCODER = struct.Struct("<5I")
_CONNECTOR = struct.Struct("<QQQQ12I")
_PROPERTY = struct.Struct("<QQII32sII")
# struct drm_mode_get_blob; drm_mode_crtc_page_flip; drm_mode_fb_dirty_cmd
_BLOB = struct.Struct("<IIQ")
_PAGE_FLIP = struct.Struct("<IIIIQ")
_DIRTY = struct.Struct("<IIIIQ")
# struct drm_mode_create_dumb; drm_mode_map_dumb; drm_mode_destroy_dumb
_CREATE_DUMB = struct.Struct("<IIIIIIQ")
_MAP_DUMB = struct.Struct("<IIQ")
_DESTROY_DUMB = struct.Struct("<I")
# struct drm_mode_fb_cmd2: fb_id width height pixel_format flags handles[4] pitches[4]
# offsets[4] (4 bytes of padding) modifier[4]
_FB_CMD2 = struct.Struct("<5I4I4I4I4x4Q")
# struct drm_virtgpu_getparam; drm_virtgpu_get_caps
_GETPARAM = struct.Struct("<QQ")
_GET_CAPS = struct.Struct("<IIQII")
# struct drm_event; drm_event_vblank
_EVENT = struct.Struct("<II")
_EVENT_VBLANK = struct.Struct("<IIQIIII")

IOCTL_VERSION = _iowr(0x00, _VERSION.size)
IOCTL_GET_CAP = _iowr(0x0C, _CAP.size)
IOCTL_SET_MASTER = _ioc(0, 0x1E, 0)
IOCTL_MODE_GETRESOURCES = _iowr(0xA0, _CARD_RES.size)
IOCTL_MODE_GETCRTC = _iowr(0xA1, _CRTC.size + _MODEINFO.size)
IOCTL_MODE_SETCRTC = _iowr(0xA2, _CRTC.size + _MODEINFO.size)
IOCTL_MODE_CURSOR = _iowr(0xA3, _CURSOR.size)
IOCTL_MODE_GETENCODER = _iowr(0xA6, _ENCODER.size)
IOCTL_MODE_GETCONNECTOR = _iowr(0xA7, _CONNECTOR.size)
IOCTL_MODE_GETPROPERTY = _iowr(0xAA, _PROPERTY.size)
IOCTL_MODE_GETPROPBLOB = _iowr(0xAC, _BLOB.size)
IOCTL_MODE_RMFB = _iowr(0xAF, 4)
IOCTL_MODE_PAGE_FLIP = _iowr(0xB0, _PAGE_FLIP.size)
IOCTL_MODE_DIRTYFB = _iowr(0xB1, _DIRTY.size)
IOCTL_MODE_CREATE_DUMB = _iowr(0xB2, _CREATE_DUMB.size)
IOCTL_MODE_MAP_DUMB = _iowr(0xB3, _MAP_DUMB.size)
IOCTL_MODE_DESTROY_DUMB = _iowr(0xB4, _DESTROY_DUMB.size)
IOCTL_MODE_ADDFB2 = _iowr(0xB8, _FB_CMD2.size)
IOCTL_MODE_CURSOR2 = _iowr(0xBB, _CURSOR2.size)
DRM_COMMAND_BASE = 0x40
IOCTL_VIRTGPU_GETPARAM = _iowr(DRM_COMMAND_BASE + 0x03, _GETPARAM.size)
IOCTL_VIRTGPU_GET_CAPS = _iowr(DRM_COMMAND_BASE + 0x09, _GET_CAPS.size)

# VIRTGPU_PARAM_* (virtgpu_drm.h; Linux 6.1 knows 1..7)
PARAM_3D_FEATURES = 1
PARAM_CAPSET_QUERY_FIX = 2
PARAM_RESOURCE_BLOB = 3
PARAM_HOST_VISIBLE = 4
PARAM_CROSS_DEVICE = 5
PARAM_CONTEXT_INIT = 6
PARAM_SUPPORTED_CAPSET_IDS = 7

CAP_DUMB_BUFFER = 0x1
CAP_CURSOR_WIDTH = 0x8
CAP_CURSOR_HEIGHT = 0x9

FORMAT_XRGB8888 = int.from_bytes(b"XR24", "little")
MODE_TYPE_PREFERRED = 1 << 3
PROP_IMMUTABLE = 1 << 2
PROP_BLOB = 1 << 4
CONNECTOR_VIRTUAL = 15
CONNECTED = 1
CURSOR_BO = 0x01
CURSOR_MOVE = 0x02
PAGE_FLIP_EVENT = 0x01
EVENT_FLIP_COMPLETE = 0x02


_PARAM_SENTINEL = 0xA5A5A5A5_5A5A5A5A


class DrmError(OSError):
    """An ioctl failed; ``errno`` holds the kernel's error."""


def _u32_array(count: int) -> ctypes.Array[ctypes.c_uint32]:
    return (ctypes.c_uint32 * max(count, 1))()


def _u64_array(count: int) -> ctypes.Array[ctypes.c_uint64]:
    return (ctypes.c_uint64 * max(count, 1))()


def _address(buffer: ctypes.Array[ctypes.c_uint32] | ctypes.Array[ctypes.c_uint64]
             | ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buffer)


@dataclass(frozen=True)
class DriverVersion:
    """DRM_IOCTL_VERSION."""

    major: int
    minor: int
    patchlevel: int
    name: str
    date: str
    description: str


@dataclass(frozen=True)
class CardResources:
    """DRM_IOCTL_MODE_GETRESOURCES."""

    fbs: tuple[int, ...]
    crtcs: tuple[int, ...]
    connectors: tuple[int, ...]
    encoders: tuple[int, ...]
    min_size: tuple[int, int]
    max_size: tuple[int, int]


class ModeInfo(NamedTuple):
    """``struct drm_mode_modeinfo``."""

    clock: int
    hdisplay: int
    hsync_start: int
    hsync_end: int
    htotal: int
    hskew: int
    vdisplay: int
    vsync_start: int
    vsync_end: int
    vtotal: int
    vscan: int
    vrefresh: int
    flags: int
    type: int
    name: bytes

    @classmethod
    def unpack(cls, data: bytes, offset: int = 0) -> ModeInfo:
        """Decode one modeinfo at ``offset``."""
        return cls._make(_MODEINFO.unpack_from(data, offset))

    def pack(self) -> bytes:
        """Encode for SETCRTC."""
        return _MODEINFO.pack(*self)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.hdisplay, self.vdisplay

    @property
    def preferred(self) -> bool:
        """DRM_MODE_TYPE_PREFERRED is set."""
        return bool(self.type & MODE_TYPE_PREFERRED)


@dataclass(frozen=True)
class Connector:
    """DRM_IOCTL_MODE_GETCONNECTOR."""

    connector_id: int
    connector_type: int
    connection: int
    encoder_id: int
    encoders: tuple[int, ...]
    modes: tuple[ModeInfo, ...]
    properties: dict[int, int]  # property id -> value
    mm_size: tuple[int, int]


@dataclass(frozen=True)
class Encoder:
    """DRM_IOCTL_MODE_GETENCODER."""

    encoder_id: int
    encoder_type: int
    crtc_id: int
    possible_crtcs: int


@dataclass(frozen=True)
class Crtc:
    """DRM_IOCTL_MODE_GETCRTC."""

    crtc_id: int
    fb_id: int
    position: tuple[int, int]
    mode: ModeInfo | None


@dataclass(frozen=True)
class Property:
    """DRM_IOCTL_MODE_GETPROPERTY (name and flags only)."""

    prop_id: int
    name: str
    flags: int


@dataclass(frozen=True)
class FlipEvent:
    """A DRM_EVENT_FLIP_COMPLETE read from the card."""

    user_data: int
    sequence: int
    crtc_id: int


class Card:
    """An open DRM device node."""

    def __init__(self, path: str = "/dev/dri/card0") -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def close(self) -> None:
        """Close the node (the last close restores the fbdev console's mode)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Card:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ioctl(self, request: int, data: bytes) -> bytes:
        """Issue ``request`` with ``data`` in/out; raise DrmError on failure."""
        buffer = bytearray(data)
        try:
            fcntl.ioctl(self.fd, request, buffer, True)
        except OSError as err:
            raise DrmError(err.errno, f"ioctl {request:#x} on {self.path}: "
                                      f"{os.strerror(err.errno or 0)}") from None
        return bytes(buffer)

    # --- driver -----------------------------------------------------------------------

    def version(self) -> DriverVersion:
        """The driver's name, date, description and version."""
        sizes = _VERSION.unpack(self.ioctl(IOCTL_VERSION, bytes(_VERSION.size)))
        name, date, desc = (ctypes.create_string_buffer(n + 1) for n in sizes[3::2])
        out = _VERSION.unpack(self.ioctl(IOCTL_VERSION, _VERSION.pack(
            0, 0, 0, sizes[3], _address(name), sizes[5], _address(date), sizes[7],
            _address(desc))))
        return DriverVersion(out[0], out[1], out[2], name.value.decode(), date.value.decode(),
                             desc.value.decode())

    def get_cap(self, cap: int) -> int:
        """DRM_IOCTL_GET_CAP."""
        return int(_CAP.unpack(self.ioctl(IOCTL_GET_CAP, _CAP.pack(cap, 0)))[1])

    def set_master(self) -> None:
        """Become DRM master (root may take it whenever nobody holds it)."""
        self.ioctl(IOCTL_SET_MASTER, b"")

    def get_param(self, param: int) -> int:
        """VIRTGPU_GETPARAM as unsigned: Linux 6.1 writes a 32-bit int (a kernel writing
        64 bits is detected by the overwritten upper half of a sentinel)."""
        value = _u64_array(1)
        value[0] = _PARAM_SENTINEL
        self.ioctl(IOCTL_VIRTGPU_GETPARAM, _GETPARAM.pack(param, _address(value)))
        if value[0] >> 32 == _PARAM_SENTINEL >> 32:
            return int(value[0] & 0xFFFFFFFF)
        return int(value[0])

    def get_caps(self, capset_id: int, version: int, size: int) -> bytes:
        """VIRTGPU_GET_CAPS: the first ``size`` bytes of a capset (from the device)."""
        buffer = ctypes.create_string_buffer(size)
        self.ioctl(IOCTL_VIRTGPU_GET_CAPS,
                   _GET_CAPS.pack(capset_id, version, _address(buffer), size, 0))
        return buffer.raw

    # --- mode objects -----------------------------------------------------------------

    def resources(self) -> CardResources:
        """Framebuffers, CRTCs, connectors and encoders."""
        counts = _CARD_RES.unpack(self.ioctl(IOCTL_MODE_GETRESOURCES, bytes(_CARD_RES.size)))
        arrays = [_u32_array(n) for n in counts[4:8]]
        out = _CARD_RES.unpack(self.ioctl(IOCTL_MODE_GETRESOURCES, _CARD_RES.pack(
            *(_address(a) for a in arrays), *counts[4:8], 0, 0, 0, 0)))
        ids = [tuple(arrays[i][:min(out[4 + i], counts[4 + i])]) for i in range(4)]
        return CardResources(ids[0], ids[1], ids[2], ids[3], (out[8], out[10]),
                             (out[9], out[11]))

    def connector(self, connector_id: int) -> Connector:
        """A connector with its modes (forces a probe) and property values."""
        while True:
            first = _CONNECTOR.unpack(self.ioctl(IOCTL_MODE_GETCONNECTOR, _CONNECTOR.pack(
                0, 0, 0, 0, 0, 0, 0, 0, connector_id, 0, 0, 0, 0, 0, 0, 0)))
            n_modes, n_props, n_encoders = first[4:7]
            modes = ctypes.create_string_buffer(max(n_modes, 1) * _MODEINFO.size)
            props, values, encoders = _u32_array(n_props), _u64_array(n_props), \
                _u32_array(n_encoders)
            out = _CONNECTOR.unpack(self.ioctl(IOCTL_MODE_GETCONNECTOR, _CONNECTOR.pack(
                _address(encoders), _address(modes), _address(props), _address(values),
                n_modes, n_props, n_encoders, 0, connector_id, 0, 0, 0, 0, 0, 0, 0)))
            if out[4:7] == (n_modes, n_props, n_encoders):  # else it changed: ask again
                break
        return Connector(
            connector_id=out[8], connector_type=out[9], connection=out[11],
            encoder_id=out[7], encoders=tuple(encoders[:n_encoders]),
            modes=tuple(ModeInfo.unpack(modes.raw, i * _MODEINFO.size)
                        for i in range(n_modes)),
            properties={props[i]: values[i] for i in range(n_props)},
            mm_size=(out[12], out[13]))

    def encoder(self, encoder_id: int) -> Encoder:
        """An encoder."""
        out = _ENCODER.unpack(self.ioctl(IOCTL_MODE_GETENCODER,
                                         _ENCODER.pack(encoder_id, 0, 0, 0, 0)))
        return Encoder(out[0], out[1], out[2], out[3])

    def crtc(self, crtc_id: int) -> Crtc:
        """A CRTC's framebuffer, position and mode."""
        data = self.ioctl(IOCTL_MODE_GETCRTC, _CRTC.pack(0, 0, crtc_id, 0, 0, 0, 0, 0)
                          + bytes(_MODEINFO.size))
        out = _CRTC.unpack_from(data)
        mode = ModeInfo.unpack(data, _CRTC.size) if out[7] else None
        return Crtc(out[2], out[3], (out[4], out[5]), mode)

    def set_crtc(self, crtc_id: int, fb_id: int, connectors: Sequence[int],
                 mode: ModeInfo, x: int = 0, y: int = 0) -> None:
        """DRM_IOCTL_MODE_SETCRTC: scan ``fb_id`` out on ``connectors`` in ``mode``."""
        ids = _u32_array(len(connectors))
        for i, connector_id in enumerate(connectors):
            ids[i] = connector_id
        self.ioctl(IOCTL_MODE_SETCRTC, _CRTC.pack(_address(ids), len(connectors), crtc_id,
                                                  fb_id, x, y, 0, 1) + mode.pack())

    def property(self, prop_id: int) -> Property:
        """A property's name and flags."""
        out = _PROPERTY.unpack(self.ioctl(IOCTL_MODE_GETPROPERTY,
                                          _PROPERTY.pack(0, 0, prop_id, 0, b"", 0, 0)))
        return Property(out[2], out[4].rstrip(b"\0").decode(), out[3])

    def property_blob(self, blob_id: int) -> bytes:
        """The bytes of a property blob."""
        length = _BLOB.unpack(self.ioctl(IOCTL_MODE_GETPROPBLOB,
                                         _BLOB.pack(blob_id, 0, 0)))[1]
        data = ctypes.create_string_buffer(max(length, 1))
        self.ioctl(IOCTL_MODE_GETPROPBLOB, _BLOB.pack(blob_id, length, _address(data)))
        return data.raw[:length]

    # --- buffers and framebuffers -----------------------------------------------------

    def create_dumb(self, width: int, height: int, bpp: int = 32) -> DumbBuffer:
        """DRM_IOCTL_MODE_CREATE_DUMB."""
        out = _CREATE_DUMB.unpack(self.ioctl(IOCTL_MODE_CREATE_DUMB, _CREATE_DUMB.pack(
            height, width, bpp, 0, 0, 0, 0)))
        return DumbBuffer(self, out[4], width, height, out[5], out[6])

    def map_dumb(self, handle: int) -> int:
        """DRM_IOCTL_MODE_MAP_DUMB: the mmap offset of a dumb buffer."""
        return int(_MAP_DUMB.unpack(self.ioctl(IOCTL_MODE_MAP_DUMB,
                                               _MAP_DUMB.pack(handle, 0, 0)))[2])

    def destroy_dumb(self, handle: int) -> None:
        """DRM_IOCTL_MODE_DESTROY_DUMB."""
        self.ioctl(IOCTL_MODE_DESTROY_DUMB, _DESTROY_DUMB.pack(handle))

    def add_fb2(self, width: int, height: int, pixel_format: int, handle: int,
                pitch: int) -> int:
        """DRM_IOCTL_MODE_ADDFB2 for a single-plane buffer; returns the fb id."""
        out = _FB_CMD2.unpack(self.ioctl(IOCTL_MODE_ADDFB2, _FB_CMD2.pack(
            0, width, height, pixel_format, 0, handle, 0, 0, 0, pitch, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0)))
        return int(out[0])

    def rm_fb(self, fb_id: int) -> None:
        """DRM_IOCTL_MODE_RMFB."""
        self.ioctl(IOCTL_MODE_RMFB, struct.pack("<I", fb_id))

    def dirty_fb(self, fb_id: int, clips: Sequence[tuple[int, int, int, int]]) -> None:
        """DRM_IOCTL_MODE_DIRTYFB with clip rectangles (x1, y1, x2, y2), x2/y2 exclusive."""
        rects = ctypes.create_string_buffer(struct.pack(f"<{4 * len(clips)}H",
                                                        *(v for clip in clips for v in clip)))
        self.ioctl(IOCTL_MODE_DIRTYFB, _DIRTY.pack(fb_id, 0, 0, len(clips), _address(rects)))

    def page_flip(self, crtc_id: int, fb_id: int, user_data: int) -> None:
        """DRM_IOCTL_MODE_PAGE_FLIP asking for a flip-complete event."""
        self.ioctl(IOCTL_MODE_PAGE_FLIP, _PAGE_FLIP.pack(crtc_id, fb_id, PAGE_FLIP_EVENT, 0,
                                                         user_data))

    def read_flip_event(self, timeout: float) -> FlipEvent:
        """Wait for one flip-complete event; TimeoutError if none comes."""
        if not select.select([self.fd], [], [], timeout)[0]:
            raise TimeoutError(f"no DRM event within {timeout} s")
        data = os.read(self.fd, 4096)
        kind, length = _EVENT.unpack_from(data)
        if kind != EVENT_FLIP_COMPLETE or length != _EVENT_VBLANK.size or len(data) != length:
            raise AssertionError(f"unexpected DRM event type {kind} length {length} "
                                 f"({len(data)} bytes read)")
        fields = _EVENT_VBLANK.unpack(data)
        return FlipEvent(fields[2], fields[5], fields[6])

    # --- cursor -----------------------------------------------------------------------

    def set_cursor(self, crtc_id: int, handle: int, width: int, height: int) -> None:
        """DRM_IOCTL_MODE_CURSOR with DRM_MODE_CURSOR_BO (handle 0 hides it)."""
        self.ioctl(IOCTL_MODE_CURSOR, _CURSOR.pack(CURSOR_BO, crtc_id, 0, 0, width, height,
                                                   handle))

    def set_cursor2(self, crtc_id: int, handle: int, width: int, height: int,
                    hot_x: int, hot_y: int) -> None:
        """DRM_IOCTL_MODE_CURSOR2 with DRM_MODE_CURSOR_BO and a hotspot."""
        self.ioctl(IOCTL_MODE_CURSOR2, _CURSOR2.pack(CURSOR_BO, crtc_id, 0, 0, width, height,
                                                     handle, hot_x, hot_y))

    def move_cursor(self, crtc_id: int, x: int, y: int) -> None:
        """DRM_IOCTL_MODE_CURSOR with DRM_MODE_CURSOR_MOVE."""
        self.ioctl(IOCTL_MODE_CURSOR, _CURSOR.pack(CURSOR_MOVE, crtc_id, x, y, 0, 0, 0))


@dataclass(frozen=True)
class DumbBuffer:
    """A dumb buffer's GEM handle and geometry."""

    card: Card
    handle: int
    width: int
    height: int
    pitch: int
    size: int

    @contextmanager
    def mapped(self) -> Iterator[mmap.mmap]:
        """MAP_DUMB + mmap for the block only: a mapping keeps the DRM file (and with it
        DRM master and the buffer's pages) alive after the card is closed."""
        mapping = mmap.mmap(self.card.fd, self.size, mmap.MAP_SHARED,
                            mmap.PROT_READ | mmap.PROT_WRITE,
                            offset=self.card.map_dumb(self.handle))
        try:
            yield mapping
        finally:
            mapping.close()

    def store(self, pixels: Image, x: int = 0, y: int = 0) -> None:
        """Copy (H, W, 4) pixel bytes (B, G, R, X/A) to (x, y)."""
        height, width = pixels.shape[:2]
        with self.mapped() as mapping:
            rows = np.frombuffer(mapping, np.uint8, self.height * self.pitch)
            rows.reshape(self.height, self.pitch)[y:y + height, x * 4:(x + width) * 4] = \
                pixels.reshape(height, width * 4)
            del rows  # release the export before the mapping closes

    def write_rgb(self, rgb: Image, x: int = 0, y: int = 0) -> None:
        """Store (H, W, 3) RGB at (x, y) as XRGB8888."""
        bgrx = np.full((*rgb.shape[:2], 4), 0xFF, np.uint8)
        bgrx[..., :3] = rgb[..., ::-1]
        self.store(bgrx, x, y)

    def destroy(self) -> None:
        """DRM_IOCTL_MODE_DESTROY_DUMB."""
        self.card.destroy_dumb(self.handle)


@dataclass(frozen=True)
class Output:
    """A connected connector with the CRTC that drives it and its preferred mode."""

    connector: Connector
    crtc_id: int
    mode: ModeInfo


def find_output(card: Card) -> Output:
    """The first connected connector that has modes (virtio-gpu scanout 0)."""
    for output in all_outputs(card):
        if output.connector.connection == CONNECTED:
            return output
    raise LookupError(f"{card.path} has no connected connector with modes")


def all_outputs(card: Card) -> list[Output]:
    """Every connector that has modes, in connector order (virtio-gpu: scanout order),
    connected or not (QEMU enables only head 0 without a UI, but every head displays),
    each with its own CRTC."""
    resources = card.resources()
    outputs, taken = [], set()
    for connector_id in resources.connectors:
        connector = card.connector(connector_id)
        if not connector.modes:
            continue
        preferred = [m for m in connector.modes if m.preferred] or [connector.modes[0]]
        encoder = card.encoder(connector.encoder_id or connector.encoders[0])
        crtc_id = encoder.crtc_id
        if not crtc_id or crtc_id in taken:
            free = [crtc for index, crtc in enumerate(resources.crtcs)
                    if encoder.possible_crtcs >> index & 1 and crtc not in taken]
            if not free:
                continue
            crtc_id = free[0]
        taken.add(crtc_id)
        outputs.append(Output(connector, crtc_id, preferred[0]))
    return outputs


class Display:
    """DRM master of a card, driving its first connected output in its preferred mode.

    While we are master the fbdev helper may not commit (its pan/restore paths return
    EBUSY) and fbcon draws only into its own framebuffer, which is off screen; closing
    the card (the last close) makes the kernel restore the console's mode.
    """

    def __init__(self, path: str = "/dev/dri/card0") -> None:
        self.card = Card(path)
        try:
            self.card.set_master()
            self.output = find_output(self.card)
        except BaseException:
            self.card.close()
            raise

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the mode."""
        return self.output.mode.size

    def framebuffer(self, rgb: Image) -> Framebuffer:
        """A new framebuffer the size of ``rgb`` (H, W, 3), holding it."""
        height, width = rgb.shape[:2]
        fb = Framebuffer.create(self.card, width, height)
        fb.buffer.write_rgb(rgb)
        return fb

    def show(self, fb: Framebuffer) -> None:
        """SETCRTC: scan ``fb`` out in the preferred mode."""
        self.card.set_crtc(self.output.crtc_id, fb.fb_id,
                           [self.output.connector.connector_id], self.output.mode)

    def close(self) -> None:
        """Close the card (the kernel then gives the display back to the console)."""
        self.card.close()


@dataclass
class Framebuffer:
    """A dumb buffer registered with ADDFB2 as XRGB8888."""

    buffer: DumbBuffer
    fb_id: int

    @classmethod
    def create(cls, card: Card, width: int, height: int) -> Framebuffer:
        """CREATE_DUMB + ADDFB2."""
        buffer = card.create_dumb(width, height)
        try:
            fb_id = card.add_fb2(width, height, FORMAT_XRGB8888, buffer.handle, buffer.pitch)
        except OSError:
            buffer.destroy()
            raise
        return cls(buffer, fb_id)

    def destroy(self) -> None:
        """RMFB + DESTROY_DUMB."""
        self.buffer.card.rm_fb(self.fb_id)
        self.buffer.destroy()
