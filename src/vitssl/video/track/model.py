"""TransTrack in plain PyTorch: one transformer encoder, a detection decoder and a track decoder on a pyramid backbone.

Per frame: the backbone's ``forward_pyramid`` maps at the chosen strides, each projected to ``dim`` channels
(1×1 conv + GroupNorm). The current and previous frame's maps are concatenated per level and fused by a 1×1
conv; the fused maps, flattened with a 2-D sine position encoding plus a learned level embedding, go through a
transformer encoder (plain attention over all tokens of one or two levels: no deformable op, so it runs on a
CPU). Two decoders read that memory:

- the detection decoder's queries are learned object embeddings, each with a learned reference box;
- the track decoder's queries are the previous frame's final detection-decoder embeddings, with the boxes they
  predicted there as reference boxes; each finds its object in the current frame.

Each decoder layer refines its reference boxes (box = sigmoid(Δ + logit(reference)), the reference of the next
layer detached, as Deformable DETR's iterative refinement) and the query position is an MLP of the reference
box's sine encoding, so plain cross-attention knows where to look. The class and box heads are shared by the
two decoders; every layer's output is kept for the auxiliary losses.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DecoderOutput:
    """What a decoder gives per layer (the last entry of each list is the final layer)."""

    logits: list[torch.Tensor]  # per layer, class logits (B, Q, K)
    boxes: list[torch.Tensor]  # per layer, (cx, cy, w, h) boxes in [0, 1] (B, Q, 4)
    embed: torch.Tensor  # final-layer query embeddings (B, Q, D): next frame's track queries
    enc_logits: torch.Tensor | None = None  # two-stage detection: the encoder proposals' logits (B, S, K)
    enc_boxes: torch.Tensor | None = None  # ... and boxes (B, S, 4), trained with the set loss too


@dataclass
class Encoded:
    """The encoder's output for one frame pair."""

    memory: torch.Tensor  # (B, S, D) tokens of every level
    pos: torch.Tensor  # (B, S, D) their sine position + level embedding
    anchors: torch.Tensor  # (S, 4) each token's anchor box (cell centre, two cells wide), cx cy w h in [0, 1]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


