"""Classification metrics shared by every probe (k-NN, linear, zero-shot, video action): top-1, top-k, per class,
the confusion matrix, and its one figure.

:func:`accuracy_report` is the one accuracy report: the probes that score in blocks (k-NN) feed it hits they
collected themselves; the others hand whole score matrices to :func:`classification_report`, which adds the
confusion matrix. :func:`save_confusion_png` is the one confusion-matrix writer (linear probe, ``video eval``,
the video demo).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
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


def confusion_matrix(labels: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts, ``[true][predicted]``.

    Args:
        labels: (N,) true classes in ``[0, num_classes)``.
        pred: (N,) predicted classes in ``[0, num_classes)``.
        num_classes: C.
    """
    flat = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(pred, dtype=np.int64)  # (N,)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, -1).astype(np.int64)


def classification_report(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """:func:`accuracy_report` of a score matrix (top-5 is top-min(5, C)) plus its ``confusion_matrix``.

    Args:
        scores: (N, C) class scores (logits or probabilities: only their order counts).
        labels: (N,) true classes.
        num_classes: C.
    """
    scores, labels = np.asarray(scores), np.asarray(labels, dtype=np.int64)
    pred, hit_top = topk_hits(scores, labels, min(5, num_classes))
    report = accuracy_report(pred == labels, hit_top, labels, num_classes)
    return {**report, "confusion_matrix": confusion_matrix(labels, pred, num_classes)}


def save_confusion_png(matrix: Any, classes: Sequence[str] | None, path: str | Path, normalize: bool = True) -> Path:
    """Draw a confusion matrix (rows = true class, columns = predicted) as a PNG, written atomically.

    Args:
        matrix: (C, C) counts, ``[true][predicted]`` (an array, a tensor or nested lists).
        classes: C class names (None = indices); tick labels are drawn up to 50 classes, counts up to 20.
        path: output file (its folder is created).
        normalize: colour by row share (per-class recall) rather than raw counts.

    Returns:
        The path.

    Raises:
        ValueError: ``matrix`` is not square, or ``classes`` does not name each of its classes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from vitssl.io import atomic_path

    cm = np.asarray(matrix)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"cm must be a square (C, C) matrix, got shape {cm.shape}")
    n = cm.shape[0]
    names = [str(c) for c in classes] if classes is not None else [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f"classes has {len(names)} names but the confusion matrix has {n} classes")
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
    side = min(max(4.0, 0.35 * n + 2), 24.0)
    fig = Figure(figsize=(side + 1, side), dpi=100)
    FigureCanvasAgg(fig)  # no pyplot: the global matplotlib backend stays untouched
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class" if normalize else "count")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = np.trace(cm) / max(cm.sum(), 1) * 100
    ax.set_title(f"confusion matrix ({cm.sum()} samples, top-1 {acc:.1f}%)")
    if n <= 50:
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    colour = "white" if shown[i, j] > 0.5 * shown.max() else "black"
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color=colour)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
