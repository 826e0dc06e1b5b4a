"""Reference model of 2D pixels: format byte orders, transfers, display conversion.

Every virtio-gpu 2D format name lists its bytes in memory order (``B8G8R8X8`` = bytes
B, G, R, X), which QEMU maps to the matching pixman format; the display wants
x8r8g8b8, i.e. bytes B, G, R, X.  Tests compute the expected console from these
models and compare the B, G, R bytes (QEMU ignores X).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from protocol.virtio_gpu_codes import Format
from tests.frontend.gpu_commands import Rect

__all__ = ["BYTE_ORDER", "apply_transfer", "display_bgr", "random_pixels"]

#: memory byte order of each 2D format
BYTE_ORDER: dict[int, str] = {
    Format.B8G8R8A8_UNORM: "BGRA",
    Format.B8G8R8X8_UNORM: "BGRX",
    Format.A8R8G8B8_UNORM: "ARGB",
    Format.X8R8G8B8_UNORM: "XRGB",
    Format.R8G8B8A8_UNORM: "RGBA",
    Format.X8B8G8R8_UNORM: "XBGR",
    Format.A8B8G8R8_UNORM: "ABGR",
    Format.R8G8B8X8_UNORM: "RGBX",
}


def random_pixels(height: int, width: int, seed: int) -> npt.NDArray[np.uint8]:
    """Random ``(height, width, 4)`` bytes."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)


def display_bgr(pixels: npt.NDArray[np.uint8], fmt: int) -> npt.NDArray[np.uint8]:
    """The B, G, R display bytes of ``pixels`` stored in format ``fmt``."""
    order = BYTE_ORDER[fmt]
    return np.stack([pixels[..., order.index(c)] for c in "BGR"], axis=-1)


def apply_transfer(host: npt.NDArray[np.uint8], backing: bytes | npt.NDArray[np.uint8],
                   rect: Rect, offset: int) -> None:
    """TRANSFER_TO_HOST_2D into a ``(h, w, 4)`` host image, as QEMU does it.

    Row ``r`` of the rectangle comes from ``backing[offset + stride*r:][:width*4]`` with
    ``stride`` the resource's row pitch (``w*4``).
    """
    src = np.frombuffer(backing, dtype=np.uint8) if isinstance(backing, bytes) else backing
    stride = host.shape[1] * 4
    for r in range(rect.height):
        start = offset + stride * r
        row = src[start:start + rect.width * 4].reshape(rect.width, 4)
        host[rect.y + r, rect.x:rect.x + rect.width] = row
