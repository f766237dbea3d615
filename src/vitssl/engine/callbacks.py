"""Callbacks: code from higher floors (evaluation monitors) or from a user runs inside the training loop.

The loop calls, on every rank:

1. :meth:`Callback.on_train_start` once, after the objective is built and resumed;
2. per optimizer step, after the backward pass of its last micro-step (gradients reduced over the ranks,
   DTensor shards of them under ``train.strategy=fsdp``) and after the fp16 gradient scaler unscaled them:
   :meth:`Callback.on_before_optimizer_step`, in registration order, then gradient clipping
   (``optim.clip_grad``), then the optimizer step. A callback there sees the true gradients and may change
   them in place, and clipping measures what the callbacks left;
3. :meth:`Callback.on_epoch_end` after each epoch's last step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from vitssl.engine.parallel import grad_norm


class Callback:
    """Extension point of the engine. The engine calls the hooks on every rank; a callback that works on one rank
    only checks the rank itself."""

    def on_train_start(self, objective: torch.nn.Module, device: torch.device) -> None:
        """Called once, after the objective is built and resumed, before the first step."""

    def on_before_optimizer_step(
        self, step: int, objective: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, float]:
        """Called before every optimizer step, with the gradients unscaled and not yet clipped.

        Gradient clipping variants, freezing (``p.grad = None`` skips a parameter, weight decay included; zeroing
        it still lets AdamW decay it) and gradient statistics go here. Gradients are already reduced over the
        ranks, so every rank sees the same values (its own shards of them under FSDP).

        Args:
            step: the number of the step about to be taken (1 for the first).
            objective: the objective (sharded in place under FSDP).
            optimizer: its optimizer; ``optimizer.param_groups`` lists what it updates.

        Returns:
            Metrics to log with this step (empty: nothing); rank 0's values are the ones written.
        """
        return {}

    def on_epoch_end(self, epoch: int, step: int) -> dict[str, float]:
        """Called after each epoch's last step; returns metrics to log (empty: nothing)."""
        return {}


def _optimized(optimizer: torch.optim.Optimizer) -> Iterable[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


class GradNormLog(Callback):
    """``train.log_grad_norm``: log ``grad_norm``, the global L2 norm of the gradients the optimizer step takes
    (over every rank's shards), as clipping measures it. The engine registers it after the run's own callbacks,
    so the norm is that of the gradients they left. Under ``precision=fp16`` a step the gradient scaler skips for
    an overflow logs an infinite norm."""

    def on_before_optimizer_step(
        self, step: int, objective: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, float]:
        return {"grad_norm": grad_norm(_optimized(optimizer))}


__all__ = ["Callback", "GradNormLog"]
