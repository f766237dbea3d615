"""``vitssl video eval`` as a library call: score a ``video_action`` checkpoint multi-view, write the confusion
matrix figure and (optionally) the scores as JSON, and format the report the command prints."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def evaluate_action_checkpoint(
    checkpoint: str | Path,
    data: str,
    *,
    split: str | None = None,
    views: str | tuple[int, int] = "1x1",
    batch_size: int = 16,
    device: torch.device | str = "auto",
    num_workers: int = 0,
    out: str | Path | None = None,
    confusion: str | Path | None = None,
) -> dict[str, Any]:
    """:func:`vitssl.video.evaluate.evaluate_checkpoint`, then its confusion-matrix PNG (and the scores as JSON).

    Args:
        checkpoint: a ``video_action`` checkpoint, or the run folder holding one.
        data: ``NAME[:key=value,...]``, e.g. ``videofolder:root=/data/k400``.
        split: the split (default the spec's own, else ``val``).
        views: ``"CLIPSxCROPS"`` (``"1x3"``, ``"4x3"``) or ``(clips, crops)``.
        batch_size: clips per forward pass.
        device: where the model runs (``auto``: a GPU if there is one).
        num_workers: data-loading processes.
        out: also write the scores as JSON here.
        confusion: the confusion-matrix figure; default next to ``out`` (``.png``), else
            ``confusion_<split>.png`` beside the checkpoint.

    Returns:
        The scores (top-1, top-5, per class, confusion, ...), with ``confusion_png`` the figure's path.

    Raises:
        ConfigError: a bad ``views``, data spec or checkpoint kind (a bad ``views`` before the checkpoint is read).
        CheckpointError: the checkpoint is missing or unreadable.
    """
    from vitssl.engine.checkpoint import resolve_checkpoint
    from vitssl.io import write_json
    from vitssl.video.evaluate import evaluate_checkpoint, parse_views, save_confusion_png

    views = parse_views(views) if isinstance(views, str) else (int(views[0]), int(views[1]))
    scores = evaluate_checkpoint(
        checkpoint, data, split=split, views=views, batch_size=batch_size, device=device, num_workers=num_workers
    )
    if confusion:
        png = Path(confusion)
    elif out:
        png = Path(out).with_suffix(".png")
    else:
        png = resolve_checkpoint(checkpoint).absolute().parent / f"confusion_{scores['split']}.png"
    names = list(scores["classes"]) + [str(i) for i in range(len(scores["classes"]), len(scores["per_class"]))]
    save_confusion_png(scores["confusion"], names, png)
    scores["confusion_png"] = str(png)
    if out:
        write_json(scores, out)
    return scores


def format_action_scores(scores: dict[str, Any]) -> str:
    """The ``video eval`` report: top-1 / top-5, mean class accuracy, a line per class, the figure's path."""
    clips, crops = scores["views"]
    head = f"{scores['checkpoint']} on {scores['data']} ({scores['split']}): {scores['num_videos']} videos, "
    head += f"{clips}x{crops} views (clips x crops)"
    top = f"top-1 {scores['top1']:.2f} %"
    if "top5" in scores:
        top += f"   top-5 {scores['top5']:.2f} %"
    top += f"   mean class accuracy {scores['mean_class_accuracy']:.2f} %"
    classes = list(scores["classes"]) + [f"class {i}" for i in range(len(scores["classes"]), len(scores["per_class"]))]
    width = max([len(c) for c in classes] + [5])
    totals = [sum(row) for row in scores["confusion"]]
    rows = [
        f"  {name:<{width}} {'-' if acc is None else f'{acc:6.2f} %'}  ({n} videos)"
        for name, acc, n in zip(classes, scores["per_class"], totals)
        if n or acc is not None
    ]
    return "\n".join([head, top, "per class:", *rows, f"confusion matrix: {scores['confusion_png']}"])
