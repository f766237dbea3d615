"""Temporal Context Aggregation (TCA, Shao et al., WACV 2021): video embeddings for near-duplicate retrieval.

A frozen image backbone embeds frames sampled at 1 fps; the frame features are PCA-whitened (eigen power -0.5,
to 1024 dimensions in the published setting) and L2-normalised, and one transformer-encoder layer (8 heads,
FFN 2048, dropout 0.2, no position encoding, a key padding mask for variable lengths) mixes them over time.
The video vector is the masked mean of its outputs, L2-normalised; the frame outputs, L2-normalised, serve
chamfer similarity.

The ``video_tca`` objective trains the encoder contrastively on frame-feature sequences: two views of the same
video are positives; the other videos of the global batch and a MoCo-style queue of earlier keys (4096 in the
published setting, key momentum 0: keys come from the query encoder itself, without gradient) are negatives.
The loss is InfoNCE, or the official code's default CircleLoss (m 0.25, gamma 256) on the same cosine logits.
Keys are gathered across ranks like the MoCo v3 loss, so W ranks of N videos compute what one process computes
on the concatenated batch, and every rank enqueues the same keys.

Views. Frame features are extracted once per video (unaugmented frames at the configured rate, through the
frame-feature cache) and each training view is drawn from the cached sequence: a random temporal crop, a
frame-rate change (frames skipped or repeated), randomly dropped frames and a cap on the length. No spatial
augmentation happens at training time: it would need the backbone on every frame of every step. Invariance
to spatial edits comes from videos that share a group (a second column of the split list, e.g. a source and
its edited copies): with ``objective.group_positive_p`` the second view is drawn from another member of the
group, and members of a query's group are never counted as its negatives (in the batch or the queue).

The PCA lives in the objective as buffers (``pca_matrix``, ``pca_bias``), so a checkpoint holds the frame
backbone, the whitening and the encoder: :class:`TCAEmbedder` embeds raw frame features or video files from
the checkpoint alone.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from vitssl import distributed as dist
from vitssl.config import ConfigError, DataConfig, ObjectiveConfig
from vitssl.data.common import DATASETS
from vitssl.errors import DataError, MissingFileError
from vitssl.ssl.base import Objective, register_objective, split_decay
from vitssl.video.datasets import VIDEO_EXTENSIONS

_logger = logging.getLogger(__name__)

LOSSES = ("infonce", "circle")
PCA_FILE = "tca_pca.npz"  # the fitted whitening in the run folder (also held by the checkpoint's buffers)
FRAMES_FILE = "tca_train_frames.npy"  # the training videos' raw frame features, concatenated (rows)
OFFSETS_FILE = "tca_train_offsets.npy"  # (V + 1,) row offsets of each training video in FRAMES_FILE
# default frame-feature cache inside the run folder: where `vitssl index build` of the checkpoint looks first
DEFAULT_CACHE = "features/video_frames"


# ---------------------------------------------------------------------------------------------------------
# encoder
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------------------------------------


def tca_logits_loss(
    sim: torch.Tensor,
    positive: torch.Tensor,
    exclude: torch.Tensor,
    loss: Literal["infonce", "circle"] = "infonce",
    temperature: float = 0.07,
    margin: float = 0.25,
    gamma: float = 256.0,
) -> torch.Tensor:
    """Mean loss of queries over cosine similarities to candidate keys, one positive per row.

    InfoNCE: ``CE(sim / τ, positive)``. CircleLoss (Sun et al. 2020, the TCA code's default): with
    ``α_p = [1 + m - s_p]₊``, ``α_n = [s_n + m]₊`` (no gradient), ``Δ_p = 1 - m``, ``Δ_n = m``, the logits are
    ``γ α (s - Δ)`` and the loss is their cross-entropy at the positive. (The official ``CircleLoss`` indexes
    ``alpha[labels]`` with a vector of zeros, which rewrites row 0 instead of the positive column; this is the
    formula it means.)

    Args:
        sim: ``(N, C)`` cosine similarities of each query to every candidate.
        positive: ``(N,)`` column of each query's positive.
        exclude: ``(N, C)`` bool, candidates that are neither positive nor negative (same-group videos).
        loss: ``infonce`` or ``circle``.
        temperature: τ of InfoNCE.
        margin: m of CircleLoss.
        gamma: γ of CircleLoss.
    """
    is_pos = F.one_hot(positive, sim.shape[1]).bool()  # (N, C)
    if loss == "infonce":
        logits = sim / temperature  # (N, C)
    elif loss == "circle":
        alpha = torch.where(is_pos, (1 + margin - sim).clamp_min(0), (sim + margin).clamp_min(0)).detach()  # (N, C)
        delta = torch.where(is_pos, 1 - margin, margin)  # (N, C)
        logits = gamma * alpha * (sim - delta)  # (N, C)
    else:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    logits = logits.masked_fill(exclude & ~is_pos, float("-inf"))  # (N, C)
    return F.cross_entropy(logits, positive)


def tca_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    groups: torch.Tensor | None = None,
    queue_groups: torch.Tensor | None = None,
    loss: Literal["infonce", "circle"] = "infonce",
    temperature: float = 0.07,
    margin: float = 0.25,
    gamma: float = 256.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TCA's contrastive loss of this rank's queries against the global batch's keys and the queue.

    Query i's positive is key i of this rank; the keys of all ranks (gathered without gradient, in rank order)
    and the queue are its negatives, except those of its own group. The mean over ranks of the returned losses
    equals the loss of one process on the concatenated batch.

    Args:
        q: ``(N, E)`` queries (normalised here).
        k: ``(N, E)`` keys, row i the positive of query i; no gradient flows into them.
        queue: ``(K, E)`` earlier keys (normalised), constants.
        groups: ``(N,)`` int group of each video (default: every video its own group).
        queue_groups: ``(K,)`` group of each queue entry (default: none shared with any query; -1 = unknown).
        loss: ``infonce`` or ``circle`` (see :func:`tca_logits_loss`).
        temperature: τ of InfoNCE.
        margin: m of CircleLoss.
        gamma: γ of CircleLoss.

    Returns:
        ``(loss, all_keys (N·W, E), all_groups (N·W,))``: the scalar loss and what the caller enqueues.
    """
    if q.ndim != 2 or q.shape != k.shape or queue.shape[1:] != q.shape[1:]:
        raise ValueError(f"q, k must be (N, E) and queue (K, E), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(queue.shape)}")  # fmt: skip
    n = q.shape[0]
    offset = n * dist.get_rank()
    if groups is None:  # distinct groups on every rank
        groups = torch.arange(n, device=q.device) + offset
    if queue_groups is None:
        queue_groups = torch.full((queue.shape[0],), -1, dtype=torch.long, device=q.device)
    q, k = F.normalize(q, dim=1), F.normalize(k.detach(), dim=1)
    all_keys = dist.all_gather_no_grad(k)  # (N·W, E)
    all_groups = dist.all_gather_no_grad(groups.long())  # (N·W,)
    sim = torch.cat([q @ all_keys.T, q @ queue.detach().to(q.dtype).T], dim=1)  # (N, N·W + K)
    cand_groups = torch.cat([all_groups, queue_groups.to(all_groups.device)])  # (N·W + K,)
    exclude = (groups.long()[:, None] == cand_groups[None, :]) & (cand_groups[None, :] >= 0)  # (N, N·W + K)
    positive = torch.arange(n, device=q.device) + offset  # (N,)
    sim = sim.to(torch.promote_types(sim.dtype, torch.float32))  # the loss in float32 at least under autocast
    value = tca_logits_loss(sim, positive, exclude, loss, temperature, margin, gamma)
    return value, all_keys, all_groups


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


# ---------------------------------------------------------------------------------------------------------
# training data: videos as (path, group) items, views drawn from their cached frame features
# ---------------------------------------------------------------------------------------------------------


def _list_videos(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)


@DATASETS.register("video_files")
class VideoFiles(Dataset):
    """Video files as ``(path, group)`` items, nothing decoded: for objectives that work on cached features.

    ``root/<split>.txt`` (or ``.csv``/``.tsv``), when present, lists the split's videos one per line, a path
    (absolute, or relative to ``root``) and optionally a group label after whitespace or a comma; without it
    every video under ``root`` (recursively) is listed. Videos of a group are near-duplicates of each other:
    groups come from that column, else from ``ground_truth`` (a query and its positives form a group; any format
    :func:`vitssl.index.groundtruth.read_ground_truth` reads), else every video is its own group. ``classes``
    are the group labels, ``targets`` each item's group index.

    Args:
        root: the folder of videos.
        split: the list file's stem; ignored when no list file exists.
        ground_truth: a near-duplicate ground-truth file whose query/positive sets group the videos.
    """

    def __init__(
        self, root: str | os.PathLike | None = None, split: str = "train", ground_truth: str | None = None
    ) -> None:
        if root is None:
            raise DataError("video_files needs data.*.root: a folder of videos (with <split>.txt lists, optional)")
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingFileError(f"video_files: root {self.root} is not a folder of videos")
        lists = [self.root / f"{split}{ext}" for ext in (".txt", ".csv", ".tsv")]
        found = next((p for p in lists if p.is_file()), None)
        rows: list[tuple[str, str | None]] = []
        if found is None:
            rows = [(rel, None) for rel in _list_videos(self.root)]
        else:
            for number, line in enumerate(found.read_text().splitlines(), 1):
                parts = line.replace(",", " ").split()
                if not parts or parts[0].startswith("#"):
                    continue
                if len(parts) > 2:
                    raise DataError(f"{found}:{number}: expected 'path [group]', got {line.strip()!r}")
                rows.append((parts[0], parts[1] if len(parts) == 2 else None))
        if not rows:
            raise DataError(
                f"video_files: no videos in {found or self.root} (extensions {', '.join(VIDEO_EXTENSIONS)})"
            )
        self.samples = [str(self.root / rel) for rel, _ in rows]
        labels = [g for _, g in rows]
        if ground_truth is not None and all(g is None for g in labels):
            labels = _groups_from_ground_truth(ground_truth, self.samples)
        labels = [s if g is None else g for s, g in zip(self.samples, labels, strict=True)]
        self.classes = sorted(set(labels))
        index = {g: i for i, g in enumerate(self.classes)}
        self.targets = [index[g] for g in labels]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.samples[index], self.targets[index]

    def sample_id(self, index: int) -> str:
        return self.samples[index]

    def __repr__(self) -> str:
        return f"VideoFiles(root={str(self.root)!r}, len={len(self)}, groups={len(self.classes)})"


def _groups_from_ground_truth(path: str, samples: Sequence[str]) -> list[str | None]:
    """Each sample's group: the first query whose set (the query and its positives) holds it, else None."""
    from vitssl.eval.retrieval_metrics import match_ids, read_ground_truth

    gt = read_ground_truth(path)
    ids = set(gt.queries) | {p for ps in gt.positives.values() for p in ps}
    matched = match_ids(ids, samples)
    group: dict[str, str] = {}
    for q in gt.queries:
        for member in [q, *sorted(gt.positives.get(q, ()))]:
            if member in matched:
                group.setdefault(matched[member], f"gt:{q}")
    return [group.get(s) for s in samples]


@dataclass
class ViewParams:
    """How a training view is drawn from a video's frame-feature sequence."""

    crop: tuple[float, float] = (0.5, 1.0)  # temporal crop length as a fraction of the video
    speed: tuple[float, float] = (0.5, 2.0)  # frame-rate change: frames advanced per output frame (log-uniform)
    drop_p: float = 0.1  # probability of dropping each frame after resampling
    max_frames: int = 300  # frames kept (a random window beyond it); the padded length of every view


def draw_view(n: int, p: ViewParams, rng: np.random.RandomState | Any = np.random) -> np.ndarray:
    """Frame indices (into a video of ``n`` frames) of one augmented view, in time order, at least one.

    Args:
        n: frames in the video.
        p: view parameters.
        rng: numpy generator with ``uniform``, ``randint`` and ``random_sample`` (default: the global one).
    """
    length = max(1, round(n * rng.uniform(*p.crop)))
    start = rng.randint(0, n - length + 1)
    speed = math.exp(rng.uniform(math.log(p.speed[0]), math.log(p.speed[1])))
    idx = start + np.floor(np.arange(0.0, length, speed)).astype(np.int64)  # skip (speed > 1) or repeat frames
    keep = rng.random_sample(len(idx)) >= p.drop_p
    if keep.any():
        idx = idx[keep]
    else:
        idx = idx[rng.randint(0, len(idx)) :][:1]
    if len(idx) > p.max_frames:
        first = rng.randint(0, len(idx) - p.max_frames + 1)
        idx = idx[first : first + p.max_frames]
    return idx


class FeatureViews:
    """Sample function ``(video path, group) -> ((frames1, valid1), (frames2, valid2), group)`` over cached features.

    Frame features are rows of a ``.npy`` file (opened memory-mapped in each worker) with ``(V + 1,)`` offsets;
    views are padded to ``max_frames`` rows of zeros, ``valid`` marking real frames. With ``group_positive_p``
    the second view comes from another video of the same group when the group has one.

    Args:
        frames_file: ``(rows, D)`` float32 features of every training video, concatenated.
        offsets: ``(V + 1,)`` row offsets; video v is rows ``offsets[v]:offsets[v+1]``.
        paths: the V video paths, in the same order.
        groups: the V group indices.
        params: view parameters.
        group_positive_p: probability of drawing the second view from another member of the group.
    """

    def __init__(
        self,
        frames_file: str | Path,
        offsets: np.ndarray,
        paths: Sequence[str],
        groups: Sequence[int],
        params: ViewParams,
        group_positive_p: float = 0.0,
    ) -> None:
        self.frames_file = str(frames_file)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.paths = [str(p) for p in paths]
        self.row = {p: i for i, p in enumerate(self.paths)}
        self.groups = np.asarray(groups, dtype=np.int64)
        members: dict[int, list[int]] = {}  # the readable videos of each group (unreadable ones own no rows)
        readable = np.diff(self.offsets) > 0
        for i, g in enumerate(self.groups.tolist()):
            if readable[i]:
                members.setdefault(g, []).append(i)
        self.members = members
        self.params = params
        self.group_positive_p = group_positive_p
        self._frames: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_frames": None}  # each worker maps the file itself

    def video(self, i: int) -> np.ndarray:
        """The raw frame features ``(n_i, D)`` of video ``i``."""
        if self._frames is None:
            self._frames = np.load(self.frames_file, mmap_mode="r")
        return np.asarray(self._frames[self.offsets[i] : self.offsets[i + 1]], dtype=np.float32)

    def _view(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.video(i)  # (n, D)
        if len(feats) == 0:
            from vitssl.video.io import CorruptVideoError

            raise CorruptVideoError(
                f"training video {self.paths[i]} could not be read when its features were extracted"
            )
        idx = draw_view(len(feats), self.params)
        out = np.zeros((self.params.max_frames, feats.shape[1]), dtype=np.float32)  # (L, D)
        out[: len(idx)] = feats[idx]
        valid = np.zeros(self.params.max_frames, dtype=bool)  # (L,)
        valid[: len(idx)] = True
        return torch.from_numpy(out), torch.from_numpy(valid)

    def __call__(self, path: str, group: int) -> tuple[Any, Any, int]:
        try:
            i = self.row[str(path)]
        except KeyError:
            raise DataError(f"video {path} has no cached frame features; it was not a training video") from None
        j = i
        others = [m for m in self.members.get(int(self.groups[i]), ()) if m != i]
        if others and np.random.random_sample() < self.group_positive_p:
            j = others[np.random.randint(0, len(others))]
        return self._view(i), self._view(j), int(self.groups[i])

    def __repr__(self) -> str:
        return f"FeatureViews({self.frames_file!r}, videos={len(self.row)}, {self.params})"


# ---------------------------------------------------------------------------------------------------------
# objective
# ---------------------------------------------------------------------------------------------------------


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
    loss: str = "infonce"  # infonce | circle (the official code's default)
    temperature: float = 0.07  # InfoNCE τ
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


def _check_config(c: Any) -> None:
    if c.loss not in LOSSES:
        raise ConfigError(f"objective.loss={c.loss!r}; choose one of {', '.join(LOSSES)}")
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

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """EMA of the key encoder (only with ``key_momentum > 0``; at 0 the query encoder makes the keys)."""
        if self.key_encoder is not None:
            m = self.cfg.key_momentum
            torch._foreach_lerp_(list(self.key_encoder.parameters()), list(self.encoder.parameters()), 1.0 - m)

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
        self._views = FeatureViews(out / FRAMES_FILE, offsets, paths, groups, params, c.group_positive_p)

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


# ---------------------------------------------------------------------------------------------------------
# embedding with a trained checkpoint
# ---------------------------------------------------------------------------------------------------------


class TCAEmbedder:
    """Video vectors and frame outputs of a ``video_tca`` checkpoint (frame backbone, PCA, encoder, in eval mode).

    Attributes ``fps``, ``num_frames`` (the sampling the encoder learnt on), ``transform`` (the frame transform's
    description) and ``backbone`` (the frozen frame backbone) describe it.

    Args:
        objective: a trained :class:`VideoTCA`.
        cfg: its run config (data settings give the frame transform).
        device: where it runs.
        max_batch_frames: padded frames per encoder batch (videos are batched by length up to this).
    """

    def __init__(self, objective: VideoTCA, cfg: Any, device: torch.device | str = "cpu", max_batch_frames: int = 4096):
        self.objective = objective.to(device).eval()
        self.cfg = cfg
        self.device = torch.device(device)
        self.max_batch_frames = int(max_batch_frames)
        self.fps = float(objective.cfg.fps)
        self.num_frames = objective.cfg.num_frames
        self.backbone = objective.backbone
        self._frame_model: Any = None

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> TCAEmbedder:
        """Load a ``video_tca`` training checkpoint.

        Raises:
            CheckpointError: the file is missing, truncated or not a vitssl checkpoint.
            ConfigError: it holds another objective.
        """
        from vitssl.distributed import resolve_device
        from vitssl.engine import load_objective

        def check(cfg: Any) -> None:
            if cfg.objective.name != "video_tca":
                raise ConfigError(
                    f"checkpoint {path} was trained with objective {cfg.objective.name!r}, not video_tca; index it "
                    "as a frame model (mean of frames) instead"
                )

        device = resolve_device(device)
        objective, cfg, _ = load_objective(path, device, check=check)
        return cls(objective, cfg, device)

    @property
    def frame_model(self) -> Any:
        """The frame backbone as a frame model (the transform of training)."""
        if self._frame_model is None:
            self._frame_model = self.objective.frame_model(self.cfg.data)
        return self._frame_model

    @property
    def transform(self) -> str:
        return f"tca(frames={self.frame_model.transform})"

    def frame_features(
        self,
        paths: Sequence[str],
        cache_dir: str | os.PathLike | None = None,
        skip_corrupt: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> list[np.ndarray | None]:
        """Raw frame features ``(n_i, D)`` of video files through the checkpoint's frame backbone (cached)."""
        from vitssl.video.frames import video_frame_features

        c = self.objective.cfg
        return video_frame_features(
            self.frame_model, list(paths), fps=c.fps, num_frames=c.num_frames, cache_dir=cache_dir,
            batch_size=c.frame_batch_size, skip_corrupt=skip_corrupt, progress=progress,
        )  # fmt: skip

    @torch.no_grad()
    def embed(self, frames: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Embed raw frame features (before the PCA, as the frame backbone gives them).

        Args:
            frames: one ``(n_i, D)`` array per video, ``n_i >= 1``.

        Returns:
            ``(video vectors (N, E) float32, frame outputs [(n_i, E) float32])``, all rows L2-normalised.
        """
        n = len(frames)
        dim = self.objective.encoder.dim
        vectors = np.zeros((n, dim), dtype=np.float32)
        outs: list[np.ndarray] = [np.zeros((0, dim), np.float32)] * n
        lengths = [len(f) for f in frames]
        if any(length == 0 for length in lengths):
            raise DataError("every video needs at least one frame feature to embed")
        order = np.argsort(lengths, kind="stable")
        start = 0
        while start < n:  # batches of similar lengths, at most max_batch_frames padded frames each
            stop = start + 1
            while stop < n and (stop + 1 - start) * lengths[order[stop]] <= self.max_batch_frames:
                stop += 1
            rows = order[start:stop]
            t = lengths[rows[-1]]
            x = torch.zeros(len(rows), t, frames[rows[0]].shape[1])  # (b, T, D)
            valid = torch.zeros(len(rows), t, dtype=torch.bool)  # (b, T)
            for j, r in enumerate(rows):
                x[j, : lengths[r]] = torch.as_tensor(np.asarray(frames[r], dtype=np.float32))
                valid[j, : lengths[r]] = True
            video, out = self.objective.encode(x.to(self.device), valid.to(self.device))  # (b, E), (b, T, E)
            video, out = video.float().cpu().numpy(), out.float().cpu().numpy()
            for j, r in enumerate(rows):
                vectors[r] = video[j]
                outs[r] = np.ascontiguousarray(out[j, : lengths[r]])
            start = stop
        return vectors, outs

    def embed_videos(
        self, paths: Sequence[str], cache_dir: str | os.PathLike | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Embed video files: frames at the checkpoint's rate through its frame backbone, then :meth:`embed`.

        Raises:
            CorruptVideoError / MissingFileError: an unreadable video (the message names it).
        """
        raw = self.frame_features(paths, cache_dir=cache_dir)
        return self.embed([f for f in raw if f is not None])
