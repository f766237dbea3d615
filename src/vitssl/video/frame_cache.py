"""Per-frame features of a frozen backbone, computed once: a head then trains with no backbone forward.

:func:`cache_frame_features` runs the backbone over every frame of every clip of a dataset, under the
evaluation clip transform, and keeps the result in the image feature cache (:mod:`vitssl.eval.features`: the
same folder layout, written atomically, keyed like it by the weights' digest, the dataset and its options, the
transform and the layer). A clip of T frames is one row of ``T x D`` values. :class:`FrameFeatures`, the
``frame_features`` dataset, reads such a folder back as items ``(features (T, D), label)``.

The ``video_action`` objective uses both when ``freeze_backbone`` is on (and ``cache_features`` is left on): its
``setup`` fills the cache for ``data.train`` and points ``data.train`` at the folder, so every epoch reads
features. Cached training features are those of the evaluation transform: no clip augmentation.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from vitssl import distributed as dist
from vitssl.data.common import DATASETS
from vitssl.errors import DataError

_logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the meaning of a key part changes
LAYER = "pooled"  # the backbone's pooled embedding of each frame, what the heads take


def weights_sha256(module: nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, shapes and values): the cache's checkpoint digest.

    It names the weights that produce the features whatever file they came from (a training checkpoint, an
    exported ``backbone.safetensors`` or a seeded random init).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def frame_feature_key(
    backbone: nn.Module, name: str, root: str | None, split: str, options: dict[str, Any], transform: str
) -> dict[str, Any]:
    """The cache key of a dataset's per-frame features (what :func:`cache_frame_features` keys on).

    Args:
        backbone: the frozen backbone.
        name: dataset registry key.
        root: its root (made absolute), or None.
        split: its split.
        options: its other options (``data.*.kwargs``).
        transform: the evaluation transform's description (``vitssl.eval.features.describe_transform``).
    """
    from vitssl.eval.spec import canonical_options

    return {
        "format": CACHE_FORMAT,
        "kind": "video_frames",
        "checkpoint_sha256": weights_sha256(backbone),
        "dataset": name,
        "options": canonical_options({**dict(options), "root": root}),
        "split": split,
        "layer": LAYER,
        "transform": transform,
    }


def cache_frame_features(
    backbone: nn.Module,
    data: Any,
    sample_fn: Any,
    cache_dir: str | Path,
    batch_size: int = 32,
    num_workers: int = 0,
    skip_corrupt: bool = False,
) -> Path:
    """The cache folder of ``data``'s per-frame features, extracted first (every rank a shard) if absent.

    Args:
        backbone: the frozen backbone, on the device to run on.
        data: a dataset config (``name``, ``root``, ``split``, ``kwargs``) of a video dataset.
        sample_fn: the evaluation sample function, ``(clip, label) -> ((T, C, H, W), label)``.
        cache_dir: where feature folders live.
        batch_size: clips per forward pass (per rank).
        num_workers: data-loading processes.
        skip_corrupt: leave out unreadable clips (counted in the folder's ``meta.json``) instead of failing.

    Returns:
        The folder, the same on every rank.
    """
    from vitssl.data import build_dataset
    from vitssl.eval.features import FeatureSet, cache_folder, describe_transform, extract_rows

    t0 = time.perf_counter()
    options = dict(data.kwargs or {})
    key = frame_feature_key(backbone, data.name, data.root, data.split, options, describe_transform(sample_fn))
    folder = cache_folder(Path(cache_dir), key)
    found = False
    if dist.is_main_process():  # rank 0 decides, so every rank takes the same branch into the collectives
        found = _holds(folder, key)
    if dist.broadcast_object(found):
        _logger.info("per-frame features of %s (%s) read from the cache %s", data.name, data.split, folder)
        return folder

    dataset = build_dataset(data.name, root=data.root, split=data.split, **options)
    device = next(iter(backbone.parameters())).device
    was_training = backbone.training
    backbone.eval()

    def frame_features(clips: torch.Tensor) -> torch.Tensor:
        b, t = clips.shape[:2]
        return backbone(clips.flatten(0, 1)).view(b, t, -1).flatten(1)  # (B, T·D)

    try:
        features, rows = extract_rows(
            frame_features,
            dataset,
            sample_fn,
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
            skip_corrupt=skip_corrupt,
            desc=f"per-frame features of {data.name} ({data.split})",
        )
    finally:
        backbone.train(was_training)
    clip = dataset[int(rows[0])][0]  # (T, H, W, 3): the clip length, to reshape rows into frames
    num_frames = int(clip.shape[0])
    meta = {
        "key": key,
        "classes": [str(c) for c in getattr(dataset, "classes", [])],
        "num_items": len(dataset),
        "count": len(rows),
        "num_frames": num_frames,
        "frame_dim": int(features.shape[1]) // num_frames,
        "skipped_rows": sorted(set(range(len(dataset))) - set(rows.tolist())),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    ids = [str(dataset.sample_id(int(r))) for r in rows]
    if dist.is_main_process():
        labels = np.asarray(dataset.targets, dtype=np.int64)[rows]  # known without decoding
        FeatureSet(features, labels, ids, meta).save(folder)
        _logger.info("cached %d clips x %d frames of %s (%s) in %.1f s -> %s", len(rows), num_frames, data.name,
                     data.split, meta["seconds"], folder)  # fmt: skip
    dist.barrier()
    return folder


def _holds(folder: Path, key: dict[str, Any]) -> bool:
    """Whether ``folder`` is a complete feature folder of exactly ``key`` (never trust a hash-prefix match)."""
    from vitssl.eval.features import FeatureCacheError, FeatureSet

    if not folder.is_dir():
        return False
    try:
        return FeatureSet.load(folder).meta.get("key") == key
    except FeatureCacheError as err:
        _logger.warning("%s; extracting again", err)
        return False


@DATASETS.register("frame_features")
class FrameFeatures(Dataset):
    """A folder written by :func:`cache_frame_features`, as items ``(float32 features (T, D), label)``.

    Args:
        root: the feature folder.
        split: unused (a folder holds one split; its key names it).
    """

    def __init__(self, root: str | None = None, split: str = "train") -> None:
        from vitssl.eval.features import FeatureCacheError, FeatureSet

        if not root or not Path(root).is_dir():
            raise DataError(f"frame_features: root={root!r} is not a feature folder; set it to a cache folder")
        try:
            fs = FeatureSet.load(root)
        except FeatureCacheError as err:
            raise DataError(f"frame_features: {err}") from None
        t = fs.meta.get("num_frames")
        if not t or fs.dim % int(t):
            raise DataError(f"frame_features: {root} holds no per-frame features (meta.json lacks num_frames)")
        if not fs.labelled:
            raise DataError(f"frame_features: {root} holds unlabelled features; a classifier needs labels")
        self.root = Path(root)
        self.features = torch.from_numpy(fs.features).view(len(fs), int(t), -1)  # (N, T, D)
        self.targets = [int(x) for x in fs.labels]
        self.classes = fs.classes
        self.ids = fs.sample_ids
        self.meta = fs.meta

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.features[index], self.targets[index]  # (T, D), label

    def sample_id(self, index: int) -> str:
        return self.ids[index]


def features_as_is(features: torch.Tensor, target: Any) -> tuple[torch.Tensor, Any]:
    """The sample function of ``frame_features`` items: cached features need no transform (picklable)."""
    return features, target


__all__ = ["FrameFeatures", "cache_frame_features", "features_as_is", "frame_feature_key", "weights_sha256"]
