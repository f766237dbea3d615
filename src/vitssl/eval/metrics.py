"""Classification accuracy shared by every probe (k-NN, linear, zero-shot): top-1, top-k, per class."""

from __future__ import annotations

from typing import Any

import numpy as np


def topk_hits(scores: np.ndarray, labels: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the predicted class, and whether the label is among the ``top`` best classes.

    Args:
        scores: (N, C) class scores.
        labels: (N,) true classes.
        top: k of the top-k hit.

    Returns:
        ``(pred (N,), hit_top (N,) bool)``; ties resolve to the lower class index, as ``argmax`` does.
    """
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :top]  # (N, top)
    return ranked[:, 0], (ranked == labels[:, None]).any(axis=1)


def accuracy_report(hit1: np.ndarray, hit_top: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Top-1, top-k, mean per-class and per-class top-1 accuracy in percent (None for absent classes).

    Args:
        hit1: (N,) whether the top-1 prediction is right.
        hit_top: (N,) whether the label is among the top-k predictions.
        labels: (N,) true classes in ``[0, num_classes)``.
        num_classes: number of classes.
    """
    counts = np.bincount(labels, minlength=num_classes)
    correct = np.bincount(labels, weights=hit1.astype(np.float64), minlength=num_classes)
    per_class = [float(correct[c] / counts[c] * 100) if counts[c] else None for c in range(num_classes)]
    present = [a for a in per_class if a is not None]
    return {
        "top1": float(hit1.mean() * 100) if len(labels) else float("nan"),
        "top5": float(hit_top.mean() * 100) if len(labels) else float("nan"),
        "mean_per_class_top1": float(np.mean(present)) if present else float("nan"),
        "per_class_top1": per_class,
    }
