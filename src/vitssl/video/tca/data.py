"""TCA's training data: video files as ``(path, group)`` items, views drawn from their cached frame features."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vitssl.data.common import DATASETS
from vitssl.errors import DataError, MissingFileError
from vitssl.video.files import VIDEO_EXTENSIONS, list_videos


@DATASETS.register("video_files")
class VideoFiles(Dataset):
    """Video files as ``(path, group)`` items, nothing decoded: for objectives that work on cached features.

    ``root/<split>.txt`` (or ``.csv``/``.tsv``), when present, lists the split's videos one per line, a path
    (absolute, or relative to ``root``) and optionally a group label after whitespace or a comma; without it
    every video under ``root`` (recursively) is listed. Videos of a group are near-duplicates of each other:
    groups come from that column, else from ``ground_truth`` (a query and its positives form a group; any format
    :func:`vitssl.eval.retrieval_metrics.read_ground_truth` reads), else every video is its own group. ``classes``
    are the group labels, ``targets`` each item's group index.

    Args:
        root: the folder of videos.
        split: the list file's stem; ignored when no list file exists.
        ground_truth: a near-duplicate ground-truth file whose query/positive sets group the videos.
    """

    def __init__(
        self, root: str | os.PathLike | None = None, split: str = "train", ground_truth: str | None = None
    ) -> None:
        if root is None:
            raise DataError("video_files needs data.*.root: a folder of videos (with <split>.txt lists, optional)")
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingFileError(f"video_files: root {self.root} is not a folder of videos")
        lists = [self.root / f"{split}{ext}" for ext in (".txt", ".csv", ".tsv")]
        found = next((p for p in lists if p.is_file()), None)
        rows: list[tuple[str, str | None]] = []
        if found is None:
            rows = [(rel, None) for rel in list_videos(self.root, relative=True)]
        else:
            for number, line in enumerate(found.read_text().splitlines(), 1):
                parts = line.replace(",", " ").split()
                if not parts or parts[0].startswith("#"):
                    continue
                if len(parts) > 2:
                    raise DataError(f"{found}:{number}: expected 'path [group]', got {line.strip()!r}")
                rows.append((parts[0], parts[1] if len(parts) == 2 else None))
        if not rows:
            raise DataError(
                f"video_files: no videos in {found or self.root} (extensions {', '.join(VIDEO_EXTENSIONS)})"
            )
        self.samples = [str(self.root / rel) for rel, _ in rows]
        labels = [g for _, g in rows]
        if ground_truth is not None and all(g is None for g in labels):
            labels = _groups_from_ground_truth(ground_truth, self.samples)
        labels = [s if g is None else g for s, g in zip(self.samples, labels, strict=True)]
        self.classes = sorted(set(labels))
        index = {g: i for i, g in enumerate(self.classes)}
        self.targets = [index[g] for g in labels]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.samples[index], self.targets[index]

    def sample_id(self, index: int) -> str:
        return self.samples[index]

    def __repr__(self) -> str:
        return f"VideoFiles(root={str(self.root)!r}, len={len(self)}, groups={len(self.classes)})"


def _groups_from_ground_truth(path: str, samples: Sequence[str]) -> list[str | None]:
    """Each sample's group: the first query whose set (the query and its positives) holds it, else None."""
    from vitssl.eval.retrieval_metrics import match_ids, read_ground_truth

    gt = read_ground_truth(path)
    ids = set(gt.queries) | {p for ps in gt.positives.values() for p in ps}
    matched = match_ids(ids, samples)
    group: dict[str, str] = {}
    for q in gt.queries:
        for member in [q, *sorted(gt.positives.get(q, ()))]:
            if member in matched:
                group.setdefault(matched[member], f"gt:{q}")
    return [group.get(s) for s in samples]


@dataclass
class ViewParams:
    """How a training view is drawn from a video's frame-feature sequence."""

    crop: tuple[float, float] = (0.5, 1.0)  # temporal crop length as a fraction of the video
    speed: tuple[float, float] = (0.5, 2.0)  # frame-rate change: frames advanced per output frame (log-uniform)
    drop_p: float = 0.1  # probability of dropping each frame after resampling
    max_frames: int = 300  # frames kept (a random window beyond it); the padded length of every view


def draw_view(n: int, p: ViewParams, rng: np.random.RandomState | Any = np.random) -> np.ndarray:
    """Frame indices (into a video of ``n`` frames) of one augmented view, in time order, at least one.

    Args:
        n: frames in the video.
        p: view parameters.
        rng: numpy generator with ``uniform``, ``randint`` and ``random_sample`` (default: the global one).
    """
    length = max(1, round(n * rng.uniform(*p.crop)))
    start = rng.randint(0, n - length + 1)
    speed = math.exp(rng.uniform(math.log(p.speed[0]), math.log(p.speed[1])))
    idx = start + np.floor(np.arange(0.0, length, speed)).astype(np.int64)  # skip (speed > 1) or repeat frames
    keep = rng.random_sample(len(idx)) >= p.drop_p
    if keep.any():
        idx = idx[keep]
    else:
        idx = idx[rng.randint(0, len(idx)) :][:1]
    if len(idx) > p.max_frames:
        first = rng.randint(0, len(idx) - p.max_frames + 1)
        idx = idx[first : first + p.max_frames]
    return idx


