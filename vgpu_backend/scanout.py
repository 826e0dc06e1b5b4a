"""Scanouts and the cursor: what the guest shows, and the display messages for it.

Rules kept here (QEMU's display-socket traps, ``vhost-user-gpu-protocol.md`` §3.3):
SCANOUT is sent only when a scanout's size changes, so QEMU never leaks a surface;
UPDATE carries only the damaged rectangle, in scanout coordinates, and never precedes
SCANOUT; when QEMU reads slowly, damage is merged and rendered once the socket drains.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from protocol.errors import GuestProtocolError
from protocol.virtio_gpu_codes import Format
from vgpu_backend.display import DisplayChannel, DisplayState
from vgpu_backend.pixels import to_bgra, to_bgrx
from vgpu_backend.resources import Image2D, Resource

__all__ = ["Rect", "Scanout", "ScanoutManager"]

log = logging.getLogger(__name__)

#: (x, y, width, height)
Rect = tuple[int, int, int, int]
#: renders the resource's pixels of a rectangle (resource coordinates) as x8r8g8b8
PixelSource = Callable[[Rect], npt.NDArray[np.uint32]]


def intersect(a: Rect, b: Rect) -> Rect | None:
    """The overlap of two rectangles, or ``None``."""
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1 - x0, y1 - y0)


def union(a: Rect, b: Rect) -> Rect:
    """The bounding box of two rectangles."""
    x0, y0 = min(a[0], b[0]), min(a[1], b[1])
    x1, y1 = max(a[0] + a[2], b[0] + b[2]), max(a[1] + a[3], b[1] + b[3])
    return (x0, y0, x1 - x0, y1 - y0)


@dataclass(slots=True)
class Scanout:
    """One scanout: which resource it shows, and which rectangle of it."""

    index: int
    #: the resource shown (its ``scanouts`` lists exactly the scanouts showing it)
    resource: Resource | None = None
    rect: Rect = (0, 0, 0, 0)
    #: (width, height) of the framebuffer ``rect`` lies in: the 2D resource, or the
    #: blob's framebuffer as SET_SCANOUT_BLOB laid it out for this scanout
    fb_size: tuple[int, int] = (0, 0)
    #: how to read pixels of the resource (set by SET_SCANOUT / SET_SCANOUT_BLOB)
    source: PixelSource | None = None
    #: damage (resource coordinates) waiting for the display socket to drain
    pending: Rect | None = None

    @property
    def resource_id(self) -> int:
        """The shown resource's id (0: none)."""
        return 0 if self.resource is None else self.resource.resource_id

    @property
    def enabled(self) -> bool:
        """Showing a resource."""
        return self.resource is not None

    def clear(self) -> None:
        """Show nothing; the resource shown no longer lists this scanout."""
        if self.resource is not None:
            self.resource.scanouts.discard(self.index)
        self.resource, self.rect, self.source, self.pending = None, (0, 0, 0, 0), None, None
        self.fb_size = (0, 0)


def image_source(res: Image2D) -> PixelSource:
    """Pixel source of a 2D resource's host image."""
    fmt = res.format

    def render(rect: Rect) -> npt.NDArray[np.uint32]:
        return to_bgrx(res.pixels(*rect), fmt)
    return render


