"""``make demo``: MoCo v3 on scikit-learn's bundled digits, then k-NN and linear probes against baselines.

Trains the shipped recipe ``pretrain/mocov3_demo`` on the CPU (a few minutes on 2 cores, no download), then
evaluates frozen features on the held-out split for three encoders: raw pixels, the random-initialised encoder,
and the pretrained one. Prints a table and writes ``results.json`` and ``curves.png`` into the run folder.

The run folder follows the settings: ``runs/demo`` for the recipe as shipped, ``runs/demo-<overrides>`` with
``key=value`` overrides (``python -m vitssl.demo seed=1`` trains into ``runs/demo-seed=1``), so other settings
never reuse another run's weights. Re-running the same command reuses its finished run and says so.

``python -m vitssl.demo action [key=value ...]``: action recognition on the procedural ``motion`` clips (the class
is the direction a blob moves). First pretrains the image backbone on single frames (recipe
``video/action_demo_pretrain``: where is the blob; no motion, no direction label), then trains the recipe
``video/action_demo`` twice on that frozen backbone, with the TSN mean head and with the ViViT temporal head, both
on the same per-frame features computed once, and scores both on held-out clips: averaging frames stays at
chance, the temporal transformer reads the motion. Overrides go to the head runs; ``pretrain.KEY=VALUE`` to the
pretraining run only; ``model.*`` and ``seed`` to both. Writes ``runs/demo_action/results.json`` (overrides give
``runs/demo_action-<overrides>``, as above).

``python -m vitssl.demo tca [key=value ...]``: near-duplicate video retrieval with TCA (:mod:`vitssl.video.tca_demo`):
writes the generated benchmark, trains the recipe ``video/tca_demo`` on its train sources and writes the held-out
mAP of TCA, TCA with chamfer re-ranking, the mean of frames and thumbnails to ``runs/demo_tca/results.json``.

``python -m vitssl.demo track [key=value ...]``: TransTrack on generated sequences against the IoU-association
baseline with the same detector (:mod:`vitssl.cli.track_demo`); writes ``runs/demo_track/results.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vitssl.cli._common import load_run_config
from vitssl.cli.pretrain import PretrainJob, pretrain_job
from vitssl.engine import build_objective, load_objective
from vitssl.engine.checkpoint import LAST_NAME
from vitssl.errors import UserError
from vitssl.io import write_json

_logger = logging.getLogger(__name__)

RECIPE = "pretrain/mocov3_demo"
DEFAULT_OUTPUT = "runs/demo"
ACTION_RECIPE = "video/action_demo"
ACTION_PRETRAIN_RECIPE = "video/action_demo_pretrain"
ACTION_OUTPUT = "runs/demo_action"
ACTION_HEADS = ("mean", "temporal")
TCA_OUTPUT = "runs/demo_tca"


def demo_output_dir(overrides: list[str], default: str = DEFAULT_OUTPUT) -> str:
    """``runs/demo``, or ``runs/demo-<overrides>`` when settings change (an explicit ``output_dir=`` wins)."""
    settings = sorted(o for o in overrides if not o.startswith("output_dir="))
    if not settings:
        return default
    slug = re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", ",".join(settings))[:120]
    return f"{default}-{slug}"


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


def run_demo(overrides: list[str]) -> int:
    """Train (or reuse) the demo run for these overrides, evaluate it and print the table."""
    if not any(o.startswith("output_dir=") for o in overrides):
        overrides = [*overrides, f"output_dir={demo_output_dir(overrides)}"]
    cfg = load_run_config(RECIPE, overrides)
    run_dir = Path(cfg.output_dir)
    if (run_dir / LAST_NAME).is_file():
        print(f"reusing the run in {run_dir} (same settings; resume=auto continues or skips it)")
    result = pretrain_job(PretrainJob.from_config(cfg))
    _logger.info("training %s at step %d", result.status, result.step)
    results = evaluate_demo(cfg, run_dir / LAST_NAME)
    write_json(results, run_dir / "results.json")
    plot_curves(run_dir, run_dir / "curves.png", results["random_init"]["knn_top1"])
    print(format_table(results))
    print(f"\nwrote {run_dir / 'results.json'} and {run_dir / 'curves.png'}")
    return 0


def run_action_demo(overrides: list[str]) -> dict[str, Any]:
    """Train (or reuse) the mean-head and temporal-head runs of ``video/action_demo``, score both, print a table.

    Args:
        overrides: ``key=value`` overrides applied to both runs; ``output_dir=`` names the folder holding them.

    Returns:
        What ``results.json`` holds: ``chance`` and each head's held-out ``top1`` (percent) and more.
    """
    import vitssl.video.action
    import vitssl.video.datasets  # noqa: F401  (registered here too, whatever vitssl.video imports)
    from vitssl.cli._common import register_objectives
    from vitssl.data import build_dataset
    from vitssl.video.evaluate import evaluate_action, save_confusion_png

    register_objectives()
    root = next((o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")), None)
    settings = [o for o in overrides if not o.startswith("output_dir=")]
    root_dir = Path(root or demo_output_dir(settings, ACTION_OUTPUT))
    shared = [o for o in settings if o.startswith(("model.", "~model.", "seed="))]
    pretrain = [o.removeprefix("pretrain.") for o in settings if o.startswith("pretrain.")]
    settings = [o for o in settings if not o.startswith("pretrain.")]
    start = time.perf_counter()

    # Stage 1: an image backbone that knows where the blob is (single frames; the engine exports its weights).
    backbone_dir = root_dir / "backbone"
    cfg = load_run_config(ACTION_PRETRAIN_RECIPE, [*shared, *pretrain, f"output_dir={backbone_dir}"])
    if (backbone_dir / LAST_NAME).is_file():
        print(f"reusing the run in {backbone_dir} (same settings; resume=auto continues or skips it)")
    result = pretrain_job(PretrainJob.from_config(cfg))
    _logger.info("backbone: training %s at step %d, %s", result.status, result.step, result.metrics)
    init_from = backbone_dir / "backbone.safetensors"
    if not init_from.is_file():
        raise UserError(f"the action demo's pretraining stopped before exporting {init_from}; run it again")

    results: dict[str, Any] = {"backbone": {"position_acc": round(float(result.metrics.get("acc", 0.0)), 2)}}
    for head in ACTION_HEADS:
        # The same frozen backbone for both heads: they train on the same cached per-frame features (computed by
        # the first run, read from <backbone>/features by the second) and differ only in the head.
        head_settings = [*settings, f"objective.head={head}", f"output_dir={root_dir / head}"]
        cfg = load_run_config(ACTION_RECIPE, [f"objective.init_from={init_from}", *head_settings])
        run_dir = Path(cfg.output_dir)
        if (run_dir / LAST_NAME).is_file():
            print(f"reusing the run in {run_dir} (same settings; resume=auto continues or skips it)")
        result = pretrain_job(PretrainJob.from_config(cfg))
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
    print(format_action_table(results))
    print(f"\nwrote {root_dir / 'results.json'} and each head's confusion.png")
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


def run_tca_demo(overrides: list[str]) -> dict[str, Any]:
    """``python -m vitssl.demo tca``: TCA on the generated near-duplicate benchmark (:mod:`vitssl.video.tca_demo`).

    Writes ``runs/demo_tca/results.json`` (``runs/demo_tca-<overrides>`` with overrides) and prints the table.
    """
    from vitssl.video import tca_demo

    root = next((o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")), None)
    settings = [o for o in overrides if not o.startswith("output_dir=")]
    root_dir = Path(root or demo_output_dir(settings, TCA_OUTPUT))

    def train(cfg: Any) -> Any:
        return pretrain_job(PretrainJob.from_config(cfg))

    results = tca_demo.run_tca_demo(root_dir, settings, load_run_config, train)
    print(tca_demo.format_tca_table(results))
    print(f"\nwrote {root_dir / 'results.json'}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="`python -m vitssl.demo action|tca|track [key=value ...]`: the video demos",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the demo recipe, e.g. seed=1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("vitssl").setLevel(logging.INFO)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    overrides = list(args.overrides)
    try:
        if overrides[:1] == ["tca"]:
            # The same reason as below: TCA's one small layer trains 10x faster on one thread here (0.4 s a step
            # against 4-5 s with 2 threads on 2 busy cores).
            torch.set_num_threads(1)
            run_tca_demo(overrides[1:])
            return 0
        if overrides[:1] == ["action"]:
            # Tiny per-frame matrices: thread hand-offs cost more than they save (measured 20x slower with 2
            # threads on 2 busy cores), so the action demo computes on one thread.
            torch.set_num_threads(1)
            run_action_demo(overrides[1:])
            return 0
        if overrides[:1] == ["track"]:
            from vitssl.cli.track_demo import run_track_demo

            torch.set_num_threads(1)  # tiny matrices, as for the action demo
            run_track_demo(overrides[1:])
            return 0
        return run_demo(overrides)
    except UserError as err:
        print(f"vitssl demo: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
