"""Pixel conversion from virtio-gpu formats to what QEMU's display socket takes.

virtio-gpu format names give the byte order in memory (``B8G8R8A8``: bytes B, G, R,
A).  The display socket takes ``PIXMAN_x8r8g8b8`` for UPDATE (bytes B, G, R, X) and
``PIXMAN_a8r8g8b8`` for CURSOR_UPDATE (bytes B, G, R, A): both are the virtio
``B8G8R8?8`` layouts, so every conversion is one whole-image uint32 operation.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from protocol.virtio_gpu_codes import Format

__all__ = ["BYTES_PER_PIXEL", "HAS_ALPHA", "to_bgra", "to_bgrx"]

BYTES_PER_PIXEL: Final = 4
#: formats whose fourth byte is alpha (the others' is padding)
HAS_ALPHA: Final = frozenset({Format.B8G8R8A8_UNORM, Format.A8R8G8B8_UNORM,
                              Format.R8G8B8A8_UNORM, Format.A8B8G8R8_UNORM})

U32 = npt.NDArray[np.uint32]


def _as_bgra_words(pixels: U32, fmt: Format) -> U32:
    """Little-endian words of a (h, w) pixel array, reordered to bytes B, G, R, A/X."""
    if fmt in (Format.B8G8R8A8_UNORM, Format.B8G8R8X8_UNORM):
        return pixels.astype(np.uint32, copy=True)
    if fmt in (Format.A8R8G8B8_UNORM, Format.X8R8G8B8_UNORM):  # A,R,G,B -> B,G,R,A
        swapped: U32 = pixels.byteswap()
        return swapped
    if fmt in (Format.X8B8G8R8_UNORM, Format.A8B8G8R8_UNORM):  # X,B,G,R -> B,G,R,X
        rotated: U32 = (pixels >> np.uint32(8)) | (pixels << np.uint32(24))
        return rotated
    if fmt in (Format.R8G8B8A8_UNORM, Format.R8G8B8X8_UNORM):  # R,G,B,A -> B,G,R,A
        swapped_rb: U32 = ((pixels & np.uint32(0xFF00FF00))
                           | ((pixels & np.uint32(0xFF)) << np.uint32(16))
                           | ((pixels >> np.uint32(16)) & np.uint32(0xFF)))
        return swapped_rb
    raise ValueError(f"not a 2D format: {fmt!r}")  # pragma: no cover - formats are checked


def to_bgrx(pixels: U32, fmt: Format) -> U32:
    """Convert ``pixels`` (a (h, w) uint32 view in ``fmt``) to a new x8r8g8b8 array."""
    return _as_bgra_words(pixels, fmt)


def to_bgra(pixels: U32, fmt: Format) -> U32:
    """Convert to a8r8g8b8 (bytes B, G, R, A); padding formats become opaque."""
    out = _as_bgra_words(pixels, fmt)
    if fmt not in HAS_ALPHA:
        out |= np.uint32(0xFF000000)
    return out
