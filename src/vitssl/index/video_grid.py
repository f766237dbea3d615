"""Contact sheets of video search results: the query's frames, then one row per neighbour."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vitssl.errors import MissingFileError

_logger = logging.getLogger(__name__)


def save_video_grid(
    query: str,
    hits: Sequence[tuple[str, float]],
    path: str | os.PathLike,
    *,
    fps: float = 1.0,
    num_frames: int | None = None,
    columns: int = 6,
    tile_size: int = 96,
) -> Path:
    """A contact sheet: the query video's frames in the first row, then one row per neighbour (best first).

    Each row shows up to ``columns`` frames spread evenly over the frames sampled at ``fps`` (or ``num_frames``);
    the first tile of a row is captioned with the file name and score. Unreadable videos draw grey rows.
    """
    from vitssl.data.common import CorruptImageError
    from vitssl.index.grid import Tile, fit_tile, save_tiles
    from vitssl.video.frames import sample_frames

    def row(video: str, caption: str) -> list[Tile]:
        try:
            frames, stamps = sample_frames(video, fps=fps, num_frames=num_frames)
        except (CorruptImageError, MissingFileError) as err:
            _logger.warning("contact sheet: cannot draw %s (%s)", video, err)
            return [Tile(fit_tile(None, tile_size), caption)]
        pick = np.unique(np.linspace(0, len(frames) - 1, min(columns, len(frames))).round().astype(int))
        from PIL import Image

        return [
            Tile(fit_tile(Image.fromarray(frames[i].numpy()), tile_size), caption if j == 0 else f"{stamps[i]:.1f} s")
            for j, i in enumerate(pick)
        ]

    rows = [row(query, f"query\n{Path(query).name[:18]}")]
    rows += [row(p, f"#{r} {Path(p).name[:14]}\n{score:.3f}") for r, (p, score) in enumerate(hits, 1)]
    return save_tiles(rows, path, tile_size)


__all__ = ["save_video_grid"]
