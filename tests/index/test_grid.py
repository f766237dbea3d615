"""The ``index query --grid`` picture (vitssl.index.grid): corpus items drawn from their dataset, enlarged, labelled."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vitssl.data import build_dataset
from vitssl.index.grid import GREY, CorpusImages, Neighbour, fit_tile, query_grid_tiles, save_query_grid

DIGITS = {"data": "digits:split=val", "split": "val"}  # an index manifest's source


def test_small_images_are_enlarged_with_nearest_neighbour_blocks():
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    tile = fit_tile(Image.fromarray(pixels), 128)
    assert tile.shape == (128, 128, 3) and tile.dtype == np.uint8
    np.testing.assert_array_equal(tile, np.repeat(np.repeat(pixels, 8, axis=0), 8, axis=1))  # sharp 8x8 blocks


def test_large_and_oblong_images_are_reduced_and_centred_on_grey():
    tile = fit_tile(Image.new("RGB", (300, 150), (255, 0, 0)), 100)
    assert tile.shape == (100, 100, 3)
    assert (tile[50, :] == (255, 0, 0)).all()  # the full width is used
    assert (tile[:20] == GREY).all() and (tile[-20:] == GREY).all()  # the rest of the height is grey
    assert (fit_tile(None, 32) == GREY).all()


def test_dataset_items_that_are_not_files_are_drawn_from_the_dataset():
    digits = build_dataset("digits", split="val")
    corpus = CorpusImages(DIGITS)
    # id 5 is the row of its sample; id 999 is not (e.g. rows shifted by skipped items): found by scanning
    hits = [Neighbour(5, "digits/val/5", 0.9), Neighbour(999, "digits/val/7", 0.5)]
    corpus.locate(hits)
    for hit in hits:
        tile = corpus.tile(hit, 128)
        row = int(hit.sample.rsplit("/", 1)[1])
        assert tile.pixels.std() > 30  # a digit, not a grey tile
        assert (tile.pixels[0, 0] != GREY).any() or (tile.pixels[-1, -1] != GREY).any()  # fills the tile
        expected = fit_tile(digits[row][0], 128)  # the 16x16 item enlarged 8x
        np.testing.assert_array_equal(tile.pixels, expected)
        assert tile.caption == f"#{hit.id} {digits.classes[digits.targets[row]]}\n{hit.score:.3f}"


def test_unknown_samples_and_missing_sources_draw_grey_tiles(tmp_path):
    corpus = CorpusImages({"data": "digits:split=val", "split": "val"})
    missing = Neighbour(0, "digits/val/100000", 0.1)
    corpus.locate([missing])
    assert (corpus.tile(missing, 16).pixels == GREY).all()
    image = tmp_path / "cat.png"
    Image.new("RGB", (8, 8), (0, 0, 255)).save(image)
    tiles = query_grid_tiles([str(image)], [[Neighbour(3, str(image), 1.0)]], None, tile_size=32)
    (query, hit) = tiles[0]
    assert query.caption == "query\ncat.png" and hit.caption == "#3 cat.png\n1.000"
    assert (hit.pixels == (0, 0, 255)).all()  # an image file without a recorded source: read as a file


def test_save_query_grid_writes_a_png(tmp_path):
    query = tmp_path / "q.png"
    Image.new("RGB", (20, 20), (10, 200, 10)).save(query)
    neighbours = [[Neighbour(i, f"digits/val/{i}", 1.0 - i / 10) for i in range(3)]]
    out = save_query_grid([str(query)], neighbours, DIGITS, tmp_path / "sub" / "grid.png", tile_size=64)
    with Image.open(out) as png:
        assert png.size[0] >= 4 * 64 * 0.9  # four tiles side by side
    with pytest.raises(ValueError, match="one per query"):
        query_grid_tiles([str(query)], [], DIGITS)
