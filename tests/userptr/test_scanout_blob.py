"""SET_SCANOUT_BLOB: a framebuffer in a blob's guest pages reaches QEMU's console."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from protocol.display import DisplayReq
from protocol.limits import DEFAULT_LIMITS
from protocol.virtio_gpu_codes import BlobFlag, BlobMem, Format, Resp
from tests.frontend import gpu_commands as cmds
from tests.frontend.gpu_commands import Rect
from tests.frontend.pixels import display_bgr, random_pixels
from tests.userptr import guest_commands as gc
from tests.userptr.fixtures import VmFactory, VmPool
from tests.userptr.guest_buffer import GuestBuffer, contiguous_buffer, scattered_buffer
from tests.userptr.vm import Vm

WIDTH, HEIGHT = 40, 24
STRIDE = WIDTH * 4 + 96  # rows padded
OFFSET = 200  # the framebuffer starts inside the blob
MAX_BACKING_ENTRIES = DEFAULT_LIMITS.max_backing_entries

@pytest.fixture
def vm(shared_vm: Vm) -> Vm:
    """The tests of this module share one back-end (each uses its own context)."""
    return shared_vm



def framebuffer_bytes(pixels: npt.NDArray[np.uint8], stride: int, offset: int) -> bytes:
    """The blob contents holding ``pixels`` (h, w, 4) with ``stride`` and ``offset``."""
    height, width = pixels.shape[:2]
    raw = np.zeros(offset + stride * height, dtype=np.uint8)
    rows = raw[offset:].reshape(height, stride)
    rows[:, :width * 4] = pixels.reshape(height, width * 4)
    return raw.tobytes()


def painted_buffer(vm: Vm, pixels: npt.NDArray[np.uint8]) -> GuestBuffer:
    """Scattered guest pages holding the framebuffer."""
    data = framebuffer_bytes(pixels, STRIDE, OFFSET)
    buf = scattered_buffer(vm.ram, len(data))
    buf.write(vm.ram, data)
    return buf


def show(vm: Vm, resource_id: int, fmt: int = Format.B8G8R8X8_UNORM,
         rect: tuple[int, int, int, int] | None = None) -> cmds.GpuResponse:
    """SET_SCANOUT_BLOB of the test framebuffer on scanout 0."""
    return vm.run(gc.set_scanout_blob(0, resource_id, fmt=fmt, fb_width=WIDTH,
                                      fb_height=HEIGHT, stride=STRIDE, offset=OFFSET,
                                      rect=rect))


def console_bgr(vm: Vm) -> npt.NDArray[np.uint8]:
    """What QEMU's console shows on scanout 0 (B, G, R), after every display message."""
    vm.s.sync_display()
    return vm.s.console.surface(0)[..., :3]


@pytest.mark.parametrize("fmt", [Format.B8G8R8X8_UNORM, Format.R8G8B8A8_UNORM,
                                 Format.X8R8G8B8_UNORM, Format.A8B8G8R8_UNORM],
                         ids=lambda f: Format(f).name)
def test_guest_blob_framebuffer(vm: Vm, fmt: Format) -> None:
    """A GUEST blob over scattered pages, padded rows, an offset: the console shows it."""
    pixels = random_pixels(HEIGHT, WIDTH, seed=int(fmt))
    buf = painted_buffer(vm, pixels)
    rid = vm.new_resource_id()
    vm.create_blob(rid, buf.entries, buf.size, blob_mem=BlobMem.GUEST,
                   flags=BlobFlag.USE_MAPPABLE).expect(Resp.OK_NODATA)
    show(vm, rid, fmt).expect(Resp.OK_NODATA)
    assert np.array_equal(console_bgr(vm), display_bgr(pixels, fmt))