class ScanoutManager:
    """All scanouts, the cursor, and the current display channel.

    While QEMU reads slowly (more than ``queue_limit`` bytes queued) nothing more is
    queued: each scanout's damage is merged, its surface size is announced from its
    state when the socket drains, and of the cursor messages only the latest image and
    the latest position after it are kept.  What a guest can make the back-end hold is
    thus bounded by the number of scanouts, whatever it sends meanwhile.
    """

    def __init__(self, count: int, queue_limit: int) -> None:
        self.scanouts = [Scanout(i) for i in range(count)]
        self._queue_limit = queue_limit
        self.display: DisplayChannel | None = None
        #: bugs of ours met while reading a scanout's pixels (logged, not raised: this
        #: also runs from the display socket's drain callback, on the event loop)
        self.internal_errors = 0
        self._drain_waiting = False  # one drain callback at a time
        #: per scanout, the cursor messages held: [latest image, latest move after it]
        self._cursor_held: dict[int, list[Callable[[DisplayChannel], None] | None]] = {}

    # --- display channel -----------------------------------------------------------

    def attach(self, display: DisplayChannel) -> None:
        """A new display socket is ready: announce every active scanout on it."""
        self.display = display
        self._drain_waiting = False  # its drain callback died with the old socket
        for scanout in self.scanouts:
            scanout.pending = (0, 0, scanout.rect[2], scanout.rect[3]) \
                if scanout.enabled else None
        self._drained()

    def detach(self, display: DisplayChannel) -> None:
        """The display socket is gone (scanout state is kept for the next one)."""
        if self.display is display:
            self.display = None

    def _ready(self) -> DisplayChannel | None:
        display = self.display
        if display is None or display.state is not DisplayState.READY:
            return None
        return display

    def _backed_up(self, display: DisplayChannel) -> bool:
        """QEMU is behind: hold what comes now, and catch up once the socket drains
        (until then, also below the limit: nothing may overtake what is held)."""
        if self._drain_waiting:
            return True
        if display.backlog <= self._queue_limit:
            return False
        self._drain_waiting = True
        display.when_drained(self._drained)
        return True

    def _drained(self) -> None:
        """Send what was held: merged damage (after its size), disabled scanouts, then
        the cursor's latest state -- unless that backs the socket up again."""
        self._drain_waiting = False
        display = self._ready()
        if display is None:
            return
        for scanout in self.scanouts:
            pending, scanout.pending = scanout.pending, None
            if not scanout.enabled:
                self._announce(scanout)  # 0x0 needs no UPDATE after it
            elif pending is not None:
                self._send(scanout, pending)  # announces the size with its UPDATE
        if self._drain_waiting:
            return  # backed up again: the cursor waits for the next drain
        held, self._cursor_held = self._cursor_held, {}
        for messages in held.values():
            for message in messages:
                if message is not None:
                    message(display)

    # --- scanout changes -----------------------------------------------------------

    def show(self, index: int, res: Resource, rect: Rect, source: PixelSource,
             fb_size: tuple[int, int]) -> None:
        """Point scanout ``index`` at ``rect`` of ``res`` (a framebuffer of ``fb_size``)
        and display it."""
        scanout = self.scanouts[index]
        if scanout.resource is res and scanout.rect == rect and scanout.source is not None:
            scanout.source, scanout.fb_size = source, fb_size
            return
        if scanout.resource is not res:
            scanout.clear()
        scanout.fb_size = fb_size
        scanout.resource = res
        scanout.rect = rect
        scanout.source = source
        scanout.pending = None
        res.scanouts.add(index)
        self._send(scanout, (0, 0, rect[2], rect[3]))

    def disable(self, index: int) -> None:
        """Stop showing anything on scanout ``index`` (SCANOUT 0x0)."""
        scanout = self.scanouts[index]
        scanout.clear()
        display = self._ready()
        if display is not None and not self._backed_up(display):
            self._announce(scanout)

    def framebuffer_sizes(self, res: Resource) -> list[tuple[int, int]]:
        """The framebuffer sizes ``res`` is shown with (a blob may be laid out
        differently on each scanout); empty when no scanout shows it."""
        return [self.scanouts[index].fb_size for index in sorted(res.scanouts)]

    def forget_resource(self, res: Resource) -> None:
        """A resource is going away: disable every scanout showing it."""
        for index in sorted(res.scanouts):
            self.disable(index)

    def _announce(self, scanout: Scanout) -> None:
        """SCANOUT, when the size QEMU has differs from the scanout's (0x0: disabled)."""
        display = self._ready()
        if display is None:
            return
        size = (scanout.rect[2], scanout.rect[3]) if scanout.enabled else None
        if display.announced(scanout.index) != size:
            display.scanout(scanout.index, *(size or (0, 0)))

    # --- updates ---------------------------------------------------------------------

    def flush(self, res: Resource, rect: Rect) -> None:
        """RESOURCE_FLUSH: send the damaged ``rect`` (resource coordinates) to every
        scanout showing ``res``."""
        for index in sorted(res.scanouts):
            scanout = self.scanouts[index]
            damage = intersect(rect, scanout.rect)
            if damage is None:
                continue
            local = (damage[0] - scanout.rect[0], damage[1] - scanout.rect[1],
                     damage[2], damage[3])
            self._send(scanout, local)

    def _send(self, scanout: Scanout, local: Rect) -> None:
        """Send ``local`` (scanout coordinates) after the surface size if it changed,
        or merge it while the socket is backed up."""
        display = self._ready()
        if display is None or scanout.source is None:
            return
        if self._backed_up(display):
            scanout.pending = local if scanout.pending is None else \
                union(scanout.pending, local)
            return
        sx, sy = scanout.rect[0], scanout.rect[1]
        try:
            pixels = scanout.source((local[0] + sx, local[1] + sy, local[2], local[3]))
        except GuestProtocolError as err:  # e.g. a blob whose backing shrank since
            log.warning("scanout %d: cannot read its pixels (%s); not updated",
                        scanout.index, err)
            return
        except Exception:
            self.internal_errors += 1
            log.exception("internal error reading scanout %d's pixels; not updated",
                          scanout.index)
            return
        # a new size goes out only with an UPDATE after it: QEMU frees a surface when
        # it draws the next one (and would crash on an UPDATE before any SCANOUT)
        self._announce(scanout)
        display.update(scanout.index, local[0], local[1], pixels)

    # --- cursor ----------------------------------------------------------------------

    def cursor_image(self, index: int, res: Image2D, x: int, y: int, hot_x: int,
                     hot_y: int) -> None:
        """UPDATE_CURSOR with a 64x64 resource."""
        argb = to_bgra(res.pixels(0, 0, 64, 64), Format(res.format))

        def message(display: DisplayChannel) -> None:
            display.cursor_update(index, x, y, hot_x, hot_y, argb)
        self._cursor(index, message, image=True)

    def cursor_move(self, index: int, x: int, y: int, visible: bool) -> None:
        """MOVE_CURSOR (or hide it)."""
        def message(display: DisplayChannel) -> None:
            display.cursor_move(index, x, y, visible)
        self._cursor(index, message, image=False)

    def _cursor(self, index: int, message: Callable[[DisplayChannel], None], *,
                image: bool) -> None:
        display = self.display
        if display is None or display.state is DisplayState.CLOSED:
            return
        if display.state is DisplayState.READY and not self._cursor_held and \
                not self._backed_up(display):
            message(display)
            return
        # held: behind a backlog, or until a new socket's features are agreed (attach)
        held = self._cursor_held.setdefault(index, [None, None])
        if image:  # an image carries its position: earlier moves are moot
            held[0], held[1] = message, None
        else:
            held[1] = message
