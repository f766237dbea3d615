"""Frame-level features of whole videos: sampling at a rate, a frozen image model per frame, a cache, PCA whitening.

Video retrieval (near-duplicate search, TCA) describes a video by features of frames sampled at a fixed rate
(TCA: 1 frame per second) or a fixed count, each frame run through a frozen image backbone:

- :func:`sample_frames` picks and decodes the frames (uint8 ``(T, H, W, 3)`` and their timestamps).
- Frame models: an :class:`~vitssl.eval.features.EvalModel` (any vitssl checkpoint: its evaluation transform and
  feature layer), :class:`BackboneFrameModel` (an exported ``backbone.safetensors`` with the standard evaluation
  transform), :class:`ModuleFrameModel` (a backbone module in memory, e.g. a video objective's frozen frame
  backbone) or :class:`ThumbnailModel` (raw downscaled frames, no network: the baseline of near-duplicate
  search). :func:`load_frame_model` picks one from a path or ``thumbnails[:size=N]``.
- :func:`video_frame_features` gives one float32 ``(n_i, D)`` array per video, cached per video in
  ``cache_dir`` under a key of the model's weights digest, its transform and layer, the sampling and the file's
  identity (absolute path, size, modification time), like the image feature cache: a changed file, model or
  sampling is extracted again, anything else is read back without decoding a frame.
- :class:`PCAWhitening` fits faiss's ``PCAMatrix`` with eigenvalue power -0.5 on training frames (TCA whitens
  to 1024 dimensions) and applies it to any frame features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from vitssl.errors import DataError, MissingFileError

_logger = logging.getLogger(__name__)

FRAME_CACHE_FORMAT = 1  # bump when the cached arrays or a key part change meaning
THUMBNAILS = "thumbnails"  # load_frame_model's name of the no-network baseline
DEFAULT_THUMBNAIL_SIZE = 8
_DEFAULT_VIDEO_FPS = 25.0  # assumed when a container states no frame rate


# --------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------


def frame_positions(
    num_frames_in_video: int, video_fps: float, *, fps: float = 1.0, num_frames: int | None = None
) -> np.ndarray:
    """Frame indices to decode: ``num_frames`` segment centres, else one frame every ``1 / fps`` seconds.

    Args:
        num_frames_in_video: decodable frames n.
        video_fps: the video's frame rate (0 or less: 25 is assumed).
        fps: frames per second to sample (used when ``num_frames`` is None).
        num_frames: a fixed count: the centres of ``num_frames`` equal segments (repeats on short videos).

    Returns:
        (T,) int64 ascending indices, T >= 1.
    """
    n = int(num_frames_in_video)
    if n < 1:
        raise ValueError(f"a video needs at least one frame, got {n}")
    if num_frames is not None:
        if num_frames < 1:
            raise DataError(f"num_frames={num_frames} must be at least 1")
        centres = (np.arange(num_frames) + 0.5) * n / num_frames  # (T,)
        return np.minimum(np.floor(centres).astype(np.int64), n - 1)
    if not fps > 0:
        raise DataError(f"fps={fps} must be positive (frames sampled per second)")
    rate = float(video_fps) if video_fps and video_fps > 0 else _DEFAULT_VIDEO_FPS
    step = rate / fps  # video frames between two samples
    count = max(1, math.ceil(n / step - 1e-9))
    return np.minimum(np.floor(np.arange(count) * step + 1e-9).astype(np.int64), n - 1)


def sample_frames(
    path: str | os.PathLike, *, fps: float = 1.0, num_frames: int | None = None
) -> tuple[torch.Tensor, np.ndarray]:
    """Decode the frames of a video sampled at ``fps`` (or ``num_frames`` evenly spread ones).

    Args:
        path: a video file.
        fps: frames per second to keep (TCA: 1).
        num_frames: a fixed number of frames instead, the centres of equal segments.

    Returns:
        ``(frames uint8 (T, H, W, 3), timestamps (T,) float64 seconds)``.

    Raises:
        MissingFileError: no such file.
        CorruptVideoError: not a video, undecodable or damaged (decoding stops before the end the file states:
            frames sampled over the part that decodes would describe another video); names the file.
    """
    from vitssl.errors import SKIP_HINT
    from vitssl.video.io import CorruptVideoError, probe, read_frames

    info = probe(path)
    if info.damaged:
        raise CorruptVideoError(f"damaged video {info.path}: {info.error} ({SKIP_HINT})")
    positions = frame_positions(info.num_frames, info.fps, fps=fps, num_frames=num_frames)
    frames = read_frames(path, positions)  # (T, H, W, 3)
    rate = info.fps if info.fps > 0 else _DEFAULT_VIDEO_FPS
    return frames, positions.astype(np.float64) / rate


# --------------------------------------------------------------------------------------------------------------
# Frame models
# --------------------------------------------------------------------------------------------------------------


class FrameModel(Protocol):
    """What :func:`video_frame_features` needs of a model (:class:`~vitssl.eval.features.EvalModel` has it)."""

    checkpoint_hash: str  # digest of the weights (part of the cache key)
    transform: str  # description of the per-frame transform (part of the cache key)
    device: torch.device
    sample_fn: Callable[[Any, Any], Any]  # (PIL image, target) -> (tensor (C, H, W), target)

    def feature_fn(self, layer: str) -> Callable[[torch.Tensor], torch.Tensor]: ...


class ThumbnailModel:
    """Raw downscaled frames as features, no network: each frame shrunk to ``size x size`` RGB (area average),
    flattened and centred on its own mean (so a uniform brightness shift changes nothing), 3 x size^2 values.

    Args:
        size: thumbnail side in pixels.
    """

    def __init__(self, size: int = DEFAULT_THUMBNAIL_SIZE) -> None:
        if size < 1:
            raise DataError(f"thumbnail size {size} must be at least 1")
        self.size = int(size)
        self.checkpoint_hash = f"{THUMBNAILS}-{self.size}"
        self.transform = f"thumbnail(size={self.size}, box filter, RGB, mean-centred)"
        self.device = torch.device("cpu")
        self.path = Path(f"{THUMBNAILS}:size={self.size}")
        self.objective_name = THUMBNAILS

    def sample_fn(self, image: Any, target: Any) -> tuple[torch.Tensor, Any]:
        from PIL import Image

        small = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BOX)
        return torch.from_numpy(np.asarray(small, dtype=np.float32).copy()).permute(2, 0, 1), target  # (3, s, s)

    def feature_fn(self, layer: str = "pooled") -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(images: torch.Tensor) -> torch.Tensor:
            flat = images.flatten(1)  # (B, 3·s·s)
            return flat - flat.mean(dim=1, keepdim=True)  # (B, 3·s·s)

        return fn

    def feature_key(self, layer: str = "pooled") -> str:
        return json.dumps({"layer": layer, "transform": self.transform}, sort_keys=True)


def _built_size(module: torch.nn.Module) -> int | None:
    """The square input size a backbone is built for (its ``img_size`` attribute, an int or ``(H, W)``), or None."""
    own = getattr(module, "img_size", None)
    if isinstance(own, (tuple, list)):
        own = own[0] if own and all(v == own[0] for v in own) else None
    return int(own) if own else None


class BackboneFrameModel:
    """An exported ``backbone.safetensors`` as a frame model: resize, centre crop ``img_size``, ImageNet
    normalisation, the backbone's pooled embedding.

    Args:
        path: the file written by ``vitssl.backbones.save_backbone`` (the trainer exports one per run).
        device: ``auto``, ``cpu``, ``cuda`` or a torch device.
        img_size: input size; default the one the backbone was saved with (its ``img_size`` kwarg), else the
            size the recorded model is built for (its ``img_size`` attribute).

    Raises:
        MissingFileError: no such file.
        DataError: not a backbone file, or neither the file nor its model says the input size (pass ``img_size``).
    """

    def __init__(
        self, path: str | os.PathLike, device: torch.device | str = "cpu", img_size: int | None = None
    ) -> None:
        from vitssl.backbones import load_backbone, read_backbone_metadata
        from vitssl.data.transforms import eval_transform
        from vitssl.distributed import resolve_device
        from vitssl.eval.features import checkpoint_sha256
        from vitssl.ssl.base import ImageTransform

        self.path = Path(path).absolute()
        if not self.path.is_file():
            raise MissingFileError(f"backbone file {self.path} not found; pass a backbone.safetensors a run exported")
        try:
            meta = read_backbone_metadata(self.path)
        except ValueError as err:
            raise DataError(str(err)) from None
        self.device = resolve_device(device)
        self.backbone = load_backbone(self.path).to(self.device).eval().requires_grad_(False)
        size = int(img_size or meta["kwargs"].get("img_size") or _built_size(self.backbone) or 0)
        if size < 1:
            raise DataError(
                f"backbone file {self.path} records no input size and its model {meta['name']!r} has no img_size; "
                "pass img_size=N (the size it was trained at)"
            )
        self.checkpoint_hash = checkpoint_sha256(self.path)
        self.sample_fn = ImageTransform(eval_transform(size, 1.0 if size < 96 else 256 / 224))
        from vitssl.eval.features import describe_transform

        self.transform = describe_transform(self.sample_fn)
        self.objective_name = f"backbone:{meta['name']}"

    def feature_fn(self, layer: str = "pooled") -> Callable[[torch.Tensor], torch.Tensor]:
        if layer != "pooled":
            raise DataError(f"an exported backbone gives its pooled embedding only; use layer pooled, not {layer!r}")
        return self.backbone

    def feature_key(self, layer: str = "pooled") -> str:
        return json.dumps({"layer": layer, "transform": self.transform}, sort_keys=True)


class ModuleFrameModel:
    """A backbone module in memory as a frame model (e.g. the frozen frame backbone of a video objective).

    Frames go through resize, centre crop ``img_size`` and normalisation (ImageNet statistics unless given), then
    the module's forward (its pooled embedding). The cache key's weights digest is a sha256 of its state dict.

    Args:
        module: the backbone, ``forward(x) -> (B, D)``.
        img_size: input size; default the module's ``img_size`` attribute, else 224.
        mean: normalisation mean; default ImageNet's.
        std: normalisation std; default ImageNet's.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        img_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        from vitssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
        from vitssl.eval.features import describe_transform
        from vitssl.ssl.base import ImageTransform

        self.module = module
        own = getattr(module, "img_size", None)
        size = int(img_size or (own[0] if isinstance(own, (tuple, list)) else own) or 224)
        ratio = 1.0 if size < 96 else 256 / 224
        self.sample_fn = ImageTransform(eval_transform(size, ratio, mean or IMAGENET_MEAN, std or IMAGENET_STD))
        self.transform = describe_transform(self.sample_fn)
        self.device = next((p.device for p in module.parameters()), torch.device("cpu"))
        digest = hashlib.sha256()
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        self.checkpoint_hash = digest.hexdigest()

    def feature_fn(self, layer: str = "pooled") -> Callable[[torch.Tensor], torch.Tensor]:
        if layer != "pooled":
            raise DataError(f"a backbone module gives its pooled embedding only; use layer pooled, not {layer!r}")
        module = self.module

        def fn(images: torch.Tensor) -> torch.Tensor:
            was_training = module.training
            module.eval()
            try:
                return module(images)  # (B, D)
            finally:
                module.train(was_training)

        return fn