def test_partial_rectangle(vm: Vm) -> None:
    """A sub-rectangle of the framebuffer becomes the scanout."""
    pixels = random_pixels(HEIGHT, WIDTH, seed=5)
    buf = painted_buffer(vm, pixels)
    rid = vm.new_resource_id()
    vm.create_blob(rid, buf.entries, buf.size, blob_mem=BlobMem.GUEST, flags=0
                   ).expect(Resp.OK_NODATA)
    x, y, w, h = 7, 3, 20, 11
    show(vm, rid, rect=(x, y, w, h)).expect(Resp.OK_NODATA)
    want = display_bgr(pixels, Format.B8G8R8X8_UNORM)[y:y + h, x:x + w]
    assert np.array_equal(console_bgr(vm), want)


def test_blob_attached_later(vm: Vm) -> None:
    """nr_entries 0 at creation: no framebuffer (ERR_UNSPEC) until ATTACH_BACKING."""
    pixels = random_pixels(HEIGHT, WIDTH, seed=6)
    buf = painted_buffer(vm, pixels)
    rid = vm.new_resource_id()
    vm.create_blob(rid, [], buf.size, blob_mem=BlobMem.GUEST, flags=BlobFlag.USE_SHAREABLE
                   ).expect(Resp.OK_NODATA)
    show(vm, rid).expect(Resp.ERR_UNSPEC)
    vm.s.gpu.attach_backing(rid, buf.entries).expect(Resp.OK_NODATA)
    show(vm, rid).expect(Resp.OK_NODATA)
    assert np.array_equal(console_bgr(vm), display_bgr(pixels, Format.B8G8R8X8_UNORM))


def test_userptr_blob_framebuffer_is_zero_copy(vm: Vm) -> None:
    """A USERPTR blob as framebuffer; after the guest changes its pages, RESOURCE_FLUSH
    shows the new pixels (the device reads guest memory in place)."""
    first = random_pixels(HEIGHT, WIDTH, seed=7)
    buf = painted_buffer(vm, first)
    rid = vm.new_resource_id()
    vm.create_blob(rid, buf.entries, buf.size, blob_mem=BlobMem.GUEST,
                   flags=BlobFlag.USE_USERPTR).expect(Resp.OK_NODATA)
    show(vm, rid).expect(Resp.OK_NODATA)
    assert np.array_equal(console_bgr(vm), display_bgr(first, Format.B8G8R8X8_UNORM))
    second = random_pixels(HEIGHT, WIDTH, seed=8)
    buf.write(vm.ram, framebuffer_bytes(second, STRIDE, OFFSET))
    vm.run(cmds.resource_flush(rid, Rect(0, 0, WIDTH, HEIGHT))).expect(Resp.OK_NODATA)
    assert np.array_equal(console_bgr(vm), display_bgr(second, Format.B8G8R8X8_UNORM))


def test_unref_disables_the_scanout(vm: Vm) -> None:
    """RESOURCE_UNREF of the blob being shown: QEMU gets a 0x0 SCANOUT for it."""
    buf = painted_buffer(vm, random_pixels(HEIGHT, WIDTH, seed=9))
    rid = vm.new_resource_id()
    vm.create_blob(rid, buf.entries, buf.size, blob_mem=BlobMem.GUEST, flags=0
                   ).expect(Resp.OK_NODATA)
    show(vm, rid).expect(Resp.OK_NODATA)
    vm.s.sync_display()
    before = vm.s.display.count(DisplayReq.SCANOUT)
    vm.unref(rid).expect(Resp.OK_NODATA)
    vm.s.sync_display()
    scanouts = vm.s.display.of_type(DisplayReq.SCANOUT)
    assert len(scanouts) == before + 1
    assert scanouts[-1].fields[1:3] == (0, 0)
    vm.run(gc.set_scanout_blob(0, 0, fmt=Format.B8G8R8X8_UNORM, fb_width=1, fb_height=1,
                               stride=4)).expect(Resp.OK_NODATA)


