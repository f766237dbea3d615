"""Training pairs for TransTrack: (previous frame, current frame) with their boxes.

Two kinds of pair, as TransTrack trains:

- two frames of one sequence, ``gap`` frames apart (1..``max_gap``), with the ground-truth boxes of each;
- one frame and a randomly shifted (and rescaled) copy of it (``static_prob``): how detection-only data such as
  CrowdHuman becomes tracking data; the shift is drawn by the sample transform.

The dataset ``mot_pairs`` reads sequences in the MOTChallenge layout (:mod:`vitssl.video.track.mot`). With
``generate`` it first writes procedural sequences (:func:`vitssl.video.track.synth.write_sequences`) into its
root when the root holds none, so a recipe can train on generated data with nothing to download. Items are
``((prev, cur), annotations)`` with uint8 frames ``(H, W, 3)``; :class:`TrackPairTransform` turns them into the
tensors the ``transtrack`` objective trains on, boxes padded to ``max_objects`` rows.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from vitssl.data.common import DATASETS
from vitssl.errors import DataError

_logger = logging.getLogger(__name__)

_SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


def gt_boxes(gt: np.ndarray | None, frame: int, classes: tuple[int, ...] | None, min_visibility: float) -> np.ndarray:
    """Ground-truth rows of one frame to keep for training: ``(K, 5)`` ``id, left, top, width, height``.

    Args:
        gt: :func:`vitssl.video.track.mot.read_mot` rows of the sequence (None: no objects).
        frame: 1-based frame number.
        classes: MOT class ids to keep (column 8; MOT17 pedestrians: 1); None keeps every class. Rows whose class
            column is -1 (unset, as in MOT15 files) are kept.
        min_visibility: rows with a visibility (column 9) below this are dropped; -1 (unset) counts as visible.
    """
    if gt is None or len(gt) == 0:
        return np.zeros((0, 5))
    rows = gt[(gt[:, 0] == frame) & (gt[:, 6] != 0)]  # column 7 = 0: "do not consider"
    if classes is not None:
        rows = rows[np.isin(rows[:, 7], classes) | (rows[:, 7] == -1)]
    rows = rows[(rows[:, 8] >= min_visibility) | (rows[:, 8] == -1)]
    return rows[:, 1:6].astype(np.float64)


@DATASETS.register("mot_pairs")
class MOTPairs(Dataset):
    """Frame pairs of MOTChallenge sequences, one item per (sequence, frame) with a previous frame.

    Args:
        root: a folder of sequences (or one sequence); ``root/<split>`` is used when it exists.
        split: "train", "val" or "test" (picks the sub-folder, and the seed of generated sequences).
        max_gap: the previous frame is 1..max_gap frames before the current one (uniform; 1 = consecutive).
        static_prob: probability that an item is one frame and its (transform-shifted) copy instead.
        classes: MOT class ids to train on (MOT17 pedestrians: [1]); null keeps every class.
        min_visibility: drop ground-truth boxes less visible than this (MOT17 column 9).
        generate: when set and the folder holds no sequences, write procedural ones there first: the keyword
            arguments of ``synth.write_sequences`` other than ``root`` (``num_sequences``, ``num_frames``,
            ``size``, ``seed``; the split's own offset is added to the seed).
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        max_gap: int = 1,
        static_prob: float = 0.0,
        classes: list[int] | None = None,
        min_visibility: float = 0.0,
        generate: dict[str, Any] | None = None,
    ) -> None:
        from vitssl.video.track.mot import list_sequences

        if root is None or str(root) == "":
            raise DataError("dataset 'mot_pairs' needs a root: set data.train.root=PATH to a folder of MOT sequences")
        if split not in _SPLIT_SEEDS:
            raise DataError(f"dataset 'mot_pairs' has no split {split!r}; valid splits: {', '.join(_SPLIT_SEEDS)}")
        if max_gap < 1:
            raise DataError(f"mot_pairs: max_gap must be at least 1, got {max_gap}")
        if not 0.0 <= static_prob <= 1.0:
            raise DataError(f"mot_pairs: static_prob must lie in [0, 1], got {static_prob}")
        folder = Path(os.path.expandvars(str(root))).expanduser()
        if (folder / split).is_dir():
            folder = folder / split
        elif generate is not None:
            folder = folder / split
            if not folder.is_dir() or not any(folder.iterdir()):
                self._generate(folder, split, dict(generate))
        self.root = folder
        self.sequences = list_sequences(folder)
        self.max_gap, self.static_prob = int(max_gap), float(static_prob)
        self.keep_classes = tuple(int(c) for c in classes) if classes is not None else None
        self.min_visibility = float(min_visibility)
        # every frame but a sequence's first can be a "current" frame (with static pairs, the first too)
        start = 1 if static_prob >= 1.0 else 2
        self.items = [(s, f) for s, seq in enumerate(self.sequences) for f in range(start, seq.length + 1)]
        if not self.items:
            raise DataError(f"mot_pairs: the sequences in {folder} are too short to give a pair of frames")
        self.classes = ["object"]  # one class: the ground truth's kept classes are all "an object to track"
        self.targets = [0] * len(self.items)

    @staticmethod
    def _generate(folder: Path, split: str, kwargs: dict[str, Any]) -> None:
        from vitssl.video.track.synth import write_sequences

        # YAML lists (OmegaConf ListConfig) become the tuples write_sequences takes
        kwargs = {k: tuple(v) if not isinstance(v, (str, int, float)) else v for k, v in kwargs.items()}
        kwargs["seed"] = int(kwargs.get("seed", 0)) * 10 + _SPLIT_SEEDS[split]
        _logger.info("writing generated sequences into %s (%s)", folder, kwargs)
        folder.mkdir(parents=True, exist_ok=True)
        write_sequences(folder, **kwargs)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[tuple[np.ndarray, np.ndarray], dict[str, Any]]:
        s, cur = self.items[index]
        seq = self.sequences[s]
        static = cur == 1 or (self.static_prob > 0 and float(np.random.random()) < self.static_prob)
        prev = cur if static else max(1, cur - int(np.random.randint(1, self.max_gap + 1)))
        cur_img = seq.frame(cur)
        prev_img = cur_img if prev == cur else seq.frame(prev)
        ann = {
            "prev": gt_boxes(seq.gt, prev, self.keep_classes, self.min_visibility),
            "cur": gt_boxes(seq.gt, cur, self.keep_classes, self.min_visibility),
            "static": static,
        }
        return (prev_img, cur_img), ann

    def sample_id(self, index: int) -> str:
        s, cur = self.items[index]
        return f"{self.sequences[s].name}/{cur}"

    def __repr__(self) -> str:
        return f"MOTPairs(root={str(self.root)!r}, sequences={len(self.sequences)}, pairs={len(self)})"


