"""Weights out of any engine checkpoint, single-file or sharded: a single-file checkpoint, or the backbone alone
in timm's safetensors layout (what a finished run writes as ``backbone.safetensors``)."""

from __future__ import annotations

from pathlib import Path

from vitssl.config import ConfigError
from vitssl.engine.checkpoint import consolidate_checkpoint
from vitssl.engine.trainer import load_objective


def export_backbone(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the backbone of a checkpoint's objective as safetensors in timm's key layout.

    A sharded checkpoint is read whole in this process (no process group needed). The file loads with
    ``vitssl.backbones.load_backbone`` or straight into timm (``save_backbone`` says how).

    Args:
        checkpoint: a checkpoint file or sharded checkpoint folder.
        out: the ``.safetensors`` file to write.

    Raises:
        CheckpointError: the checkpoint is unreadable.
        ConfigError: ``out`` is not a ``.safetensors`` name, or the backbone has no timm layout.
    """
    from vitssl.backbones import save_backbone

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: backbone weights are written as safetensors; name the file '*.safetensors'")
    objective, _, _ = load_objective(checkpoint)
    try:
        return save_backbone(objective.backbone, out)
    except (TypeError, ValueError) as err:  # iGPT's token-input backbone, open_clip's own tower layout
        raise ConfigError(f"{checkpoint}: the backbone cannot be written in timm's layout: {err}") from None


__all__ = ["consolidate_checkpoint", "export_backbone"]