def test_a_huge_stride_reads_only_the_rows(start_vm: VmFactory) -> None:
    """Entries that repeat the same 64 KiB make a 1 GiB blob; a 1x4 scanout with a
    256 MiB stride reads its 4 rows (16 bytes), not the 768 MiB between them."""
    vm = start_vm()
    page_run = contiguous_buffer(vm.ram, 64 * 1024)
    page_run.write(vm.ram, bytes(range(256)) * 256)
    repeats = MAX_BACKING_ENTRIES
    rid = vm.new_resource_id()
    vm.create_blob(rid, page_run.entries * repeats, page_run.size * repeats,
                   blob_mem=BlobMem.GUEST, flags=0).expect(Resp.OK_NODATA)
    stride = (256 << 20) + 4  # row i starts at byte 4 * i of the repeated 64 KiB
    before = peak_rss(vm)
    vm.run(gc.set_scanout_blob(0, rid, fmt=Format.B8G8R8X8_UNORM, fb_width=1, fb_height=4,
                               stride=stride, rect=(0, 0, 1, 4))).expect(Resp.OK_NODATA)
    want = np.arange(16, dtype=np.uint8).reshape(4, 1, 4)
    assert np.array_equal(console_bgr(vm), display_bgr(want, Format.B8G8R8X8_UNORM))
    assert peak_rss(vm) - before < 64 << 20
    vm.still_serving()


def test_the_framebuffer_must_fit_the_blob_size_not_its_entries(vm: Vm) -> None:
    """Against the blob's size (as QEMU): a blob of one page over entries covering two
    pages shows no framebuffer that reaches into the second page."""
    buf = scattered_buffer(vm.ram, 2 * 4096)
    rid = vm.new_resource_id()
    vm.create_blob(rid, buf.entries, 4096, blob_mem=BlobMem.GUEST, flags=0
                   ).expect(Resp.OK_NODATA)
    vm.run(gc.set_scanout_blob(0, rid, fmt=Format.B8G8R8X8_UNORM, fb_width=WIDTH,
                               fb_height=27, stride=WIDTH * 4, rect=(0, 0, WIDTH, 27))
           ).expect(Resp.ERR_INVALID_PARAMETER)
    vm.still_serving()


