"""Opening images as displayed: EXIF orientation (phone photos) and high bit depths (16-bit PNG, float TIFF)."""

import numpy as np
import pytest
from PIL import Image, ImageOps

from vitssl.data.common import EXIF_ORIENTATION, open_rgb
from vitssl.data.decode import LazyJpeg, open_lazy_rgb


def _photo(path, orientation):
    """A 40 x 24 JPEG with distinct quadrants, stored unrotated with the EXIF orientation tag set."""
    pixels = np.zeros((24, 40, 3), dtype=np.uint8)
    pixels[:12, :20] = (250, 10, 10)
    pixels[:12, 20:] = (10, 250, 10)
    pixels[12:, :20] = (10, 10, 250)
    pixels[12:, 20:] = (250, 250, 10)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[EXIF_ORIENTATION] = orientation
    image.save(path, quality=95, exif=exif)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_photo_opens_as_displayed_for_every_exif_orientation(tmp_path, orientation):
    path = _photo(tmp_path / f"o{orientation}.jpg", orientation)
    with Image.open(path) as raw:
        shown = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))  # PIL's own reading of the tag
        stored = np.asarray(raw.convert("RGB"))
    for opened in (open_rgb(path), open_lazy_rgb(path)):
        np.testing.assert_array_equal(np.asarray(opened), shown)
    np.testing.assert_array_equal(np.asarray(open_rgb(path, orient=False)), stored)
    if orientation in (5, 6, 7, 8):
        assert shown.shape == (40, 24, 3)  # turned a quarter: height and width swap
    assert isinstance(open_lazy_rgb(path), LazyJpeg) == (orientation == 1)  # only unturned JPEGs decode lazily


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "depth.png")  # PIL reads it back as mode I;16 (or I)
    got = np.asarray(open_rgb(tmp_path / "depth.png"))
    assert got.shape == (64, 64, 3) and (got[..., 0] == got[..., 2]).all()
    np.testing.assert_array_equal(got[..., 0], np.rint(values / 257.0).astype(np.uint8))
    assert (got == 255).mean() < 0.01  # PIL's convert("RGB") makes 99 % of it white


def test_float_images_in_the_unit_range_are_scaled(tmp_path):
    values = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(values, "F").save(tmp_path / "f.tiff")
    got = np.asarray(open_rgb(tmp_path / "f.tiff"))[..., 0]
    np.testing.assert_array_equal(got, np.rint(values.astype(np.float64) * 255).astype(np.uint8))
