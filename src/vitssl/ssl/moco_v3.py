"""MoCo v3 (Chen, Xie & He, 2021): a query encoder with a predictor chases a momentum encoder.

Faithful to the official recipe: projector 3 layers and predictor 2 layers (Linear without bias → BN →
ReLU, output BN without affine), InfoNCE scaled by 2τ on L2-normalised features with keys gathered from
all ranks, symmetrised over the two views, and the momentum encoder updated after every optimizer step
with m rising from m0 to 1 on a half cosine. For ViT backbones the patch projection stays frozen at its
random init and the position embedding is a fixed 2-D sin-cos table (the paper's stability fixes).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vitssl import distributed as dist
from vitssl.config import DataConfig, ObjectiveConfig
from vitssl.data.augment import prepare_view
from vitssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, MocoV3Views, resolve_augment_device
from vitssl.ssl.base import Objective, register_objective
from vitssl.ssl.ema import ema_update
from vitssl.ssl.losses import contrastive_loss


@dataclass
class MocoV3Config(ObjectiveConfig):
    name: str = "moco_v3"
    dim: int = 256  # output width of projector and predictor
    mlp_dim: int = 4096  # hidden width of projector and predictor
    temperature: float = 0.2  # τ of the InfoNCE loss (0.2 for ViT in the paper)
    momentum: float = 0.99  # m0: momentum-encoder EMA at step 0, rising to 1 by a half cosine
    momentum_cosine: bool = True  # false keeps m = m0 throughout
    vit_stability: bool = True  # ViT: frozen random patch projection + fixed 2-D sin-cos position embedding
    sync_bn: bool = True  # SyncBatchNorm in the MLP heads on multi-GPU runs (as the official code)
    # augmentations (BYOL-style asymmetric pair; scales and strengths adapt to small images)
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])  # brightness, contrast, sat., hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: list[float] = field(default_factory=lambda: [1.0, 0.1])  # view 1, view 2
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # σ range in pixels
    solarize_p: list[float] = field(default_factory=lambda: [0.0, 0.2])  # view 1, view 2
    flip: bool = True


def build_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's MLP: ``[Linear(no bias) → BN → ReLU] × (L-1) → Linear(no bias) → BN(affine=False)``.

    Args:
        num_layers: number of Linear layers.
        in_dim: input width.
        hidden_dim: width of the hidden layers.
        out_dim: output width.
        last_bn: end with a BatchNorm without affine parameters (SimCLR's design, used for ViT).
    """
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def momentum_at(step: int, total_steps: int, m0: float, cosine: bool = True) -> float:
    """EMA momentum after ``step`` of ``total_steps`` optimizer steps: ``1 - (1 - m0)(1 + cos(πt/T))/2``."""
    if not cosine:
        return m0
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * step / max(1, total_steps))) * (1.0 - m0)


@register_objective("moco_v3")
class MocoV3(Objective):
    """Query encoder (backbone → projector → predictor) against a momentum encoder (backbone → projector)."""

    Config = MocoV3Config
    supports_accumulation = False  # negatives are the rest of the batch: see Objective.supports_accumulation
    # training cost of one sample in backbone forwards (telemetry's MFU): two views through the query backbone
    # (forward + backward = 3) and through the momentum backbone (forward = 1); the MLP heads are left out
    backbone_passes_per_sample = 8

    def __init__(self, cfg: MocoV3Config, backbone_factory: Callable[..., nn.Module]) -> None:
        super().__init__(cfg, backbone_factory)
        backbone = backbone_factory()
        if cfg.vit_stability and getattr(backbone, "family", None) == "vit":
            backbone = backbone_factory(pos_embed="sincos", freeze_patch_embed=True)
        self.backbone = backbone
        width = backbone.num_features
        self.projector = build_mlp(3, width, cfg.mlp_dim, cfg.dim)
        self.predictor = build_mlp(2, cfg.dim, cfg.mlp_dim, cfg.dim)
        if cfg.sync_bn and dist.get_world_size() > 1 and torch.cuda.is_available():
            self.projector = nn.SyncBatchNorm.convert_sync_batchnorm(self.projector)
            self.predictor = nn.SyncBatchNorm.convert_sync_batchnorm(self.predictor)
        # The momentum encoder starts as an exact copy and never receives gradients.
        self.momentum_backbone = copy.deepcopy(self.backbone)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in self._momentum_params():
            p.requires_grad = False
        self.current_momentum = cfg.momentum
        # uint8 views are normalised per batch on the device with the data's statistics (setup / train_sample_fn)
        self.mean, self.std = list(IMAGENET_MEAN), list(IMAGENET_STD)

    def _momentum_params(self) -> list[nn.Parameter]:
        return [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]

    def _query_params(self) -> list[nn.Parameter]:
        return [*self.backbone.parameters(), *self.projector.parameters()]

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        (v1, v2), _ = batch  # two views (float, uint8, or uint8 + augmentation parameters); labels unused
        x1 = prepare_view(v1, self.mean, self.std)  # (B, 3, H, W) normalised float
        x2 = prepare_view(v2, self.mean, self.std)
        q1 = self.predictor(self.projector(self.backbone(x1)))  # (B, dim)
        q2 = self.predictor(self.projector(self.backbone(x2)))  # (B, dim)
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_backbone(x1))  # (B, dim)
            k2 = self.momentum_projector(self.momentum_backbone(x2))  # (B, dim)
        tau = self.cfg.temperature
        loss = contrastive_loss(q1, k2, tau) + contrastive_loss(q2, k1, tau)
        return {"loss": loss, "momentum": torch.tensor(self.current_momentum)}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """EMA update ``θ_k ← m θ_k + (1 - m) θ_q`` with m on the cosine schedule (``step`` = steps done)."""
        m = momentum_at(step, total_steps, self.cfg.momentum, self.cfg.momentum_cosine)
        self.current_momentum = m
        ema_update(self._momentum_params(), self._query_params(), m)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The query branch only (the momentum encoder follows by EMA); no decay by timm's rule."""
        from vitssl.ssl.base import backbone_no_decay, split_decay

        named = [(n, p) for n, p in self.named_parameters() if not n.startswith("momentum_")]
        return split_decay(named, weight_decay, backbone_no_decay(self))

    def setup(self, cfg: Any) -> None:
        """Take the data's normalisation statistics (the views arrive in uint8 and are normalised here)."""
        self.mean, self.std = list(cfg.data.mean), list(cfg.data.std)

    def train_sample_fn(self, data_cfg: DataConfig) -> Callable[[Any, Any], Any]:
        """Two uint8 views per image (:class:`vitssl.data.transforms.MocoV3Views`); ``data.augment_device`` says
        whether their photometric augmentations run in the loader workers or batched in :meth:`forward`."""
        c = self.cfg
        self.mean, self.std = list(data_cfg.mean), list(data_cfg.std)
        return MocoV3Views(
            data_cfg.img_size,
            crop_scale=tuple(c.crop_scale),
            jitter=tuple(c.jitter),
            jitter_p=c.jitter_p,
            grayscale_p=c.grayscale_p,
            blur_p=tuple(c.blur_p),
            blur_sigma=tuple(c.blur_sigma),
            solarize_p=tuple(c.solarize_p),
            flip=c.flip,
            augment_device=resolve_augment_device(getattr(data_cfg, "augment_device", "auto")),
        )
