"""PVT v1 (Wang et al., "Pyramid Vision Transformer", ICCV 2021): our implementation, registered with timm.

Four stages; stage i embeds non-overlapping P_i x P_i patches (a strided conv + LayerNorm), adds a learned
position embedding, and runs L_i blocks of spatial-reduction attention (SRA): queries from all tokens, keys and
values from the token map reduced by a conv of kernel = stride = R_i (Reshape by R then Linear W_S) and a
LayerNorm, so K and V are R_i^2 times shorter. The last stage has a class token (pooled output, as in the
official code). Paper table:

    P = (4, 2, 2, 2)  C = (64, 128, 320, 512)  heads = (1, 2, 5, 8)  R = (8, 4, 2, 1)  MLP ratio = (8, 8, 4, 4)
    depths: Tiny (2, 2, 2, 2) 13.2M, Small (3, 4, 6, 3) 24.5M, Medium (3, 4, 18, 3) 44.2M, Large (3, 8, 27, 3) 61.4M

Position embeddings are made for ``img_size`` and bilinearly resized for other input sizes (as the official
code does). Importing this module registers ``pvt_tiny`` ... ``pvt_large`` with timm, so
``timm.create_model("pvt_small", pretrained=True, pretrained_cfg_overlay=dict(file=path))`` builds and loads
them, from our exports or from the official checkpoints (their keys are remapped by ``checkpoint_filter_fn``).
``load_backbone_state`` runs the same mapping, so an official checkpoint also loads straight into a backbone:
``load_backbone_state(create_backbone("pvt_small"), torch.load("pvt_small.pth"))`` (the ImageNet head is dropped).
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import timm.models
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitssl.backbones._base import (
    Backbone,
    check_img_size,
    check_last_blocks,
    check_min_input_size,
    create_timm_model,
    register_variant,
    to_2tuple,
)

_logger = logging.getLogger(__name__)

_Size = int | tuple[int, int]


class PatchEmbed(nn.Module):
    """Non-overlapping P x P patches -> tokens: a conv of kernel = stride = P, then LayerNorm.

    Args:
        in_chans: input channels.
        dim: output width.
        patch_size: P.
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)  # official eps (1e-5), unlike the blocks' 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).permute(0, 2, 3, 1)  # (B, H/P, W/P, C)
        return self.norm(x)  # (B, H/P, W/P, C)


class SpatialReductionAttention(nn.Module):
    """Multi-head attention whose keys and values come from the token map reduced R times per side.

    Args:
        dim: token width.
        num_heads: attention heads.
        sr_ratio: R; 1 is plain multi-head attention (no ``sr``/``norm`` parameters, as in the official code).
        qkv_bias: biases on the query and key/value projections.
        attn_drop: dropout on attention weights.
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool, attn_drop: float, proj_drop: float
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"PVT stage width {dim} is not divisible by its {num_heads} heads")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr: nn.Conv2d | None = None
        self.norm: nn.LayerNorm | None = None
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(b, n, heads, c // heads).transpose(1, 2)  # (B, nh, N, hd)
        kv_in = x
        if self.sr is not None:
            kv_in = x.transpose(1, 2).reshape(b, c, hw[0], hw[1])  # (B, C, H, W)
            kv_in = self.sr(kv_in).flatten(2).transpose(1, 2)  # (B, HW/R^2, C)
            kv_in = self.norm(kv_in)  # (B, HW/R^2, C)
        k, v = self.kv(kv_in).reshape(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, M, hd)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)  # (B,nh,N,hd)
        x = x.transpose(1, 2).reshape(b, n, c)  # (B, N, C)
        return self.proj_drop(self.proj(x))  # (B, N, C)


class Block(nn.Module):
    """Pre-norm transformer block with spatial-reduction attention.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / dim.
        sr_ratio: spatial reduction R.
        qkv_bias: biases on q and kv.
        proj_drop: dropout after attention and in the MLP.
        attn_drop: dropout on attention weights.
        drop_path: stochastic depth rate of this block.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        sr_ratio: int,
        qkv_bias: bool,
        proj_drop: float,
        attn_drop: float,
        drop_path: float,
        norm_eps: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), hw))  # (B, N, C)
        return x + self.drop_path2(self.mlp(self.norm2(x)))  # (B, N, C)