class FeatureViews:
    """Sample function ``(video path, group) -> ((frames1, valid1), (frames2, valid2), group)`` over cached features.

    Frame features are rows of a ``.npy`` file (opened memory-mapped in each worker) with ``(V + 1,)`` offsets;
    views are padded to ``max_frames`` rows of zeros, ``valid`` marking real frames. With ``group_positive_p``
    the second view comes from another video of the same group when the group has one.

    With ``neg_num > 0`` (the official TCA wiring) a sample is ``(anchor, positive, (frames (M, L, D), valid
    (M, L)), group)``: the anchor and positive as above, and views of ``M = neg_num`` distinct videos drawn
    uniformly from the readable videos outside the anchor's group, its hard negatives (the official code draws
    them from VCDB's background videos, which are exactly the videos of no annotated group).

    Args:
        frames_file: ``(rows, D)`` float32 features of every training video, concatenated.
        offsets: ``(V + 1,)`` row offsets; video v is rows ``offsets[v]:offsets[v+1]``.
        paths: the V video paths, in the same order.
        groups: the V group indices.
        params: view parameters.
        group_positive_p: probability of drawing the second view from another member of the group.
        neg_num: negatives drawn per sample (0: none, the two-view samples).

    Raises:
        DataError: a group with fewer than ``neg_num`` readable videos outside it.
    """

    def __init__(
        self,
        frames_file: str | Path,
        offsets: np.ndarray,
        paths: Sequence[str],
        groups: Sequence[int],
        params: ViewParams,
        group_positive_p: float = 0.0,
        neg_num: int = 0,
    ) -> None:
        self.frames_file = str(frames_file)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.paths = [str(p) for p in paths]
        self.row = {p: i for i, p in enumerate(self.paths)}
        self.groups = np.asarray(groups, dtype=np.int64)
        members: dict[int, list[int]] = {}  # the readable videos of each group (unreadable ones own no rows)
        readable = np.diff(self.offsets) > 0
        for i, g in enumerate(self.groups.tolist()):
            if readable[i]:
                members.setdefault(g, []).append(i)
        self.members = members
        self.readable = np.flatnonzero(readable)  # (R,)
        self.params = params
        self.group_positive_p = group_positive_p
        self.neg_num = int(neg_num)
        if self.neg_num > 0 and members:
            largest = max(len(m) for m in members.values())
            if len(self.readable) - largest < self.neg_num:
                raise DataError(
                    f"objective.neg_num={self.neg_num} negatives per video, but a group of {largest} leaves only "
                    f"{len(self.readable) - largest} readable training videos outside it; lower objective.neg_num"
                )
        self._frames: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_frames": None}  # each worker maps the file itself

    def video(self, i: int) -> np.ndarray:
        """The raw frame features ``(n_i, D)`` of video ``i``."""
        if self._frames is None:
            self._frames = np.load(self.frames_file, mmap_mode="r")
        return np.asarray(self._frames[self.offsets[i] : self.offsets[i + 1]], dtype=np.float32)

    def _view(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.video(i)  # (n, D)
        if len(feats) == 0:
            from vitssl.video.io import CorruptVideoError

            raise CorruptVideoError(
                f"training video {self.paths[i]} could not be read when its features were extracted"
            )
        idx = draw_view(len(feats), self.params)
        out = np.zeros((self.params.max_frames, feats.shape[1]), dtype=np.float32)  # (L, D)
        out[: len(idx)] = feats[idx]
        valid = np.zeros(self.params.max_frames, dtype=bool)  # (L,)
        valid[: len(idx)] = True
        return torch.from_numpy(out), torch.from_numpy(valid)

    def __call__(self, path: str, group: int) -> tuple[Any, Any, int]:
        try:
            i = self.row[str(path)]
        except KeyError:
            raise DataError(f"video {path} has no cached frame features; it was not a training video") from None
        j = i
        others = [m for m in self.members.get(int(self.groups[i]), ()) if m != i]
        if others and np.random.random_sample() < self.group_positive_p:
            j = others[np.random.randint(0, len(others))]
        if self.neg_num == 0:
            return self._view(i), self._view(j), int(self.groups[i])
        views = [self._view(n) for n in self._negatives(i)]
        negatives = (torch.stack([f for f, _ in views]), torch.stack([v for _, v in views]))  # (M, L, D), (M, L)
        return self._view(i), self._view(j), negatives, int(self.groups[i])

    def _negatives(self, i: int) -> list[int]:
        """``neg_num`` distinct readable videos outside video ``i``'s group, uniformly (numpy's global generator)."""
        group, chosen = int(self.groups[i]), []
        while len(chosen) < self.neg_num:  # rejection: groups are small beside the background, few draws are lost
            n = int(self.readable[np.random.randint(0, len(self.readable))])
            if int(self.groups[n]) != group and n not in chosen:
                chosen.append(n)
        return chosen

    def __repr__(self) -> str:
        return f"FeatureViews({self.frames_file!r}, videos={len(self.row)}, {self.params})"
