"""The TCA encoder, its key queue and the ``video_tca`` objective (with the PCA whitening it holds)."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitssl import distributed as dist
from vitssl.config import ConfigError, DataConfig, ObjectiveConfig
from vitssl.errors import DataError
from vitssl.ssl.base import Objective, register_objective, split_decay
from vitssl.ssl.ema import ema_update
from vitssl.video.tca.data import FeatureViews, VideoFiles, ViewParams
from vitssl.video.tca.loss import LOSSES, tca_loss, tca_official_loss

_logger = logging.getLogger(__name__)

PCA_FILE = "tca_pca.npz"  # the fitted whitening in the run folder (also held by the checkpoint's buffers)
FRAMES_FILE = "tca_train_frames.npy"  # the training videos' raw frame features, concatenated (rows)
OFFSETS_FILE = "tca_train_offsets.npy"  # (V + 1,) row offsets of each training video in FRAMES_FILE
# default frame-feature cache inside the run folder: where `vitssl index build` of the checkpoint looks first
DEFAULT_CACHE = "features/video_frames"


class TCAEncoder(nn.Module):
    """Transformer encoder over a video's frame features, without position encoding (TCA).

    Post-norm ``nn.TransformerEncoderLayer`` with ReLU, as the official code. A linear projection precedes it
    only when ``dim_in != dim`` (TCA feeds the whitened features directly).

    Args:
        dim_in: width of the input frame features.
        dim: model width E (1024 in TCA).
        num_heads: attention heads (8).
        ffn: feed-forward width (2048).
        dropout: dropout in the layer (0.2).
        layers: encoder layers (1).
    """

    def __init__(
        self, dim_in: int, dim: int = 1024, num_heads: int = 8, ffn: int = 2048, dropout: float = 0.2, layers: int = 1
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"TCA width {dim} is not divisible by {num_heads} heads")
        self.dim_in, self.dim = dim_in, dim
        self.proj = nn.Identity() if dim_in == dim else nn.Linear(dim_in, dim)
        layer = nn.TransformerEncoderLayer(dim, num_heads, ffn, dropout, batch_first=True)
        # No nested-tensor fast path: it changes numerics between train and eval and warns on every build.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, frames: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Video vectors and frame outputs of padded sequences.

        Args:
            frames: ``(B, T, dim_in)`` frame features, padded at any positions.
            valid: ``(B, T)`` bool, True for real frames; every video needs at least one.

        Returns:
            ``(video (B, E), frames (B, T, E))``, both L2-normalised; padded frame outputs are zero.
        """
        if frames.ndim != 3 or valid.shape != frames.shape[:2]:
            raise ValueError(
                f"frames must be (B, T, D) and valid (B, T), got {tuple(frames.shape)}, {tuple(valid.shape)}"
            )
        valid = valid.bool()
        if not bool(valid.any(1).all()):
            raise ValueError("every video needs at least one valid frame")
        x = self.proj(frames)  # (B, T, E)
        x = self.encoder(x, src_key_padding_mask=~valid)  # (B, T, E)
        w = valid.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        x = x * w  # (B, T, E): padded outputs (finite garbage) zeroed
        video = x.sum(1) / w.sum(1)  # (B, E) masked mean
        return F.normalize(video, dim=-1), F.normalize(x, dim=-1)  # (B, E), (B, T, E)


