"""The model that embeds an image corpus and its queries: a vitssl checkpoint, or a ``backbone.safetensors``.

Training writes ``backbone.safetensors`` next to its checkpoints (:func:`vitssl.backbones.save_backbone`, timm's
layout with the backbone's name and options as metadata). An image index built from it embeds with the standard
evaluation transform (resize, centre crop at the recorded ``img_size``, ImageNet normalisation) and the backbone's
pooled embedding, as video indexes do (:class:`vitssl.video.frames.BackboneFrameModel`); its manifest records the
file's digest, so ``index query`` embeds queries with the same file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from vitssl.eval.features import EvalModel

BACKBONE_SUFFIX = ".safetensors"


class BackboneFileModel(EvalModel):
    """An exported backbone file with :class:`~vitssl.eval.features.EvalModel`'s interface (feature cache,
    extraction, ``embed_images``); it has no objective or config, so only the ``pooled`` layer exists.

    Args:
        path: a file written by :func:`vitssl.backbones.save_backbone`.
        device: ``auto``, ``cpu``, ``cuda`` or a torch device.
    """

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "auto") -> None:
        from vitssl.video.frames import BackboneFrameModel

        # EvalModel.__init__ loads an engine checkpoint; a backbone file is loaded by the frame model instead
        self._file = BackboneFrameModel(path, device)
        self.path = self._file.path
        self.device = self._file.device
        self.checkpoint_hash = self._file.checkpoint_hash
        self.sample_fn = self._file.sample_fn
        self.transform = self._file.transform

    @property
    def objective_name(self) -> str:
        return self._file.objective_name

    def feature_fn(self, layer: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return self._file.feature_fn(layer)


def load_image_model(checkpoint: str | os.PathLike, device: torch.device | str = "auto") -> EvalModel:
    """The model of an image index: a ``.safetensors`` backbone file, else an engine checkpoint."""
    if Path(checkpoint).suffix == BACKBONE_SUFFIX:
        return BackboneFileModel(checkpoint, device)
    return EvalModel(checkpoint, device)


__all__ = ["BACKBONE_SUFFIX", "BackboneFileModel", "load_image_model"]
