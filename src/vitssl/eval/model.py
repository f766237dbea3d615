"""A checkpoint loaded for frozen-feature evaluation: its content hash, evaluation transform and feature layers.

Layers (DINO's options), ``--layer``:

- ``pooled``: the objective's ``eval_features`` (the backbone's pooled embedding; for iGPT its probe layer);
- ``cls``: the class token of the last block, after the final norm;
- ``mean``: the mean of the last block's patch tokens (prefix tokens left out), after the final norm;
- ``lastN`` (``last4``): the class tokens of the last N blocks, each through the final norm, concatenated oldest
  first (DINO's ``n_last_blocks``), so the width is N x ``num_features``;
- ``lastNavg`` (``last4avg``): ``lastN`` followed by the mean of the last block's patch tokens, width
  (N + 1) x ``num_features``: DINOv2's linear-evaluation input, from which every one of its feature variants
  (last 1 or N class tokens, with or without the pooled patch tokens) is a choice of columns
  (:func:`vitssl.eval.sweep.layer_variants`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitssl.config import ConfigError
from vitssl.distributed import resolve_device
from vitssl.eval.extract import corrupt_sample_error
from vitssl.eval.spec import parse_layer
from vitssl.io import atomic_write

_logger = logging.getLogger(__name__)

_HASH_BLOCK = 1 << 22
# Digests of checkpoint files already hashed by this process: (path, device, inode, size, mtime_ns) -> sha256.
_HASHES: dict[tuple[str, int, int, int, int], str] = {}


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint file, streamed; remembered per (file identity, size, mtime).

    The digest is kept in this process and in a hidden sidecar ``.<name>.sha256.json`` next to the file (when
    the folder is writable), so later runs do not read the file again until it changes.

    Args:
        path: the file.
    """
    path = Path(path)
    st = path.stat()
    ident = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if ident in _HASHES:
        return _HASHES[ident]
    sidecar = path.with_name(f".{path.name}.sha256.json")
    stamp = {"inode": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        saved = json.loads(sidecar.read_text())
        if {k: saved.get(k) for k in stamp} == stamp and isinstance(saved.get("sha256"), str):
            _HASHES[ident] = saved["sha256"]
            return saved["sha256"]
    except (OSError, ValueError):
        pass  # no sidecar yet, or an unreadable one: hash the file
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            digest.update(block)
    value = digest.hexdigest()
    _HASHES[ident] = value
    try:
        atomic_write(sidecar, json.dumps({**stamp, "sha256": value}) + "\n")
    except OSError:
        _logger.debug("cannot write %s; the digest is kept in this process only", sidecar)
    return value


def load_for_eval(checkpoint_path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[Any, Any, str]:
    """Rebuild a checkpoint's objective for evaluation, in eval mode on ``device``.

    Works for every objective: ``objective.eval_sample_fn(cfg.data)`` is the checkpoint's evaluation transform
    and ``objective.eval_features(images)`` its default features (for iGPT, the probe layer).

    Args:
        checkpoint_path: an engine checkpoint.
        device: where the model goes.

    Returns:
        ``(objective, cfg, checkpoint sha256)``.

    Raises:
        CheckpointError: the file is missing, truncated or not a vitssl checkpoint.
    """
    from vitssl.engine import CheckpointError, load_objective
    from vitssl.engine.checkpoint import resolve_checkpoint

    checkpoint_path = resolve_checkpoint(checkpoint_path)  # a run folder: its checkpoint_last.pth (hashed below)
    try:
        objective, cfg, _ = load_objective(checkpoint_path, device)
    except CheckpointError as err:
        raise eval_checkpoint_error(err, checkpoint_path) from None
    objective.requires_grad_(False)
    return objective, cfg, checkpoint_sha256(checkpoint_path)


def eval_checkpoint_error(err: Exception, path: str | os.PathLike) -> Exception:
    """The engine's error about an unreadable checkpoint, with the fix that applies to evaluation.

    The engine suggests ``resume=auto`` for a truncated checkpoint, a training setting; an evaluation command
    needs another file instead, so the message names one (the newest other checkpoint of the run folder).
    Other checkpoint errors are returned unchanged.

    Args:
        err: the ``CheckpointError`` raised while loading ``path``.
        path: the checkpoint given.
    """
    from vitssl.engine import CheckpointError

    text = str(err)
    if "truncated or corrupt" not in text and "resume=auto" not in text:
        return err
    path = Path(path)
    reason = getattr(err, "reason", None)  # the loader's short reason (empty file, zip cut short, ...)
    why = f" ({reason})" if reason else ""
    others = sorted(
        (p for p in path.parent.glob("checkpoint_*.pth") if p.is_file() and p.resolve() != path.resolve()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    example = str(others[0]) if others else f"an earlier checkpoint_<step>.pth in {path.parent}"
    return CheckpointError(f"checkpoint {path} is truncated or corrupt{why}; pass another checkpoint, e.g. {example}")


def _has_class_token(backbone: Any) -> bool:
    inner = getattr(backbone, "model", None)
    # timm ViTs with registers but no class token have prefix tokens that are not a class token
    return int(getattr(backbone, "num_prefix_tokens", 0)) > 0 and bool(getattr(inner, "has_class_token", True))


def check_layer(objective: Any, layer: str, in_chans: int | None = None) -> None:
    """Fail early, naming the fix, when ``objective``'s backbone cannot give ``layer``.

    Args:
        objective: an objective (its ``backbone`` is read).
        layer: a valid layer name.
        in_chans: channels of the evaluation transform's output (3 for RGB), when known.
    """
    if layer == "pooled":
        return
    bb = objective.backbone
    name = getattr(bb, "name", type(bb).__name__)
    bb_chans = getattr(bb, "in_chans", None)
    if in_chans is not None and bb_chans is not None and bb_chans != in_chans:
        raise ConfigError(
            f"--layer {layer} runs backbone {name!r} on the evaluation images ({in_chans} channels), but objective "
            f"{getattr(objective, 'name', '?')!r} feeds it {bb_chans}-channel inputs of its own (e.g. iGPT's token "
            "embeddings); use --layer pooled, the objective's own features (iGPT: objective.probe_layer)"
        )
    if (layer == "cls" or layer.startswith("last")) and not _has_class_token(bb):
        raise ConfigError(
            f"--layer {layer} needs a class token, and backbone {name!r} has none (num_prefix_tokens="
            f"{getattr(bb, 'num_prefix_tokens', 0)}); use --layer mean (mean of the last tokens) or pooled"
        )


def layer_features(objective: Any, images: torch.Tensor, layer: str) -> torch.Tensor:
    """Features (B, C) of one layer option for a batch of evaluation images.

    Args:
        objective: an objective in eval mode.
        images: a batch from its evaluation transform, (B, C_in, H, W).
        layer: ``pooled``, ``cls``, ``mean`` or ``lastN``.
    """
    if layer == "pooled":
        return objective.eval_features(images)  # (B, C)
    bb = objective.backbone
    prefix = int(getattr(bb, "num_prefix_tokens", 0))
    if layer == "cls":
        return bb.forward_tokens(images)[:, 0]  # (B, C)
    if layer == "mean":
        tokens = bb.forward_tokens(images)  # (B, P + N, C)
        return tokens[:, prefix:].mean(dim=1)  # (B, C)
    avg = layer.endswith("avg")
    n = int(layer[4:-3] if avg else layer[4:])
    outs = bb.forward_intermediate(images, n)  # n x (B, P + N, C), oldest first
    parts = [t[:, 0] for t in outs]  # n x (B, C)
    if avg:  # DINOv2: the mean of the last block's patch tokens after the class tokens
        parts.append(outs[-1][:, prefix:].mean(dim=1))  # (B, C)
    return torch.cat(parts, dim=-1)  # (B, (n + avg) * C)


_ADDRESS_RE = re.compile(r" at 0x[0-9a-fA-F]+")


def describe_transform(sample_fn: Any, _depth: int = 0) -> str:
    """A stable text description of an evaluation transform (part of the cache key).

    torchvision transforms describe themselves (``repr``); a wrapper without its own ``__repr__`` is described by
    its class and attributes, and memory addresses are dropped, so the text is the same in every process.
    """
    text = repr(sample_fn)
    if _depth < 4 and text.startswith("<") and " object at 0x" in text and hasattr(sample_fn, "__dict__"):
        cls = type(sample_fn)
        attrs = ", ".join(f"{k}={describe_transform(v, _depth + 1)}" for k, v in sorted(vars(sample_fn).items()))
        text = f"{cls.__module__}.{cls.__qualname__}({attrs})"
    return _ADDRESS_RE.sub("", text)


class EvalModel:
    """A checkpoint loaded for frozen-feature evaluation: objective, config, content hash, transform.

    Args:
        checkpoint: an engine checkpoint path, or a run folder (its ``checkpoint_last.pth``).
        device: ``auto`` (this rank's GPU if any), ``cpu``, ``cuda`` or a torch device.
    """

    def __init__(self, checkpoint: str | os.PathLike, device: torch.device | str = "auto") -> None:
        from vitssl.engine.checkpoint import resolve_checkpoint

        self.path = resolve_checkpoint(checkpoint).absolute()  # a run folder: its checkpoint_last.pth
        self.device = resolve_device(device)
        self.objective, self.cfg, self.checkpoint_hash = load_for_eval(self.path, self.device)
        self.sample_fn = self.objective.eval_sample_fn(self.cfg.data)
        self.transform = describe_transform(self.sample_fn)

    @property
    def objective_name(self) -> str:
        return str(self.cfg.objective.name)

    def feature_fn(self, layer: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The batch -> (B, C) function of ``layer``, checked against the backbone first."""
        parse_layer(layer)
        check_layer(self.objective, layer, self._input_channels())

        def fn(images: torch.Tensor) -> torch.Tensor:
            try:
                return layer_features(self.objective, images, layer)
            except ValueError as err:  # e.g. last12 on a 6-block model: the backbone names the limit
                raise ConfigError(f"--layer {layer}: {err}") from None

        return fn

    def _input_channels(self) -> int | None:
        # RGB evaluation transforms give 3 channels; what matters is whether the backbone reads them directly.
        from PIL import Image

        probe = Image.new("RGB", (self.cfg.data.img_size, self.cfg.data.img_size))
        try:
            sample = self.sample_fn(probe, -1)[0]
        except Exception:  # a transform that needs real data cannot be probed; the forward pass will tell
            return None
        return int(sample.shape[0]) if isinstance(sample, torch.Tensor) and sample.ndim == 3 else None

    def feature_key(self, layer: str) -> str:
        """What the features of ``layer`` depend on besides the weights: recorded in retrieval manifests."""
        return json.dumps({"layer": layer, "transform": self.transform}, sort_keys=True)

    @torch.no_grad()
    def embed_images(self, paths: Sequence[str | os.PathLike], layer: str, batch_size: int = 64) -> np.ndarray:
        """Features (Q, C) float32 of image files, through the evaluation transform and ``layer``.

        Raises:
            CorruptSampleError: a file is missing or cannot be decoded (named).
        """
        from vitssl.data import CorruptImageError, open_rgb

        fn = self.feature_fn(layer)
        out = []
        for start in range(0, len(paths), batch_size):
            batch = []
            for path in paths[start : start + batch_size]:
                try:
                    batch.append(self.sample_fn(open_rgb(path), -1)[0])
                except CorruptImageError as err:  # a query image: nothing to skip, the user names another file
                    raise corrupt_sample_error(err, hint="") from None
            out.append(fn(torch.stack(batch).to(self.device)).float().cpu().numpy())  # (b, C)
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


__all__ = [
    "EvalModel",
    "check_layer",
    "checkpoint_sha256",
    "describe_transform",
    "eval_checkpoint_error",
    "layer_features",
    "load_for_eval",
]
