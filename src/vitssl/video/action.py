"""Action recognition on an image backbone: the ``video_action`` objective.

Each frame goes through the image backbone on its own (T folded into the batch), giving frame embeddings
``(B, T, D)``; a head (:mod:`vitssl.video.heads`, chosen by name from its registry) turns them into class logits:
``temporal``, the temporal transformer of ViViT's factorised encoder, ``mean``, TSN's average, or a registered
one. Trained with label-smoothed cross-entropy, from scratch or from an image objective's backbone
(``init_from``); ``freeze_backbone`` trains the head alone, on per-frame features computed once
(:mod:`vitssl.video.frame_cache`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitssl.config import ConfigError, DataConfig, ObjectiveConfig
from vitssl.ssl.base import ImageTransform, Objective, register_objective
from vitssl.video.heads import VIDEO_HEADS, build_head

_logger = logging.getLogger(__name__)


@dataclass
class VideoActionConfig(ObjectiveConfig):
    name: str = "video_action"
    num_classes: int = 400  # classes of data.train (Kinetics-400: 400, Something-Something v2: 174)
    # a name registered in vitssl.video.heads.VIDEO_HEADS: temporal (ViViT factorised encoder's temporal
    # transformer) | mean (TSN average) | a head of your own (register_head)
    head: str = "temporal"
    head_kwargs: dict[str, Any] = field(default_factory=dict)  # options of a registered head of your own
    depth: int = 2  # temporal transformer layers (head=temporal)
    num_heads: int | None = None  # its attention heads; null = backbone width // 64 (at least 1)
    mlp_ratio: float = 4.0  # its MLP width as a multiple of the backbone width
    dropout: float = 0.0  # dropout in the temporal layers and before the classifier
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    freeze_backbone: bool = False  # train the head only (backbone in eval mode, no gradients)
    # with freeze_backbone: compute data.train's per-frame features once (evaluation transform, no clip
    # augmentation) and train the head on them, no backbone forward per step; false: run the frozen backbone live
    cache_features: bool = True
    feature_cache_dir: str | None = None  # where the cache lives; null = <init_from folder>/features, else
    # <output_dir>/features
    num_frames: int = 8  # frames per clip T (the datasets' num_frames must match)
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # clip RandomResizedCrop scale range
    flip: bool = True  # random horizontal flip of whole clips; false where labels name directions (SSv2)
    # a vitssl checkpoint of an image objective (its backbone.* weights), the run folder holding one (its
    # checkpoint_last.pth, else the newest checkpoint_<step>) or an exported backbone.safetensors; loaded once
    # when a run starts (before resuming), with the backbone built from model.* as configured
    init_from: str | None = None


def _check_config(cfg: Any) -> None:
    if cfg.head not in VIDEO_HEADS:
        raise ConfigError(f"objective.head={cfg.head!r}: {VIDEO_HEADS.unknown_message(cfg.head)}")
    if cfg.num_classes < 2:
        raise ConfigError(f"objective.num_classes={cfg.num_classes}: a classifier needs at least 2 classes")
    if cfg.num_frames < 1:
        raise ConfigError(f"objective.num_frames={cfg.num_frames} must be positive")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ConfigError(f"objective.label_smoothing={cfg.label_smoothing} must lie in [0, 1)")
    scale = list(cfg.crop_scale)
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ConfigError(f"objective.crop_scale must be [min, max] with 0 < min <= max <= 1, got {scale}")


@register_objective("video_action")
class VideoAction(Objective):
    """Per-frame image backbone + temporal head, trained with label-smoothed cross-entropy on clips.

    Batches are ``(clips (B, T, C, H, W), labels (B,))``; ``forward`` returns ``loss`` and ``top1`` (batch
    accuracy in percent).

    With ``freeze_backbone`` the backbone's parameters have ``requires_grad=False`` (so ``param_groups``, the
    optimizer and DDP see only the head) and it runs in eval mode under ``torch.no_grad()`` whatever mode the
    objective is put in. With ``cache_features`` too, ``setup`` computes ``data.train``'s per-frame features
    once (or finds them in the cache) and points ``data.train`` at them (the ``frame_features`` dataset, recorded
    so in the run's config), so training batches are features ``(B, T, D)`` and no step runs the backbone.
    """

    Config = VideoActionConfig

    def __init__(self, cfg: VideoActionConfig, backbone_factory: Callable[[], nn.Module]) -> None:
        super().__init__(cfg, backbone_factory)
        _check_config(cfg)
        self.backbone = backbone_factory()
        dim = int(self.backbone.num_features)
        self.head: nn.Module = build_head(cfg.head, dim, cfg)  # (B, T, D) -> (B, num_classes)
        self.freeze_backbone = bool(cfg.freeze_backbone)
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    # ------------------------------------------------------------------------------------------- modes
    def train(self, mode: bool = True) -> VideoAction:
        """Set the mode; a frozen backbone stays in eval mode (no dropout, fixed norms) while the head trains."""
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def setup(self, cfg: Any) -> None:
        """Load ``objective.init_from`` into the backbone (a resumed run then overwrites it with its own weights);
        with a frozen backbone and ``cache_features``, fill the per-frame feature cache of ``data.train`` and
        point ``data.train`` at it (a frozen backbone's weights are the same in a resumed run)."""
        if self.cfg.init_from:
            load_backbone_weights(self.backbone, self.cfg.init_from)
        if self.freeze_backbone and self.cfg.cache_features and cfg.data.train.name != "frame_features":
            from vitssl.video.frame_cache import cache_frame_features

            source = cfg.data.train
            if self.cfg.feature_cache_dir:
                cache_dir = Path(self.cfg.feature_cache_dir)
            elif self.cfg.init_from:
                cache_dir = init_weights_file(self.cfg.init_from).absolute().parent / "features"
            else:
                cache_dir = Path(cfg.output_dir) / "features"
            folder = cache_frame_features(
                self.backbone,
                source,
                self.eval_sample_fn(cfg.data),
                cache_dir,
                batch_size=cfg.train.batch_size,
                num_workers=cfg.data.num_workers,
                skip_corrupt=cfg.data.skip_corrupt,
            )
            _logger.info(
                "training the head on the cached per-frame features of %s: data.train -> %s", source.name, folder
            )
            source.name, source.root, source.kwargs = "frame_features", str(folder), {}

    # ----------------------------------------------------------------------------------------- compute
    def frame_features(self, clips: torch.Tensor) -> torch.Tensor:
        """Per-frame embeddings (B, T, D) of clips (B, T, C, H, W): the backbone on every frame."""
        b, t = clips.shape[:2]
        frames = clips.flatten(0, 1)  # (B·T, C, H, W): frames are independent images to the backbone
        if self.freeze_backbone:
            with torch.no_grad():
                feats = self.backbone(frames)  # (B·T, D)
        else:
            feats = self.backbone(frames)  # (B·T, D)
        return feats.view(b, t, -1)  # (B, T, D)

    def logits(self, clips: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes) of clips (B, T, C, H, W)."""
        return self.head(self.frame_features(clips))  # (B, K)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        clips, labels = batch  # clips (B, T, C, H, W) or cached frame features (B, T, D); labels (B,)
        if clips.ndim == 3:
            if not self.freeze_backbone:
                raise ConfigError("cached frame features (data.train=frame_features) need objective.freeze_backbone")
            logits = self.head(clips)  # (B, K)
        else:
            logits = self.logits(clips)  # (B, K)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)
        top1 = (logits.argmax(-1) == labels).float().mean() * 100
        return {"loss": loss, "top1": top1.detach()}

    def eval_features(self, clips: torch.Tensor) -> torch.Tensor:
        """The head's pre-logit embedding (B, D) of clips (B, T, C, H, W)."""
        return self.head.forward_features(self.frame_features(clips))  # (B, D)

    # -------------------------------------------------------------------------------------------- data
    def train_sample_fn(self, data_cfg: DataConfig) -> Callable[[Any, Any], Any]:
        from vitssl.video.transforms import clip_train_transform

        if data_cfg.train.name == "frame_features":
            from vitssl.video.frame_cache import features_as_is

            return features_as_is

        transform = clip_train_transform(
            data_cfg.img_size, data_cfg.mean, data_cfg.std, crop_scale=tuple(self.cfg.crop_scale), flip=self.cfg.flip
        )
        return ImageTransform(transform)

    def eval_sample_fn(self, data_cfg: DataConfig) -> Callable[[Any, Any], Any]:
        from vitssl.video.transforms import clip_eval_transform

        ratio = 1.0 if data_cfg.img_size < 96 else 256 / 224  # as for images: no resize margin on tiny clips
        return ImageTransform(clip_eval_transform(data_cfg.img_size, data_cfg.mean, data_cfg.std, resize_ratio=ratio))


def init_weights_file(path: str | Path) -> Path:
    """The file ``objective.init_from`` names: a ``.safetensors`` backbone or checkpoint as given, or a run
    folder's checkpoint through the engine's checkpoint resolver (``checkpoint_last.pth``, else the newest
    ``checkpoint_<step>``).

    Raises:
        ConfigError: nothing there, or a folder that holds no checkpoint.
    """
    from vitssl.engine.checkpoint import CheckpointError, resolve_checkpoint

    if not Path(path).exists():
        raise ConfigError(
            f"objective.init_from={str(path)!r}: no such file (a vitssl checkpoint, its run folder or a .safetensors)"
        )
    try:
        return resolve_checkpoint(path)
    except CheckpointError as err:
        raise ConfigError(
            f"objective.init_from={str(path)!r}: {err}; or name a vitssl checkpoint or a .safetensors backbone"
        ) from None


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load an image backbone's weights from a vitssl checkpoint, a run folder or a ``backbone.safetensors``.

    Args:
        backbone: the (freshly built) backbone to fill.
        path: a training checkpoint of any image objective (its ``backbone.*`` weights are taken), the run folder
            that holds it (see :func:`init_weights_file`) or a file written by ``vitssl.backbones.save_backbone``.

    Raises:
        ConfigError: nothing there, or its weights do not fit the configured backbone.
        CheckpointError: the checkpoint is truncated or not a vitssl checkpoint.
    """
    from vitssl.backbones import load_backbone_state
    from vitssl.engine import load_checkpoint

    path = init_weights_file(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            load_backbone_state(backbone, load_file(str(path)))
        else:
            load_backbone_state(backbone, load_checkpoint(path)["model"], prefix="backbone.")
    except KeyError as err:
        raise ConfigError(f"objective.init_from={str(path)!r}: {err.args[0] if err.args else err}") from None