def sine_position_2d(h: int, w: int, dim: int, device: torch.device, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalised 2-D sine position encoding of an (h, w) grid, (h·w, dim): half for y, half for x."""
    npf = dim // 2
    y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 * math.pi  # (h,)
    x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 * math.pi  # (w,)
    dim_t = temperature ** (2 * (torch.arange(npf, device=device) // 2) / npf)  # (npf,)
    py, px = y[:, None] / dim_t, x[:, None] / dim_t  # (h, npf), (w, npf)
    py = torch.stack((py[:, 0::2].sin(), py[:, 1::2].cos()), dim=2).flatten(1)  # (h, npf)
    px = torch.stack((px[:, 0::2].sin(), px[:, 1::2].cos()), dim=2).flatten(1)  # (w, npf)
    pos = torch.cat([py[:, None, :].expand(h, w, npf), px[None, :, :].expand(h, w, npf)], dim=-1)  # (h, w, dim)
    return pos.reshape(h * w, dim)


def sine_box_embed(boxes: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine encoding of (cx, cy, w, h) boxes in [0, 1]: (..., 4) -> (..., 4·dim/4 = dim)."""
    per = dim // 4
    dim_t = temperature ** (2 * (torch.arange(per, device=boxes.device) // 2) / per)  # (per,)
    pos = boxes[..., None] * 2 * math.pi / dim_t  # (..., 4, per)
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)  # (..., 4, per)
    return pos.flatten(-2)  # (..., dim)


class MLP(nn.Module):
    """``n`` linear layers with ReLU between them."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, n: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (n - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class EncoderLayer(nn.Module):
    """Post-norm self-attention + FFN with the position added to queries and keys (DETR)."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = x + pos  # (B, S, D)
        x = self.norm1(x + self.drop(self.attn(q, q, x, need_weights=False)[0]))
        return self.norm2(x + self.drop(self.ffn(x)))  # (B, S, D)


class DecoderLayer(nn.Module):
    """Post-norm query self-attention, cross-attention to the memory, FFN; query positions on q and k."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, dim))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, qpos: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = tgt + qpos  # (B, Q, D)
        tgt = self.norm1(tgt + self.drop(self.self_attn(q, q, tgt, need_weights=False)[0]))
        attn = self.cross_attn(tgt + qpos, memory + pos, memory, need_weights=False)[0]  # (B, Q, D)
        tgt = self.norm2(tgt + self.drop(attn))
        return self.norm3(tgt + self.drop(self.ffn(tgt)))  # (B, Q, D)


class Decoder(nn.Module):
    """A stack of decoder layers with iterative box refinement through the shared heads."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, ffn, dropout) for _ in range(depth))
        self.query_pos = MLP(dim, dim, dim, 2)  # reference box sine encoding -> query position
        self.dim = dim

    def forward(
        self,
        tgt: torch.Tensor,
        ref: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        class_head: nn.Module,
        box_head: nn.Module,
    ) -> DecoderOutput:
        logits, boxes = [], []
        for layer in self.layers:
            qpos = self.query_pos(sine_box_embed(ref, self.dim))  # (B, Q, D)
            tgt = layer(tgt, qpos, memory, pos)  # (B, Q, D)
            box = (box_head(tgt) + inverse_sigmoid(ref)).sigmoid()  # (B, Q, 4)
            logits.append(class_head(tgt))  # (B, Q, K)
            boxes.append(box)
            ref = box.detach()  # the next layer refines this box; gradients stay within a layer
        return DecoderOutput(logits=logits, boxes=boxes, embed=tgt)


def select_levels(strides: list[int], wanted: list[int] | None) -> list[int]:
    """Indices of the pyramid levels to use: those at ``wanted`` strides, default the last (coarsest) two.

    Raises:
        ValueError: a wanted stride is not one of the backbone's (the objective turns it into a ConfigError).
    """
    if not wanted:
        return list(range(len(strides)))[-2:]
    missing = [s for s in wanted if s not in strides]
    if missing:
        raise ValueError(f"strides {missing} are not among the backbone's pyramid strides {strides}")
    return [strides.index(s) for s in wanted]


class TransTrack(nn.Module):
    """The TransTrack network on a vitssl backbone; see the module docstring for the data flow.

    Args:
        backbone: a vitssl backbone (``forward_pyramid``, ``pyramid_strides``, ``pyramid_channels``).
        num_classes: object classes (sigmoid focal classification: no "no object" class; softmax: add it).
        dim: transformer width d.
        num_queries: learned object queries of the detection decoder.
        enc_layers: encoder depth.
        dec_layers: depth of each decoder.
        heads: attention heads.
        ffn: feed-forward width.
        dropout: dropout in the transformer.
        strides: pyramid strides to use (one or two keep plain attention affordable); default the last two.
        prior_prob: initial object probability of the class head (focal loss's bias initialisation).
        two_stage: detection queries are the ``num_queries`` best-scoring encoder tokens (each token predicts a box
            around its anchor; Deformable DETR's two-stage variant) instead of learned embeddings: converges in far
            fewer steps, which a CPU-sized run needs.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        num_classes: int = 1,
        dim: int = 256,
        num_queries: int = 500,
        enc_layers: int = 6,
        dec_layers: int = 6,
        heads: int = 8,
        ffn: int = 1024,
        dropout: float = 0.1,
        strides: list[int] | None = None,
        prior_prob: float = 0.01,
        two_stage: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.levels = select_levels(list(backbone.pyramid_strides), strides)
        self.strides = [int(backbone.pyramid_strides[i]) for i in self.levels]
        chans = [int(backbone.pyramid_channels[i]) for i in self.levels]
        groups = math.gcd(32, dim)
        self.input_proj = nn.ModuleList(nn.Sequential(nn.Conv2d(c, dim, 1), nn.GroupNorm(groups, dim)) for c in chans)
        self.fuse = nn.ModuleList(nn.Conv2d(2 * dim, dim, 1) for _ in chans)
        self.level_embed = nn.Parameter(torch.zeros(len(chans), dim))
        self.encoder = nn.ModuleList(EncoderLayer(dim, heads, ffn, dropout) for _ in range(enc_layers))
        self.det_decoder = Decoder(dim, heads, ffn, dropout, dec_layers)
        self.track_decoder = Decoder(dim, heads, ffn, dropout, dec_layers)
        self.two_stage = bool(two_stage)
        if self.two_stage:
            self.enc_proj = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim))
            self.enc_class = nn.Linear(dim, num_classes)
            self.enc_box = MLP(dim, dim, 4, 3)
        else:
            self.query_embed = nn.Embedding(num_queries, dim)
            self.query_ref = nn.Embedding(num_queries, 4)  # reference boxes as logits
        self.class_head = nn.Linear(dim, num_classes)
        self.box_head = MLP(dim, dim, 4, 3)
        self.dim, self.num_queries, self.num_classes = dim, num_queries, num_classes
        self._reset_parameters(prior_prob)

    def _reset_parameters(self, prior_prob: float) -> None:
        nn.init.normal_(self.level_embed, std=0.02)
        bias = -math.log((1 - prior_prob) / prior_prob)
        for cls, box in [(self.class_head, self.box_head)] + (
            [(self.enc_class, self.enc_box)] if self.two_stage else []
        ):
            nn.init.constant_(cls.bias, bias)
            nn.init.zeros_(box.layers[-1].weight)  # the first boxes are the reference (or anchor) boxes
            nn.init.zeros_(box.layers[-1].bias)
        for fuse in self.fuse:
            # start as "current frame only" (identity on the first half), so the previous frame adds context
            with torch.no_grad():
                fuse.weight.zero_()
                fuse.weight[:, : self.dim, 0, 0] = torch.eye(self.dim)
                fuse.bias.zero_()
        if self.two_stage:
            return
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            centres = torch.rand(self.num_queries, 2, generator=g)  # spread over the image
            sizes = torch.full((self.num_queries, 2), 0.1)
            self.query_ref.weight.copy_(inverse_sigmoid(torch.cat([centres, sizes], dim=1)))

    # ----------------------------------------------------------------------------------------- stages
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Projected pyramid maps [(B, D, H_l, W_l)] of normalised images (B, 3, H, W): the backbone stage."""
        maps = self.backbone.forward_pyramid(images)
        return [proj(maps[i]) for proj, i in zip(self.input_proj, self.levels)]

    def encode(self, cur: list[torch.Tensor], prev: list[torch.Tensor]) -> Encoded:
        """Fuse the current and previous frame's maps and run the encoder.

        Args:
            cur: :meth:`features` of the current frame.
            prev: :meth:`features` of the previous frame (the current one again on a sequence's first frame).

        Returns:
            The memory (B, S, D) over the S tokens of every level, their positions and anchor boxes.
        """
        tokens, pos, anchors = [], [], []
        for lvl, (fuse, c, p) in enumerate(zip(self.fuse, cur, prev)):
            b, _, h, w = c.shape
            fused = fuse(torch.cat([c, p], dim=1))  # (B, D, H_l, W_l)
            tokens.append(fused.flatten(2).transpose(1, 2))  # (B, H_l·W_l, D)
            pe = sine_position_2d(h, w, self.dim, c.device).to(c.dtype) + self.level_embed[lvl]  # (H_l·W_l, D)
            pos.append(pe.unsqueeze(0).expand(b, -1, -1))
            ys, xs = torch.meshgrid(torch.arange(h, device=c.device), torch.arange(w, device=c.device), indexing="ij")
            centres = torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], dim=1)  # (H_l·W_l, 2)
            sizes = torch.tensor([2.0 / w, 2.0 / h], device=c.device).expand_as(centres)  # two cells
            anchors.append(torch.cat([centres, sizes.clamp(max=0.9)], dim=1).to(c.dtype))
        x, pos_t = torch.cat(tokens, dim=1), torch.cat(pos, dim=1)  # (B, S, D)
        for layer in self.encoder:
            x = layer(x, pos_t)
        return Encoded(memory=x, pos=pos_t, anchors=torch.cat(anchors))

    def detect(self, enc: Encoded) -> DecoderOutput:
        """The detection decoder over the learned object queries (or the best encoder proposals, two-stage)."""
        b = enc.memory.shape[0]
        if not self.two_stage:
            tgt = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)  # (B, N, D)
            ref = self.query_ref.weight.sigmoid().unsqueeze(0).expand(b, -1, -1)  # (B, N, 4)
            return self.det_decoder(tgt, ref, enc.memory, enc.pos, self.class_head, self.box_head)
        out = self.enc_proj(enc.memory)  # (B, S, D)
        enc_logits = self.enc_class(out)  # (B, S, K)
        enc_boxes = (self.enc_box(out) + inverse_sigmoid(enc.anchors)).sigmoid()  # (B, S, 4)
        k = min(self.num_queries, out.shape[1])
        top = enc_logits.max(-1).values.topk(k, dim=1).indices  # (B, k)
        tgt = torch.gather(out, 1, top[..., None].expand(-1, -1, out.shape[-1]))  # (B, k, D)
        ref = torch.gather(enc_boxes, 1, top[..., None].expand(-1, -1, 4)).detach()  # (B, k, 4)
        dec = self.det_decoder(tgt, ref, enc.memory, enc.pos, self.class_head, self.box_head)
        dec.enc_logits, dec.enc_boxes = enc_logits, enc_boxes
        return dec

    def track(self, enc: Encoded, queries: torch.Tensor, ref: torch.Tensor) -> DecoderOutput:
        """The track decoder: previous-frame embeddings (B, T, D) with their boxes (B, T, 4) as reference."""
        return self.track_decoder(queries, ref.detach(), enc.memory, enc.pos, self.class_head, self.box_head)

    def forward(
        self,
        cur: torch.Tensor,
        prev: torch.Tensor,
        queries: torch.Tensor | None = None,
        ref: torch.Tensor | None = None,
    ) -> tuple[DecoderOutput, DecoderOutput | None]:
        """Detections of ``cur`` (and, given track queries and boxes, the tracked objects' boxes in it).

        Args:
            cur: normalised current frames (B, 3, H, W).
            prev: normalised previous frames (B, 3, H, W).
            queries: track queries (B, T, D), the previous frame's final detection embeddings.
            ref: their boxes (B, T, 4).
        """
        enc = self.encode(self.features(cur), self.features(prev))
        det = self.detect(enc)
        trk = self.track(enc, queries, ref) if queries is not None and ref is not None else None
        return det, trk