def frame_to_tensor(
    frame: np.ndarray | torch.Tensor, size: tuple[int, int], mean: list[float], std: list[float]
) -> torch.Tensor:
    """A uint8 frame (H, W, 3) resized to ``size`` (h, w) and normalised: float (3, h, w)."""
    x = torch.as_tensor(np.array(frame, copy=True) if isinstance(frame, np.ndarray) else frame)  # (H, W, 3)
    x = x.permute(2, 0, 1).float().div_(255)  # (3, H, W)
    if tuple(x.shape[1:]) != tuple(size):
        x = F.interpolate(x[None], size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[0]
    m = torch.tensor(mean, dtype=x.dtype)[:, None, None]
    s = torch.tensor(std, dtype=x.dtype)[:, None, None]
    return (x - m) / s  # (3, h, w)


def _shift(img: torch.Tensor, boxes: np.ndarray, max_shift: float, max_scale: float) -> tuple[torch.Tensor, np.ndarray]:
    """A random translation (up to ``max_shift`` of the side) and zoom (1 ± ``max_scale``) of a (3, H, W) image
    and its ``(K, 5)`` id-ltwh boxes in pixels of that image; the image is resampled, boxes follow exactly."""
    _, h, w = img.shape
    scale = 1.0 + (2 * float(torch.rand(())) - 1) * max_scale
    dx = (2 * float(torch.rand(())) - 1) * max_shift * w
    dy = (2 * float(torch.rand(())) - 1) * max_shift * h
    # output pixel p shows input pixel (p - centre - d) / scale + centre
    theta = torch.tensor(
        [[1 / scale, 0.0, -2 * dx / (w * scale)], [0.0, 1 / scale, -2 * dy / (h * scale)]], dtype=img.dtype
    )
    grid = F.affine_grid(theta[None], [1, *img.shape], align_corners=False)
    out = F.grid_sample(img[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    boxes = boxes.copy()
    if len(boxes):
        cx, cy = w / 2, h / 2
        boxes[:, 1] = (boxes[:, 1] - cx) * scale + cx + dx
        boxes[:, 2] = (boxes[:, 2] - cy) * scale + cy + dy
        boxes[:, 3:5] *= scale
    return out, boxes


def normalised_boxes(boxes: np.ndarray, width: int, height: int, min_size: float = 2.0) -> np.ndarray:
    """``(K, 5)`` id-ltwh pixel boxes clipped to the image, as ``(K', 5)`` id + normalised (cx, cy, w, h); boxes
    with less than ``min_size`` pixels of either side inside the image are dropped."""
    if len(boxes) == 0:
        return np.zeros((0, 5))
    x0 = np.clip(boxes[:, 1], 0, width)
    y0 = np.clip(boxes[:, 2], 0, height)
    x1 = np.clip(boxes[:, 1] + boxes[:, 3], 0, width)
    y1 = np.clip(boxes[:, 2] + boxes[:, 4], 0, height)
    keep = ((x1 - x0) >= min_size) & ((y1 - y0) >= min_size)
    out = np.stack(
        [boxes[:, 0], (x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height], 1
    )
    return out[keep]


class TrackPairTransform:
    """Sample function ``((prev, cur), annotations) -> dict`` of tensors for the ``transtrack`` objective.

    Frames are resized to ``size`` and normalised; a static pair's current frame is a shifted copy of the
    previous; both frames of a pair are flipped together. Boxes become normalised (cx, cy, w, h), padded to
    ``max_objects`` rows with a validity mask (objects beyond it are dropped, with a warning once).

    Args:
        size: network input (h, w).
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        max_objects: rows of the padded box tensors.
        flip: random horizontal flip of the pair.
        shift: largest translation of a static pair's copy, as a fraction of the side.
        scale: largest zoom change of a static pair's copy (1 ± scale).
    """

    _warned = False

    def __init__(
        self,
        size: tuple[int, int],
        mean: list[float],
        std: list[float],
        max_objects: int,
        flip: bool = True,
        shift: float = 0.05,
        scale: float = 0.05,
    ) -> None:
        self.size, self.mean, self.std = tuple(size), list(mean), list(std)
        self.max_objects, self.flip, self.shift, self.scale = int(max_objects), bool(flip), float(shift), float(scale)

    def _pad(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if len(rows) > self.max_objects and not TrackPairTransform._warned:
            _logger.warning("a frame has %d objects, more than max_objects=%d: the rest are dropped from training",
                            len(rows), self.max_objects)  # fmt: skip
            TrackPairTransform._warned = True
        rows = rows[: self.max_objects]
        boxes = torch.zeros(self.max_objects, 4)
        ids = torch.full((self.max_objects,), -1, dtype=torch.long)
        mask = torch.zeros(self.max_objects, dtype=torch.bool)
        boxes[: len(rows)] = torch.as_tensor(rows[:, 1:5], dtype=torch.float32)
        ids[: len(rows)] = torch.as_tensor(rows[:, 0], dtype=torch.long)
        mask[: len(rows)] = True
        return boxes, ids, mask

    def __call__(self, frames: tuple[np.ndarray, np.ndarray], ann: dict[str, Any]) -> dict[str, torch.Tensor]:
        prev_img, cur_img = frames
        h, w = prev_img.shape[:2]
        prev = frame_to_tensor(prev_img, (h, w), self.mean, self.std)  # (3, H, W)
        cur = prev if cur_img is prev_img else frame_to_tensor(cur_img, (h, w), self.mean, self.std)
        prev_boxes, cur_boxes = np.asarray(ann["prev"], dtype=np.float64), np.asarray(ann["cur"], dtype=np.float64)
        if ann.get("static"):
            cur, cur_boxes = _shift(prev, prev_boxes, self.shift, self.scale)
        if self.flip and float(torch.rand(())) < 0.5:
            prev, cur = prev.flip(-1), cur.flip(-1)
            prev_boxes, cur_boxes = prev_boxes.copy(), cur_boxes.copy()
            for b in (prev_boxes, cur_boxes):
                if len(b):
                    b[:, 1] = w - b[:, 1] - b[:, 3]
        if (h, w) != self.size:
            prev = F.interpolate(prev[None], size=self.size, mode="bilinear", antialias=True, align_corners=False)[0]
            cur = F.interpolate(cur[None], size=self.size, mode="bilinear", antialias=True, align_corners=False)[0]
        pb, pi, pm = self._pad(normalised_boxes(prev_boxes, w, h))
        cb, ci, cm = self._pad(normalised_boxes(cur_boxes, w, h))
        return {"prev": prev, "cur": cur, "prev_boxes": pb, "prev_ids": pi, "prev_mask": pm,
                "cur_boxes": cb, "cur_ids": ci, "cur_mask": cm}  # fmt: skip

    def __repr__(self) -> str:
        return (f"TrackPairTransform(size={self.size}, max_objects={self.max_objects}, flip={self.flip}, "
                f"shift={self.shift}, scale={self.scale})")  # fmt: skip


@DATASETS.register("crowdhuman")
class CrowdHumanPairs(Dataset):
    """CrowdHuman images as static pairs (an image and its shifted copy), the way TransTrack pre-trains on it.

    Reads ``root/annotation_<split>.odgt`` (one JSON object per line: ``ID`` and ``gtboxes`` with ``tag``,
    ``fbox`` = full body ``[left, top, width, height]`` and ``extra.ignore``) and ``root/Images/<ID>.jpg``.
    Boxes tagged ``person`` and not ignored are kept; each item is ``((image, image), annotations)`` with
    ``static`` set, so :class:`TrackPairTransform` draws the shift.

    Args:
        root: the CrowdHuman folder.
        split: "train" or "val".
        box: "fbox" (full body, TransTrack's choice) or "vbox" (visible part).
    """

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train", box: str = "fbox") -> None:
        import json

        if root is None or str(root) == "":
            raise DataError("dataset 'crowdhuman' needs a root: set data.train.root=PATH to the CrowdHuman folder")
        if split not in ("train", "val"):
            raise DataError(f"dataset 'crowdhuman' has no split {split!r}; valid splits: train, val")
        if box not in ("fbox", "vbox"):
            raise DataError(f"crowdhuman: box={box!r}; choose fbox (full body) or vbox (visible part)")
        folder = Path(os.path.expandvars(str(root))).expanduser()
        ann = folder / f"annotation_{split}.odgt"
        if not ann.is_file():
            from vitssl.errors import MissingFileError

            raise MissingFileError(f"crowdhuman: {ann} does not exist (expected annotation_{split}.odgt and Images/)")
        self.root, self.items = folder, []
        for n, line in enumerate(ann.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                rows = [[k + 1, *g[box]] for k, g in enumerate(record["gtboxes"])
                        if g.get("tag") == "person" and not g.get("extra", {}).get("ignore", 0)]  # fmt: skip
                self.items.append((str(record["ID"]), np.asarray(rows, dtype=np.float64).reshape(-1, 5)))
            except (ValueError, KeyError, TypeError) as err:
                raise DataError(f"crowdhuman: {ann} line {n} is not a CrowdHuman record ({err})") from None
        if not self.items:
            raise DataError(f"crowdhuman: {ann} holds no images")
        self.classes = ["person"]
        self.targets = [0] * len(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[tuple[np.ndarray, np.ndarray], dict[str, Any]]:
        from vitssl.data.common import open_rgb

        image_id, rows = self.items[index]
        # the stored geometry, which the boxes refer to (TransTrack's loader ignores EXIF orientation too)
        image = np.asarray(open_rgb(self.root / "Images" / f"{image_id}.jpg", orient=False))  # (H, W, 3)
        return (image, image), {"prev": rows, "cur": rows, "static": True}

    def sample_id(self, index: int) -> str:
        return str(self.root / "Images" / f"{self.items[index][0]}.jpg")
