"""ViT backbones over timm's ``VisionTransformer``, with MoCo v3's stability options.

MoCo v3 trains ViTs stably by (1) a fixed 2-D sin-cos position embedding and (2) a patch projection frozen at
its random initialisation. Both are off by default here and turned on by the MoCo objective:
``create_backbone("vit_small_patch16_224", pos_embed="sincos", freeze_patch_embed=True, weight_init="moco")``.
The fixed embedding is written into timm's ``pos_embed`` parameter (with ``requires_grad=False``), so an
exported backbone is still a plain timm ViT.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitssl.backbones._base import (
    Backbone,
    check_img_size,
    check_last_blocks,
    create_timm_model,
    register_variant,
    to_2tuple,
)

_logger = logging.getLogger(__name__)

_POS_EMBED_KINDS = ("learn", "sincos", "none", "")
_AVG_POOLS = ("avg", "avgmax", "max")


def sincos_pos_embed_2d(
    grid_size: tuple[int, int], dim: int, num_prefix_tokens: int = 1, temperature: float = 10000.0
) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding of MoCo v3, (1, num_prefix_tokens + gh * gw, dim).

    A quarter of the channels each hold sin and cos of the row index, then sin and cos of the column index, at
    frequencies ``temperature ** -(k / (dim / 4))``. On square grids this equals moco-v3's ``vits.py`` value for
    value; unlike it, tokens of non-square grids get their own row and column. Prefix (class) slots are zeros.

    Args:
        grid_size: (rows, columns) of the patch grid.
        dim: embedding width, a multiple of 4.
        num_prefix_tokens: zero rows put in front for the class / register tokens.
        temperature: frequency base.
    """
    if dim % 4:
        raise ValueError(f"the sin-cos position embedding needs a width divisible by 4, got embed_dim={dim}")
    gh, gw = grid_size
    rows, cols = torch.meshgrid(
        torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32), indexing="ij"
    )  # (gh, gw) each
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # (dim/4,)
    out_r = rows.flatten()[:, None] * omega[None, :]  # (gh*gw, dim/4)
    out_c = cols.flatten()[:, None] * omega[None, :]  # (gh*gw, dim/4)
    grid = torch.cat([out_r.sin(), out_r.cos(), out_c.sin(), out_c.cos()], dim=1)  # (gh*gw, dim)
    prefix = torch.zeros(num_prefix_tokens, dim)  # (P, dim)
    return torch.cat([prefix, grid], dim=0)[None]  # (1, P + gh*gw, dim)


def _mask_kwargs(attn_mask: torch.Tensor | None, is_causal: bool) -> dict[str, Any]:
    # passed only when used: timm releases before attention masks in ViT.forward_features still work without them
    return {"attn_mask": attn_mask, "is_causal": is_causal} if attn_mask is not None or is_causal else {}


