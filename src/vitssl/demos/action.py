"""``python -m vitssl.demo action [key=value ...]``: action recognition on the procedural ``motion`` clips.

The class is the direction a blob moves. The demo first pretrains the image backbone on single frames (recipe
``video/action_demo_pretrain``: where is the blob; no motion, no direction label), then trains the recipe
``video/action_demo`` twice on that frozen backbone, with the TSN mean head and with the ViViT temporal head, both
on the same per-frame features computed once, and scores both on held-out clips: averaging frames stays at
chance, the temporal transformer reads the motion. Overrides go to the head runs; ``pretrain.KEY=VALUE`` to the
pretraining run only; ``model.*`` and ``seed`` to both. Writes ``runs/demo_action/results.json`` (overrides give
``runs/demo_action-<overrides>``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from vitssl.config import load_config
from vitssl.demos.common import demo_root, train_or_reuse
from vitssl.engine import load_objective
from vitssl.engine.checkpoint import LAST_NAME
from vitssl.errors import UserError
from vitssl.io import write_json

_logger = logging.getLogger(__name__)

ACTION_RECIPE = "video/action_demo"
ACTION_PRETRAIN_RECIPE = "video/action_demo_pretrain"
ACTION_OUTPUT = "runs/demo_action"
ACTION_HEADS = ("mean", "temporal")


def run_action_demo(overrides: list[str]) -> dict[str, Any]:
    """Train (or reuse) the mean-head and temporal-head runs of ``video/action_demo`` and score both.

    Args:
        overrides: ``key=value`` overrides applied to both runs; ``output_dir=`` names the folder holding them.

    Returns:
        What ``results.json`` holds: ``chance`` and each head's held-out ``top1`` (percent) and more.
    """
    from vitssl.data import build_dataset
    from vitssl.video.evaluate import evaluate_action, save_confusion_png

    root_dir, settings = demo_root(overrides, ACTION_OUTPUT)
    shared = [o for o in settings if o.startswith(("model.", "~model.", "seed="))]
    pretrain = [o.removeprefix("pretrain.") for o in settings if o.startswith("pretrain.")]
    settings = [o for o in settings if not o.startswith("pretrain.")]
    start = time.perf_counter()

    # Stage 1: an image backbone that knows where the blob is (single frames; the engine exports its weights).
    backbone_dir = root_dir / "backbone"
    cfg = load_config(ACTION_PRETRAIN_RECIPE, [*shared, *pretrain, f"output_dir={backbone_dir}"])
    result = train_or_reuse(cfg)
    _logger.info("backbone: training %s at step %d, %s", result.status, result.step, result.metrics)
    init_from = backbone_dir / "backbone.safetensors"
    if not init_from.is_file():
        raise UserError(f"the action demo's pretraining stopped before exporting {init_from}; run it again")

    results: dict[str, Any] = {"backbone": {"position_acc": round(float(result.metrics.get("acc", 0.0)), 2)}}
    for head in ACTION_HEADS:
        # The same frozen backbone for both heads: they train on the same cached per-frame features (computed by
        # the first run, read from <backbone>/features by the second) and differ only in the head.
        head_settings = [*settings, f"objective.head={head}", f"output_dir={root_dir / head}"]
        cfg = load_config(ACTION_RECIPE, [f"objective.init_from={init_from}", *head_settings])
        run_dir = root_dir / head
        result = train_or_reuse(cfg)
        _logger.info("%s head: training %s at step %d", head, result.status, result.step)
        objective, _, _ = load_objective(run_dir / LAST_NAME)
        d = cfg.data.val
        if d is None:
            raise UserError("the action demo needs data.val (held-out clips) in its recipe")
        held_out = build_dataset(d.name, root=d.root, split=d.split, **dict(d.kwargs))
        scores = evaluate_action(objective, held_out, views=(1, 1), batch_size=64, data_cfg=cfg.data, seed=cfg.seed)
        save_confusion_png(scores["confusion"], held_out.classes, run_dir / "confusion.png")
        results[head] = {k: scores[k] for k in ("top1", "mean_class_accuracy", "per_class", "num_videos")}
        results["chance"] = round(100.0 / cfg.objective.num_classes, 2)
        results["classes"] = list(held_out.classes)
    results["seconds"] = round(time.perf_counter() - start, 1)
    write_json(results, root_dir / "results.json")
    return results


def format_action_table(results: dict[str, Any]) -> str:
    """The action demo's table: held-out top-1 of each head against chance."""
    n = results[ACTION_HEADS[0]]["num_videos"]
    lines = [f"held-out top-1 (%), {n} motion clips", f"{'head':<22}{'top-1':>8}", "-" * 30]
    lines.append(f"{'chance':<22}{results['chance']:>8.1f}")
    names = {"mean": "mean (TSN average)", "temporal": "temporal (ViViT)"}
    for head in ACTION_HEADS:
        lines.append(f"{names[head]:<22}{results[head]['top1']:>8.1f}")
    return "\n".join(lines)


__all__ = ["ACTION_OUTPUT", "format_action_table", "run_action_demo"]
