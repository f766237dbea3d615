"""Supervised classification: the cross-entropy baseline every SSL table compares against."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T

from vitssl.config import DataConfig, ObjectiveConfig
from vitssl.ssl.base import ImageTransform, Objective, register_objective


@dataclass
class SupervisedConfig(ObjectiveConfig):
    name: str = "supervised"
    num_classes: int = 1000  # classes of data.train
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    crop_scale_min: float = 0.08  # RandomResizedCrop lower scale bound


@register_objective("supervised")
class Supervised(Objective):
    """Backbone + linear head trained with cross-entropy on labelled images."""

    Config = SupervisedConfig

    def __init__(self, cfg: SupervisedConfig, backbone_factory: Callable[[], nn.Module]) -> None:
        super().__init__(cfg, backbone_factory)
        self.backbone = backbone_factory()
        self.head = nn.Linear(self.backbone.num_features, cfg.num_classes)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        images, labels = batch  # (B, 3, H, W), (B,)
        logits = self.head(self.backbone(images))  # (B, num_classes)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)
        acc = (logits.argmax(-1) == labels).float().mean()
        return {"loss": loss, "acc": acc.detach()}

    def train_sample_fn(self, data_cfg: DataConfig) -> Callable[[Any, Any], Any]:
        transform = T.Compose(
            [
                T.RandomResizedCrop(data_cfg.img_size, scale=(self.cfg.crop_scale_min, 1.0), antialias=True),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(data_cfg.mean, data_cfg.std),
            ]
        )
        return ImageTransform(transform)