class Stage(nn.Module):
    """Patch embedding + learned position embedding + blocks.

    Args:
        in_chans: channels of the incoming map.
        dim: stage width.
        depth: number of blocks.
        patch_size: P_i.
        grid_size: (rows, columns) of the token grid at the init ``img_size``; position embeddings are made for it.
        num_prefix_tokens: class tokens prepended in this stage (1 in the last stage, else 0).
        num_heads: attention heads.
        mlp_ratio: MLP expansion.
        sr_ratio: spatial reduction R_i.
        qkv_bias: biases on q and kv.
        proj_drop: dropout after the position embedding, attention and MLP.
        attn_drop: dropout on attention weights.
        drop_path: stochastic depth rate per block.
        norm_eps: LayerNorm epsilon of the blocks.
    """

    def __init__(
        self,
        in_chans: int,
        dim: int,
        depth: int,
        patch_size: int,
        grid_size: tuple[int, int],
        num_prefix_tokens: int,
        num_heads: int,
        mlp_ratio: float,
        sr_ratio: int,
        qkv_bias: bool,
        proj_drop: float,
        attn_drop: float,
        drop_path: Sequence[float],
        norm_eps: float,
    ) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.num_prefix_tokens = num_prefix_tokens
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(in_chans, dim, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_prefix_tokens + grid_size[0] * grid_size[1], dim))
        self.pos_drop = nn.Dropout(proj_drop)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, sr_ratio, qkv_bias, proj_drop, attn_drop, drop_path[j], norm_eps)
            for j in range(depth)
        )

    def _pos_embed(self, hw: tuple[int, int]) -> torch.Tensor:
        prefix = self.pos_embed[:, : self.num_prefix_tokens]  # (1, P, C)
        grid = self.pos_embed[:, self.num_prefix_tokens :]  # (1, gh*gw, C)
        if hw != self.grid_size:
            gh, gw = self.grid_size
            grid = grid.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)  # (1, C, gh, gw)
            grid = F.interpolate(grid, size=hw, mode="bilinear", align_corners=False)  # (1, C, H, W)
            grid = grid.flatten(2).transpose(1, 2)  # (1, H*W, C)
        return torch.cat([prefix, grid], dim=1)  # (1, P + H*W, C)

    def embed(self, x: torch.Tensor, prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """Map (B, C_in, H_in, W_in) -> tokens (B, P + H*W, C) with position embedding, and (H, W).

        Args:
            x: incoming image or feature map.
            prefix: (1, P, C) class token(s) to prepend, for the stage that has them.
        """
        x = self.patch_embed(x)  # (B, H, W, C)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)  # (B, H*W, C)
        if prefix is not None:
            x = torch.cat([prefix.expand(b, -1, -1), x], dim=1)  # (B, P + H*W, C)
        return self.pos_drop(x + self._pos_embed((h, w))), (h, w)

    def run_block(self, index: int, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        block = self.blocks[index]
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, hw, use_reentrant=False)
        return block(x, hw)  # (B, N, C)

    def forward(self, x: torch.Tensor, prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        x, hw = self.embed(x, prefix)  # (B, P + H*W, C)
        for i in range(len(self.blocks)):
            x = self.run_block(i, x, hw)  # (B, P + H*W, C)
        return x, hw


def tokens_to_map(x: torch.Tensor, hw: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
    """(B, P + H*W, C) tokens -> (B, C, H, W) map of the spatial tokens."""
    x = x[:, num_prefix_tokens:]  # (B, H*W, C)
    return x.transpose(1, 2).reshape(x.shape[0], -1, hw[0], hw[1]).contiguous()  # (B, C, H, W)


def _check_global_pool(global_pool: str) -> None:
    if global_pool not in ("token", "avg", ""):
        raise ValueError(f"PVT: global_pool={global_pool!r}; choose 'token', 'avg' or ''")


class PyramidVisionTransformer(nn.Module):
    """PVT v1 classifier in timm's model interface (``num_classes``, ``forward_features``, ``forward_head``, ...).

    Args:
        img_size: input size the position embeddings are made for; a multiple of the total patch stride.
        in_chans: input channels.
        num_classes: classifier outputs; 0 for none (features only).
        global_pool: "token" (class token, official), "avg" (mean of the spatial tokens) or "" (no pooling).
        patch_sizes: P_i.
        embed_dims: C_i.
        depths: L_i.
        num_heads: heads per stage.
        mlp_ratios: E_i.
        sr_ratios: R_i; the last stage (with the class token) must have 1.
        qkv_bias: biases on q and kv (True in all paper models).
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after position embeddings, attention and MLPs.
        attn_drop_rate: dropout on attention weights.
        drop_path_rate: stochastic depth, rising linearly over all blocks to this value.
        norm_eps: LayerNorm epsilon of the blocks and final norm.
    """

    def __init__(
        self,
        img_size: _Size = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: Literal["token", "avg", ""] = "token",
        patch_sizes: Sequence[int] = (4, 2, 2, 2),
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        num_stages = len(depths)
        per_stage = {
            "patch_sizes": patch_sizes,
            "embed_dims": embed_dims,
            "num_heads": num_heads,
            "mlp_ratios": mlp_ratios,
            "sr_ratios": sr_ratios,
        }
        for key, value in per_stage.items():
            if len(value) != num_stages:
                raise ValueError(f"PVT: {key}={tuple(value)} must have one entry per stage ({num_stages}, from depths)")
        if sr_ratios[-1] != 1:
            raise ValueError(
                f"PVT: the last stage holds the class token and needs sr_ratio 1, got sr_ratios={tuple(sr_ratios)}"
            )
        _check_global_pool(global_pool)
        img_size = to_2tuple(img_size)
        total_stride = 1
        for p in patch_sizes:
            total_stride *= p
        if any(s % total_stride for s in img_size):
            raise ValueError(
                f"PVT: img_size={img_size} must have sides that are multiples of the total patch stride {total_stride}"
            )
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_prefix_tokens = 1
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.feature_info: list[dict[str, Any]] = []

        dpr = torch.linspace(
            0, drop_path_rate, sum(depths), device="cpu"
        ).tolist()  # rises over all blocks (paper code)
        stages = []
        stride, prev_dim, first = 1, in_chans, 0
        for i in range(num_stages):
            stride *= patch_sizes[i]
            stages.append(
                Stage(
                    in_chans=prev_dim,
                    dim=embed_dims[i],
                    depth=depths[i],
                    patch_size=patch_sizes[i],
                    grid_size=(img_size[0] // stride, img_size[1] // stride),
                    num_prefix_tokens=1 if i == num_stages - 1 else 0,
                    num_heads=num_heads[i],
                    mlp_ratio=mlp_ratios[i],
                    sr_ratio=sr_ratios[i],
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[first : first + depths[i]],
                    norm_eps=norm_eps,
                )
            )
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=stride, module=f"stages.{i}"))
            prev_dim, first = embed_dims[i], first + depths[i]
        self.stages = nn.ModuleList(stages)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[-1]))
        self.norm = nn.LayerNorm(embed_dims[-1], eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """The official init: truncated normal (std 0.02) for Linear layers and embeddings, zero biases."""
        for stage in self.stages:
            trunc_normal_(stage.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"} | {f"stages.{i}.pos_embed" for i in range(len(self.stages))}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh one of ``num_classes`` outputs (0: none)."""
        if global_pool is not None:
            _check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        device = self.cls_token.device
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()

    def _run(self, x: torch.Tensor, keep_maps: bool) -> tuple[torch.Tensor, tuple[int, int], list[torch.Tensor]]:
        """All stages; returns last-stage tokens (B, 1 + H*W, C) before the final norm, their grid, earlier maps."""
        maps = []
        hw = (0, 0)
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            x, hw = stage(x, self.cls_token if i == last else None)  # (B, P + H_i*W_i, C_i)
            if i != last:
                x = tokens_to_map(x, hw)  # (B, C_i, H_i, W_i)
                if keep_maps:
                    maps.append(x)
        return x, hw, maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed last-stage tokens (B, 1 + H/32 * W/32, C), class token first."""
        x, _, _ = self._run(x, keep_maps=False)
        return self.norm(x)  # (B, 1 + N, C)

    def forward_intermediates(
        self, x: torch.Tensor, norm: bool = True, intermediates_only: bool = False
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs as maps [(B, C_i, H/s_i, W/s_i)] (and the final features unless ``intermediates_only``).

        Args:
            x: images.
            norm: put the last stage's map through the final norm.
            intermediates_only: return only the maps.
        """
        x, hw, maps = self._run(x, keep_maps=True)
        normed = self.norm(x)  # (B, 1 + N, C)
        maps.append(tokens_to_map(normed if norm else x, hw, self.num_prefix_tokens))  # (B, C, H/32, W/32)
        return maps if intermediates_only else (normed, maps)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]  # (B, C)
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)  # (B, C)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: PyramidVisionTransformer) -> dict:
    """Map official PVT checkpoints (``patch_embed1``, ``pos_embed1``, ``block1.0``) onto our keys, and resize
    position embeddings made for another input size. Our own exports pass through unchanged.

    Args:
        state_dict: checkpoint weights.
        model: the model they are loaded into.
    """
    state_dict = state_dict.get("model", state_dict)
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"^patch_embed(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.patch_embed.", k)
        k = re.sub(r"^pos_embed(\d+)$", lambda m: f"stages.{int(m.group(1)) - 1}.pos_embed", k)
        k = re.sub(r"^block(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks.", k)
        match = re.fullmatch(r"stages\.(\d+)\.pos_embed", k)
        if match is not None:
            stage = model.stages[int(match.group(1))]
            if v.shape != stage.pos_embed.shape:
                v = _resize_pos_embed(v, stage.grid_size, stage.num_prefix_tokens)
        out[k] = v
    return out


