"""JPEG decoding at reduced size: lazily opened JPEGs, and a decode that covers a set of crops at the output size.

A JPEG opened with :func:`open_lazy_rgb` has read its header (size, mode) but not its pixels, so a transform can
sample its crops on the full-size geometry first and then decode with PIL's ``draft``, which scales the image by
1/2, 1/4 or 1/8 inside the DCT (libjpeg's scaled IDCT), several times cheaper than a full decode followed by a
resize. :func:`decode_for_crops` picks the strongest reduction that still leaves every crop at least the output
size on both sides, so no crop is upsampled that would not have been upsampled from the full image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from vitssl.data.common import SKIP_HINT, CorruptImageError, exif_orientation, open_rgb

# PIL's draft reductions for JPEG, strongest first.
_DRAFT_SCALES = (8, 4, 2)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class LazyJpeg(JpegImageFile):
    """An RGB JPEG whose pixels are decoded on first use; a decode failure is a ``CorruptImageError`` naming the file.

    It behaves as any PIL RGB image (every PIL operation decodes it first); only a transform that calls ``draft``
    before touching the pixels decodes it at reduced size.
    """

    _vitssl_label: str = ""

    def load(self) -> Any:
        try:
            return super().load()
        except _DECODE_ERRORS as exc:
            raise CorruptImageError(
                f"cannot decode image {self._vitssl_label}: {type(exc).__name__}: {exc} ({SKIP_HINT})"
            ) from exc


def open_lazy_rgb(path: str | os.PathLike, name: str | None = None) -> Image.Image:
    """An RGB image from ``path``: a not-yet-decoded :class:`LazyJpeg` for RGB JPEGs, else fully decoded.

    Greyscale, CMYK and EXIF-rotated JPEGs and every other format go through :func:`vitssl.data.open_rgb` (decoded
    and converted to RGB as displayed at once), so the result is always an RGB image the way a viewer shows it.

    Args:
        path: image file.
        name: what to call the sample in error messages; defaults to the path.

    Raises:
        CorruptImageError: the file is missing or its header is not an image's (a truncated JPEG body fails when
            its pixels are first used, with the same error).
    """
    label = name if name is not None else str(path)
    try:
        img = Image.open(path)
    except FileNotFoundError as exc:
        raise CorruptImageError(f"image file not found: {label} ({SKIP_HINT})") from exc
    except _DECODE_ERRORS as exc:
        raise CorruptImageError(f"cannot decode image {label}: {type(exc).__name__}: {exc} ({SKIP_HINT})") from exc
    # A JPEG shown rotated (EXIF orientation, phone photos) is decoded whole and turned: the crops of a lazy one
    # are drawn on the stored geometry.
    if type(img) is JpegImageFile and img.mode == "RGB" and exif_orientation(img) == 1:
        img.__class__ = LazyJpeg  # same object and state; only load() gains the one-line error
        img._vitssl_label = label
        return img
    img.close()
    return open_rgb(path, name)


def is_undecoded_jpeg(img: Any) -> bool:
    """True for a JPEG whose pixels are not decoded yet (``draft`` can still reduce it)."""
    return isinstance(img, JpegImageFile) and bool(img.tile)


def draft_scale(size: tuple[int, int], boxes: Sequence[tuple[int, int, int, int]], out_size: int) -> int:
    """The strongest JPEG reduction (8, 4, 2 or 1) that keeps every crop at least ``out_size`` on both sides.

    Args:
        size: full image (width, height).
        boxes: crops as (top, left, height, width) in full-size pixels.
        out_size: the side every crop is resized to.
    """
    smallest = min(min(h, w) for _, _, h, w in boxes)
    width, height = size
    for scale in _DRAFT_SCALES:
        if smallest >= scale * out_size and width >= scale and height >= scale:
            return scale
    return 1


def decode_for_crops(
    img: Image.Image, boxes: Sequence[tuple[int, int, int, int]], out_size: int
) -> tuple[np.ndarray, list[tuple[int, int, int, int]], int]:
    """Decode ``img`` as small as its crops allow; the crops mapped to the decoded pixels.

    Args:
        img: an RGB PIL image, decoded or an undecoded JPEG (:func:`open_lazy_rgb`).
        boxes: crops as (top, left, height, width) in full-size pixels.
        out_size: the side every crop is resized to.

    Returns:
        ``(pixels (H', W', 3) uint8, boxes in decoded pixels, reduction)``; the reduction is 1 without ``draft``.
    """
    width, height = img.size
    scale = 1
    if is_undecoded_jpeg(img):
        want = draft_scale((width, height), boxes, out_size)
        if want > 1:
            img.draft("RGB", (width // want, height // want))
        img.load()
        scale = max(1, round(width / img.size[0]))
    if img.mode != "RGB":
        img = img.convert("RGB")
    pixels = np.asarray(img)  # (H', W', 3)
    if scale == 1 and pixels.shape[:2] == (height, width):
        return pixels, [tuple(int(v) for v in b) for b in boxes], 1  # type: ignore[misc]
    sy, sx = pixels.shape[0] / height, pixels.shape[1] / width
    mapped = []
    for top, left, h, w in boxes:
        t, lft = round(top * sy), round(left * sx)
        bh = max(1, min(pixels.shape[0] - t, round(h * sy)))
        bw = max(1, min(pixels.shape[1] - lft, round(w * sx)))
        mapped.append((t, lft, bh, bw))
    return pixels, mapped, scale
