"""The ``transtrack`` objective: TransTrack's detection and track decoders trained with DETR's set loss.

A batch holds frame pairs (``prev``, ``cur``) and their padded boxes (:class:`vitssl.video.track.data.
TrackPairTransform`). One step:

1. backbone features of both frames (one batched call);
2. the previous frame alone (fused with itself, as on a sequence's first frame) through the encoder and the
   detection decoder: its final embeddings and boxes become the track queries;
3. the current frame fused with the previous one through the encoder, then the detection decoder (learned
   queries) and the track decoder (the track queries from 2);
4. the set loss (Hungarian matching, focal + L1 + GIoU, every decoder layer) of each decoder output against its
   frame's boxes.

``decoders: both`` (the default here) sums the losses of the three decoder outputs every step, which uses each
pair fully; ``decoders: alternate`` is the official schedule: each step trains the detection decoder (on the
current frame) or the track decoder (p = 0.5, the same draw on every rank), the other branch's parameters
joining the graph with weight zero so that DDP sees every parameter used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitssl.config import ConfigError, DataConfig, ObjectiveConfig
from vitssl.ssl.base import Objective, backbone_no_decay, register_objective, split_decay
from vitssl.video.track.matcher import SetLossWeights, set_loss, targets_from_padded
from vitssl.video.track.model import DecoderOutput, TransTrack, select_levels

DECODERS = ("both", "alternate")


@dataclass
class TransTrackConfig(ObjectiveConfig):
    name: str = "transtrack"
    num_classes: int = 1  # object classes (MOT17, CrowdHuman: pedestrians only)
    dim: int = 256  # transformer width d
    num_queries: int = 500  # learned object queries of the detection decoder
    enc_layers: int = 6  # transformer encoder layers
    dec_layers: int = 6  # layers of each decoder (detection and track)
    num_heads: int = 8  # attention heads
    ffn_dim: int = 1024  # feed-forward width
    dropout: float = 0.1  # transformer dropout
    strides: list[int] | None = None  # backbone pyramid strides to attend over; null = the coarsest two
    # detection queries: false = num_queries learned embeddings (TransTrack); true = the num_queries best encoder
    # tokens, each predicting a box around its location (Deformable DETR's two-stage): far fewer steps to converge
    two_stage: bool = False
    focal: bool = True  # sigmoid focal classification (alpha 0.25, gamma 2); false: softmax CE with no-object
    cost_class: float = 2.0  # matcher cost and loss weight of the class term
    cost_l1: float = 5.0  # ... of the L1 box term (normalised cx, cy, w, h)
    cost_giou: float = 2.0  # ... of the GIoU term
    aux_loss: bool = True  # set loss on every decoder layer, not only the last
    decoders: str = "both"  # both: all decoder outputs every step | alternate: one decoder per step (p=0.5)
    max_objects: int = 100  # box rows per frame in a batch (more objects are dropped from training)
    input_size: list[int] | None = None  # network input [height, width] in pixels; null = data.img_size square
    flip: bool = True  # random horizontal flip of training pairs
    shift: float = 0.05  # static pairs: largest translation of the copy, as a fraction of the side
    scale: float = 0.05  # static pairs: largest zoom change of the copy (1 ± scale)
    backbone_lr_scale: float = 0.1  # backbone learning rate as a multiple of optim.lr (TransTrack: 2e-5 / 2e-4)
    # a vitssl checkpoint of an image objective (its backbone.* weights) or an exported backbone.safetensors
    init_from: str | None = None
    score_thresh: float = 0.4  # `track run` defaults, stored with the model: detection score threshold
    match_thresh: float = 1.2  # ... reject track/detection pairs whose 1 - GIoU exceeds this
    max_age: int = 32  # ... frames an unmatched track is kept
    nms_thresh: float | None = None  # ... drop detections overlapping a better one by IoU above this (null: none,
    # as TransTrack: its set loss learns to avoid duplicates, which a briefly trained model has not yet)


def _check_config(cfg: Any) -> None:
    if cfg.decoders not in DECODERS:
        raise ConfigError(f"objective.decoders={cfg.decoders!r}; choose one of {', '.join(DECODERS)}")
    if cfg.num_classes < 1:
        raise ConfigError(f"objective.num_classes={cfg.num_classes} must be at least 1")
    if cfg.dim % cfg.num_heads or cfg.dim % 4:
        raise ConfigError(f"objective.dim={cfg.dim} must be a multiple of 4 and of objective.num_heads={cfg.num_heads}")
    if cfg.num_queries < cfg.max_objects:
        raise ConfigError(
            f"objective.num_queries={cfg.num_queries} is below objective.max_objects={cfg.max_objects}: "
            "a frame could hold more objects than there are queries; raise num_queries or lower max_objects"
        )
    if cfg.enc_layers < 0 or cfg.dec_layers < 1:
        raise ConfigError("objective.enc_layers must be >= 0 and objective.dec_layers >= 1")
    if cfg.input_size is not None and (len(cfg.input_size) != 2 or min(cfg.input_size) < 16):
        raise ConfigError(f"objective.input_size={list(cfg.input_size)} must be [height, width], each >= 16 pixels")


@register_objective("transtrack")
class TransTrackObjective(Objective):
    """TransTrack (detection + track decoders on a vitssl backbone) trained on frame pairs with the set loss.

    ``forward`` returns ``loss`` and the final-layer terms of each decoder output (``det_loss``, ``track_loss``,
    ``l1``, ``giou``, ``cls``). ``self.model`` is the :class:`~vitssl.video.track.model.TransTrack` network that
    :mod:`vitssl.video.track.infer` runs.
    """

    Config = TransTrackConfig

    def __init__(self, cfg: TransTrackConfig, backbone_factory: Callable[..., nn.Module]) -> None:
        super().__init__(cfg, backbone_factory)
        _check_config(cfg)
        self.input_hw = tuple(int(v) for v in cfg.input_size) if cfg.input_size is not None else None
        backbone = backbone_factory(img_size=self.input_hw) if self.input_hw is not None else backbone_factory()
        try:
            select_levels(list(backbone.pyramid_strides), list(cfg.strides) if cfg.strides else None)
        except ValueError as err:
            raise ConfigError(f"objective.strides: {err}") from None
        self.model = TransTrack(
            backbone,
            num_classes=cfg.num_classes + (0 if cfg.focal else 1),
            dim=cfg.dim,
            num_queries=cfg.num_queries,
            enc_layers=cfg.enc_layers,
            dec_layers=cfg.dec_layers,
            heads=cfg.num_heads,
            ffn=cfg.ffn_dim,
            dropout=cfg.dropout,
            strides=list(cfg.strides) if cfg.strides else None,
            two_stage=cfg.two_stage,
        )
        self.backbone = self.model.backbone
        self.weights = SetLossWeights(cls=cfg.cost_class, l1=cfg.cost_l1, giou=cfg.cost_giou, focal=cfg.focal)
        self._draws = torch.Generator().manual_seed(0)  # the alternate schedule's coin, identical on every rank

    def setup(self, cfg: Any) -> None:
        """Load ``objective.init_from`` into the backbone (a resumed run then overwrites it with its own weights)."""
        if self.cfg.init_from:
            from vitssl.video.action import load_backbone_weights

            load_backbone_weights(self.backbone, self.cfg.init_from)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """timm's decay rule, with the backbone in groups of its own at ``backbone_lr_scale`` × the learning rate."""
        no_decay = backbone_no_decay(self)
        named = list(self.named_parameters())
        groups = []
        for is_backbone, scale in ((True, float(self.cfg.backbone_lr_scale)), (False, 1.0)):
            part = [(n, p) for n, p in named if n.startswith("model.backbone.") == is_backbone]
            for group in split_decay(part, weight_decay, no_decay):
                group["lr_scale"] = scale
                groups.append(group)
        return groups

    # ----------------------------------------------------------------------------------------- compute
    def _loss(self, out: DecoderOutput, targets: list) -> dict[str, torch.Tensor]:
        layers = range(len(out.logits)) if self.cfg.aux_loss else [len(out.logits) - 1]
        num_boxes = float(sum(len(lab) for lab, _ in targets))
        total = None
        for i in layers:
            terms = set_loss(out.logits[i], out.boxes[i], targets, self.weights, num_boxes)
            total = terms["loss"] if total is None else total + terms["loss"]
        if out.enc_logits is not None:  # two-stage: the encoder proposals are trained as a detector too
            total = total + set_loss(out.enc_logits, out.enc_boxes, targets, self.weights, num_boxes)["loss"]
        terms["loss"] = total  # final layer's terms, loss summed over layers (and the proposals)
        return terms

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        m = self.model
        prev, cur = batch["prev"], batch["cur"]  # (B, 3, H, W) each
        b = prev.shape[0]
        feats = m.features(torch.cat([prev, cur]))  # one backbone call for both frames
        f_prev, f_cur = [f[:b] for f in feats], [f[b:] for f in feats]
        prev_t = targets_from_padded(batch["prev_boxes"], batch["prev_mask"])
        cur_t = targets_from_padded(batch["cur_boxes"], batch["cur_mask"])

        if self.cfg.decoders == "alternate":
            branch = "det" if float(torch.rand((), generator=self._draws)) < 0.5 else "track"
        else:
            branch = "both"
        enc_cur = m.encode(f_cur, f_prev)
        out: dict[str, torch.Tensor] = {}
        loss = torch.zeros((), device=prev.device)
        if branch in ("both", "track"):
            det_prev = m.detect(m.encode(f_prev, f_prev))
            trk = m.track(enc_cur, det_prev.embed, det_prev.boxes[-1])
            t = self._loss(trk, cur_t)
            loss = loss + t["loss"]
            out["track_loss"] = t["loss"].detach()
            if branch == "both":
                p = self._loss(det_prev, prev_t)
                loss = loss + p["loss"]
        if branch in ("both", "det"):
            det = m.detect(enc_cur)
            d = self._loss(det, cur_t)
            loss = loss + d["loss"]
            out["det_loss"] = d["loss"].detach()
            out.update({k: d[k].detach() for k in ("cls", "l1", "giou")})
        if branch == "det":  # the track decoder joins the graph with weight zero (DDP needs every parameter used)
            loss = loss + sum(p.sum() for p in m.track_decoder.parameters()) * 0.0
        out["loss"] = loss
        return out

    # -------------------------------------------------------------------------------------------- data
    def input_size(self, data_cfg: DataConfig) -> tuple[int, int]:
        """The network input (h, w): ``objective.input_size`` or ``data.img_size`` square."""
        return self.input_hw if self.input_hw is not None else (int(data_cfg.img_size), int(data_cfg.img_size))

    def train_sample_fn(self, data_cfg: DataConfig) -> Callable[[Any, Any], Any]:
        from vitssl.video.track.data import TrackPairTransform

        return TrackPairTransform(
            self.input_size(data_cfg),
            list(data_cfg.mean),
            list(data_cfg.std),
            max_objects=self.cfg.max_objects,
            flip=self.cfg.flip,
            shift=self.cfg.shift,
            scale=self.cfg.scale,
        )
