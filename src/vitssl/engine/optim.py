"""Optimizers (AdamW, SGD, LARS) and per-iteration schedules (linear warm-up + cosine)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from vitssl.config import ConfigError, OptimConfig


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as MoCo v3 uses it: SGD with momentum and a layer-wise trust ratio.

    Parameters with ``ndim <= 1`` (biases, norms) skip weight decay and the trust ratio, as in the
    MoCo v3 / BYOL implementations.

    Args:
        params: parameters or param groups.
        lr: learning rate.
        weight_decay: L2 penalty added to the gradient before the trust ratio.
        momentum: heavy-ball momentum.
        eta: trust coefficient.
    """

    def __init__(self, params: Any, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0), group["eta"] * param_norm / update_norm, 1.0
                    )
                    dp = dp.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(dp)
                p.add_(mu, alpha=-group["lr"])


def build_optimizer(param_groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``optim.name``; lr and weight decay are set per step by the schedules.

    Args:
        param_groups: from ``objective.param_groups(weight_decay)``.
        cfg: the ``optim`` block.
    """
    if cfg.name == "adamw":
        return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adam":  # L2 weight decay added to the gradient (the official TCA code's optimizer)
        return torch.optim.Adam(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.name == "lars":
        return LARS(param_groups, lr=cfg.lr, momentum=cfg.momentum, eta=cfg.lars_eta)
    raise ConfigError(f"optim.name={cfg.name!r}; valid: adamw, adam, sgd, lars")


def cosine_schedule(
    base_value: float, final_value: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Per-iteration values: linear warm-up, then a half cosine from ``base_value`` to ``final_value``.

    1. steps ``[0, warmup_steps)``: linear from ``warmup_start`` towards ``base_value``;
    2. steps ``[warmup_steps, total_steps)``: ``final + (base - final) * (1 + cos(pi * t / T)) / 2``.

    Args:
        base_value: value at the end of warm-up (the peak).
        final_value: value at the last step.
        total_steps: schedule length (optimizer steps).
        warmup_steps: warm-up length (clipped to ``total_steps``).
        warmup_start: value at step 0.
    """
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(warmup_start, base_value, warmup_steps, endpoint=False)
    decay_steps = total_steps - warmup_steps
    t = np.arange(decay_steps)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(math.pi * t / max(1, decay_steps)))
    return np.concatenate([warmup, cosine]).astype(np.float64)


def peak_lr(cfg: OptimConfig, batch_size: int) -> float:
    """``optim.lr`` scaled by ``batch_size / 256`` when ``optim.lr_scaling=linear`` (MoCo v3, MAE)."""
    return cfg.lr * batch_size / 256 if cfg.lr_scaling == "linear" else cfg.lr