def _resize_pos_embed(pos_embed: torch.Tensor, grid_size: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """Bilinearly resize a (1, P + n*n, C) position embedding from a square source grid to ``grid_size``."""
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]  # (1, P, C), (1, n*n, C)
    side = round(grid.shape[1] ** 0.5)
    if side * side != grid.shape[1]:
        raise ValueError(
            f"cannot resize a PVT position embedding of {grid.shape[1]} tokens (not a square grid) to {grid_size}; "
            "build the model with the img_size the checkpoint was trained at"
        )
    _logger.info("resizing PVT position embedding from %dx%d to %dx%d", side, side, *grid_size)
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()  # (1, C, n, n)
    grid = F.interpolate(grid, size=grid_size, mode="bilinear", align_corners=False)  # (1, C, gh, gw)
    return torch.cat([prefix, grid.flatten(2).transpose(1, 2).to(pos_embed.dtype)], dim=1)  # (1, P + gh*gw, C)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stages.0.patch_embed.proj",
        "classifier": "head",
        "paper_ids": "arXiv:2102.12122",
        **kwargs,
    }


# timm's register_model reads this module's `default_cfgs` for the names it registers
default_cfgs = generate_default_cfgs({name: _cfg() for name in ("pvt_tiny", "pvt_small", "pvt_medium", "pvt_large")})

