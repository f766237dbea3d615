"""Multi-view action-recognition testing (TimeSformer / ViViT protocol).

Each video is scored on ``clips`` temporal clips × ``crops`` spatial crops; the softmax scores of the views are
averaged per video before the arg-max (TimeSformer: 1 × 3 views on Kinetics; ViViT: 4 × 3). The scores and
the confusion-matrix figure (:func:`save_confusion_png`, re-exported here) come from :mod:`vitssl.eval.metrics`.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from vitssl.config import ConfigError
from vitssl.data import TransformedDataset, collate_skip_none
from vitssl.eval.metrics import classification_report, save_confusion_png

_logger = logging.getLogger(__name__)


class SpatialCropClip:
    """Picklable sample function: one of ``num_crops`` evenly spaced square crops of a clip (ViViT's 3-crop test).

    The clip is resized so its shorter side is ``size``; crop ``index`` is taken at the ``index / (num_crops - 1)``
    point along the longer side (left, centre, right for 3 crops), then normalised.

    Args:
        size: crop side S.
        mean: per-channel mean.
        std: per-channel std.
        index: which crop, ``0 <= index < num_crops``.
        num_crops: crops per clip.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], index: int, num_crops: int) -> None:
        self.size, self.index, self.num_crops = size, index, num_crops
        self.mean, self.std = list(mean), list(std)

    def __call__(self, clip: Any, label: Any) -> tuple[torch.Tensor, Any]:
        x = torch.as_tensor(clip).permute(0, 3, 1, 2).float() / 255  # (T, 3, H, W)
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)  # (T, 3, h', w')
        frac = self.index / (self.num_crops - 1) if self.num_crops > 1 else 0.5
        top, left = round((nh - self.size) * frac), round((nw - self.size) * frac)
        x = x[..., top : top + self.size, left : left + self.size]  # (T, 3, S, S)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std, label

    def __repr__(self) -> str:
        return f"SpatialCropClip(size={self.size}, index={self.index}, num_crops={self.num_crops})"


def clip_views(name: str, root: str | None, split: str, num_clips: int, **kwargs: Any) -> Callable[[int], Dataset]:
    """A ``clip_index -> dataset`` factory for file datasets (``videofolder``, ``video_csv``): view ``c`` is the
    ``c``-th of ``num_clips`` evenly spaced clips of each video (``train=False``), for ``evaluate_action``.

    Args:
        name: dataset registry key.
        root: its root.
        split: its split.
        num_clips: temporal views per video (pass the same number as ``views[0]``).
        **kwargs: further dataset options (``num_frames``, ``sampler``, ``stride``...).
    """
    return functools.partial(_build_view, name, root, split, num_clips, kwargs)


def _build_view(name: str, root: str | None, split: str, num_clips: int, kwargs: dict[str, Any], c: int) -> Dataset:
    from vitssl.data import build_dataset

    return build_dataset(name, root=root, split=split, clip_index=c, num_clips=num_clips, train=False, **kwargs)


