"""The ``video_action`` objective, its heads and multi-view evaluation, on a tiny ViT and tiny clips."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
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


def _flax_xavier_uniform_limit(fan_in: int, fan_out: int) -> float:
    """flax ``xavier_uniform()`` = ``variance_scaling(1.0, "fan_avg", "uniform")``: U(-l, l), l = sqrt(3 / fan_avg)."""
    return math.sqrt(3.0 * 1.0 / ((fan_in + fan_out) / 2.0))


def _flax_gelu(x: torch.Tensor) -> torch.Tensor:
    """``jax.nn.gelu(x, approximate=True)``, flax's ``nn.gelu``."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def test_temporal_head_is_initialised_as_scenic_vivit() -> None:
    # scenic SpaceTimeViViT (classifier 'token'), Encoder (learned_1d posemb), EncoderBlock, MlpBlock initialisers
    torch.manual_seed(0)
    dim, mlp = 256, 1024
    head = TemporalHead(dim, K, depth=2, heads=4, num_frames_max=8)
    norms = [m for m in head.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1  # two per block and the encoder_norm
    for norm in norms:
        assert norm.eps == 1e-6  # flax nn.LayerNorm's epsilon
        assert torch.equal(norm.weight, torch.ones(dim)) and torch.equal(norm.bias, torch.zeros(dim))
    assert torch.count_nonzero(head.cls_token) == 0  # nn.initializers.zeros
    assert torch.count_nonzero(head.fc.weight) == 0 and torch.count_nonzero(head.fc.bias) == 0  # output_projection
    assert head.time_embed.shape == (1, 1 + 8, dim)  # covers the CLS token and the frames
    assert abs(head.time_embed.std().item() - 0.02) < 0.002 and abs(head.time_embed.mean().item()) < 0.002

    def check_uniform(weight: torch.Tensor, limit: float) -> None:
        assert weight.abs().max().item() <= limit
        assert weight.abs().max().item() > 0.98 * limit
        assert abs(weight.var().item() / (limit**2 / 3.0) - 1.0) < 0.05

    for layer in head.layers:
        attn = layer.self_attn
        for block in attn.in_proj_weight.detach().chunk(3):  # query, key, value: each DenseGeneral (D, heads, D/h)
            check_uniform(block, _flax_xavier_uniform_limit(dim, dim))
        check_uniform(attn.out_proj.weight.detach(), _flax_xavier_uniform_limit(dim, dim))
        assert torch.count_nonzero(attn.in_proj_bias) == 0 and torch.count_nonzero(attn.out_proj.bias) == 0
        check_uniform(layer.linear1.weight.detach(), _flax_xavier_uniform_limit(dim, mlp))
        check_uniform(layer.linear2.weight.detach(), _flax_xavier_uniform_limit(mlp, dim))
        for bias in (layer.linear1.bias, layer.linear2.bias):  # normal(stddev=1e-6)
            assert 0.8e-6 < bias.std().item() < 1.2e-6
        x = torch.linspace(-4, 4, 101)
        torch.testing.assert_close(layer.activation(x), _flax_gelu(x), atol=0, rtol=0)


def _scenic_encoder_block(x: torch.Tensor, layer: torch.nn.TransformerEncoderLayer, heads: int) -> torch.Tensor:
    """scenic ``EncoderBlock`` (no dropout): x + MHA(LN(x)), then + MlpBlock(LN(.)) with flax's gelu."""
    b, n, d = x.shape
    attn = layer.self_attn
    y = F.layer_norm(x, (d,), layer.norm1.weight, layer.norm1.bias, eps=1e-6)
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    q, k, v = (F.linear(y, w, bb).view(b, n, heads, d // heads) for w, bb in ((wq, bq), (wk, bk), (wv, bv)))
    weights = torch.einsum("bqhd,bkhd->bhqk", q / math.sqrt(d // heads), k).softmax(dim=-1)  # dot_product_attention
    y = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, d)
    x = x + F.linear(y, attn.out_proj.weight, attn.out_proj.bias)
    y = F.layer_norm(x, (d,), layer.norm2.weight, layer.norm2.bias, eps=1e-6)
    y = F.linear(
        _flax_gelu(F.linear(y, layer.linear1.weight, layer.linear1.bias)), layer.linear2.weight, layer.linear2.bias
    )
    return x + y


@pytest.mark.parametrize("train", [True, False])
def test_temporal_head_forward_equals_scenic_encoder(train: bool) -> None:
    # the same weights through a transcription of scenic's temporal encoder, in both modes (eval and no_grad is
    # where PyTorch's fused fast path, with the exact GELU, would take over)
    torch.manual_seed(0)
    head = TemporalHead(D, K, depth=2, heads=2, num_frames_max=8).train(train)
    frames = torch.randn(B, T, D)  # (B, T, D)
    with torch.no_grad():
        got = head.forward_features(frames)
        x = torch.cat([head.cls_token.expand(B, -1, -1), frames], dim=1) + head.time_embed[:, : 1 + T]
        for layer in head.layers:
            x = _scenic_encoder_block(x, layer, heads=2)
        want = F.layer_norm(x, (D,), head.norm.weight, head.norm.bias, eps=1e-6)[:, 0]  # encoder_norm, token 0
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_temporal_head_position_embedding_learns() -> None:
    head = TemporalHead(D, K, depth=1, heads=2, num_frames_max=8)
    head.forward_features(torch.randn(B, T, D)).square().sum().backward()
    assert head.time_embed.grad is not None
    assert head.time_embed.grad[:, : 1 + T].abs().sum() > 0  # CLS and the used steps learn
    assert head.time_embed.grad[:, 1 + T :].abs().sum() == 0  # the unused ones are untouched
    with pytest.raises(ValueError, match="frames"):
        head(torch.randn(B, 9, D))


def test_mean_head_ignores_frame_order_temporal_head_does_not() -> None:
    torch.manual_seed(0)
    frames = torch.randn(B, T, D)  # (B, T, D)
    reversed_frames = frames.flip(1)
    mean, temporal = MeanHead(D, K).eval(), TemporalHead(D, K, depth=1, heads=2, num_frames_max=T).eval()
    torch.testing.assert_close(mean(frames), mean(reversed_frames))
    # the position embedding tells the frames apart from the start
    assert not torch.allclose(temporal.forward_features(frames), temporal.forward_features(reversed_frames), atol=1e-4)
    with torch.no_grad():  # without it the CLS output is order-blind (attention is permutation-equivariant)
        temporal.time_embed.zero_()
    torch.testing.assert_close(
        temporal.forward_features(frames), temporal.forward_features(reversed_frames), atol=1e-5, rtol=1e-5
    )


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
