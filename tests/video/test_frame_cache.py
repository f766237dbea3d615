"""Frozen-backbone action training on cached per-frame features (vitssl.video.frame_cache)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import vitssl.ssl
import vitssl.video.registered  # noqa: F401  (registers video_action, motion, frame_features)
from vitssl.config import load_config
from vitssl.data import build_dataset
from vitssl.errors import DataError
from vitssl.video.frame_cache import FrameFeatures, frame_feature_key

T, S = 4, 16


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(out: Path, *extra: str) -> object:
    return load_config(
        "video/action_demo",
        [
            f"output_dir={out}",
            "model.backbone=test_vit",
            "~model.backbone_kwargs",
            "objective.num_heads=2",
            f"objective.num_frames={T}",
            "objective.crop_scale=[1.0, 1.0]",  # full frames, no flip: the live path sees what the cache holds
            f"data.train.kwargs={{num_samples: 12, img_size: {S}, num_frames: {T}}}",
            f"data.val.kwargs={{num_samples: 4, img_size: {S}, num_frames: {T}}}",
            f"data.img_size={S}",
            "train.epochs=2",
            "train.batch_size=4",
            "train.log_every_steps=1",
            "optim.warmup_epochs=0",
            *extra,
        ],
    )


class _CountBackboneCalls:
    """Engine callback: counts forward calls of the objective's backbone from the first training step on."""

    def __init__(self) -> None:
        self.calls = 0

    def on_train_start(self, objective: torch.nn.Module, device: torch.device) -> None:
        objective.backbone.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))

    def on_epoch_end(self, epoch: int, step: int) -> dict[str, float]:
        return {}


def _losses(run: Path) -> list[float]:
    import json

    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


def test_head_on_cached_features_equals_live_frozen_forwards_without_backbone_calls(tmp_path: Path) -> None:
    from vitssl.engine import load_objective, train

    live_calls, cached_calls = _CountBackboneCalls(), _CountBackboneCalls()
    live = train(_cfg(tmp_path / "live", "objective.cache_features=false"), callbacks=[live_calls])
    cfg = _cfg(tmp_path / "cached")
    cached = train(cfg, callbacks=[cached_calls])

    assert live.step == cached.step == 6
    assert live_calls.calls == 6 and cached_calls.calls == 0  # a live step runs the backbone; a cached one never
    torch.testing.assert_close(_losses(tmp_path / "cached"), _losses(tmp_path / "live"), rtol=1e-4, atol=1e-5)
    a, _, _ = load_objective(Path(live.checkpoint_path))
    b, _, _ = load_objective(Path(cached.checkpoint_path))
    for (name, x), y in zip(a.head.state_dict().items(), b.head.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)

    # the run trained on the cache folder, under <output_dir>/features, and says so in its config
    assert (
        cfg.data.train.name == "frame_features" and Path(cfg.data.train.root).parent == tmp_path / "cached" / "features"
    )
    stored = (tmp_path / "cached" / "config.yaml").read_text()
    assert "frame_features" in stored
    feats = FrameFeatures(cfg.data.train.root)
    assert feats.features.shape == (12, T, b.backbone.num_features) and feats.classes == ["left", "right", "up", "down"]
    assert math.isfinite(cached.metrics["loss"])


def test_cache_is_reused_and_keyed_by_weights_data_and_transform(tmp_path: Path) -> None:
    from vitssl.engine import build_objective
    from vitssl.video.frame_cache import cache_frame_features

    cfg = _cfg(tmp_path / "run")
    objective = build_objective(cfg)
    sample_fn = objective.eval_sample_fn(cfg.data)
    first = cache_frame_features(objective.backbone, cfg.data.train, sample_fn, tmp_path / "cache")
    mtime = (first / "features.npy").stat().st_mtime_ns
    calls = []
    objective.backbone.register_forward_hook(lambda *_: calls.append(1))
    again = cache_frame_features(objective.backbone, cfg.data.train, sample_fn, tmp_path / "cache")
    assert again == first and not calls and (first / "features.npy").stat().st_mtime_ns == mtime

    d = cfg.data.train
    key = frame_feature_key(objective.backbone, d.name, d.root, d.split, dict(d.kwargs), "t")
    assert key["layer"] == "pooled" and key["dataset"] == "motion" and key["options"]["num_frames"] == T
    changed_data = frame_feature_key(objective.backbone, d.name, d.root, d.split, {**d.kwargs, "seed": 1}, "t")
    assert changed_data != key and frame_feature_key(objective.backbone, d.name, d.root, d.split, d.kwargs, "u") != key
    with torch.no_grad():
        next(iter(objective.backbone.parameters())).add_(1.0)
    assert frame_feature_key(objective.backbone, d.name, d.root, d.split, dict(d.kwargs), "t") != key
    other = cache_frame_features(objective.backbone, cfg.data.train, sample_fn, tmp_path / "cache")
    assert other != first and calls  # other weights: extracted again, into another folder


def test_frame_features_dataset_rejects_a_folder_that_is_not_a_cache(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="frame_features"):
        build_dataset("frame_features", root=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        FrameFeatures(str(tmp_path / "empty"))


def test_cached_features_need_a_frozen_backbone(tmp_path: Path) -> None:
    from vitssl.config import ConfigError
    from vitssl.engine import build_objective

    objective = build_objective(_cfg(tmp_path / "run", "objective.freeze_backbone=false"))
    with pytest.raises(ConfigError, match="freeze_backbone"):
        objective((torch.zeros(2, T, objective.backbone.num_features), torch.tensor([0, 1])))