_PAPER_ARGS = dict(
    patch_sizes=(4, 2, 2, 2),
    embed_dims=(64, 128, 320, 512),
    num_heads=(1, 2, 5, 8),
    mlp_ratios=(8, 8, 4, 4),
    sr_ratios=(8, 4, 2, 1),
    qkv_bias=True,
)
DEPTHS = {
    "pvt_tiny": (2, 2, 2, 2),
    "pvt_small": (3, 4, 6, 3),
    "pvt_medium": (3, 4, 18, 3),
    "pvt_large": (3, 8, 27, 3),
}
# parameters with a 1000-class head, from the paper's Table 2
PAPER_PARAMS_M = {"pvt_tiny": 13.2, "pvt_small": 24.5, "pvt_medium": 44.2, "pvt_large": 61.4}


def _create_pvt(variant: str, pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    model_args = dict(_PAPER_ARGS, depths=DEPTHS[variant])
    return build_model_with_cfg(
        PyramidVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **dict(model_args, **kwargs),
    )


def _register_with_timm(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """``timm.models.register_model`` unless timm already knows the name (a second import, or a future timm with
    its own PVT v1, which we then leave in place)."""
    if timm.models.is_model(fn.__name__):
        existing = timm.models.model_entrypoint(fn.__name__)
        if existing.__module__ != fn.__module__:
            _logger.warning("timm already has a model %r (from %s); not replacing it", fn.__name__, existing.__module__)
        return fn
    return timm.models.register_model(fn)


@_register_with_timm
def pvt_tiny(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """PVT-Tiny (13.2M parameters)."""
    return _create_pvt("pvt_tiny", pretrained, **kwargs)


@_register_with_timm
def pvt_small(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """PVT-Small (24.5M parameters)."""
    return _create_pvt("pvt_small", pretrained, **kwargs)


@_register_with_timm
def pvt_medium(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """PVT-Medium (44.2M parameters)."""
    return _create_pvt("pvt_medium", pretrained, **kwargs)


@_register_with_timm
def pvt_large(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """PVT-Large (61.4M parameters)."""
    return _create_pvt("pvt_large", pretrained, **kwargs)


_DEFAULT_IMG_SIZE = inspect.signature(PyramidVisionTransformer).parameters["img_size"].default
_STRIDE = "PVT's total patch stride"


class PVTBackbone(Backbone):
    """Our PVT v1 as a backbone; pooled embedding = the class token after the final norm (official)."""

    family = "pvt"
    model_class = PyramidVisionTransformer
    model: PyramidVisionTransformer

    def __init__(self, name: str, timm_name: str, defaults: Mapping[str, Any], kwargs: Mapping[str, Any]) -> None:
        super().__init__(name, timm_name, defaults, kwargs)
        cfg = dict(self.config)
        # checked here, before the model raises from deep inside timm's builder without naming the fix
        img_size = to_2tuple(cfg.get("img_size", _DEFAULT_IMG_SIZE))
        check_img_size(name, img_size, math.prod(cfg.get("patch_sizes", _PAPER_ARGS["patch_sizes"])), _STRIDE)
        # built through timm (registered above), as the other families are, so exports load back the same way
        self.model = create_timm_model(name, timm_name, cfg)
        self.timm_kwargs = cfg

        model = self.model
        self.img_size = model.img_size
        self.in_chans = model.in_chans
        self.dynamic_img_size = True  # position embeddings are resized to any input size
        self.num_features = int(model.num_features)
        self.num_prefix_tokens = model.num_prefix_tokens
        self.pyramid_strides = [int(info["reduction"]) for info in model.feature_info]
        self.pyramid_channels = [int(info["num_chs"]) for info in model.feature_info]
        # every stage's spatial-reduction conv (kernel = stride = R) needs a grid of at least R
        self.min_input_size = max(
            stride * stage.blocks[0].attn.sr_ratio if len(stage.blocks) else stride
            for stride, stage in zip(self.pyramid_strides, model.stages)
        )

    def convert_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Official PVT v1 keys (``patch_embed1``, ``pos_embed1``, ``block1.0``) -> ours, position embeddings
        resized to this model's ``img_size``, and the classification head dropped."""
        return super().convert_state_dict(checkpoint_filter_fn(state_dict, self.model))

    def _check(self, x: torch.Tensor) -> None:
        h, w = self._check_input(x, self.pyramid_strides[-1])
        check_min_input_size(self.name, h, w, self.min_input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (B, C): the final-normed class token."""
        self._check(x)
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)  # (B, C)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed last-stage tokens (B, 1 + H/32 * W/32, C), class token first."""
        self._check(x)
        return self.model.forward_features(x)  # (B, 1 + N, C)

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Four stage outputs [(B, C_i, H/s_i, W/s_i)]; the last one through the final norm, without the class token."""
        self._check(x)
        return self.model.forward_intermediates(x, norm=True, intermediates_only=True)

    def transformer_blocks(self) -> list[nn.Module]:
        """Every stage's SRA blocks, first stage first."""
        return [block for stage in self.model.stages for block in stage.blocks]

    def forward_intermediate(self, x: torch.Tensor, n: int) -> list[torch.Tensor]:
        """Tokens (B, 1 + N, C) of the last ``n`` blocks of the last stage, each through the final norm."""
        model = self.model
        last = model.stages[-1]
        depth = len(last.blocks)
        check_last_blocks(self.name, n, depth, "the last stage")
        self._check(x)
        for stage in model.stages[:-1]:
            x, hw = stage(x)  # (B, H_i*W_i, C_i)
            x = tokens_to_map(x, hw)  # (B, C_i, H_i, W_i)
        x, hw = last.embed(x, model.cls_token)  # (B, 1 + N, C)
        outs = []
        for i in range(depth):
            x = last.run_block(i, x, hw)  # (B, 1 + N, C)
            if i >= depth - n:
                outs.append(model.norm(x))  # (B, 1 + N, C)
        return outs


_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {name: (name, {}) for name in DEPTHS}
# ~25k parameters at 32 px: grids 8, 4, 2, 1; stage 1 and 2 reduce K/V to 2x2
_VARIANTS["test_pvt"] = (
    "pvt_tiny",
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
    register_variant(_name, PVTBackbone, _timm_name, **_defaults)
