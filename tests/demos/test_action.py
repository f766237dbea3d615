"""``python -m vitssl.demo action`` at test size, and the point it makes: an order-aware head reads motion.

The shipped demo needs minutes to teach its backbone where the blob is; here the first test runs the whole
pipeline at a size that only checks its plumbing, and the second gives both heads per-frame features that say
where the blob is by construction (its centre on the torus, from the renderer), trained through the engine on
the ``frame_features`` path, to check the claim itself: the temporal head reads the motion, the mean cannot.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import vitssl.ssl
import vitssl.video.registered  # noqa: F401  (registers video_action, blob_position and the datasets)
from vitssl.config import load_config
from vitssl.video.datasets import _SPLIT_IDS, MOTION_CLASSES, render_motion

T, S = 8, 16
TINY = ["model.backbone=test_vit", "~model.backbone_kwargs"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_action_demo_pretrains_then_trains_both_heads_on_one_cache(tmp_path: Path) -> None:
    from vitssl.demos.action import format_action_table, run_action_demo

    out = tmp_path / "demo"
    results = run_action_demo(
        [
            f"output_dir={out}",
            *TINY,
            "pretrain.data.train.kwargs.num_samples=64",
            "pretrain.train.epochs=1",
            "pretrain.train.batch_size=32",
            "data.train.kwargs.num_samples=32",
            "data.val.kwargs.num_samples=16",
            "train.epochs=1",
            "train.batch_size=16",
        ]
    )
    saved = json.loads((out / "results.json").read_text())
    assert saved["chance"] == 25.0 and saved["classes"] == list(MOTION_CLASSES)
    for head in ("mean", "temporal"):
        assert 0 <= saved[head]["top1"] <= 100 and saved[head]["num_videos"] == 16
        assert (out / head / "confusion.png").is_file()
    assert results["temporal"]["top1"] == saved["temporal"]["top1"]
    assert (out / "backbone" / "backbone.safetensors").is_file()
    (folder,) = (out / "backbone" / "features").iterdir()  # one cache, shared by both heads' runs
    for head in ("mean", "temporal"):
        assert str(folder) in (out / head / "config.yaml").read_text()
    table = format_action_table(results)
    assert "mean (TSN average)" in table and f"{saved['temporal']['top1']:>8.1f}" in table


def _position_features(split: str, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame features (n, T·dim) that say where the blob is: its centre on the torus (cos, sin of x and y),
    through a fixed random projection to ``dim``; labels (n,). The clips are those of ``motion``."""
    proj = np.random.default_rng(123).normal(0.0, 1.0, (4, dim))
    feats = np.empty((n, T, dim), dtype=np.float32)
    for i in range(n):
        rng = np.random.default_rng([0, _SPLIT_IDS[split], i])
        _, centres = render_motion(rng, i % 4, S, T, return_centres=True)  # (T, 2)
        angle = 2 * math.pi * centres / S
        feats[i] = np.concatenate([np.cos(angle), np.sin(angle)], 1) @ proj
    return feats.reshape(n, -1), np.arange(n) % 4


def test_temporal_head_reads_the_motion_the_mean_head_cannot(tmp_path: Path) -> None:
    from vitssl.backbones import create_backbone
    from vitssl.engine import load_objective, train
    from vitssl.eval.features import FeatureSet

    dim = int(create_backbone("test_vit", img_size=S).num_features)
    train_x, train_y = _position_features("train", 512, dim)
    meta = {"num_frames": T, "classes": list(MOTION_CLASSES)}
    folder = FeatureSet(train_x, train_y, [f"motion/train/{i}" for i in range(512)], meta).save(tmp_path / "feats")
    val_x, val_y = _position_features("val", 256, dim)
    val = torch.from_numpy(val_x).view(256, T, dim)  # (N, T, D)

    top1 = {}
    for head in ("mean", "temporal"):
        cfg = load_config(
            "video/action_demo",
            [
                f"output_dir={tmp_path / head}",
                *TINY,
                f"objective.head={head}",
                "data.train.name=frame_features",
                f"data.train.root={folder}",
                "~data.train.kwargs",
                f"data.img_size={S}",
                "train.epochs=24",
                "train.batch_size=32",
                "optim.lr=3.0e-3",
            ],
        )
        result = train(cfg)
        objective, _, _ = load_objective(Path(result.checkpoint_path))
        with torch.no_grad():
            pred = objective.head(val).argmax(-1)  # (N,)
        top1[head] = float((pred == torch.from_numpy(val_y)).float().mean()) * 100
    assert top1["mean"] <= 40.0, top1  # chance is 25: averaging the frames erases their order
    assert top1["temporal"] >= top1["mean"] + 30.0, top1
