"""Activation checkpointing (train.activation_checkpointing): every backbone, iGPT's causal decoder and the CLIP
towers recompute their blocks in the backward pass and give the same loss and gradients as without it."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import vitssl.ssl  # noqa: F401  (registers the objectives)
from vitssl.backbones import create_backbone, list_backbones
from vitssl.config import ConfigError, load_config
from vitssl.engine import build_objective, train
from vitssl.engine.parallel import apply_activation_checkpointing, towers, transformer_blocks
from vitssl.ssl.igpt import IGPT, IGPTConfig


def _count_block_calls(module: nn.Module) -> list[int]:
    """A one-element counter of block forward calls (recomputation in the backward pass calls them again)."""
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    for block in transformer_blocks(module):
        block.register_forward_pre_hook(hook)  # a recomputation stops early, before forward hooks run
    return calls


def _loss_and_grads(
    module: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    calls = _count_block_calls(module)
    torch.manual_seed(1)  # the same drop-path draws with and without checkpointing
    loss = loss_fn(module)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads, calls[0]


def _check_same(module: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> None:
    """Loss and every gradient equal (<= 1e-6) with checkpointing on a copy; its blocks ran twice as often."""
    plain = copy.deepcopy(module)
    loss, grads, calls = _loss_and_grads(plain, loss_fn)
    assert apply_activation_checkpointing(module) >= 1
    loss_ckpt, grads_ckpt, calls_ckpt = _loss_and_grads(module, loss_fn)
    n_blocks = len(transformer_blocks(module))
    assert n_blocks > 0 and calls == calls_ckpt / 2 and calls % n_blocks == 0  # recomputed once in backward
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", list_backbones("test_*"))
def test_backbone_blocks_recompute_with_the_same_loss_and_gradients(name: str) -> None:
    torch.manual_seed(0)
    backbone = create_backbone(name, drop_path_rate=0.2).double().train()
    x = torch.randn(2, backbone.in_chans, *backbone.img_size, dtype=torch.float64)  # (B, C, H, W)
    _check_same(backbone, lambda m: m(x).square().mean() + m.forward_tokens(x).mean())


def test_igpt_causal_decoder_recomputes_with_the_same_loss() -> None:
    """timm runs masked (causal) blocks without its checkpointing: the ViT backbone checkpoints them itself."""
    cfg = IGPTConfig(mode="ar", palette_size=16, token_dim=16)
    torch.manual_seed(0)
    objective = IGPT(cfg, lambda **o: create_backbone("test_vit", **{"img_size": 8, "patch_size": 1, **o}))
    objective.set_palette(torch.rand(16, 3, generator=torch.Generator().manual_seed(0)))
    objective = objective.double().train()
    tokens = torch.randint(0, 16, (3, 64), generator=torch.Generator().manual_seed(2))  # (B, N): an 8x8 grid
    _check_same(objective, lambda m: m.token_loss(tokens)["loss"])


def test_clip_towers_and_momentum_encoders_are_all_found() -> None:
    clip = build_objective(load_config("pretrain/clip_demo", ["objective.text_depth=2"]))
    assert len(towers(clip)) == 2  # open_clip's image tower and text tower
    images = torch.randn(2, 3, 32, 32)  # (B, 3, H, W)
    text = clip.tokenize(["a red star", "a blue circle"])  # (B, L)
    _check_same(clip.double().train(), lambda m: m((images.double(), text))["loss"])
    moco = build_objective(load_config("pretrain/mocov3_demo", ["model.backbone=test_vit", "~model.backbone_kwargs"]))
    assert towers(moco) == [moco.backbone, moco.momentum_backbone]  # the EMA copy is found and treated alike
    assert len(transformer_blocks(moco)) == 2 * moco.backbone.depth


def test_a_module_without_towers_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"activation_checkpointing=true.*no transformer tower"):
        apply_activation_checkpointing(nn.Linear(2, 2))


def test_engine_run_with_checkpointing_has_the_same_losses(tmp_path: Path) -> None:
    def losses(out: Path, *overrides: str) -> list[float]:
        cfg = load_config("pretrain/test_tiny", [f"output_dir={out}", "train.stop_after_steps=3", *overrides])
        train(cfg)
        return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]

    plain = losses(tmp_path / "plain")
    assert losses(tmp_path / "ckpt", "train.activation_checkpointing=true") == pytest.approx(plain, abs=1e-6)