@torch.no_grad()
def evaluate_action(
    objective: Any,
    dataset_or_factory: Dataset | Callable[[int], Dataset],
    *,
    views: tuple[int, int] = (1, 1),
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    data_cfg: Any = None,
    seed: int = 0,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Top-1 / top-5, per-class accuracy and confusion matrix of a ``video_action`` objective, multi-view.

    Temporal views: clip ``c`` reads the videos through ``factory(c)`` when a factory is given (a dataset built
    with that ``clip_index``), else through the one dataset under the data seed ``seed + c``: datasets that draw
    their frame indices at random while reading (seeded per item by ``TransformedDataset``) give a different,
    reproducible clip per view; deterministic datasets give the same clip each time. Spatial views: with one
    crop, the objective's ``eval_sample_fn`` (centre crop); with several, :class:`SpatialCropClip` crops evenly
    along the longer side after resizing the shorter one to ``data_cfg.img_size``.

    Args:
        objective: a ``VideoAction`` objective (``logits(clips)``, ``eval_sample_fn``, ``cfg.num_classes``).
        dataset_or_factory: a video dataset with ``(uint8 (T, H, W, 3), label)`` items, or ``clip_index -> dataset``.
        views: ``(clips, crops)`` per video.
        batch_size: clips per forward pass.
        device: where the objective runs.
        data_cfg: the run's ``data`` config (``img_size``, ``mean``, ``std``); required.
        seed: base data seed of the views.
        num_workers: DataLoader workers.

    Returns:
        ``top1`` (and ``top5`` with at least 5 classes) in percent, ``mean_class_accuracy``, ``per_class``
        (percent per class, None for a class without videos), ``confusion`` (``[true][predicted]`` counts),
        ``num_videos`` and ``views``.
    """
    if data_cfg is None:
        raise ValueError("evaluate_action needs data_cfg (img_size, mean, std) for the clip transforms")
    num_clips, num_crops = (int(v) for v in views)
    if num_clips < 1 or num_crops < 1:
        raise ValueError(f"views must be (clips >= 1, crops >= 1), got {views}")
    num_classes = int(objective.cfg.num_classes)
    was_training = objective.training
    objective.eval().to(device)
    scores: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    try:
        for c in range(num_clips):
            base = dataset_or_factory(c) if callable(dataset_or_factory) else dataset_or_factory
            for k in range(num_crops):
                if num_crops == 1:
                    sample_fn = objective.eval_sample_fn(data_cfg)
                else:
                    sample_fn = SpatialCropClip(data_cfg.img_size, data_cfg.mean, data_cfg.std, k, num_crops)
                data = TransformedDataset(base, sample_fn, seed=seed + c)
                view_scores, view_labels = _score(objective, data, batch_size, device, num_workers)
                scores = view_scores if scores is None else scores + view_scores
                labels = view_labels
    finally:
        objective.train(was_training)
    assert scores is not None and labels is not None
    scores = scores / (num_clips * num_crops)  # (N, K) mean softmax over views
    return _metrics(scores, labels, num_classes) | {"views": [num_clips, num_crops]}


def _score(
    objective: Any, data: Dataset, batch_size: int, device: torch.device | str, num_workers: int
) -> tuple[torch.Tensor, torch.Tensor]:
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_skip_none)  # fmt: skip
    probs, labels = [], []
    for batch, skipped in loader:
        if skipped:
            raise RuntimeError("evaluate_action: a video could not be read; every view must score every video")
        clips, target = batch  # (B, T, C, H, W), (B,)
        logits = objective.logits(clips.to(device))  # (B, K)
        probs.append(logits.float().softmax(-1).cpu())  # (B, K)
        labels.append(torch.as_tensor(target))
    return torch.cat(probs), torch.cat(labels)  # (N, K), (N,)


def _metrics(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """The ``video eval`` scores from :func:`vitssl.eval.metrics.classification_report`: percentages rounded to two
    decimals, the mean class accuracy over the rounded per-class values, top-5 only with at least 5 classes."""
    report = classification_report(scores.numpy(), labels.numpy(), num_classes)
    per_class = [None if a is None else round(a, 2) for a in report["per_class_top1"]]
    present = [a for a in per_class if a is not None]
    out: dict[str, Any] = {
        "top1": round(report["top1"], 2),
        "mean_class_accuracy": round(sum(present) / len(present), 2) if present else math.nan,
        "per_class": per_class,
        "confusion": report["confusion_matrix"].tolist(),
        "num_videos": int(labels.numel()),
    }
    if num_classes >= 5:
        out["top5"] = round(report["top5"], 2)
    return out


def parse_views(text: str) -> tuple[int, int]:
    """``"CLIPSxCROPS"`` (``"1x3"``, ``"4x3"``) → ``(clips, crops)``.

    Raises:
        ConfigError: not two positive integers joined by ``x``.
    """
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        raise ConfigError(
            f"--views {text!r}: expected CLIPSxCROPS with two positive integers, e.g. 1x3 (TimeSformer) or 4x3 (ViViT)"
        )
    return int(m[1]), int(m[2])


def evaluate_checkpoint(
    checkpoint: str | Path,
    data_spec: str,
    *,
    split: str | None = None,
    views: tuple[int, int] = (1, 1),
    batch_size: int = 16,
    device: torch.device | str = "auto",
    num_workers: int = 0,
) -> dict[str, Any]:
    """:func:`evaluate_action` of a ``video_action`` checkpoint on the videos a data spec names.

    File datasets (``videofolder``, ``video_csv``) are read in test mode (evenly spaced clips, one per temporal
    view); ``num_frames`` defaults to the checkpoint's clip length.

    Args:
        checkpoint: an engine checkpoint of the ``video_action`` objective.
        data_spec: ``NAME[:key=value,...]``, e.g. ``videofolder:root=/data/k400``.
        split: the split (default the spec's own, else ``val``).
        views: ``(clips, crops)`` per video.
        batch_size: clips per forward pass.
        device: where the model runs (``auto``: a GPU if there is one).
        num_workers: data-loading processes.

    Returns:
        :func:`evaluate_action`'s scores plus ``checkpoint``, ``data``, ``split`` and ``classes``.

    Raises:
        CheckpointError: the checkpoint is missing, truncated or not a vitssl checkpoint.
        ConfigError: it is not a ``video_action`` checkpoint, the spec is bad, or the data has more classes than
            the checkpoint's classifier.
    """
    from vitssl.distributed import resolve_device
    from vitssl.eval.features import load_for_eval
    from vitssl.eval.spec import build_eval_dataset, parse_data_spec
    from vitssl.video.datasets import FileVideoDataset

    dev = resolve_device(device)
    objective, cfg, _ = load_for_eval(checkpoint, dev)
    kind = cfg.objective.name
    if kind != "video_action":
        raise ConfigError(
            f"checkpoint {checkpoint} was trained by the {kind!r} objective; vitssl video eval takes a video_action "
            "checkpoint (train one with vitssl train video/<recipe>)"
        )
    name, options = parse_data_spec(data_spec)
    if "num_frames" not in options:  # the clip length the head was trained on
        data_spec = f"{data_spec}{',' if ':' in data_spec else ':'}num_frames={int(cfg.objective.num_frames)}"
    dataset, name, options = build_eval_dataset(data_spec, split)
    if isinstance(dataset, FileVideoDataset):  # test-mode clips: evenly spaced, the same on every run
        opts = {k: v for k, v in options.items() if k not in ("root", "split", "train")}
        source: Dataset | Callable[[int], Dataset] = clip_views(
            name, options.get("root"), options["split"], views[0], **opts
        )
        classes = list(dataset.classes)
    else:
        source, classes = dataset, list(getattr(dataset, "classes", []))
    num_classes = int(cfg.objective.num_classes)
    if len(classes) > num_classes:
        raise ConfigError(
            f"{data_spec}: {len(classes)} classes, but the checkpoint's classifier has {num_classes}; evaluate it on "
            "data with its own classes"
        )
    scores = evaluate_action(
        objective, source, views=views, batch_size=batch_size, device=dev, data_cfg=cfg.data, seed=int(cfg.seed),
        num_workers=num_workers,
    )  # fmt: skip
    return {"checkpoint": str(checkpoint), "data": data_spec, "split": options["split"], "classes": classes, **scores}


__all__ = [
    "SpatialCropClip",
    "clip_views",
    "evaluate_action",
    "evaluate_checkpoint",
    "parse_views",
    "save_confusion_png",
]