def load_frame_model(spec: str | os.PathLike, device: torch.device | str = "cpu") -> Any:
    """A frame model from ``thumbnails[:size=N]``, a ``.safetensors`` backbone or a vitssl checkpoint.

    Raises:
        MissingFileError: the file does not exist.
        CheckpointError: the checkpoint is unreadable.
    """
    text = str(spec)
    if text == THUMBNAILS or text.startswith(THUMBNAILS + ":"):
        _, _, rest = text.partition(":")
        size = DEFAULT_THUMBNAIL_SIZE
        if rest:
            key, _, value = rest.partition("=")
            if key != "size" or not value.isdigit():
                raise DataError(f"frame model {text!r}: write thumbnails or thumbnails:size=N (N pixels a side)")
            size = int(value)
        return ThumbnailModel(size)
    path = Path(text)
    if not path.is_file():
        raise MissingFileError(
            f"frame model {text!r} is not a file; pass a vitssl checkpoint, a backbone.safetensors or 'thumbnails'"
        )
    if path.suffix == ".safetensors":
        return BackboneFrameModel(path, device)
    from vitssl.eval.features import EvalModel

    return EvalModel(path, device)


# --------------------------------------------------------------------------------------------------------------
# Extraction and cache
# --------------------------------------------------------------------------------------------------------------


