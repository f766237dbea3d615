"""The picture of ``vitssl index query --grid``: each query image with its neighbours, as the corpus holds them.

Neighbours are drawn from the dataset the index was built from, whatever it stores: the manifest's ``source``
names its data spec and split, the dataset is rebuilt from them and sample ids are mapped back to rows, so
digits, CIFAR or shapes items (which are no files) are drawn as well as image files. Without a recorded source
(an index of precomputed embeddings) sample ids are read as image files. Every tile is ``tile_size`` square:
small images are enlarged with nearest-neighbour sampling (an 8x8 digit stays a sharp 8x8 grid of blocks), large
ones reduced; each neighbour is labelled with its faiss id, its class (or file name) and its score.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

_logger = logging.getLogger(__name__)

GREY = 200  # fill of a tile's border and of tiles with nothing to draw
_LABEL_CHARS = 18  # longest label drawn under a tile (fontsize 7 on a 128 px tile)


@dataclass(frozen=True)
class Neighbour:
    """One search result, as ``vitssl index query`` prints it."""

    id: int  # faiss id
    sample: str  # sample id: an image path for file-backed corpora, "digits/val/17" otherwise
    score: float  # similarity (ip) or distance (l2)


@dataclass
class Tile:
    """One picture of the grid and its caption."""

    pixels: np.ndarray  # (size, size, 3) uint8
    caption: str


def fit_tile(image: Image.Image | None, size: int) -> np.ndarray:
    """An image scaled to fit a ``size`` square, centred on grey; a grey tile for None.

    Smaller images are enlarged with nearest-neighbour sampling, so their pixels stay visible as blocks instead of
    a blur; larger ones are reduced with a Lanczos filter.

    Args:
        image: a PIL image (any mode) or None.
        size: tile side in pixels.

    Returns:
        (size, size, 3) uint8.
    """
    tile = np.full((size, size, 3), GREY, dtype=np.uint8)
    if image is None:
        return tile
    rgb = image.convert("RGB")
    w, h = rgb.size
    scale = size / max(w, h)
    new = (max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale))))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    arr = np.asarray(rgb.resize(new, resample))
    y, x = (size - arr.shape[0]) // 2, (size - arr.shape[1]) // 2
    tile[y : y + arr.shape[0], x : x + arr.shape[1]] = arr
    return tile


def _short(text: str) -> str:
    return text if len(text) <= _LABEL_CHARS else "…" + text[-(_LABEL_CHARS - 1) :]


def _open_file(path: str) -> Image.Image | None:
    """A readable image file, else None (logged)."""
    from vitssl.data import CorruptImageError, open_rgb

    try:
        return open_rgb(path)
    except CorruptImageError as err:
        _logger.warning("query grid: cannot draw %s (%s); drawing a grey tile", path, err)
        return None


class CorpusImages:
    """The images and labels of an index's samples: from the dataset the index was built from, else from files.

    Args:
        source: the index manifest's ``source`` (``data`` spec and ``split``), or None.
    """

    def __init__(self, source: Mapping[str, Any] | None) -> None:
        self.source = dict(source or {})
        self._dataset: Any = None
        self._tried = False
        self._rows: dict[str, int] = {}

    def _load_dataset(self) -> Any:
        """The corpus dataset, rebuilt from the manifest's data spec once; None when it cannot be."""
        if not self._tried:
            self._tried = True
            from vitssl.errors import UserError
            from vitssl.eval.spec import build_eval_dataset

            spec = self.source.get("data")
            if spec:
                try:
                    self._dataset, _, _ = build_eval_dataset(spec, self.source.get("split"), absolute_root=True)
                except UserError as err:
                    _logger.warning("query grid: cannot rebuild the corpus %s (%s); drawing files only", spec, err)
        return self._dataset

    def locate(self, neighbours: Sequence[Neighbour]) -> None:
        """Map the sample ids of ``neighbours`` to dataset rows (ahead of :meth:`tile`), scanning at most once.

        A faiss id is the row of its sample when nothing was skipped while building (ids are rows, shards
        included); that guess is checked, and the ids it misses are looked for among every row's sample id.
        """
        wanted = {n.sample for n in neighbours if n.sample not in self._rows and not Path(n.sample).is_file()}
        if not wanted or self._load_dataset() is None:
            return
        dataset = self._dataset
        for n in neighbours:
            if n.sample in wanted and 0 <= n.id < len(dataset) and str(dataset.sample_id(n.id)) == n.sample:
                self._rows[n.sample] = n.id
                wanted.discard(n.sample)
        for row in range(len(dataset)) if wanted else ():
            sample = str(dataset.sample_id(row))
            if sample in wanted:
                self._rows[sample] = row
                wanted.discard(sample)
                if not wanted:
                    break
        if wanted:
            _logger.warning("query grid: %d neighbours are not in %s; drawn grey", len(wanted), self.source["data"])

    def _label(self, row: int) -> str | None:
        """The class name of a dataset row (read without decoding the image), if the dataset is labelled."""
        classes = list(getattr(self._dataset, "classes", None) or [])
        targets = getattr(self._dataset, "labels", None)
        if targets is None:
            targets = getattr(self._dataset, "targets", None)
        if not classes or targets is None:
            return None
        target = targets[row]
        return str(classes[int(target)]) if isinstance(target, (int, np.integer)) else None

    def tile(self, neighbour: Neighbour, size: int) -> Tile:
        """The tile of one neighbour: its picture, and ``#id label`` over its score."""
        from vitssl.data import CorruptImageError

        row = self._rows.get(neighbour.sample)
        label = None
        if row is not None:
            try:
                image = self._dataset[row][0]
            except CorruptImageError as err:
                _logger.warning("query grid: cannot draw %s (%s); drawing a grey tile", neighbour.sample, err)
                image = None
            label = self._label(row)
        elif Path(neighbour.sample).is_file():
            image = _open_file(neighbour.sample)
        else:
            image = None
        if label is None:
            label = Path(neighbour.sample).name if Path(neighbour.sample).suffix else neighbour.sample
        caption = f"#{neighbour.id} {_short(label)}\n{neighbour.score:.3f}"
        return Tile(fit_tile(image, size), caption)


