"""Video files to a video vector and frame vectors (:class:`VideoEmbedder`), every process a share
(:func:`embed_shared`).

Two methods, chosen by the model it opens:

- ``mean``: an image checkpoint (any objective), an exported ``backbone.safetensors`` or ``thumbnails[:size=N]``
  (raw downscaled frames, no network): the frames' features, each L2-normalised, averaged, L2-normalised again
  (the mean-of-frames baseline); the frame vectors kept for chamfer are the normalised frame features.
- ``tca``: a ``video_tca`` checkpoint (:mod:`vitssl.video.tca`): its frame backbone and whitening give frame
  features, its encoder the video vector and the frame outputs.

The index pipeline's video embedders (:mod:`vitssl.index.embedders`: ``video``, ``thumbnails``, ``tca``) wrap it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitssl.errors import DataError
from vitssl.eval.gather import RankPart, gather_rows
from vitssl.index.chamfer import _l2

METHODS = ("mean", "tca")


def is_thumbnails(model: str | os.PathLike) -> bool:
    """Whether a model argument names raw thumbnails (``thumbnails[:size=N]``) rather than a file."""
    from vitssl.video.frames import THUMBNAILS

    text = str(model)
    return text == THUMBNAILS or text.startswith(THUMBNAILS + ":")


def checkpoint_objective(path: str | os.PathLike) -> str | None:
    """The objective a vitssl checkpoint was trained with (None for a ``.safetensors`` backbone or thumbnails)."""
    text = str(path)
    if is_thumbnails(text) or text.endswith(".safetensors"):
        return None
    from vitssl.engine import load_checkpoint

    cfg = load_checkpoint(text)["config"]
    objective = cfg.get("objective") if isinstance(cfg, dict) else getattr(cfg, "objective", None)
    name = objective.get("name") if isinstance(objective, dict) else getattr(objective, "name", None)
    return str(name) if name else None


@dataclass
class Embedded:
    """What :meth:`VideoEmbedder.embed` gives: vectors of the readable videos and what was skipped."""

    vectors: np.ndarray  # (M, E) float32 video vectors
    frames: list[np.ndarray]  # M arrays (n_i, E) of frame vectors (L2-normalised)
    rows: np.ndarray  # (M,) int64 positions of these videos in the input list
    skipped: list[str] = field(default_factory=list)  # paths of the unreadable videos left out


class VideoEmbedder:
    """Turns video files into a video vector and frame vectors (see the module doc for the two methods).

    Use :meth:`open`. Attributes: ``method`` ("mean" | "tca"), ``model`` (what was opened: a checkpoint path or
    ``thumbnails:size=N``), ``checkpoint_hash`` (weights digest), ``layer``, ``fps``, ``num_frames``.
    """

    def __init__(self) -> None:
        self.method = "mean"
        self.model = ""
        self.checkpoint_hash = ""
        self.layer = "pooled"
        self.fps = 1.0
        self.num_frames: int | None = None
        self.cache_dir: str | None = None
        self.batch_size = 64
        self._frame_model: Any = None
        self._tca: Any = None
        self.transform = ""

    @classmethod
    def open(
        cls,
        model: str | os.PathLike,
        *,
        fps: float = 1.0,
        num_frames: int | None = None,
        layer: str = "pooled",
        device: str = "cpu",
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 64,
        use_cache: bool = True,
    ) -> VideoEmbedder:
        """Open a frame model or TCA checkpoint.

        Args:
            model: a vitssl checkpoint (``video_tca``: TCA; any other objective: mean of frames), a
                ``backbone.safetensors`` or ``thumbnails[:size=N]``.
            fps: frames sampled per second.
            num_frames: a fixed count of frames per video instead.
            layer: feature layer of an image checkpoint.
            device: where the model runs.
            cache_dir: frame-feature cache; default ``<checkpoint folder>/features/video_frames`` (none for
                thumbnails).
            batch_size: frames per forward pass.
            use_cache: False: extract every time (no cache at all).
        """
        from vitssl.video.frames import load_frame_model

        self = cls()
        self.fps, self.num_frames, self.layer, self.batch_size = float(fps), num_frames, layer, int(batch_size)
        objective = checkpoint_objective(model)
        if objective == "video_tca":
            from vitssl.video import tca

            self.method = "tca"
            self._tca = tca.TCAEmbedder.from_checkpoint(model, device=device)
            from vitssl.eval.features import checkpoint_sha256

            self.model = str(Path(model).absolute())
            self.checkpoint_hash = checkpoint_sha256(model)
            self.transform = self._tca.transform
            # the checkpoint's own sampling wins over the corpus spec's: its encoder learnt on that frame rate
            self.fps, self.num_frames = float(self._tca.fps), self._tca.num_frames
        else:
            self._frame_model = load_frame_model(model, device)
            self.model = str(getattr(self._frame_model, "path", model))
            self.checkpoint_hash = self._frame_model.checkpoint_hash
            self.transform = self._frame_model.transform
        if cache_dir is None and use_cache and Path(str(model)).is_file():
            cache_dir = Path(str(model)).absolute().parent / "features" / "video_frames"
        self.cache_dir = str(cache_dir) if cache_dir is not None and use_cache else None
        return self

    @property
    def feature_key(self) -> str:
        """What the vectors depend on besides the weights: recorded in the index manifest and checked at query."""
        return json.dumps(
            {
                "method": self.method,
                "layer": self.layer,
                "transform": self.transform,
                "fps": None if self.num_frames else self.fps,
                "num_frames": self.num_frames,
            },
            sort_keys=True,
        )

    def describe(self) -> dict[str, Any]:
        """The manifest's ``video`` entry (without the skipped list)."""
        return {
            "method": self.method,
            "model": self.model,
            "layer": self.layer,
            "fps": self.fps,
            "num_frames": self.num_frames,
        }

    def raw_frames(
        self, paths: Sequence[str], skip_corrupt: bool = False, progress: Callable[[int], None] | None = None
    ) -> list[np.ndarray | None]:
        """Per-video frame features before any video model (cached); None for skipped corrupt videos."""
        from vitssl.video.frames import video_frame_features

        if self._tca is not None:  # its frame backbone with the transform it was trained with
            return self._tca.frame_features(
                list(paths), cache_dir=self.cache_dir, skip_corrupt=skip_corrupt, progress=progress
            )
        return video_frame_features(
            self._frame_model,
            list(paths),
            fps=self.fps,
            num_frames=self.num_frames,
            cache_dir=self.cache_dir,
            batch_size=self.batch_size,
            layer=self.layer,
            skip_corrupt=skip_corrupt,
            progress=progress,
        )

    def embed_frames(self, frames: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Video vectors (N, E) and L2-normalised frame vectors of raw frame features."""
        if not frames:
            return np.zeros((0, 0), dtype=np.float32), []
        if self._tca is not None:
            vectors, outs = self._tca.embed(list(frames))
            return np.asarray(vectors, dtype=np.float32), [_l2(o) for o in outs]
        normed = [_l2(f) for f in frames]
        return _l2(np.stack([f.mean(axis=0) for f in normed])), normed

    def embed(self, paths: Sequence[str], skip_corrupt: bool = False, desc: str = "videos") -> Embedded:
        """Embed video files; unreadable ones raise (naming the file), or with ``skip_corrupt`` are left out.

        Raises:
            CorruptVideoError / MissingFileError: an unreadable video without ``skip_corrupt``.
            DataError: no video could be read.
        """
        from vitssl.eval.features import Progress

        with Progress(len(paths), f"frame features of {desc}", unit="video") as progress:
            raw = self.raw_frames(paths, skip_corrupt, progress.update)
        rows = np.asarray([i for i, f in enumerate(raw) if f is not None], dtype=np.int64)
        skipped = [str(paths[i]) for i, f in enumerate(raw) if f is None]
        if len(rows) == 0 and len(paths):
            raise DataError(f"none of the {len(paths)} videos could be read (all skipped as corrupt)")
        vectors, frames = self.embed_frames([raw[i] for i in rows])  # type: ignore[misc]
        return Embedded(vectors, frames, rows, skipped)


def embed_shared(
    embedder: VideoEmbedder, paths: Sequence[str], skip_corrupt: bool = False, desc: str = "videos"
) -> Embedded:
    """:meth:`VideoEmbedder.embed` with every process of a distributed job embedding ``paths[rank::world]``; the
    parts are gathered in path order on every rank (one process: the plain call).

    An error on any rank (an unreadable video without ``skip_corrupt``) is raised on every rank
    (:func:`vitssl.eval.gather.gather_rows`), so no rank is left waiting in the gather.
    """
    from vitssl import distributed as dist

    world = dist.get_world_size()
    if world == 1:
        return embedder.embed(paths, skip_corrupt, desc)
    rank = dist.get_rank()
    mine = np.arange(rank, len(paths), world, dtype=np.int64)

    def local() -> RankPart:
        part = embedder.embed([paths[i] for i in mine], skip_corrupt, f"{desc} [rank {rank} of {world}]")
        return RankPart(mine[part.rows], part.vectors, list(part.frames), info=part.skipped)  # rows: in ``paths``

    gathered = gather_rows(local)
    if gathered.vectors is None:
        raise DataError(f"none of the {len(paths)} videos could be read (all skipped as corrupt)")
    skipped = sorted((s for info in gathered.infos for s in info), key=list(map(str, paths)).index)
    return Embedded(np.ascontiguousarray(gathered.vectors), gathered.extras, gathered.rows, skipped)


__all__ = ["METHODS", "Embedded", "VideoEmbedder", "checkpoint_objective", "embed_shared", "is_thumbnails"]
