"""Backbones: ViT and Swin from timm, PVT v1 ours (also registered with timm), PVT v2 from timm.

Importing this package registers every variant (and ``pvt_tiny`` ... ``pvt_large`` with timm)::

    from vitssl.backbones import create_backbone, list_backbones
    bb = create_backbone("vit_small_patch16_224", img_size=96, drop_path_rate=0.1)
    bb(x)                       # (B, C) pooled
    bb.forward_tokens(x)        # (B, N, C)
    bb.forward_pyramid(x)       # [(B, C_i, H_i, W_i)]
    bb.forward_intermediate(x, 4)

Only this package imports timm; ``import vitssl`` alone does not.
"""

from vitssl.backbones import pvt, pvt_v2, swin, vit  # noqa: F401  (importing registers the variants)
from vitssl.backbones._base import BACKBONES, Backbone
from vitssl.backbones.factory import (
    create_backbone,
    describe_backbone,
    format_backbone_table,
    list_backbones,
    load_backbone,
    load_backbone_state,
    read_backbone_metadata,
    save_backbone,
)
from vitssl.backbones.pvt import PyramidVisionTransformer
from vitssl.backbones.vit import sincos_pos_embed_2d

__all__ = [
    "BACKBONES",
    "Backbone",
    "PyramidVisionTransformer",
    "create_backbone",
    "describe_backbone",
    "format_backbone_table",
    "list_backbones",
    "load_backbone",
    "load_backbone_state",
    "read_backbone_metadata",
    "save_backbone",
    "sincos_pos_embed_2d",
]
