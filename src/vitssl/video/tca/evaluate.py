"""Embedding videos with a trained ``video_tca`` checkpoint (frame backbone, PCA, encoder)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from vitssl.config import ConfigError
from vitssl.errors import DataError
from vitssl.video.tca.model import VideoTCA


class TCAEmbedder:
    """Video vectors and frame outputs of a ``video_tca`` checkpoint (frame backbone, PCA, encoder, in eval mode).

    Attributes ``fps``, ``num_frames`` (the sampling the encoder learnt on), ``transform`` (the frame transform's
    description) and ``backbone`` (the frozen frame backbone) describe it.

    Args:
        objective: a trained :class:`VideoTCA`.
        cfg: its run config (data settings give the frame transform).
        device: where it runs.
        max_batch_frames: padded frames per encoder batch (videos are batched by length up to this).
    """

    def __init__(self, objective: VideoTCA, cfg: Any, device: torch.device | str = "cpu", max_batch_frames: int = 4096):
        self.objective = objective.to(device).eval()
        self.cfg = cfg
        self.device = torch.device(device)
        self.max_batch_frames = int(max_batch_frames)
        self.fps = float(objective.cfg.fps)
        self.num_frames = objective.cfg.num_frames
        self.backbone = objective.backbone
        self._frame_model: Any = None

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> TCAEmbedder:
        """Load a ``video_tca`` training checkpoint.

        Raises:
            CheckpointError: the file is missing, truncated or not a vitssl checkpoint.
            ConfigError: it holds another objective.
        """
        from vitssl.distributed import resolve_device
        from vitssl.engine import load_objective

        def check(cfg: Any) -> None:
            if cfg.objective.name != "video_tca":
                raise ConfigError(
                    f"checkpoint {path} was trained with objective {cfg.objective.name!r}, not video_tca; index it "
                    "as a frame model (mean of frames) instead"
                )

        device = resolve_device(device)
        objective, cfg, _ = load_objective(path, device, check=check)
        return cls(objective, cfg, device)

    @property
    def frame_model(self) -> Any:
        """The frame backbone as a frame model (the transform of training)."""
        if self._frame_model is None:
            self._frame_model = self.objective.frame_model(self.cfg.data)
        return self._frame_model

    @property
    def transform(self) -> str:
        return f"tca(frames={self.frame_model.transform})"

    def frame_features(
        self,
        paths: Sequence[str],
        cache_dir: str | os.PathLike | None = None,
        skip_corrupt: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> list[np.ndarray | None]:
        """Raw frame features ``(n_i, D)`` of video files through the checkpoint's frame backbone (cached)."""
        from vitssl.video.frames import video_frame_features

        c = self.objective.cfg
        return video_frame_features(
            self.frame_model, list(paths), fps=c.fps, num_frames=c.num_frames, cache_dir=cache_dir,
            batch_size=c.frame_batch_size, skip_corrupt=skip_corrupt, progress=progress,
        )  # fmt: skip

    @torch.no_grad()
    def embed(self, frames: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Embed raw frame features (before the PCA, as the frame backbone gives them).

        Args:
            frames: one ``(n_i, D)`` array per video, ``n_i >= 1``.

        Returns:
            ``(video vectors (N, E) float32, frame outputs [(n_i, E) float32])``, all rows L2-normalised.
        """
        n = len(frames)
        dim = self.objective.encoder.dim
        vectors = np.zeros((n, dim), dtype=np.float32)
        outs: list[np.ndarray] = [np.zeros((0, dim), np.float32)] * n
        lengths = [len(f) for f in frames]
        if any(length == 0 for length in lengths):
            raise DataError("every video needs at least one frame feature to embed")
        order = np.argsort(lengths, kind="stable")
        start = 0
        while start < n:  # batches of similar lengths, at most max_batch_frames padded frames each
            stop = start + 1
            while stop < n and (stop + 1 - start) * lengths[order[stop]] <= self.max_batch_frames:
                stop += 1
            rows = order[start:stop]
            t = lengths[rows[-1]]
            x = torch.zeros(len(rows), t, frames[rows[0]].shape[1])  # (b, T, D)
            valid = torch.zeros(len(rows), t, dtype=torch.bool)  # (b, T)
            for j, r in enumerate(rows):
                x[j, : lengths[r]] = torch.as_tensor(np.asarray(frames[r], dtype=np.float32))
                valid[j, : lengths[r]] = True
            video, out = self.objective.encode(x.to(self.device), valid.to(self.device))  # (b, E), (b, T, E)
            video, out = video.float().cpu().numpy(), out.float().cpu().numpy()
            for j, r in enumerate(rows):
                vectors[r] = video[j]
                outs[r] = np.ascontiguousarray(out[j, : lengths[r]])
            start = stop
        return vectors, outs

    def embed_videos(
        self, paths: Sequence[str], cache_dir: str | os.PathLike | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Embed video files: frames at the checkpoint's rate through its frame backbone, then :meth:`embed`.

        Raises:
            CorruptVideoError / MissingFileError: an unreadable video (the message names it).
        """
        raw = self.frame_features(paths, cache_dir=cache_dir)
        return self.embed([f for f in raw if f is not None])