class KeyQueue(nn.Module):
    """A FIFO of ``size`` keys (and their groups) held in registered buffers, so checkpoints keep it.

    Starts as MoCo's: random unit vectors (group -1, negatives of everyone).

    Args:
        size: queue length K (0 = no queue).
        dim: key width E.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))  # (K, E)
        self.register_buffer("groups", torch.full((size,), -1, dtype=torch.long))  # (K,)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, keys: torch.Tensor, groups: torch.Tensor) -> None:
        """Replace the oldest entries by ``keys (M, E)``; with M > K only the last K stay."""
        size = self.keys.shape[0]
        if size == 0:
            return
        keys, groups = keys[-size:], groups[-size:]
        idx = (int(self.ptr) + torch.arange(keys.shape[0], device=self.keys.device)) % size  # (M,)
        self.keys[idx] = keys.to(self.keys.dtype)
        self.groups[idx] = groups.to(self.groups.device)
        self.ptr.fill_((int(self.ptr) + keys.shape[0]) % size)


@dataclass
class VideoTCAConfig(ObjectiveConfig):
    name: str = "video_tca"
    # an image vitssl checkpoint (its backbone.* weights) or an exported backbone.safetensors, built as model.*;
    # null keeps the backbone's random init (tests only: random frame features carry little)
    frame_backbone: str | None = None
    fps: float = 1.0  # frames sampled per second of video (TCA: 1)
    num_frames: int | None = None  # a fixed count of frames per video instead of fps; null = use fps
    frame_batch_size: int = 64  # frames per backbone forward when extracting features
    # per-video frame-feature cache folder; null = <output_dir>/features/video_frames (shared with index build)
    feature_cache: str | None = None
    pca_dim: int = 1024  # PCA-whitened width of the frame features (TCA: 1024); at most the backbone width
    pca_max_frames: int = 200_000  # training frames (evenly spaced) that fit the PCA
    dim: int | None = None  # encoder width; null = pca_dim (TCA: no projection)
    num_heads: int = 8  # attention heads
    ffn: int = 2048  # feed-forward width
    dropout: float = 0.2  # dropout in the encoder layer
    layers: int = 1  # encoder layers
    # views: two views of a video are a positive pair, the global batch and a queue of keys the negatives (vitssl);
    # official: the official code's wiring (anchor vs its positive, neg_num drawn negatives through the key
    # encoder enqueued after the loss; see VideoTCA)
    wiring: str = "views"
    neg_num: int = 16  # official wiring: negatives drawn per anchor (the published command: 16)
    loss: str = "infonce"  # infonce | circle (the official code's loss) | circle_official (its exact computation)
    temperature: float = 0.07  # InfoNCE τ; the official wiring divides its logits by it for every loss (T)
    circle_margin: float = 0.25  # CircleLoss m
    circle_gamma: float = 256.0  # CircleLoss γ
    queue_size: int = 4096  # MoCo queue of negative keys (TCA: 4096); 0 = batch negatives only
    key_momentum: float = 0.0  # EMA of the key encoder (TCA: 0, keys from the query encoder without gradient)
    symmetric: bool = True  # average the loss of both directions (view 1 -> 2 and 2 -> 1)
    # views drawn from the cached frame-feature sequences
    crop: list[float] = field(default_factory=lambda: [0.5, 1.0])  # temporal crop, fraction of the video
    speed: list[float] = field(default_factory=lambda: [0.5, 2.0])  # frame-rate change (log-uniform factor)
    drop_p: float = 0.1  # probability of dropping each frame
    max_frames: int = 300  # frames per training view (TCA's padding size 300)
    group_positive_p: float = 0.0  # draw the positive from another video of the same group (split list column)


WIRINGS = ("views", "official")


def _check_config(c: Any) -> None:
    if c.loss not in LOSSES:
        raise ConfigError(f"objective.loss={c.loss!r}; choose one of {', '.join(LOSSES)}")
    if c.wiring not in WIRINGS:
        raise ConfigError(f"objective.wiring={c.wiring!r}; choose one of {', '.join(WIRINGS)}")
    if c.loss == "circle_official" and c.wiring != "official":
        raise ConfigError("objective.loss=circle_official needs objective.wiring=official (its target is column 0)")
    if c.wiring == "official" and c.neg_num < 1:
        raise ConfigError(f"objective.neg_num={c.neg_num} must be >= 1 with objective.wiring=official")
    if c.temperature <= 0:
        raise ConfigError(f"objective.temperature={c.temperature} must be positive")
    if c.fps <= 0 and c.num_frames is None:
        raise ConfigError(f"objective.fps={c.fps} must be positive (or set objective.num_frames)")
    if c.num_frames is not None and c.num_frames < 1:
        raise ConfigError(f"objective.num_frames={c.num_frames} must be positive (or null to sample at fps)")
    if c.pca_dim < 1 or c.layers < 1 or c.num_heads < 1 or c.ffn < 1 or c.max_frames < 1:
        raise ConfigError("objective.pca_dim, layers, num_heads, ffn and max_frames must be positive")
    dim = c.dim or c.pca_dim
    if dim % c.num_heads:
        raise ConfigError(f"objective.num_heads={c.num_heads} must divide the encoder width {dim} (objective.dim)")
    if c.queue_size < 0:
        raise ConfigError(f"objective.queue_size={c.queue_size} must be >= 0")
    if not 0.0 <= c.key_momentum < 1.0:
        raise ConfigError(f"objective.key_momentum={c.key_momentum} must lie in [0, 1)")
    crop, speed = list(c.crop), list(c.speed)
    if len(crop) != 2 or not 0.0 < crop[0] <= crop[1] <= 1.0:
        raise ConfigError(f"objective.crop must be [min, max] with 0 < min <= max <= 1, got {crop}")
    if len(speed) != 2 or not 0.0 < speed[0] <= speed[1]:
        raise ConfigError(f"objective.speed must be [min, max] with 0 < min <= max, got {speed}")
    if not 0.0 <= c.drop_p < 1.0 or not 0.0 <= c.group_positive_p <= 1.0:
        raise ConfigError("objective.drop_p must lie in [0, 1) and objective.group_positive_p in [0, 1]")


@register_objective("video_tca")
class VideoTCA(Objective):
    """TCA encoder on PCA-whitened frame features of a frozen image backbone, trained with a MoCo queue.

    Batches are ``((frames1, valid1), (frames2, valid2), groups)`` of raw frame features ``(B, L, D)`` with
    masks ``(B, L)``; ``forward`` whitens them with the PCA buffers and returns ``loss`` and ``pos_sim`` (mean
    cosine of the positive pairs). ``backbone`` is the frozen frame backbone (never trained, kept in the
    checkpoint so its frame features can be recomputed for new videos).

    ``wiring="official"`` trains as the official code's ``MoCo`` + ``CircleLoss`` do. Batches are then
    ``(anchor, positive, negatives, groups)`` (:class:`FeatureViews` with ``neg_num``): the query encoder embeds
    the anchor; the positive and the ``neg_num`` negatives of each anchor go through the key encoder without
    gradient (with ``key_momentum`` 0 that is the query encoder itself, the official key encoder being a copy
    of it at every step); the logits are ``[q·p, q·queue] / T`` (:func:`tca_official_loss`), target 0; after
    them the negatives of every rank, and only they, are enqueued (the newest K kept when a step brings more).
    """

    Config = VideoTCAConfig
    supports_accumulation = False  # negatives are the rest of the batch: see Objective.supports_accumulation

    def __init__(self, cfg: VideoTCAConfig, backbone_factory: Callable[..., nn.Module]) -> None:
        super().__init__(cfg, backbone_factory)
        _check_config(cfg)
        self.backbone = backbone_factory()
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        raw = int(self.backbone.num_features)
        if cfg.pca_dim > raw:
            raise ConfigError(
                f"objective.pca_dim={cfg.pca_dim} exceeds the frame features' width {raw} (model.backbone); "
                f"set objective.pca_dim <= {raw}"
            )
        dim = cfg.dim or cfg.pca_dim
        # The whitening y = x @ pca_matrix + pca_bias, filled by setup() (identity-free zeros until then).
        self.register_buffer("pca_matrix", torch.zeros(raw, cfg.pca_dim))  # (D, P)
        self.register_buffer("pca_bias", torch.zeros(cfg.pca_dim))  # (P,)
        self.encoder = TCAEncoder(cfg.pca_dim, dim, cfg.num_heads, cfg.ffn, cfg.dropout, cfg.layers)
        self.key_encoder: TCAEncoder | None = None
        if cfg.key_momentum > 0:
            self.key_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.queue = KeyQueue(cfg.queue_size, dim)
        self._views: FeatureViews | None = None

    # ------------------------------------------------------------------------------------------- modes
    def train(self, mode: bool = True) -> VideoTCA:
        """Set the mode; the frozen frame backbone stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The encoder's parameters (backbone frozen, key encoder by EMA); no decay on norms and biases."""
        return split_decay(self.encoder.named_parameters(), weight_decay)

    # ----------------------------------------------------------------------------------------- compute
    def whiten(self, frames: torch.Tensor) -> torch.Tensor:
        """PCA-whitened, L2-normalised features ``(..., P)`` of raw frame features ``(..., D)``.

        Normalised as the official TCA pre-processing does after its whitening; this also removes the overall
        scale of faiss's whitening (its components have variance 1 / training frames, not 1).
        """
        white = frames @ self.pca_matrix.to(frames.dtype) + self.pca_bias.to(frames.dtype)  # (..., P)
        return F.normalize(white, dim=-1)

    def encode(self, frames: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(video (B, E), frames (B, T, E))`` of raw frame features ``(B, T, D)`` with masks ``(B, T)``."""
        return self.encoder(self.whiten(frames), valid)

    def _trim(self, frames: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = int(valid.any(0).nonzero().max()) + 1  # views are left-aligned: drop all-padding columns
        return frames[:, :t], valid[:, :t]

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        if self.cfg.wiring == "official":
            return self._forward_official(batch)
        (f1, v1), (f2, v2), groups = batch  # (B, L, D), (B, L) twice, (B,)
        f1, v1 = self._trim(f1, v1)
        f2, v2 = self._trim(f2, v2)
        q1, _ = self.encode(f1, v1)  # (B, E)
        q2, _ = self.encode(f2, v2)  # (B, E)
        key_encoder = self.key_encoder or self.encoder
        with torch.no_grad():
            k1, _ = key_encoder(self.whiten(f1), v1)  # (B, E)
            k2, _ = key_encoder(self.whiten(f2), v2)  # (B, E)
        c = self.cfg
        kw = {"loss": c.loss, "temperature": c.temperature, "margin": c.circle_margin, "gamma": c.circle_gamma}
        queue, queue_groups = self.queue.keys.clone(), self.queue.groups.clone()
        loss, all_k2, all_groups = tca_loss(q1, k2, queue, groups, queue_groups, **kw)
        if c.symmetric:
            loss = (loss + tca_loss(q2, k1, queue, groups, queue_groups, **kw)[0]) / 2
        if self.training:
            self.queue.push(all_k2, all_groups)
        pos = (F.normalize(q1.detach(), dim=1) * F.normalize(k2, dim=1)).sum(1).mean()
        return {"loss": loss, "pos_sim": pos}

    def _forward_official(self, batch: Any) -> dict[str, torch.Tensor]:
        """The official code's MoCo forward: anchor through the query encoder, positive and negatives through
        the key encoder without gradient, logits against the positive and the queue, negatives enqueued after."""
        (fa, va), (fp, vp), (fn, vn), _ = batch  # (B, L, D), (B, L); the same; (B, M, L, D), (B, M, L); (B,)
        fa, va = self._trim(fa, va)
        fp, vp = self._trim(fp, vp)
        fn, vn = self._trim(fn.flatten(0, 1), vn.flatten(0, 1))  # (B·M, L', D), (B·M, L')
        q, _ = self.encode(fa, va)  # (B, E)
        key_encoder = self.key_encoder or self.encoder  # momentum 0: the key encoder is the query encoder
        with torch.no_grad():
            p, _ = key_encoder(self.whiten(fp), vp)  # (B, E)
            k, _ = key_encoder(self.whiten(fn), vn)  # (B·M, E)
        c = self.cfg
        queue = self.queue.keys.clone()  # (K, E): this step's logits see the queue before the negatives join
        loss = tca_official_loss(q, p, queue, c.loss, c.temperature, c.circle_margin, c.circle_gamma)
        if self.training:
            all_k = dist.all_gather_no_grad(k)  # (B·M·W, E), in rank order as the official concat_all_gather
            self.queue.push(all_k, torch.full((all_k.shape[0],), -1, dtype=torch.long, device=all_k.device))
        pos = (F.normalize(q.detach(), dim=1) * F.normalize(p, dim=1)).sum(1).mean()
        return {"loss": loss, "pos_sim": pos}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """EMA of the key encoder (only with ``key_momentum > 0``; at 0 the query encoder makes the keys)."""
        if self.key_encoder is not None:
            m = self.cfg.key_momentum
            ema_update(self.key_encoder.parameters(), self.encoder.parameters(), m)

    # --------------------------------------------------------------------------------------- the PCA
    def set_pca(self, matrix: np.ndarray | torch.Tensor, bias: np.ndarray | torch.Tensor) -> None:
        """Install the whitening ``y = x @ matrix + bias`` (``(D, P)``, ``(P,)``)."""
        matrix, bias = torch.as_tensor(np.asarray(matrix)), torch.as_tensor(np.asarray(bias))
        if tuple(matrix.shape) != tuple(self.pca_matrix.shape) or tuple(bias.shape) != tuple(self.pca_bias.shape):
            raise ConfigError(
                f"the PCA maps {tuple(matrix.shape)} but objective.pca_dim and the frame backbone need "
                f"{tuple(self.pca_matrix.shape)}; remove {PCA_FILE} from the run folder to fit it again"
            )
        self.pca_matrix.copy_(matrix)
        self.pca_bias.copy_(bias)

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, cfg: Any) -> None:
        """Load the frame backbone, extract (or load cached) training frame features, fit or load the PCA.

        Rank 0 does the work and writes ``tca_pca.npz`` and the training features (``tca_train_frames.npy``,
        ``tca_train_offsets.npy``) into the run folder; the other ranks wait and read them. A resumed run finds
        them there and refits nothing.
        """
        from vitssl.video.action import load_backbone_weights

        if self.cfg.frame_backbone:
            try:
                load_backbone_weights(self.backbone, self.cfg.frame_backbone)
            except ConfigError as err:  # its messages name the key of video_action
                raise ConfigError(str(err).replace("objective.init_from", "objective.frame_backbone")) from None
        else:
            _logger.warning(
                "objective.frame_backbone is null: frame features come from a randomly initialised backbone"
            )
        out = Path(cfg.output_dir)
        d = cfg.data.train
        from vitssl.data import build_dataset

        videos = build_dataset(d.name, root=d.root, split=d.split, **dict(d.kwargs))
        if not isinstance(videos, VideoFiles):
            raise ConfigError(
                f"data.train.name={d.name!r}: video_tca trains on video_files (video paths whose frame features it "
                "extracts and caches); set data.train.name=video_files"
            )
        paths, groups = [str(p) for p in videos.samples], list(videos.targets)
        if dist.is_main_process():
            self._prepare(out, cfg, paths)
        dist.barrier()
        pca = np.load(out / PCA_FILE)
        self.set_pca(pca["matrix"], pca["bias"])
        offsets = np.load(out / OFFSETS_FILE)
        if len(offsets) != len(paths) + 1:
            raise ConfigError(
                f"{out / OFFSETS_FILE} holds {len(offsets) - 1} videos but data.train lists {len(paths)}; "
                "train into another output_dir"
            )
        c = self.cfg
        params = ViewParams(tuple(c.crop), tuple(c.speed), c.drop_p, c.max_frames)
        neg_num = c.neg_num if c.wiring == "official" else 0
        self._views = FeatureViews(out / FRAMES_FILE, offsets, paths, groups, params, c.group_positive_p, neg_num)

    def _prepare(self, out: Path, cfg: Any, paths: list[str]) -> None:
        from vitssl.io import atomic_path

        have = (out / PCA_FILE).is_file() and (out / FRAMES_FILE).is_file() and (out / OFFSETS_FILE).is_file()
        if have:
            _logger.info("reusing the frame features and PCA in %s", out)
            return
        from vitssl.eval.features import Progress

        cache = self.cfg.feature_cache or str(out / DEFAULT_CACHE)
        with Progress(len(paths), "frame features of the training videos", unit="video") as progress:
            feats = self.frame_features(paths, cfg.data, cache, cfg.data.skip_corrupt, progress.update)
        readable = [f for f in feats if f is not None]
        if not readable:
            raise DataError(f"none of the {len(paths)} training videos could be read")
        width = readable[0].shape[1]
        offsets = np.zeros(len(feats) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([0 if f is None else len(f) for f in feats])  # unreadable videos own no rows
        with atomic_path(out / FRAMES_FILE) as tmp:
            rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(int(offsets[-1]), width))
            for f, start in zip(feats, offsets[:-1], strict=True):
                if f is not None:
                    rows[start : start + len(f)] = f
            rows.flush()
            del rows
        with atomic_path(out / OFFSETS_FILE) as tmp, open(tmp, "wb") as fh:
            np.save(fh, offsets)
        matrix, bias = fit_pca(np.load(out / FRAMES_FILE, mmap_mode="r"), self.cfg.pca_dim, self.cfg.pca_max_frames,
                               out / "tca_pca.faiss")  # fmt: skip
        with atomic_path(out / PCA_FILE) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, matrix=matrix, bias=bias)

    def frame_model(self, data_cfg: DataConfig) -> Any:
        """The frozen frame backbone as a frame model: resize, centre crop ``data.img_size``, ``data.mean/std``."""
        from vitssl.video.frames import ModuleFrameModel

        return ModuleFrameModel(self.backbone, img_size=data_cfg.img_size, mean=data_cfg.mean, std=data_cfg.std)

    def frame_features(
        self,
        paths: Sequence[str],
        data_cfg: DataConfig,
        cache_dir: str | os.PathLike | None,
        skip_corrupt: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> list[np.ndarray | None]:
        """Raw frame features ``(n_i, D)`` of video files through the frame backbone, cached per video.

        Args:
            paths: video files.
            data_cfg: the run's data settings (frame size and normalisation).
            cache_dir: the per-video feature cache (None: none).
            skip_corrupt: None for an unreadable video instead of raising.
            progress: called with 1 after each video.
        """
        from vitssl.video.frames import video_frame_features

        c = self.cfg
        return video_frame_features(
            self.frame_model(data_cfg), list(paths), fps=c.fps, num_frames=c.num_frames, cache_dir=cache_dir,
            batch_size=c.frame_batch_size, skip_corrupt=skip_corrupt, progress=progress,
        )  # fmt: skip

    # -------------------------------------------------------------------------------------------- data
    def train_sample_fn(self, data_cfg: DataConfig) -> Callable[[Any, Any], Any]:
        if self._views is None:
            raise RuntimeError("VideoTCA.setup() must run before train_sample_fn (the engine calls it)")
        return self._views


def fit_pca(
    frames: np.ndarray, dim: int, max_frames: int, save_to: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fit PCA whitening (eigen power -0.5) on frames; return it as ``(matrix (D, P), bias (P,))``.

    Uses :class:`vitssl.video.frames.PCAWhitening` (faiss ``PCAMatrix``); the affine map is read back by
    applying it to the zero vector and the unit vectors, so ``x @ matrix + bias`` equals ``apply(x)``.

    Args:
        frames: ``(rows, D)`` frame features (array or memory map).
        dim: output width P.
        max_frames: at most this many rows, evenly spaced, fit the PCA.
        save_to: also save the fitted ``PCAWhitening`` there.
    """
    from vitssl.video.frames import PCAWhitening

    rows = frames.shape[0]
    if rows < dim:
        raise DataError(
            f"PCA to {dim} dimensions needs at least {dim} training frames, got {rows}; lower objective.pca_dim"
        )
    pick = np.linspace(0, rows - 1, min(rows, max_frames)).round().astype(np.int64)
    sample = np.ascontiguousarray(frames[pick], dtype=np.float32)
    pca = PCAWhitening(dim)
    pca.fit(sample)
    if save_to is not None:
        pca.save(save_to)
    return pca_affine(pca.apply, sample.shape[1])


def pca_affine(apply: Callable[[np.ndarray], np.ndarray], d: int) -> tuple[np.ndarray, np.ndarray]:
    """``(matrix (D, P), bias (P,))`` of an affine map given as a function on ``(N, D)`` float32 rows."""
    probe = np.concatenate([np.zeros((1, d), np.float32), np.eye(d, dtype=np.float32)])  # (1 + D, D)
    mapped = np.asarray(apply(probe), dtype=np.float64)  # (1 + D, P)
    bias = mapped[0]
    return (mapped[1:] - bias).astype(np.float32), bias.astype(np.float32)
