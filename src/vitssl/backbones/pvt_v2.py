"""PVT v2 backbones over timm's ``PyramidVisionTransformerV2`` (``pvt_v2_b0`` ... ``pvt_v2_b5``, ``pvt_v2_b2_li``).

PVT v2 has no position embedding (overlapping patch embeddings and a depth-wise conv in the MLP carry position),
so it takes any input size; timm's model has no ``img_size`` argument. ``img_size`` is still accepted here, as
for every backbone, and only records the intended input size (``describe_backbone``, tests).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from timm.models.pvt_v2 import PyramidVisionTransformerV2

from vitssl.backbones._base import (
    Backbone,
    check_last_blocks,
    check_min_input_size,
    create_timm_model,
    register_variant,
    to_2tuple,
)

_logger = logging.getLogger(__name__)


class PVTv2Backbone(Backbone):
    """A timm PVT v2 as a backbone; pooled embedding = mean of the last stage's (normed) tokens."""

    family = "pvt_v2"
    model_class = PyramidVisionTransformerV2
    wrapper_kwargs = ("img_size",)  # timm's model takes any size; the wrapper records it

    def __init__(self, name: str, timm_name: str, defaults: Mapping[str, Any], kwargs: Mapping[str, Any]) -> None:
        super().__init__(name, timm_name, defaults, kwargs)
        cfg = dict(self.config)
        self.img_size = to_2tuple(cfg.pop("img_size", 224))
        self.model = create_timm_model(name, timm_name, cfg)
        self.timm_kwargs = cfg

        model = self.model
        self.in_chans = model.patch_embed.proj.in_channels
        self.dynamic_img_size = True
        self.num_features = int(model.num_features)
        self.num_prefix_tokens = 0
        self.pyramid_strides = [int(info["reduction"]) for info in model.feature_info]
        self.pyramid_channels = [int(info["num_chs"]) for info in model.feature_info]
        # spatial reduction is a conv of kernel = stride = R over a stage's grid, so that grid must be >= R
        min_side = 1
        for stride, stage in zip(self.pyramid_strides, model.stages):
            sr = stage.blocks[0].attn.sr if len(stage.blocks) else None
            if sr is not None and stage.blocks[0].attn.pool is None:
                min_side = max(min_side, stride * sr.kernel_size[0])
        self.min_input_size = min_side

    def _check(self, x: torch.Tensor) -> None:
        h, w = self._check_input(x, 1)
        check_min_input_size(self.name, h, w, self.min_input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (B, C)."""
        self._check(x)
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)  # (B, C)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage tokens after the stage norm, (B, H/32 * W/32, C), row-major."""
        self._check(x)
        return self.model.forward_features(x).flatten(2).transpose(1, 2)  # (B, N, C)

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Four stage outputs [(B, C_i, ~H/s_i, ~W/s_i)] (sides round up), each after its stage norm."""
        self._check(x)
        return self.model.forward_intermediates(x, intermediates_only=True)

    def transformer_blocks(self) -> list[torch.nn.Module]:
        """Every stage's blocks, first stage first."""
        return [block for stage in self.model.stages for block in stage.blocks]

    def forward_intermediate(self, x: torch.Tensor, n: int) -> list[torch.Tensor]:
        """Tokens (B, N, C) of the last ``n`` blocks of the last stage, each through that stage's norm."""
        last = self.model.stages[-1]
        depth = len(last.blocks)
        check_last_blocks(self.name, n, depth, "the last stage")
        self._check(x)
        x = self.model.patch_embed(x)  # (B, H/4, W/4, C0), NHWC
        for stage in self.model.stages[:-1]:
            x = stage(x)  # (B, C_i, H_i, W_i), NCHW
        if last.downsample is not None:
            x = last.downsample(x)  # (B, H/32, W/32, C), NHWC
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)  # (B, N, C)
        outs = []
        for i, block in enumerate(last.blocks):
            x = block(x, (h, w))  # (B, N, C)
            if i >= depth - n:
                outs.append(last.norm(x))  # (B, N, C)
        return outs


_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    name: (name, {})
    for name in ("pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2", "pvt_v2_b2_li", "pvt_v2_b3", "pvt_v2_b4", "pvt_v2_b5")
}
# ~20k parameters, 32 px default input
_VARIANTS["test_pvt_v2"] = (
    "pvt_v2_b0",
    dict(
        img_size=32,
        embed_dims=(8, 16, 24, 32),
        depths=(1, 1, 2, 2),
        num_heads=(1, 1, 2, 2),
        mlp_ratios=(2, 2, 2, 2),
        sr_ratios=(4, 2, 1, 1),
    ),
)

for _name, (_timm_name, _defaults) in _VARIANTS.items():
    register_variant(_name, PVTv2Backbone, _timm_name, **_defaults)
