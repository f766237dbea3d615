"""``make demo``: MoCo v3 on scikit-learn's bundled digits, then k-NN and linear probes against baselines.

Trains the shipped recipe ``pretrain/mocov3_demo`` on the CPU (a few minutes on 2 cores, no download), then
evaluates frozen features on the held-out split for three encoders: raw pixels, the random-initialised encoder,
and the pretrained one. Writes ``results.json`` and ``curves.png`` into the run folder; ``python -m vitssl.demo``
prints the table.

The run folder follows the settings: ``runs/demo`` for the recipe as shipped, ``runs/demo-<overrides>`` with
``key=value`` overrides (``python -m vitssl.demo seed=1`` trains into ``runs/demo-seed=1``), so other settings
never reuse another run's weights. Re-running the same command reuses its finished run and says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from vitssl.config import load_config
from vitssl.demos.common import demo_root, train_or_reuse
from vitssl.engine import build_objective, load_objective
from vitssl.engine.checkpoint import LAST_NAME
from vitssl.io import write_json

_logger = logging.getLogger(__name__)

RECIPE = "pretrain/mocov3_demo"
DEFAULT_OUTPUT = "runs/demo"


def _probe(
    train_set: tuple[torch.Tensor, torch.Tensor],
    val_set: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    cfg: Any,
    seed: int,
) -> dict[str, float]:
    from vitssl.eval.knn import knn_predict
    from vitssl.eval.linear import train_linear_probe

    (train_f, train_l), (val_f, val_l) = train_set, val_set
    scores = knn_predict(train_f, train_l, val_f, cfg.eval.knn_k, cfg.eval.knn_temperature, num_classes)
    knn_top1 = (torch.as_tensor(scores).argmax(1) == val_l).float().mean().item() * 100
    linear = train_linear_probe(train_f, train_l, val_f, val_l, num_classes, seed=seed)
    return {"knn_top1": round(knn_top1, 2), "linear_top1": round(float(linear["top1"]), 2)}


def evaluate_demo(cfg: Any, checkpoint: Path) -> dict[str, dict[str, float]]:
    """k-NN and linear-probe top-1 (percent) on ``data.val`` for raw pixels, random init and the checkpoint."""
    from vitssl.data import TransformedDataset, build_dataset
    from vitssl.eval.features import extract_features

    torch.manual_seed(cfg.seed)
    random_init = build_objective(cfg).eval()
    pretrained, _, _ = load_objective(checkpoint)
    sample_fn = pretrained.eval_sample_fn(cfg.data)
    splits = {}
    for role in ("train", "val"):
        d = cfg.data[role]
        base = build_dataset(d.name, root=d.root, split=d.split, **dict(d.kwargs))
        splits[role] = TransformedDataset(base, sample_fn, seed=cfg.seed)
    num_classes = len(splits["train"].base.classes)

    encoders = {
        "raw_pixels": lambda x: x.flatten(1),  # (B, 3·H·W) normalised pixels
        "random_init": random_init.eval_features,
        "pretrained": pretrained.eval_features,
    }
    results = {}
    for name, fn in encoders.items():
        feats = {role: extract_features(fn, ds, batch_size=256) for role, ds in splits.items()}
        results[name] = _probe(feats["train"], feats["val"], num_classes, cfg, cfg.seed)
        _logger.info("%s: %s", name, results[name])
    return results


def format_table(results: dict[str, dict[str, float]], n_val: int | None = None) -> str:
    title = f"held-out top-1 (%){f', {n_val} images' if n_val else ''}"
    lines = [title, f"{'encoder':<14}{'k-NN':>8}{'linear':>9}", "-" * 31]
    for name, r in results.items():
        lines.append(f"{name:<14}{r['knn_top1']:>8.1f}{r['linear_top1']:>9.1f}")
    return "\n".join(lines)


def plot_curves(run_dir: Path, path: Path, random_init_knn: float | None = None) -> None:
    """Loss and online k-NN top-1 against optimizer steps, from ``metrics.jsonl`` (step 0: random init)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    loss = [(r["step"], r["loss"]) for r in records if "loss" in r]
    knn = [(r["step"], r["knn_top1"]) for r in records if "knn_top1" in r]
    if random_init_knn is not None:
        knn.insert(0, (0, random_init_knn))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot(*zip(*loss))
    ax1.set(xlabel="step", ylabel="MoCo v3 loss", title="training loss")
    if knn:
        ax2.plot(*zip(*knn), marker="o")
    ax2.set(xlabel="step", ylabel="k-NN top-1 (%)", title="online k-NN on held-out digits")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(overrides: list[str]) -> dict[str, dict[str, float]]:
    """Train (or reuse) the demo run for these overrides, evaluate it, write ``results.json`` and ``curves.png``.

    Args:
        overrides: ``key=value`` overrides of ``pretrain/mocov3_demo``; ``output_dir=`` names the run folder.

    Returns:
        What ``results.json`` holds: per encoder (raw pixels, random init, pretrained) k-NN and linear top-1.
    """
    run_dir, settings = demo_root(overrides, DEFAULT_OUTPUT)
    cfg = load_config(RECIPE, [*settings, f"output_dir={run_dir}"])
    result = train_or_reuse(cfg)
    _logger.info("training %s at step %d", result.status, result.step)
    results = evaluate_demo(cfg, run_dir / LAST_NAME)
    write_json(results, run_dir / "results.json")
    plot_curves(run_dir, run_dir / "curves.png", results["random_init"]["knn_top1"])
    return results


__all__ = ["DEFAULT_OUTPUT", "RECIPE", "evaluate_demo", "format_table", "plot_curves", "run_demo"]