class VisionTransformerBackbone(Backbone):
    """A timm ViT as a backbone.

    Options on top of timm's ``VisionTransformer`` kwargs (``img_size``, ``patch_size``, ``in_chans``,
    ``drop_path_rate``, ``embed_dim``, ``depth``, ``num_heads``, ``class_token``, ``dynamic_img_size``,
    ``weight_init``, ...):

    - ``pos_embed``: "learn" (timm default), "sincos" (fixed, MoCo v3) or "none";
    - ``freeze_patch_embed``: keep the patch projection at its random init (MoCo v3); with
      ``weight_init="moco"`` that init is moco-v3's uniform one, which timm's "moco" mode leaves out.

    Without a class token the pooled embedding is the mean of the final-normed patch tokens (``fc_norm`` off).
    """

    family = "vit"
    model_class = VisionTransformer
    wrapper_kwargs = ("freeze_patch_embed",)  # pos_embed is timm's too, extended with "sincos"

    def __init__(self, name: str, timm_name: str, defaults: Mapping[str, Any], kwargs: Mapping[str, Any]) -> None:
        super().__init__(name, timm_name, defaults, kwargs)
        cfg = dict(self.config)
        pos_embed = cfg.pop("pos_embed", "learn")
        freeze_patch_embed = bool(cfg.pop("freeze_patch_embed", False))
        if pos_embed not in _POS_EMBED_KINDS:
            raise ValueError(f"backbone {name!r}: pos_embed={pos_embed!r}; choose one of 'learn', 'sincos', 'none'")
        if pos_embed in ("none", ""):
            cfg["pos_embed"] = "none"
        if not cfg.get("class_token", True):
            cfg.setdefault("global_pool", "avg")
        if cfg.get("global_pool") in _AVG_POOLS:
            # the contract's forward_tokens are final-normed; timm would move the norm after the pooling
            cfg.setdefault("fc_norm", False)
        self.model = create_timm_model(name, timm_name, cfg)
        self.timm_kwargs = cfg

        model = self.model
        patch_embed = model.patch_embed
        self.patch_size = to_2tuple(patch_embed.patch_size)
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"backbone {name!r}: non-square patches {self.patch_size} are not supported")
        self.img_size = to_2tuple(patch_embed.img_size)
        self.in_chans = patch_embed.proj.in_channels
        self.dynamic_img_size = bool(model.dynamic_img_size)
        self._dynamic_img_pad = bool(patch_embed.dynamic_img_pad)
        if not self._dynamic_img_pad:
            check_img_size(
                name, self.img_size, self.patch_size[0], "the patch size", extra=" (or dynamic_img_pad=True)"
            )
        self.num_features = int(model.num_features)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.pyramid_strides = [self.patch_size[0]]
        self.pyramid_channels = [self.num_features]
        self.depth = len(model.blocks)
        self.pos_embed_kind = pos_embed

        if pos_embed == "sincos":
            prefix = 0 if model.no_embed_class else model.num_prefix_tokens
            grid = tuple(patch_embed.grid_size)
            with torch.no_grad():
                model.pos_embed.copy_(sincos_pos_embed_2d(grid, self.num_features, prefix))
            model.pos_embed.requires_grad_(False)
        if cfg.get("weight_init") == "moco":
            # moco-v3's uniform (Xavier-like) patch projection, fan-in over channels x patch area
            val = math.sqrt(6.0 / float(self.in_chans * self.patch_size[0] * self.patch_size[1] + self.num_features))
            with torch.no_grad():
                nn.init.uniform_(patch_embed.proj.weight, -val, val)
                nn.init.zeros_(patch_embed.proj.bias)
        if freeze_patch_embed:
            patch_embed.proj.requires_grad_(False)
        self.freeze_patch_embed = freeze_patch_embed

    def _check(self, x: torch.Tensor) -> tuple[int, int]:
        return self._check_input(x, 1 if self._dynamic_img_pad else self.patch_size[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (B, C): the class token after the final norm, or the mean token without one."""
        tokens = self.forward_tokens(x)  # (B, P + N, C)
        return self.model.forward_head(tokens, pre_logits=True)  # (B, C)

    def forward_tokens(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """All tokens after the final norm, prefix (class) tokens first.

        Args:
            x: images (B, in_chans, H, W) (or any (B, D, H, W) map when in_chans=D).
            attn_mask: optional mask added to the attention logits, (N, N) or broadcastable to (B, heads, N, N).
            is_causal: causal attention over the token sequence (prefix tokens first), e.g. for iGPT.
        """
        self._check(x)
        if (attn_mask is not None or is_causal) and self.model.grad_checkpointing and torch.is_grad_enabled():
            return self._masked_features_checkpointed(x, attn_mask, is_causal)  # (B, P + N, C)
        return self.model.forward_features(x, **_mask_kwargs(attn_mask, is_causal))  # (B, P + N, C)

    def _masked_features_checkpointed(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        """timm's ``forward_features`` with a mask, each block checkpointed (timm runs masked blocks without it)."""
        model = self.model
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))  # (B, P + N, C)
        for block in model.blocks:
            x = checkpoint(block, x, use_reentrant=False, **_mask_kwargs(attn_mask, is_causal))  # (B, P + N, C)
        return model.norm(x)  # (B, P + N, C)

    def transformer_blocks(self) -> list[nn.Module]:
        """The encoder blocks, first to last."""
        return list(self.model.blocks)

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One map (B, C, H / p, W / p) of the final-normed patch tokens."""
        h, w = self._check(x)
        tokens = self.model.forward_features(x)[:, self.num_prefix_tokens :]  # (B, N, C)
        gh, gw = self.model.patch_embed.dynamic_feat_size((h, w))
        return [tokens.reshape(x.shape[0], gh, gw, -1).permute(0, 3, 1, 2).contiguous()]  # [(B, C, gh, gw)]

    def forward_intermediate(
        self, x: torch.Tensor, n: int, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> list[torch.Tensor]:
        """Tokens of the last ``n`` blocks, each through the final norm, prefix tokens included: [(B, P + N, C)].

        Args:
            x: images.
            n: number of blocks, counted from the last.
            attn_mask: as in ``forward_tokens``.
            is_causal: as in ``forward_tokens``.
        """
        check_last_blocks(self.name, n, self.depth, "the model")
        self._check(x)
        outs = self.model.forward_intermediates(
            x,
            indices=n,
            return_prefix_tokens=True,
            norm=True,
            output_fmt="NLC",
            intermediates_only=True,
            **_mask_kwargs(attn_mask, is_causal),
        )
        if not self.num_prefix_tokens:
            return list(outs)
        return [torch.cat([prefix, spatial], dim=1) for spatial, prefix in outs]  # [(B, P + N, C)]


_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    name: (name, {})
    for name in (
        "vit_tiny_patch16_224",
        "vit_small_patch16_224",
        "vit_base_patch16_224",
        "vit_large_patch16_224",
        "vit_huge_patch14_224",
        "vit_small_patch8_224",
        "vit_base_patch8_224",
        "vit_small_patch32_224",
        "vit_base_patch32_224",
        "vit_large_patch32_224",
    )
}
# ~30k parameters at 32 px for CPU tests; still a timm vit_tiny_patch16_224 with overrides
_VARIANTS["test_vit"] = (
    "vit_tiny_patch16_224",
    dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
)

for _name, (_timm_name, _defaults) in _VARIANTS.items():
    register_variant(_name, VisionTransformerBackbone, _timm_name, **_defaults)