def peak_rss(vm: Vm) -> int:
    """The back-end process's peak resident set, in bytes."""
    status = Path(f"/proc/{vm.s.backend.proc.pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


@dataclass(frozen=True, slots=True)
class ScanoutArgs:
    """SET_SCANOUT_BLOB fields of the rejection cases (defaults: a valid command)."""

    scanout_id: int = 0
    resource_id: int | None = None  # None: the fresh blob
    fmt: int = Format.B8G8R8X8_UNORM
    fb_width: int = WIDTH
    fb_height: int = HEIGHT
    stride: int = WIDTH * 4
    offset: int = 0
    rect: tuple[int, int, int, int] = (0, 0, WIDTH, HEIGHT)


#: one page: the WIDTH x HEIGHT framebuffer (3840 bytes) fits, with 256 bytes to spare
BLOB_SIZE = 4096
REJECTIONS: dict[str, tuple[ScanoutArgs, Resp]] = {
    "scanout beyond max_outputs": (ScanoutArgs(scanout_id=1), Resp.ERR_INVALID_SCANOUT_ID),
    "scanout beyond 16": (ScanoutArgs(scanout_id=16), Resp.ERR_INVALID_SCANOUT_ID),
    "unknown resource": (ScanoutArgs(resource_id=0xDEAD), Resp.ERR_INVALID_RESOURCE_ID),
    "unknown format": (ScanoutArgs(fmt=5), Resp.ERR_INVALID_PARAMETER),
    "stride below a row": (ScanoutArgs(stride=WIDTH * 4 - 4), Resp.ERR_INVALID_PARAMETER),
    "zero width": (ScanoutArgs(fb_width=0, rect=(0, 0, 0, HEIGHT)),
                   Resp.ERR_INVALID_PARAMETER),
    "framebuffer beyond the blob": (ScanoutArgs(fb_height=27, rect=(0, 0, WIDTH, 27)),
                                    Resp.ERR_INVALID_PARAMETER),
    "offset pushes it beyond": (ScanoutArgs(offset=BLOB_SIZE - WIDTH * HEIGHT * 4 + 4),
                                Resp.ERR_INVALID_PARAMETER),
    "rectangle outside": (ScanoutArgs(rect=(1, 0, WIDTH, HEIGHT)), Resp.ERR_INVALID_PARAMETER),
    "empty rectangle": (ScanoutArgs(rect=(0, 0, WIDTH, 0)), Resp.ERR_INVALID_PARAMETER),
}


@pytest.mark.parametrize("case", list(REJECTIONS))
def test_rejections(vm_pool: VmPool, case: str) -> None:
    """Each bad SET_SCANOUT_BLOB gets its error code; the same command with valid fields
    succeeds (so only the changed field is at fault); the device keeps serving."""
    vm = vm_pool.get()
    args, code = REJECTIONS[case]
    buf = scattered_buffer(vm.ram, BLOB_SIZE)
    rid = vm.new_resource_id()
    vm.create_blob(rid, buf.entries, BLOB_SIZE, blob_mem=BlobMem.GUEST, flags=0
                   ).expect(Resp.OK_NODATA)
    target = rid if args.resource_id is None else args.resource_id
    vm.run(gc.set_scanout_blob(args.scanout_id, target, fmt=args.fmt, fb_width=args.fb_width,
                               fb_height=args.fb_height, stride=args.stride,
                               offset=args.offset, rect=args.rect)).expect(code)
    valid = ScanoutArgs()
    vm.run(gc.set_scanout_blob(0, rid, fmt=valid.fmt, fb_width=valid.fb_width,
                               fb_height=valid.fb_height, stride=valid.stride,
                               rect=valid.rect)).expect(Resp.OK_NODATA)
    vm.still_serving()


def test_not_a_blob(vm: Vm) -> None:
    """A 2D resource: INVALID_PARAMETER."""
    image = vm.s.gpu.create_image(WIDTH, HEIGHT)
    vm.run(gc.set_scanout_blob(0, image.resource_id, fmt=Format.B8G8R8X8_UNORM,
                               fb_width=WIDTH, fb_height=HEIGHT, stride=WIDTH * 4)
           ).expect(Resp.ERR_INVALID_PARAMETER)


# --- limits exactly at their bounds (found unpinned by a mutation review) ---------------

#: WIDTH x HEIGHT pixels of 4 bytes, rows unpadded: what a scanout of the whole
#: framebuffer converts per flush
FRAME_BYTES = WIDTH * HEIGHT * 4


def exact_blob(vm: Vm, size: int, *, flags: int = 0) -> int:
    """A GUEST blob of exactly ``size`` bytes over scattered pages (the entries may cover
    more: the blob's size is what counts); returns its id."""
    buf = scattered_buffer(vm.ram, size)
    rid = vm.new_resource_id()
    vm.create_blob(rid, buf.entries, size, blob_mem=BlobMem.GUEST, flags=flags
                   ).expect(Resp.OK_NODATA)
    return rid


def test_a_framebuffer_that_exactly_fills_its_blob(vm: Vm) -> None:
    """Offset 0, stride = a row, blob size = width * height * 4: the last pixel is the
    blob's last byte, accepted (one byte less is refused)."""
    rid = exact_blob(vm, FRAME_BYTES)
    vm.run(gc.set_scanout_blob(0, rid, fmt=Format.B8G8R8X8_UNORM, fb_width=WIDTH,
                               fb_height=HEIGHT, stride=WIDTH * 4)).expect(Resp.OK_NODATA)
    short = exact_blob(vm, FRAME_BYTES - 1)
    vm.run(gc.set_scanout_blob(0, short, fmt=Format.B8G8R8X8_UNORM, fb_width=WIDTH,
                               fb_height=HEIGHT, stride=WIDTH * 4)
           ).expect(Resp.ERR_INVALID_PARAMETER)
    vm.still_serving()


def test_a_rectangle_running_below_the_framebuffer(vm: Vm) -> None:
    """y = 10, height = fb_height - 5: its bottom lies 5 rows below the framebuffer
    although y itself is inside: INVALID_PARAMETER."""
    rid = exact_blob(vm, BLOB_SIZE)
    vm.run(gc.set_scanout_blob(0, rid, fmt=Format.B8G8R8X8_UNORM, fb_width=WIDTH,
                               fb_height=HEIGHT, stride=WIDTH * 4,
                               rect=(0, 10, WIDTH, HEIGHT - 5))
           ).expect(Resp.ERR_INVALID_PARAMETER)
    vm.run(gc.set_scanout_blob(0, rid, fmt=Format.B8G8R8X8_UNORM, fb_width=WIDTH,
                               fb_height=HEIGHT, stride=WIDTH * 4,
                               rect=(0, 10, WIDTH, HEIGHT - 10))).expect(Resp.OK_NODATA)
    vm.still_serving()


@pytest.mark.parametrize(("budget", "code"), [(FRAME_BYTES - 1, Resp.ERR_OUT_OF_MEMORY),
                                              (FRAME_BYTES, Resp.OK_NODATA)],
                         ids=["one byte over", "exactly"])
def test_scanout_rectangle_against_max_hostmem(vm_pool: VmPool, budget: int,
                                               code: Resp) -> None:
    """A scanout rectangle of width * height * 4 bytes: OUT_OF_MEMORY (not
    INVALID_PARAMETER) with --max-hostmem one byte below, accepted at exactly it."""
    vm = vm_pool.get("--max-hostmem", str(budget))
    rid = exact_blob(vm, BLOB_SIZE)
    vm.run(gc.set_scanout_blob(0, rid, fmt=Format.B8G8R8X8_UNORM, fb_width=WIDTH,
                               fb_height=HEIGHT, stride=WIDTH * 4)).expect(code)
    vm.still_serving()


def test_framebuffer_height_at_max_dimension(vm: Vm) -> None:
    """fb_height == max_dimension (16384, a 1-pixel-wide column) is accepted; one more
    row is INVALID_PARAMETER."""
    tall = DEFAULT_LIMITS.max_dimension
    rid = exact_blob(vm, (tall + 1) * 4)
    for height, code in ((tall, Resp.OK_NODATA), (tall + 1, Resp.ERR_INVALID_PARAMETER)):
        vm.run(gc.set_scanout_blob(0, rid, fmt=Format.B8G8R8X8_UNORM, fb_width=1,
                                   fb_height=height, stride=4, rect=(0, 0, 1, height))
               ).expect(code)
    vm.still_serving()


def test_guest_blob_survives_detach_and_reattach(vm: Vm) -> None:
    """A GUEST (not USERPTR) blob: DETACH_BACKING then ATTACH_BACKING of new pages does
    not invalidate it: SET_SCANOUT_BLOB and RESOURCE_FLUSH work and show the new pages."""
    first = random_pixels(HEIGHT, WIDTH, seed=11)
    buf = painted_buffer(vm, first)
    rid = vm.new_resource_id()
    vm.create_blob(rid, buf.entries, buf.size, blob_mem=BlobMem.GUEST, flags=0
                   ).expect(Resp.OK_NODATA)
    vm.s.gpu.detach_backing(rid).expect(Resp.OK_NODATA)
    second = random_pixels(HEIGHT, WIDTH, seed=12)
    again = painted_buffer(vm, second)
    vm.s.gpu.attach_backing(rid, again.entries).expect(Resp.OK_NODATA)
    show(vm, rid).expect(Resp.OK_NODATA)
    vm.run(cmds.resource_flush(rid, Rect(0, 0, WIDTH, HEIGHT))).expect(Resp.OK_NODATA)
    assert np.array_equal(console_bgr(vm), display_bgr(second, Format.B8G8R8X8_UNORM))