def _file_identity(path: str) -> dict[str, Any]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MissingFileError(f"video file not found: {path}; check the path") from None
    return {"path": os.path.abspath(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def frame_cache_key(
    model: Any, path: str | os.PathLike, layer: str, fps: float, num_frames: int | None
) -> dict[str, Any]:
    """The key of one video's cached frame features (see the module doc)."""
    return {
        "format": FRAME_CACHE_FORMAT,
        "checkpoint_sha256": model.checkpoint_hash,
        "transform": model.transform,
        "layer": layer,
        "sampling": {"fps": None if num_frames is not None else float(fps), "num_frames": num_frames},
        "file": _file_identity(str(path)),
    }


def frame_cache_path(cache_dir: str | os.PathLike, key: dict[str, Any]) -> Path:
    """``<cache_dir>/<video stem>-<key digest>.npz``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(key["file"]["path"]).stem)[:40]
    return Path(cache_dir) / f"{stem}-{digest}.npz"


def _read_cached(path: Path, key: dict[str, Any]) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if json.loads(str(data["key"])) != key:
                return None
            return np.asarray(data["features"], dtype=np.float32)
    except (OSError, ValueError, KeyError) as err:
        _logger.warning("frame cache %s is unreadable (%s); extracting again", path, err)
        return None


def _write_cached(path: Path, key: dict[str, Any], features: np.ndarray, timestamps: np.ndarray) -> None:
    from vitssl.io import atomic_open

    with atomic_open(path, "wb") as f:
        np.savez(f, features=features, timestamps=timestamps, key=np.asarray(json.dumps(key, sort_keys=True)))


@torch.no_grad()
def _embed_frames(
    model: Any, fn: Callable[[torch.Tensor], torch.Tensor], frames: torch.Tensor, batch_size: int
) -> np.ndarray:
    from PIL import Image

    out = []
    for start in range(0, len(frames), batch_size):
        batch = [model.sample_fn(Image.fromarray(f.numpy()), -1)[0] for f in frames[start : start + batch_size]]
        x = torch.stack(batch).to(model.device)  # (b, C, H, W)
        out.append(fn(x).float().cpu().numpy())  # (b, D)
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)  # (T, D)


def video_frame_features(
    model: Any,
    paths: Sequence[str | os.PathLike],
    *,
    fps: float = 1.0,
    num_frames: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    layer: str = "pooled",
    skip_corrupt: bool = False,
    progress: Callable[[int], None] | None = None,
) -> list[np.ndarray | None]:
    """Frame features of each video: frames sampled by :func:`sample_frames`, each through the frozen model.

    Args:
        model: a frame model (:class:`~vitssl.eval.features.EvalModel`, :class:`BackboneFrameModel`,
            :class:`ThumbnailModel`; see :class:`FrameModel`), a backbone module (wrapped in
            :class:`ModuleFrameModel`), or what :func:`load_frame_model` loads one from.
        paths: video files.
        fps: frames per second to sample.
        num_frames: a fixed number of frames per video instead.
        cache_dir: keep each video's features here (see the module doc); None: no cache.
        batch_size: frames per forward pass.
        layer: the model's feature layer (``pooled``, ``cls``, ``mean``, ``lastN`` for checkpoints).
        skip_corrupt: give None for an unreadable video (and log it) instead of raising.
        progress: called with 1 after each video.

    Returns:
        One float32 ``(n_i, D)`` array per video, in order (None for skipped corrupt videos).

    Raises:
        CorruptVideoError: an unreadable video (without ``skip_corrupt``); the message names it.
        MissingFileError: a video file that does not exist (without ``skip_corrupt``).
    """
    from vitssl.data.common import CorruptImageError

    if isinstance(model, (str, os.PathLike)):
        model = load_frame_model(model)
    elif isinstance(model, torch.nn.Module):
        model = ModuleFrameModel(model)
    fn = model.feature_fn(layer)
    out: list[np.ndarray | None] = []
    for path in paths:
        path = str(path)
        try:
            key = frame_cache_key(model, path, layer, fps, num_frames) if cache_dir is not None else None
            cached = _read_cached(frame_cache_path(cache_dir, key), key) if key is not None else None
            if cached is None:
                frames, stamps = sample_frames(path, fps=fps, num_frames=num_frames)
                cached = _embed_frames(model, fn, frames, batch_size)
                if key is not None:
                    _write_cached(frame_cache_path(cache_dir, key), key, cached, stamps)
            out.append(cached)
        except (CorruptImageError, MissingFileError) as err:
            if not skip_corrupt:
                raise
            _logger.warning("skipping %s: %s", path, err)
            out.append(None)
        if progress is not None:
            progress(1)
    skipped = [str(p) for p, f in zip(paths, out) if f is None]
    if skipped:
        _logger.warning("skipped %d of %d unreadable or damaged videos: %s", len(skipped), len(out), ", ".join(skipped))
    return out


# --------------------------------------------------------------------------------------------------------------
# PCA whitening
# --------------------------------------------------------------------------------------------------------------


class PCAWhitening:
    """PCA to ``d_out`` dimensions with whitening (each component divided by the square root of its eigenvalue),
    faiss's ``PCAMatrix(d_in, d_out, eigen_power=-0.5)`` as TCA uses it. The outputs are centred and
    uncorrelated with equal variances; faiss takes the eigenvalues of the scatter matrix (not divided by the N
    training frames), so that variance is 1/N rather than 1, which cosine and chamfer similarity ignore.

    Args:
        d_out: output width (at most the input width, and at most the number of training frames).
        d_in: input width; None: taken from the frames :meth:`fit` gets.
    """

    EIGEN_POWER = -0.5

    def __init__(self, d_out: int, d_in: int | None = None) -> None:
        if d_out < 1 or (d_in is not None and d_out > d_in):
            raise DataError(f"PCA whitening to {d_out} dimensions needs 1 <= d_out <= d_in = {d_in}")
        self.d_out = int(d_out)
        self.d_in = None if d_in is None else int(d_in)
        self._pca: Any = None

    @property
    def is_trained(self) -> bool:
        return self._pca is not None and bool(self._pca.is_trained)

    def fit(self, frames: np.ndarray | Sequence[np.ndarray]) -> PCAWhitening:
        """Fit on training frame features: an ``(N, d_in)`` array or a list of per-video arrays."""
        from vitssl._faiss import faiss

        x = np.concatenate(list(frames)) if not isinstance(frames, np.ndarray) else frames
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or (self.d_in is not None and x.shape[1] != self.d_in):
            raise DataError(f"PCA whitening fits (N, {self.d_in or 'D'}) frame features, got shape {x.shape}")
        if x.shape[1] < self.d_out:
            raise DataError(
                f"PCA whitening to {self.d_out} dimensions needs features at least that wide, got {x.shape[1]}; "
                "whiten to fewer dimensions"
            )
        if x.shape[0] < self.d_out:
            raise DataError(
                f"PCA whitening to {self.d_out} dimensions needs at least {self.d_out} training frames, got "
                f"{x.shape[0]}; sample more frames (higher fps, more videos) or whiten to fewer dimensions"
            )
        self.d_in = int(x.shape[1])
        self._pca = faiss.PCAMatrix(self.d_in, self.d_out, self.EIGEN_POWER)
        self._pca.train(x)
        return self

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Whitened ``(N, d_out)`` float32 features of ``(N, d_in)`` ones."""
        if not self.is_trained:
            raise DataError("PCA whitening is not fitted; call fit(training frames) or load(path) first")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise DataError(f"PCA whitening maps (N, {self.d_in}) features, got shape {x.shape}")
        if len(x) == 0:
            return np.zeros((0, self.d_out), dtype=np.float32)
        return self._pca.apply(x)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted matrix (faiss's VectorTransform format), atomically."""
        from vitssl._faiss import faiss
        from vitssl.io import atomic_path

        if not self.is_trained:
            raise DataError("PCA whitening is not fitted; fit it before saving")
        path = Path(path)
        with atomic_path(path) as tmp:
            faiss.write_VectorTransform(self._pca, str(tmp))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> PCAWhitening:
        """Read a matrix written by :meth:`save`.

        Raises:
            MissingFileError: no such file.
            DataError: the file is not a fitted PCA matrix.
        """
        from vitssl._faiss import faiss

        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"PCA whitening file {path} not found; fit one and save it there")
        try:
            raw = faiss.read_VectorTransform(str(path))  # owns the C++ object: kept alive with its downcast
            vt = faiss.downcast_VectorTransform(raw)
        except RuntimeError as err:
            raise DataError(f"{path} is not a faiss PCA matrix ({str(err).splitlines()[-1][:200]})") from None
        if not isinstance(vt, faiss.PCAMatrix) or not vt.is_trained:
            raise DataError(f"{path} holds a {type(vt).__name__}, not a fitted PCA matrix")
        out = cls.__new__(cls)
        out.d_in, out.d_out, out._pca, out._owner = int(vt.d_in), int(vt.d_out), vt, raw
        return out


__all__ = [
    "THUMBNAILS",
    "BackboneFrameModel",
    "FrameModel",
    "ModuleFrameModel",
    "PCAWhitening",
    "ThumbnailModel",
    "frame_cache_key",
    "frame_cache_path",
    "frame_positions",
    "load_frame_model",
    "sample_frames",
    "video_frame_features",
]
