"""The pre-optimizer-step hook of vitssl.engine.callbacks: a callback from outside the package changes gradients
and the step sees it; the documented order (unscaled gradients, the hooks, clipping, the step); and
train.log_grad_norm, which logs the gradient norm through the hook without changing the training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vitssl.config import load_config
from vitssl.engine import Callback, load_checkpoint, train
from vitssl.engine.build import build_objective, seed_all
from vitssl.engine.checkpoint import LAST_NAME
from vitssl.engine.parallel import grad_norm

PATCH = "backbone.model.patch_embed.proj."  # test_vit's patch projection (weight and bias)


def _cfg(out: Path, *overrides: str):
    # one epoch of 4 steps, no weight decay: a parameter whose gradient is zero does not move under AdamW
    overrides = ("train.epochs=1", "optim.weight_decay=0", *overrides)
    return load_config("pretrain/test_tiny", [f"output_dir={out}", *overrides])


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


class ZeroPatchGrad(Callback):
    """Zeros the patch embedding's gradient and records what the hook saw."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.norm_before: list[float] = []  # the whole gradient's norm as it reached the hook
        self.norm_after: list[float] = []  # the norm the hook left

    def on_before_optimizer_step(self, step, objective, optimizer):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.steps.append(step)
        self.norm_before.append(grad_norm(params))
        for name, p in objective.named_parameters():
            if name.startswith(PATCH):
                assert p.grad is not None and p.grad.abs().sum() > 0
                p.grad.zero_()
        self.norm_after.append(grad_norm(params))
        return {"patch_zeroed": 1.0}


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain")
    train(_cfg(out))
    return out


def test_a_callback_zeroing_the_patch_embedding_gradient_keeps_it_at_its_init(tmp_path, plain_run) -> None:
    hook = ZeroPatchGrad()
    # a clip limit far under the gradient norm: clipping must measure (and scale) what the hook left
    result = train(_cfg(tmp_path, "optim.clip_grad=1e-3"), callbacks=[hook])
    assert result.status == "finished" and hook.steps == [1, 2, 3, 4]
    records = _records(tmp_path)
    assert [r["patch_zeroed"] for r in records] == [1.0] * 4  # the hook's metrics are logged with its step
    # order: the hook sees the gradients before clipping (their norm is far above the limit), and the norm that
    # clipping reports is the one of the gradients the hook left, not the one it received
    assert min(hook.norm_before) > 1e-2
    assert [r["grad_norm"] for r in records] == pytest.approx(hook.norm_after, rel=1e-6)
    assert all(a < b for a, b in zip(hook.norm_after, hook.norm_before))

    seed_all(0)  # the engine builds the model from the run's seed: the same initial weights
    init = build_objective(_cfg(tmp_path)).state_dict()
    trained, plain = load_checkpoint(tmp_path / LAST_NAME)["model"], load_checkpoint(plain_run / LAST_NAME)["model"]
    patch = [k for k in init if k.startswith(PATCH)]
    assert len(patch) == 2
    for key in patch:
        assert torch.equal(trained[key], init[key]), key  # frozen by its zero gradient
        assert not torch.equal(plain[key], init[key]), key  # where a run without the hook moves it
    qkv = "backbone.model.blocks.0.attn.qkv.weight"
    assert not torch.equal(trained[qkv], init[qkv])  # the rest trains


def test_log_grad_norm_logs_the_norm_clipping_measures_and_changes_nothing(tmp_path, plain_run) -> None:
    train(_cfg(tmp_path / "logged", "train.log_grad_norm=true"))
    train(_cfg(tmp_path / "clipped", "optim.clip_grad=1e9"))  # a limit never reached: clipping only measures
    logged, clipped, plain = _records(tmp_path / "logged"), _records(tmp_path / "clipped"), _records(plain_run)
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert all(r["grad_norm"] > 0 for r in logged)
    assert [r["grad_norm"] for r in logged] == pytest.approx([r["grad_norm"] for r in clipped], rel=1e-6)
    assert [r["loss"] for r in logged] == [r["loss"] for r in plain]  # logging the norm leaves the run as it was
    assert "grad_norm" not in plain[0]


def test_under_fp16_the_hook_sees_unscaled_gradients(tmp_path) -> None:
    """precision=fp16 (a GradScaler starting at 2**16): the logged norms are the true gradients' (the fp32 run's
    size), not 65536 times them; steps the scaler skips for an overflow log an infinite norm."""
    train(_cfg(tmp_path, "precision=fp16", "train.log_grad_norm=true"))
    norms = [r["grad_norm"] for r in _records(tmp_path)]
    finite = [n for n in norms if n != float("inf")]
    assert finite and all(0 < n < 1e3 for n in finite)
