"""vitssl.eval.metrics: the one accuracy report and the one confusion-matrix writer, and the video scores built on
them (checked against a transcription of the torch formulas video/evaluate.py used before it shared them)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitssl.eval.metrics import classification_report, confusion_matrix, save_confusion_png

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _old_video_metrics(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """video/evaluate.py's own metrics before they came from eval.metrics (transcribed)."""
    pred = scores.argmax(-1)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    totals = confusion.sum(1)
    per_class = [
        round(float(confusion[i, i]) / float(n) * 100, 2) if n else None for i, n in enumerate(totals.tolist())
    ]
    present = [a for a in per_class if a is not None]
    out = {
        "top1": round(float((pred == labels).float().mean()) * 100, 2),
        "mean_class_accuracy": round(sum(present) / len(present), 2) if present else math.nan,
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "num_videos": int(labels.numel()),
    }
    if num_classes >= 5:
        top5 = scores.topk(5, dim=-1).indices
        out["top5"] = round(float((top5 == labels[:, None]).any(-1).float().mean()) * 100, 2)
    return out


@pytest.mark.parametrize("num_classes", [3, 7])
def test_video_scores_equal_the_former_torch_formulas(num_classes):
    from vitssl.video.evaluate import _metrics

    gen = torch.Generator().manual_seed(num_classes)
    labels = torch.randint(0, num_classes - 1, (53,), generator=gen)  # the last class has no video
    scores = torch.rand(53, num_classes, generator=gen).softmax(-1)
    assert _metrics(scores, labels, num_classes) == _old_video_metrics(scores, labels, num_classes)


def test_classification_report_counts_by_hand():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    labels = np.array([0, 1, 1, 2])
    r = classification_report(scores, labels, 3)
    np.testing.assert_array_equal(r["confusion_matrix"], [[1, 0, 0], [1, 1, 0], [0, 0, 1]])
    assert r["top1"] == 75.0 and r["top5"] == 100.0  # top-min(5, C): every label is among 3 classes
    assert r["per_class_top1"] == [100.0, 50.0, 100.0] and r["mean_per_class_top1"] == pytest.approx(250 / 3)
    by_hand = [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    np.testing.assert_array_equal(confusion_matrix(labels, np.array([0, 0, 1, 2]), 3), by_hand)


def test_confusion_png_is_written_atomically_and_checks_its_names(tmp_path):
    cm = np.array([[3, 1], [0, 2]])
    png = save_confusion_png(torch.as_tensor(cm).tolist(), ["a", "b"], tmp_path / "cm" / "confusion.png")
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in png.parent.iterdir()] == ["confusion.png"]  # no temporary left behind
    with pytest.raises(ValueError, match="1 names but the confusion matrix has 2"):
        save_confusion_png(cm, ["a"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="square"):
        save_confusion_png(np.zeros((2, 3)), None, tmp_path / "x.png")


def test_video_and_linear_share_the_writer():
    from vitssl.video import evaluate

    assert evaluate.save_confusion_png is save_confusion_png