def query_grid_tiles(
    queries: Sequence[str],
    neighbours: Sequence[Sequence[Neighbour]],
    source: Mapping[str, Any] | None,
    tile_size: int = 128,
) -> list[list[Tile]]:
    """The tiles of the grid: per query, the query image, then its neighbours best first.

    Args:
        queries: Q query image files.
        neighbours: per query, its neighbours (best first).
        source: the index manifest's ``source`` (where the corpus images come from), or None.
        tile_size: tile side in pixels.
    """
    if len(queries) != len(neighbours):
        raise ValueError(f"{len(queries)} queries but {len(neighbours)} neighbour lists; give one per query")
    corpus = CorpusImages(source)
    corpus.locate([n for row in neighbours for n in row])
    rows = []
    for query, hits in zip(queries, neighbours):
        first = Tile(fit_tile(_open_file(query), tile_size), f"query\n{_short(Path(query).name)}")
        rows.append([first, *(corpus.tile(n, tile_size) for n in hits)])
    return rows


def save_query_grid(
    queries: Sequence[str],
    neighbours: Sequence[Sequence[Neighbour]],
    source: Mapping[str, Any] | None,
    path: str | Path,
    tile_size: int = 128,
) -> Path:
    """Draw one row per query, the query image then its neighbours left to right, into a PNG.

    Args:
        queries: Q query image files.
        neighbours: per query, its neighbours (best first).
        source: the index manifest's ``source``, or None (sample ids are then read as image files).
        path: output PNG.
        tile_size: tile side in pixels.

    Returns:
        The PNG path.
    """
    return save_tiles(query_grid_tiles(queries, neighbours, source, tile_size), path, tile_size)


def save_tiles(tiles: Sequence[Sequence[Tile]], path: str | Path, tile_size: int = 128) -> Path:
    """Draw rows of tiles (first tile of each row captioned in blue) into a PNG, written atomically.

    Args:
        tiles: the rows, e.g. from :func:`query_grid_tiles`; rows may differ in length.
        path: output PNG.
        tile_size: tile side in pixels.

    Returns:
        The PNG path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from vitssl.io import atomic_open

    rows = len(tiles)
    cols = max((len(r) for r in tiles), default=1)
    inch = tile_size / 100
    fig = Figure(figsize=(cols * inch, max(1, rows) * (inch + 0.4)), dpi=100)
    FigureCanvasAgg(fig)  # no pyplot: the global matplotlib backend stays untouched
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            ax = fig.add_subplot(rows, cols, r * cols + c + 1)
            ax.set_axis_off()
            ax.imshow(tile.pixels, interpolation="nearest")  # the tile is at its final size: no resampling blur
            ax.set_title(tile.caption, fontsize=7, color="tab:blue" if c == 0 else "black")
    fig.tight_layout()
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    return path


__all__ = ["CorpusImages", "Neighbour", "Tile", "fit_tile", "query_grid_tiles", "save_query_grid", "save_tiles"]
