"""``to_bgrx``/``to_bgra`` for every 2D format against a per-pixel model.

A virtio-gpu format name lists the bytes of a pixel in memory order
(``R8G8B8A8``: bytes R, G, B, A); the display socket takes bytes B, G, R, X/A.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis.extra import numpy as hnp

from protocol.virtio_gpu_codes import Format
from vgpu_backend.pixels import HAS_ALPHA, to_bgra, to_bgrx


def memory_order(fmt: Format) -> str:
    """``"BGRA"`` for B8G8R8A8_UNORM: the component of each byte in memory."""
    return fmt.name.split("_")[0].replace("8", "")


def model_pixel(pixel: bytes, fmt: Format, with_alpha: bool) -> bytes:
    """Bytes B, G, R and (alpha or 0xFF / the padding byte) of one pixel."""
    components = dict(zip(memory_order(fmt), pixel, strict=True))
    fourth = components.get("A", 0xFF if with_alpha else None)
    out = bytes([components["B"], components["G"], components["R"]])
    return out + bytes([fourth]) if fourth is not None else out


IMAGES = hnp.arrays(np.dtype("<u4"), hnp.array_shapes(min_dims=2, max_dims=2, max_side=9))


def check(converted: npt.NDArray[np.uint32], source: npt.NDArray[np.uint32], fmt: Format,
          with_alpha: bool) -> None:
    assert converted.shape == source.shape
    assert converted.dtype.itemsize == 4
    got = np.ascontiguousarray(converted).astype("<u4").tobytes()
    src = np.ascontiguousarray(source).tobytes()
    for i in range(0, len(src), 4):
        expected = model_pixel(src[i:i + 4], fmt, with_alpha)
        assert got[i:i + len(expected)] == expected, f"pixel {i // 4} of {fmt.name}"


def test_every_format_is_covered() -> None:
    assert len(Format) == 8
    assert {memory_order(f) for f in Format} == {
        "BGRA", "BGRX", "ARGB", "XRGB", "RGBA", "XBGR", "ABGR", "RGBX"}
    assert {memory_order(f) for f in HAS_ALPHA} == {"BGRA", "ARGB", "RGBA", "ABGR"}


@settings(max_examples=40, deadline=None)
@given(image=IMAGES)
@pytest.mark.parametrize("fmt", list(Format), ids=lambda f: f.name)
def test_to_bgrx(fmt: Format, image: npt.NDArray[np.uint32]) -> None:
    before = image.copy()
    check(to_bgrx(image, fmt), image, fmt, with_alpha=False)
    assert np.array_equal(image, before)


@settings(max_examples=40, deadline=None)
@given(image=IMAGES)
@pytest.mark.parametrize("fmt", list(Format), ids=lambda f: f.name)
def test_to_bgra(fmt: Format, image: npt.NDArray[np.uint32]) -> None:
    before = image.copy()
    check(to_bgra(image, fmt), image, fmt, with_alpha=True)
    assert np.array_equal(image, before)  # never converted in place


@pytest.mark.parametrize("fmt", list(Format), ids=lambda f: f.name)
def test_strided_views_of_a_larger_image(fmt: Format) -> None:
    """Scanouts convert a rectangle of a resource image: a non-contiguous view."""
    rng = np.random.default_rng(int(fmt))
    image = rng.integers(0, 256, size=(6, 10 * 4), dtype=np.uint8)
    rect = image[1:5, 2 * 4:7 * 4].view("<u4")
    assert not rect.flags.c_contiguous
    check(to_bgrx(rect, fmt), rect, fmt, with_alpha=False)
    check(to_bgra(rect, fmt), rect, fmt, with_alpha=True)
