"""Where is the blob: the ``blob_position`` objective, the image pretraining stage of the action demo.

A video head on frozen per-frame embeddings can only see motion if each frame's embedding says where things are.
A backbone trained from scratch through a clip classifier does not learn that from a few thousand clips, so the
action demo first trains its backbone on single frames (``motion_frames``: a blob on a textured background,
target = the blob's centre) to classify the centre's column and row, each into ``bins`` equal bins. No frame
carries a direction and no clip label is seen: this stage plays the part that image pretraining (MoCo v3,
supervised ImageNet) plays for the Kinetics recipes, which start from ``objective.init_from``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitssl.config import ConfigError, DataConfig, ObjectiveConfig
from vitssl.ssl.base import Objective, register_objective


@dataclass
class BlobPositionConfig(ObjectiveConfig):
    name: str = "blob_position"
    bins: int = 8  # position classes per axis: the frame side in this many equal bins (x and y each)


class FrameSample:
    """Sample function of ``motion_frames``: uint8 frame (H, W, 3) → normalised (3, S, S), the target passed on.

    No flip or crop, which would move the blob away from its target. A frame of the output size is only scaled
    and normalised (what the evaluation clip transform does to it, without its per-call pipeline overhead);
    another size goes through that transform (resize, centre crop).

    Args:
        img_size: output side S.
        mean: normalisation mean (of pixels scaled to [0, 1]).
        std: normalisation std.
    """

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        from vitssl.video.transforms import clip_eval_transform

        self.img_size = int(img_size)
        self.transform = clip_eval_transform(img_size, mean, std, resize_ratio=1.0)  # checks the arguments
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)

    def __call__(self, frame: torch.Tensor, target: Any) -> tuple[torch.Tensor, Any]:
        if frame.shape[0] != self.img_size or frame.shape[1] != self.img_size:
            return self.transform(frame[None])[0], target  # (3, S, S)
        pixels = frame.permute(2, 0, 1).float() / 255.0  # (3, S, S) in [0, 1]
        return (pixels - self.mean) / self.std, target  # (3, S, S)

    def __repr__(self) -> str:
        return f"FrameSample({self.transform!r})"


@register_objective("blob_position")
class BlobPosition(Objective):
    """Backbone + a linear layer classifying the blob centre's column and row (``bins`` classes each).

    Batches are ``(frames (B, 3, S, S), centres (B, 2))`` with centres as fractions of the side in ``[0, 1)``;
    the loss is the mean of the two cross-entropies, ``acc`` the fraction of coordinates in the right bin.
    """

    Config = BlobPositionConfig

    def __init__(self, cfg: BlobPositionConfig, backbone_factory: Callable[[], nn.Module]) -> None:
        super().__init__(cfg, backbone_factory)
        if cfg.bins < 2:
            raise ConfigError(f"objective.bins={cfg.bins}: a position classifier needs at least 2 bins per axis")
        self.backbone = backbone_factory()
        self.head = nn.Linear(int(self.backbone.num_features), 2 * cfg.bins)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        frames, centres = batch  # (B, 3, S, S), (B, 2)
        bins = self.cfg.bins
        targets = (centres * bins).long().clamp(0, bins - 1)  # (B, 2) column and row bins
        logits = self.head(self.backbone(frames)).view(-1, 2, bins)  # (B, 2, bins)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        acc = (logits.argmax(-1) == targets).float().mean() * 100
        return {"loss": loss, "acc": acc.detach()}

    def train_sample_fn(self, data_cfg: DataConfig) -> Callable[[Any, Any], Any]:
        return FrameSample(data_cfg.img_size, data_cfg.mean, data_cfg.std)

    def eval_sample_fn(self, data_cfg: DataConfig) -> Callable[[Any, Any], Any]:
        return self.train_sample_fn(data_cfg)
