"""Swin backbones over timm's ``SwinTransformer``.

Input sizes (timm 1.0): any ``img_size`` whose sides are multiples of the patch size (4) works, square or not
(224, 256, 192, 64, (224, 160), ...). timm pads a stage whose grid is not a multiple of the window size, and
shrinks the window (and drops the shift) of a stage whose grid is smaller than the window, per side. The model
then takes exactly ``img_size`` inputs, unless built with ``dynamic_img_size=True`` (attention masks are then made
for each input size). timm's Swin is NHWC inside; ``forward_pyramid`` returns NCHW maps.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from timm.models.swin_transformer import SwinTransformer

from vitssl.backbones._base import (
    Backbone,
    check_img_size,
    check_last_blocks,
    create_timm_model,
    register_variant,
    to_2tuple,
)

_logger = logging.getLogger(__name__)


class SwinBackbone(Backbone):
    """A timm Swin Transformer as a backbone; pooled embedding = mean of the final-normed last-stage tokens."""

    family = "swin"
    model_class = SwinTransformer

    def __init__(self, name: str, timm_name: str, defaults: Mapping[str, Any], kwargs: Mapping[str, Any]) -> None:
        super().__init__(name, timm_name, defaults, kwargs)
        cfg = dict(self.config)
        # timm's Swin alone defaults to stochastic depth 0.1; every backbone here defaults to none
        cfg.setdefault("drop_path_rate", 0.0)
        self.model = create_timm_model(name, timm_name, cfg)
        self.timm_kwargs = cfg

        model = self.model
        patch_embed = model.patch_embed
        self.patch_size = to_2tuple(patch_embed.patch_size)[0]
        self.img_size = to_2tuple(patch_embed.img_size)
        # timm pads grids that do not fill the windows and shrinks windows larger than a grid, so the patch size
        # is the only constraint
        check_img_size(
            name,
            self.img_size,
            self.patch_size,
            "the patch size",
            extra=f"; Swin takes any multiples of {self.patch_size}, e.g. 224, 256, 192, 64 or (224, 160)",
        )
        self.in_chans = patch_embed.proj.in_channels
        self.dynamic_img_size = bool(model.dynamic_img_size)
        self.num_features = int(model.num_features)
        self.num_prefix_tokens = 0
        self.pyramid_strides = [int(info["reduction"]) for info in model.feature_info]
        self.pyramid_channels = [int(info["num_chs"]) for info in model.feature_info]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (B, C): mean over the final-normed last-stage tokens."""
        self._check_input(x, self.patch_size)
        feats = self.model.forward_features(x)  # (B, H/32, W/32, C)
        return self.model.forward_head(feats, pre_logits=True)  # (B, C)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed last-stage tokens (B, H/32 * W/32, C), row-major."""
        self._check_input(x, self.patch_size)
        return self.model.forward_features(x).flatten(1, 2)  # (B, N, C)

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Four stage outputs [(B, C_i, H/s_i, W/s_i)], NCHW; the last one through the final norm."""
        self._check_input(x, self.patch_size)
        return self.model.forward_intermediates(x, norm=True, intermediates_only=True)

    def transformer_blocks(self) -> list[torch.nn.Module]:
        """Every stage's Swin blocks, first stage first (patch merging stays with the root)."""
        return [block for stage in self.model.layers for block in stage.blocks]

    def forward_intermediate(self, x: torch.Tensor, n: int) -> list[torch.Tensor]:
        """Tokens (B, N, C) of the last ``n`` blocks of the last stage, each through the final norm."""
        last = self.model.layers[-1]
        depth = len(last.blocks)
        check_last_blocks(self.name, n, depth, "the last stage")
        self._check_input(x, self.patch_size)
        x = self.model.patch_embed(x)  # (B, H/4, W/4, C0)
        for stage in self.model.layers[:-1]:
            x = stage(x)  # (B, H_i, W_i, C_i)
        x = last.downsample(x)  # (B, H/32, W/32, C)
        outs = []
        for i, block in enumerate(last.blocks):
            x = block(x)  # (B, H/32, W/32, C)
            if i >= depth - n:
                outs.append(self.model.norm(x).flatten(1, 2))  # (B, N, C)
        return outs


_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    name: (name, {})
    for name in (
        "swin_tiny_patch4_window7_224",
        "swin_small_patch4_window7_224",
        "swin_base_patch4_window7_224",
        "swin_large_patch4_window7_224",
        "swin_base_patch4_window12_384",
        "swin_large_patch4_window12_384",
    )
}
# ~90k parameters at 32 px: grids 8, 4, 2, 1 with 4x4 windows, so stage 1 has a shifted window
_VARIANTS["test_swin"] = (
    "swin_tiny_patch4_window7_224",
    dict(img_size=32, embed_dim=8, depths=(2, 1, 1, 2), num_heads=(1, 1, 2, 2), window_size=4, mlp_ratio=2.0),
)

for _name, (_timm_name, _defaults) in _VARIANTS.items():
    register_variant(_name, SwinBackbone, _timm_name, **_defaults)
