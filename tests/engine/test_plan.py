"""The memory plan (`vitssl pretrain RECIPE --plan`): its block formula against autograd's saved tensors measured
on the CPU, its parameter counts against the model, and the recipes for large models, run for two steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vitssl.ssl  # noqa: F401  (registers the objectives)
from vitssl.cli import main
from vitssl.config import load_config
from vitssl.engine import build_objective, train
from vitssl.engine.plan import plan_memory

_SHAPES = ["data.train.name=shapes", "data.train.root=null", "data.train.kwargs={num_samples: 8}", "precision=fp32"]


def _measured_saved_bytes(objective: torch.nn.Module, batch: object) -> int:
    """Bytes autograd saves for the backward pass in one real CPU forward (parameters left out, storages once)."""
    params = {p.untyped_storage().data_ptr() for p in objective.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        objective(batch)
    return sum(storages.values())


def test_plan_matches_the_saved_tensors_measured_on_the_cpu() -> None:
    """MoCo v3 on a ViT at 64 px (two views, a momentum encoder without gradient): within 15 %."""
    overrides = [*_SHAPES, "model.backbone=vit_tiny_patch16_224", "model.backbone_kwargs={patch_size: 8, depth: 3}",
                 "data.img_size=64", "objective.mlp_dim=256", "objective.dim=64"]  # fmt: skip
    cfg = load_config("pretrain/mocov3_demo", overrides)
    plan = plan_memory(cfg, world_size=4)
    objective = build_objective(cfg).train()
    assert plan.params == sum(p.numel() for p in objective.parameters())
    assert plan.trainable == sum(p.numel() for p in objective.parameters() if p.requires_grad)
    assert [b.grad for b in plan.blocks].count(True) == 2 * 3  # two views through the online encoder's 3 blocks
    images = torch.rand(4, 3, 64, 64)  # (B, 3, H, W)
    measured = _measured_saved_bytes(objective, ((images, images.flip(-1)), torch.zeros(4))) / 4
    assert plan.activations_per_sample(False) == pytest.approx(measured, rel=0.15)
    assert plan.activations_per_sample(True) < 0.5 * plan.activations_per_sample(False)
    assert plan.static_bytes("fsdp") < plan.static_bytes("ddp")
    assert plan.largest_batch("fsdp", True, 80, 2) > plan.largest_batch("ddp", False, 80, 2) > 0


@pytest.mark.parametrize(
    ("recipe", "overrides"),
    [
        ("mocov3_vit_large", ["model.backbone=test_vit", "~model.backbone_kwargs", "data.img_size=32",
                              "objective.mlp_dim=32", "objective.dim=16"]),
        ("mocov3_vit_huge", ["model.backbone=test_vit", "~model.backbone_kwargs", "data.img_size=32",
                             "objective.mlp_dim=32", "objective.dim=16"]),
        ("igpt_ar_large", ["model.backbone=test_vit", "~model.backbone_kwargs", "model.backbone_kwargs.patch_size=1",
                           "data.img_size=8",
                           "objective.token_dim=32", "objective.palette_size=16", "objective.palette_images=8",
                           "~data.val", "eval.knn_every_epochs=0"]),
        ("clip_vit_huge", ["model.backbone=test_vit", "~model.backbone_kwargs", "data.img_size=32",
                           "data.train.name=shapes_captions", "data.train.root=null", "objective.embed_dim=16",
                           "objective.text_width=16", "objective.text_depth=1", "objective.text_heads=2",
                           "data.num_workers=0", "data.skip_corrupt=false"]),
    ],
)  # fmt: skip
def test_large_recipes_run_their_first_steps_at_reduced_size(recipe: str, overrides: list[str], tmp_path: Path) -> None:
    data = [] if recipe == "clip_vit_huge" else ["data.train.name=shapes", "data.train.root=null", "~data.val"]
    data = [d for d in data if not (d == "~data.val" and "~data.val" in overrides)]
    cfg = load_config(f"pretrain/{recipe}", [
        f"output_dir={tmp_path}", *data, *overrides, "data.train.kwargs={num_samples: 16}", "train.batch_size=8",
        "train.stop_after_steps=2", "train.log_every_steps=1", "data.num_workers=0", "launch.nodes=1",
    ])  # fmt: skip
    assert (cfg.train.strategy, cfg.train.activation_checkpointing) == ("fsdp", True)
    result = train(cfg)
    assert result.step == 2 and (tmp_path / "checkpoint_00000002.dcp").is_dir()
    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(map(lambda v: v == v, losses))  # finite (NaN != NaN)


def test_plan_command_prints_both_strategies(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["pretrain", "pretrain/test_tiny", "--plan", "--world-size", "8", "--gpu-memory-gb", "16"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "with checkpointing" in out and "ddp" in out and "fsdp" in out
