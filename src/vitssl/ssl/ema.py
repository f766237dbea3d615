"""The one exponential-moving-average update, for every objective that keeps a copy of an encoder by EMA (MoCo v3's
momentum encoder, TCA's key encoder).

One fused ``torch._foreach_lerp_`` over the parameter lists: ``θ_t ← θ_t + (1 − m)(θ_s − θ_t)``, which is
``m θ_t + (1 − m) θ_s``. It works unchanged on FSDP's DTensor shards: the online and the EMA towers are sharded
the same way (``vitssl.engine.parallel``), so each rank updates its own shards with no communication.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


@torch.no_grad()
def ema_update(target: Iterable[torch.Tensor], source: Iterable[torch.Tensor], momentum: float) -> None:
    """Move ``target`` towards ``source`` in place: ``θ_t ← m θ_t + (1 − m) θ_s`` for each pair.

    Args:
        target: the EMA copy's parameters (no gradients).
        source: the online parameters, in the same order and shapes.
        momentum: m in [0, 1]; 1 keeps the target, 0 copies the source.

    Raises:
        ValueError: the lists differ in length or a pair in shape (the copy was not built from the source).
    """
    target, source = list(target), list(source)
    if len(target) != len(source) or any(t.shape != s.shape for t, s in zip(target, source)):
        raise ValueError(
            f"EMA update of {len(target)} tensors from {len(source)}: the EMA copy must mirror its source module"
        )
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum {momentum} must lie in [0, 1]")
    torch._foreach_lerp_(target, source, 1.0 - momentum)


__all__ = ["ema_update"]
