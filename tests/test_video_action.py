"""The ``video_action`` objective, its heads and multi-view evaluation, on a tiny ViT and tiny clips."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import vitssl.ssl  # noqa: F401  (registers the image objectives)
from vitssl.backbones import create_backbone
from vitssl.config import ConfigError
from vitssl.video.action import VideoAction, VideoActionConfig
from vitssl.video.heads import MeanHead, TemporalHead

B, T, D, K, S = 2, 4, 32, 4, 16


def _objective(**overrides: object) -> VideoAction:
    cfg = OmegaConf.structured(VideoActionConfig(**{"num_classes": K, "num_frames": T, "depth": 1, **overrides}))
    torch.manual_seed(0)
    return VideoAction(cfg, lambda: create_backbone("test_vit", img_size=S))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, T, 3, S, S, generator=g), torch.tensor([0, 3])  # (B, T, C, H, W), (B,)


@pytest.mark.parametrize("head", [MeanHead(D, K), TemporalHead(D, K, depth=1, heads=2, num_frames_max=8)])
def test_heads_map_frame_embeddings_to_logits(head: torch.nn.Module) -> None:
    frames = torch.randn(B, T, D)  # (B, T, D)
    assert head(frames).shape == (B, K)
    assert head.forward_features(frames).shape == (B, D)


def test_temporal_head_time_embedding_starts_at_zero_and_learns() -> None:
    head = TemporalHead(D, K, depth=1, heads=2, num_frames_max=8)
    assert torch.count_nonzero(head.time_embed) == 0
    head(torch.randn(B, T, D)).square().sum().backward()
    assert head.time_embed.grad is not None
    assert head.time_embed.grad[:, :T].abs().sum() > 0  # the used steps learn
    assert head.time_embed.grad[:, T:].abs().sum() == 0  # the unused ones are untouched
    with pytest.raises(ValueError, match="frames"):
        head(torch.randn(B, 9, D))


def test_mean_head_ignores_frame_order_temporal_head_does_not() -> None:
    torch.manual_seed(0)
    frames = torch.randn(B, T, D)  # (B, T, D)
    reversed_frames = frames.flip(1)
    mean, temporal = MeanHead(D, K).eval(), TemporalHead(D, K, depth=1, heads=2, num_frames_max=T).eval()
    torch.testing.assert_close(mean(frames), mean(reversed_frames))
    # zero time embedding: no position information, so the CLS output is order-blind at initialisation
    torch.testing.assert_close(temporal(frames), temporal(reversed_frames), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        temporal.time_embed.normal_(std=0.5)
    assert not torch.allclose(temporal(frames), temporal(reversed_frames), atol=1e-4)


@pytest.mark.parametrize("head", ["temporal", "mean"])
def test_forward_returns_loss_and_top1_and_every_trainable_parameter_gets_a_gradient(head: str) -> None:
    objective = _objective(head=head)
    out = objective(_batch())
    assert out["loss"].ndim == 0 and math.isfinite(out["loss"].item())
    assert 0.0 <= out["top1"].item() <= 100.0
    out["loss"].backward()
    missing = [n for n, p in objective.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert objective.eval_features(_batch()[0]).shape == (B, objective.backbone.num_features)


def test_frozen_backbone_trains_the_head_only() -> None:
    objective = _objective(freeze_backbone=True)
    assert not any(p.requires_grad for p in objective.backbone.parameters())
    objective.train()
    assert objective.head.training and not objective.backbone.training  # no dropout / norm updates in it
    grouped = {id(p) for g in objective.param_groups(0.05) for p in g["params"]}
    assert grouped == {id(p) for p in objective.head.parameters()}
    # the head's tokens are not decayed
    no_decay = next(g for g in objective.param_groups(0.05) if g["weight_decay"] == 0.0)
    assert any(p is objective.head.time_embed for p in no_decay["params"])
    out = objective(_batch())
    out["loss"].backward()
    assert all(p.grad is None for p in objective.backbone.parameters())


@pytest.mark.parametrize(
    ("overrides", "key"),
    [({"head": "lstm"}, "objective.head"), ({"num_classes": 1}, "objective.num_classes"),
     ({"crop_scale": [0.5, 2.0]}, "objective.crop_scale"), ({"num_heads": 3}, "objective.num_heads")],
)  # fmt: skip
def test_bad_config_values_raise_config_error_naming_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _objective(**overrides)


def test_init_from_loads_an_exported_backbone_and_refuses_a_missing_file(tmp_path: Path) -> None:
    from vitssl.backbones import save_backbone

    source = _objective()
    with torch.no_grad():
        for p in source.backbone.parameters():
            p.add_(1.0)
    path = save_backbone(source.backbone, tmp_path / "backbone.safetensors")
    target = _objective(init_from=str(path))
    target.setup(None)
    for a, b in zip(source.backbone.state_dict().values(), target.backbone.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ConfigError, match=r"objective\.init_from"):
        _objective(init_from=str(tmp_path / "nope.pth")).setup(None)


def _tiny_cfg(tmp_path: Path, *extra: str) -> object:
    import vitssl.video.datasets  # noqa: F401  (registers motion)
    from vitssl.config import load_config

    return load_config(
        "video/action_demo",
        [
            f"output_dir={tmp_path / 'run'}",
            "model.backbone=test_vit",
            "~model.backbone_kwargs",
            "objective.num_heads=2",
            f"objective.num_frames={T}",
            f"data.train.kwargs={{num_samples: 8, img_size: {S}, num_frames: {T}}}",
            f"data.val.kwargs={{num_samples: 8, img_size: {S}, num_frames: {T}}}",
            f"data.img_size={S}",
            "train.epochs=1",
            "train.batch_size=4",
            "train.log_every_steps=1",
            *extra,
        ],
    )


@pytest.mark.parametrize("head", ["temporal", "mean"])
def test_trains_through_the_engine_on_motion(tmp_path: Path, head: str) -> None:
    from vitssl.engine import load_objective, train

    cfg = _tiny_cfg(tmp_path, f"objective.head={head}")
    result = train(cfg)
    assert result.status == "finished" and result.step == 2
    assert math.isfinite(result.metrics["loss"]) and "top1" in result.metrics
    objective, _, _ = load_objective(Path(result.checkpoint_path))
    assert objective.cfg.head == head


def test_multi_view_evaluation_and_confusion_png(tmp_path: Path) -> None:
    from vitssl.data import build_dataset
    from vitssl.video.evaluate import SpatialCropClip, evaluate_action, save_confusion_png

    cfg = _tiny_cfg(tmp_path, "objective.num_classes=5")  # 5 classes: top-5 is reported (labels use 4)
    objective = _objective(num_classes=5)
    d = cfg.data.val
    held_out = build_dataset(d.name, root=d.root, split=d.split, **dict(d.kwargs))
    clip, _ = SpatialCropClip(S, cfg.data.mean, cfg.data.std, index=2, num_crops=3)(
        torch.zeros(T, S, 2 * S, 3, dtype=torch.uint8), 0
    )
    assert clip.shape == (T, 3, S, S)
    scores = evaluate_action(objective, held_out, views=(2, 3), batch_size=4, data_cfg=cfg.data)
    assert scores["views"] == [2, 3] and scores["num_videos"] == 8
    assert sum(map(sum, scores["confusion"])) == 8 and len(scores["per_class"]) == 5
    assert scores["per_class"][4] is None  # no clip of the 5th class
    assert 0 <= scores["top1"] <= scores["top5"] == 100.0
    png = save_confusion_png(scores["confusion"], [*held_out.classes, "none"], tmp_path / "cm" / "confusion.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in png.parent.iterdir()] == ["confusion.png"]  # no temporary left behind
