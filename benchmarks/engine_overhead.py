"""Engine overhead: steps/s of ``vitssl.engine.train`` vs a bare PyTorch loop on the same work (CPU).

Both loops train the same objective (supervised, a small ViT) on the same data pipeline (procedural shapes
through ``TransformedDataset`` and a ``DataLoader``) with the same global batch and AdamW. The bare loop
does forward, backward and step and nothing else; the engine adds schedules, the per-step finite-loss
check, metric logging and the step-boundary bookkeeping. Checkpoint writes are excluded from both (the
engine's run is timed from its metrics timestamps, with no checkpoint in between). Throughput is
1 / median step time after 5 warm-up steps, so bursts of load from other processes do not decide it.

    python benchmarks/engine_overhead.py [--steps 60] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import vitssl.ssl  # noqa: F401  (registers the objectives)
from vitssl.config import load_config
from vitssl.data import TransformedDataset, build_dataset, collate_skip_none
from vitssl.engine import build_objective, train
from vitssl.engine.trainer import ResumableSampler


def _config(out: Path, steps: int, batch: int):
    n = steps * batch
    return load_config(
        "pretrain/test_tiny",
        [
            f"output_dir={out}",
            "model.backbone=vit_tiny_patch16_224",
            "model.backbone_kwargs={patch_size: 4, embed_dim: 192, depth: 6, num_heads: 3}",
            f"data.train.kwargs={{num_samples: {n}}}",
            "train.epochs=1",
            f"train.batch_size={batch}",
            "train.log_every_steps=1",
            f"train.checkpoint_every_steps={10 * steps}",
            "optim.warmup_epochs=0",
        ],
    )


def _steps_per_second(stamps: list[float]) -> float:
    """1 / median step time: robust to bursts of load from other processes on a shared machine."""
    return 1.0 / statistics.median(b - a for a, b in itertools.pairwise(stamps))


def bare_loop(cfg, warmup: int) -> float:
    """Steps per second of forward / backward / AdamW step over the engine's own data pipeline."""
    torch.manual_seed(cfg.seed)
    objective = build_objective(cfg).train()
    base = build_dataset(cfg.data.train.name, split="train", **dict(cfg.data.train.kwargs))
    dataset = TransformedDataset(base, objective.train_sample_fn(cfg.data), seed=cfg.seed)
    sampler = ResumableSampler(len(dataset), 1, 0, cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, collate_fn=collate_skip_none)
    opt = torch.optim.AdamW(objective.param_groups(cfg.optim.weight_decay), lr=cfg.optim.lr)
    stamps = []
    for batch, _ in loader:
        loss = objective(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stamps.append(time.perf_counter())
    return _steps_per_second(stamps[warmup:])


def engine_loop(cfg, warmup: int) -> float:
    """Steps per second of the engine, from the wall-clock stamps of its per-step metrics lines."""
    train(cfg)
    records = [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in records if "loss" in r]
    return _steps_per_second(times[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/engine_overhead.json", help="where the figures go")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warmup = 5
    bare, engine = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # interleaved, so drifting machine load hits both alike
            bare.append(bare_loop(_config(Path(tmp) / f"b{r}", args.steps, args.batch), warmup))
            engine.append(engine_loop(_config(Path(tmp) / f"e{r}", args.steps, args.batch), warmup))
    b, e = statistics.median(bare), statistics.median(engine)
    print(f"bare loop : {b:.3f} steps/s  (runs: {', '.join(f'{x:.3f}' for x in bare)})")
    print(f"engine    : {e:.3f} steps/s  (runs: {', '.join(f'{x:.3f}' for x in engine)})")
    print(f"overhead  : {100 * (b / e - 1):+.1f}% time per step (goal <= 5%)")
    record = {
        "benchmark": "engine_overhead",
        "baseline": "bare training loop (same objective, data and optimizer)",
        "torch": torch.__version__,
        "threads": args.threads,
        "steps": args.steps,
        "bare_steps_per_s": bare,
        "engine_steps_per_s": engine,
        "overhead_percent": 100 * (b / e - 1),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
