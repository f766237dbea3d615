"""Frozen features of a checkpoint: extraction (every rank a shard, gathered back in dataset order) and a cache.

Layers (DINO's options), ``--layer``:

- ``pooled``: the objective's ``eval_features`` (the backbone's pooled embedding; for iGPT its probe layer);
- ``cls``: the class token of the last block, after the final norm;
- ``mean``: the mean of the last block's patch tokens (prefix tokens left out), after the final norm;
- ``lastN`` (``last4``): the class tokens of the last N blocks, each through the final norm, concatenated oldest
  first (DINO's ``n_last_blocks``), so the width is N x ``num_features``.

Cache. ``extract_cached`` keys a feature set by (checkpoint content hash, dataset name and options, split, layer,
the evaluation transform's description, corrupt-sample handling, row range) and keeps it in its own folder under
``cache_dir`` (default ``<checkpoint folder>/features/``)::

    <dataset>-<split>-<layer>-<key hash>/
        features.npy   (N, C) float32, dataset order
        labels.npy     (N,) int64 class labels, -1 for unlabelled data
        ids.json       N sample ids (file paths for file-backed sets, "digits/val/17" otherwise)
        meta.json      the key, the checkpoint path, classes, counts, timings, versions

A folder is written to a temporary sibling and renamed into place, so it is complete or absent. A later call
with the same key loads it with no backbone forward; any change of a key part extracts again into
a new folder.

Extraction has one loop (``_embed``), behind :func:`extract_rows` (untransformed datasets, the cache, the index
builder, zero-shot evaluation) and :func:`extract_features` (transformed datasets: the online k-NN monitor, the
demo). :class:`Progress` shows how far it is on rank 0: a bar on a terminal, a log line every ~10 % otherwise;
the linear probes use it too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vitssl import distributed as dist
from vitssl.config import ConfigError
from vitssl.distributed import resolve_device
from vitssl.errors import UserError
from vitssl.eval.spec import LAYER_HELP, parse_layer
from vitssl.io import atomic_dir, atomic_write

_logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the folder layout or the meaning of a key part changes
FEATURES_FILE = "features.npy"
LABELS_FILE = "labels.npy"
IDS_FILE = "ids.json"
META_FILE = "meta.json"
DEFAULT_CACHE_NAME = "features"  # <checkpoint folder>/features/
_HASH_BLOCK = 1 << 22
# Digests of checkpoint files already hashed by this process: (path, device, inode, size, mtime_ns) -> sha256.
_HASHES: dict[tuple[str, int, int, int, int], str] = {}
# What evaluation commands tell a user whose data holds an unreadable sample (the training fix, a config key,
# does not apply to them).
SKIP_CORRUPT_HINT = "pass --skip-corrupt to leave such samples out (they are counted and logged)"
# Streamed shard corpora (webdataset_stream) are embedded whole, in one job per command.
_STREAM_HINT = "embed it whole (no --shard/--shards/--train-only), or read it with the map-style 'webdataset'"


class FeatureCacheError(UserError, ValueError):
    """A feature folder is incomplete or inconsistent (its files disagree with each other or with meta.json)."""


class CorruptSampleError(UserError, RuntimeError):
    """A sample to evaluate cannot be read (undecodable or missing image); the message names it and the option
    that skips such samples."""


def corrupt_sample_error(err: BaseException, hint: str = SKIP_CORRUPT_HINT) -> CorruptSampleError:
    """The data layer's ``CorruptImageError`` with the fix of an evaluation command instead of the training one.

    The data layer's message ends in the config key a training run sets (``data.skip_corrupt=true``); evaluation
    commands take ``--skip-corrupt`` instead. A DataLoader worker re-raises the error with the worker's traceback
    as its message; the original message is its last line.

    Args:
        err: the ``CorruptImageError`` (or any error naming an unreadable sample).
        hint: what the user can do about it.
    """
    from vitssl.data.common import SKIP_HINT

    text = str(err).strip()
    if "Original Traceback" in text:  # re-raised by a DataLoader worker
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split("Error: ", 1)[-1].strip()
    text = text.replace(f" ({SKIP_HINT})", "").replace(SKIP_HINT, "").rstrip(" ;")
    return CorruptSampleError(f"{text}; {hint}" if hint else text)


# --------------------------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------------------------


class Progress:
    """Progress of a long evaluation loop, on rank 0 only: a tqdm bar when stderr is a terminal, else log lines.

    Without a terminal (SLURM logs, pipes) a line is logged each time another 10 % is done or 30 s have passed since
    the last line, from :attr:`QUIET_S` seconds on, so loops of a few seconds stay silent (their callers log a
    summary).

    Args:
        total: units of work (images, epochs, ...).
        desc: what is being done, e.g. ``"features of digits (val, pooled)"``.
        unit: the name of a unit.
        enabled: show anything at all; default: on the main process only.
    """

    LOG_FRACTION = 0.1  # share of the work between two log lines ...
    LOG_EVERY_S = 30.0  # ... or seconds, whichever comes first
    QUIET_S = 5.0  # no log line (and no bar) before the loop has run this long

    def __init__(self, total: int, desc: str, unit: str = "img", enabled: bool | None = None) -> None:
        self.total = max(0, int(total))
        self.desc = desc
        self.unit = unit
        self.enabled = dist.is_main_process() if enabled is None else bool(enabled)
        self.done = 0
        self._t0 = self._last = time.monotonic()
        self._next_fraction = self.LOG_FRACTION
        self._bar: Any = None
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            # leave=False: the bar goes once done (the caller's summary line stays); delay: short loops show none
            self._bar = tqdm(
                total=self.total, desc=desc, unit=unit, dynamic_ncols=True, leave=False, delay=self.QUIET_S
            )

    def update(self, n: int = 1, status: str | None = None) -> None:
        """Count ``n`` more units done; ``status`` (e.g. the current loss) is shown with the count."""
        if not self.enabled:
            return
        self.done += n
        if self._bar is not None:
            if status:
                self._bar.set_postfix_str(status, refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        fraction = self.done / self.total if self.total else 1.0
        due = fraction >= self._next_fraction - 1e-9 or now - self._last >= self.LOG_EVERY_S
        if due and now - self._t0 >= self.QUIET_S:
            self._log(now, status)
            # the next line after another 10 % from here (a line the 30 s rule wrote moves the mark too)
            self._next_fraction = fraction + self.LOG_FRACTION

    def _log(self, now: float, status: str | None) -> None:
        elapsed = now - self._t0
        left = (self.total - self.done) * elapsed / self.done if self.done else float("nan")
        percent = 100.0 * self.done / self.total if self.total else 100.0
        _logger.info(
            "%s: %d/%d %s (%.0f%%), %.0f s, about %.0f s left%s",
            self.desc,
            self.done,
            self.total,
            self.unit,
            percent,
            elapsed,
            left,
            f", {status}" if status else "",
        )
        self._last = now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------------------


class _RowItems(Dataset):
    """Items ``(image, row)`` of ``base`` at ``rows`` (``(image, (row, target))`` with ``targets``): the row says
    which items a corrupt-skipping loader returned."""

    def __init__(self, base: Dataset, rows: np.ndarray, targets: bool = False) -> None:
        self.base = base
        self.rows = rows
        self.targets = targets

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        row = int(self.rows[index])
        image, target = self.base[row]
        return image, ((row, target) if self.targets else row)


def _as_is(image: Any, target: Any) -> tuple[Any, Any]:
    """The sample function of datasets whose items are transformed already (picklable for loader workers)."""
    return image, target


@torch.no_grad()
def _embed(
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    sample_fn: Callable[[Any, Any], Any] | None,
    rows: Sequence[int] | None,
    batch_size: int,
    device: torch.device | str,
    num_workers: int,
    skip_corrupt: bool,
    desc: str,
    keep_targets: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[Any] | None]:
    """The one extraction loop: rank ``r`` of ``W`` embeds ``rows[r::W]``; the parts are gathered on every rank.

    Returns:
        ``(features (M, C) float32, rows (M,) int64, targets or None)`` in ascending row order; M < len(rows) only
        when corrupt items were skipped.
    """
    from vitssl.data import CorruptImageError, TransformedDataset, collate_skip_none, is_stream

    if is_stream(dataset):
        raise ConfigError(f"{dataset!r} streams its shards: rows cannot be picked from it; {_STREAM_HINT}")
    n = len(dataset)  # type: ignore[arg-type]
    all_rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(list(rows), dtype=np.int64)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = _RowItems(dataset, all_rows[rank::world], keep_targets)
    wrapped = TransformedDataset(mine, sample_fn or _as_is, seed=0, skip_corrupt=skip_corrupt)
    pin = torch.device(device).type == "cuda"
    loader = DataLoader(
        wrapped, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skip_none, pin_memory=pin
    )
    feats: list[np.ndarray] = []
    got: list[np.ndarray] = []
    targets: list[Any] = []
    desc = desc if world == 1 else f"{desc} [rank 0 of {world}]"
    try:
        with Progress(len(mine), desc) as progress:
            for batch, skipped in loader:
                if batch is not None:
                    images, info = batch  # (b, C_in, H, W); rows (b,) or [rows (b,), targets]
                    batch_rows = info[0] if keep_targets else info
                    feats.append(feature_fn(images.to(device, non_blocking=True)).float().cpu().numpy())  # (b, C)
                    got.append(np.asarray(batch_rows, dtype=np.int64))
                    if keep_targets:
                        targets.extend(info[1].tolist() if isinstance(info[1], torch.Tensor) else list(info[1]))
                progress.update((len(got[-1]) if batch is not None else 0) + skipped)
    except CorruptImageError as err:
        raise corrupt_sample_error(err) from None
    local = (
        np.concatenate(feats) if feats else None,
        np.concatenate(got) if got else np.zeros(0, dtype=np.int64),
        targets,
    )
    parts = dist.all_gather_object(local) if world > 1 else [local]
    present = [p for p in parts if p[0] is not None]
    if not present:
        raise CorruptSampleError(f"no readable image among the {len(all_rows)} items to embed (all skipped as corrupt)")
    features = np.concatenate([p[0] for p in present])
    out_rows = np.concatenate([p[1] for p in present])
    order = np.argsort(out_rows, kind="stable")
    out_targets = [t for p in present for t in p[2]] if keep_targets else None
    return (
        np.ascontiguousarray(features[order], dtype=np.float32),
        out_rows[order],
        [out_targets[i] for i in order] if out_targets is not None else None,
    )


def extract_features(
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``feature_fn`` over a dataset of ``(image tensor, label)`` items (transformed already).

    Rank ``r`` of ``W`` processes items ``r, r + W, ...``; the shards are gathered back, so every rank returns
    features in dataset order.

    Args:
        feature_fn: maps a (B, 3, H, W) batch to (B, C) features (e.g. ``objective.eval_features``).
        dataset: yields ``(tensor, int label)``.
        batch_size: images per forward pass.
        device: where ``feature_fn`` runs.
        num_workers: data-loading processes.
        desc: what the progress display calls the loop.

    Returns:
        ``(features (N, C) float32 on the CPU, labels (N,) int64)``.
    """
    features, _, labels = _embed(
        feature_fn, dataset, None, None, batch_size, device, num_workers, False, desc, keep_targets=True
    )
    return torch.from_numpy(features), torch.as_tensor(labels, dtype=torch.long)


def extract_rows(
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    sample_fn: Callable[[Any, Any], Any],
    rows: Sequence[int] | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    skip_corrupt: bool = False,
    desc: str = "features",
) -> tuple[np.ndarray, np.ndarray]:
    """Features of the items ``rows`` of an untransformed dataset, every rank a shard, gathered on every rank.

    Args:
        feature_fn: maps a transformed batch to (B, C) features.
        dataset: items ``(PIL image, target)``.
        sample_fn: the evaluation transform ``(image, target) -> (tensor, target)``.
        rows: dataset rows to embed, ascending; None = all.
        batch_size: images per forward pass (per rank).
        device: where ``feature_fn`` runs.
        num_workers: data-loading processes per rank.
        skip_corrupt: leave out unreadable items (logged) instead of failing with their name.
        desc: what the progress display calls the loop.

    Returns:
        ``(features (M, C) float32, rows (M,) int64)`` in ascending row order; M < len(rows) only when corrupt
        items were skipped.

    Raises:
        CorruptSampleError: an item cannot be read (without ``skip_corrupt``), or none can.
    """
    features, got, _ = _embed(feature_fn, dataset, sample_fn, rows, batch_size, device, num_workers, skip_corrupt, desc)
    return features, got


# --------------------------------------------------------------------------------------------------------------
# Checkpoints and layers
# --------------------------------------------------------------------------------------------------------------


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
    cause = err.__context__  # the loader's own error (the engine raises "from None", which keeps the context)
    why = f" ({type(cause).__name__}: {str(cause).splitlines()[0][:200] if str(cause) else ''})" if cause else ""
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
    n = int(layer[4:])
    outs = bb.forward_intermediate(images, n)  # n x (B, P + N, C), oldest first
    return torch.cat([t[:, 0] for t in outs], dim=-1)  # (B, n * C)


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


# --------------------------------------------------------------------------------------------------------------
# Feature sets and the cache
# --------------------------------------------------------------------------------------------------------------


@dataclass
class FeatureSet:
    """Features of a dataset, with labels and sample ids, in dataset order.

    Attributes:
        features: (N, C) float32.
        labels: (N,) int64 class labels; -1 where the data is unlabelled.
        sample_ids: N sample ids.
        meta: what produced them (the cache key, classes, counts, ...); ``cache_hit`` tells whether this call
            read them from the cache.
        path: the folder they were read from or written to, if any.
    """

    features: np.ndarray
    labels: np.ndarray
    sample_ids: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        n = len(self.sample_ids)
        if self.features.ndim != 2 or self.features.shape[0] != n or self.labels.shape != (n,):
            raise FeatureCacheError(
                f"feature set {self.path or ''}: features {self.features.shape}, labels {self.labels.shape} and "
                f"{n} sample ids do not describe the same N items"
            )

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def classes(self) -> list[str]:
        return list(self.meta.get("classes") or [])

    @property
    def labelled(self) -> bool:
        return len(self) > 0 and bool((self.labels >= 0).all())

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the four files into ``directory`` atomically (a temporary sibling renamed into place).

        An existing folder is replaced. Any producer (image checkpoints here, video heads later) can write
        feature sets this way for the probes and the retrieval index builder.
        """
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            np.save(tmp / FEATURES_FILE, np.ascontiguousarray(self.features, dtype=np.float32))
            np.save(tmp / LABELS_FILE, np.asarray(self.labels, dtype=np.int64))
            (tmp / IDS_FILE).write_text(json.dumps(list(self.sample_ids)) + "\n", encoding="utf-8")
            meta = {k: v for k, v in self.meta.items() if k != "cache_hit"}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        self.path = directory
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> FeatureSet:
        """Read a feature folder written by :meth:`save`.

        Raises:
            FeatureCacheError: a file is missing, unreadable or inconsistent with the others.
        """
        directory = Path(directory)
        try:
            meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
            features = np.load(directory / FEATURES_FILE)
            labels = np.load(directory / LABELS_FILE)
            ids = json.loads((directory / IDS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise FeatureCacheError(f"feature folder {directory} is incomplete or unreadable ({err})") from None
        if features.dtype != np.float32 or labels.dtype != np.int64 or not isinstance(ids, list):
            raise FeatureCacheError(f"feature folder {directory}: unexpected file types; delete it to re-extract")
        return cls(features, labels, [str(i) for i in ids], meta, directory)


def default_cache_dir(checkpoint: str | os.PathLike) -> Path:
    """``<checkpoint folder>/features``."""
    return Path(checkpoint).absolute().parent / DEFAULT_CACHE_NAME


def _dataset_labels(dataset: Dataset) -> np.ndarray:
    """Integer labels without decoding any image: ``labels`` (caption sets keep class ids there), else
    ``targets`` when they are ints; -1 everywhere for unlabelled data."""
    n = len(dataset)  # type: ignore[arg-type]
    for attr in ("labels", "targets"):
        values = getattr(dataset, attr, None)
        if values is not None and len(values) == n and all(isinstance(v, (int, np.integer)) for v in values):
            return np.asarray(values, dtype=np.int64)
    return np.full(n, -1, dtype=np.int64)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")[:60] or "data"


def _key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def cache_folder(cache_dir: Path, key: dict[str, Any]) -> Path:
    """The folder of a key: readable prefix (dataset, split, layer, rows) plus a hash of the whole key."""
    rows = f"-rows{key['rows'][0]}-{key['rows'][1]}" if key.get("rows") else ""
    prefix = _slug(f"{key['dataset']}-{key['split']}-{key['layer']}{rows}")
    return cache_dir / f"{prefix}-{_key_digest(key)[:16]}"


def _try_load(folder: Path, key: dict[str, Any]) -> FeatureSet | None:
    if not folder.is_dir():
        return None
    try:
        fs = FeatureSet.load(folder)
    except FeatureCacheError as err:
        _logger.warning("%s; extracting again", err)
        return None
    if fs.meta.get("key") != key:  # a hash-prefix collision or a hand-edited folder: never trust it
        _logger.warning("feature folder %s holds features of another key; extracting again", folder)
        return None
    return fs


def dataset_rows(meta: dict[str, Any]) -> np.ndarray:
    """The dataset rows (M,) a cached feature set holds: its row range minus the skipped (corrupt) rows."""
    start, stop = meta["row_range"]
    rows = np.arange(start, stop, dtype=np.int64)
    skipped = meta.get("skipped_rows") or []
    return np.setdiff1d(rows, np.asarray(skipped, dtype=np.int64)) if skipped else rows


def _slice_rows(full: FeatureSet, start: int, stop: int, key: dict[str, Any]) -> FeatureSet:
    rows = dataset_rows(full.meta)
    keep = (rows >= start) & (rows < stop)
    skipped = [r for r in full.meta.get("skipped_rows") or [] if start <= r < stop]
    meta = {
        **full.meta,
        "key": key,
        "row_range": [start, stop],
        "count": int(keep.sum()),
        "skipped": len(skipped),
        "skipped_rows": skipped,
        "sliced_from": str(full.path),
    }
    ids = [s for s, k in zip(full.sample_ids, keep) if k]
    return FeatureSet(np.ascontiguousarray(full.features[keep]), full.labels[keep], ids, meta)


def extract_cached(
    checkpoint: str | os.PathLike | EvalModel,
    data_spec: str,
    split: str | None = None,
    layer: str = "pooled",
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    device: torch.device | str = "auto",
    num_workers: int = 0,
    skip_corrupt: bool = False,
    rows: tuple[int, int] | None = None,
    option: str = "--data",
) -> FeatureSet:
    """Features of a dataset from the cache, or extracted (every rank a shard) and cached.

    Args:
        checkpoint: a checkpoint path, or an :class:`EvalModel` already loaded (to share it between calls).
        data_spec: ``NAME[:key=value,...]`` (see :mod:`vitssl.eval.spec`).
        split: split (``--split``); default the spec's own, else ``val``.
        layer: ``pooled``, ``cls``, ``mean`` or ``lastN``.
        cache_dir: where feature folders live; default ``<checkpoint folder>/features``.
        batch_size: images per forward pass and rank.
        device: where the model runs when ``checkpoint`` is a path.
        num_workers: data-loading processes per rank.
        skip_corrupt: leave out unreadable samples (counted in ``meta["skipped"]``) instead of failing.
        rows: only dataset rows ``[start, stop)`` (an index shard); sliced from the whole set's cached features
            when those exist.
        option: the command-line option ``data_spec`` came from (``--train``, ``--val``), named in errors.

    Returns:
        The :class:`FeatureSet`, the same on every rank; ``meta["cache_hit"]`` says whether it was read.

    Raises:
        ConfigError: bad spec, layer or rows, or a layer the backbone cannot give.
        CheckpointError: unusable checkpoint.
        CorruptSampleError: an unreadable image (without ``skip_corrupt``).
    """
    from vitssl import __version__
    from vitssl.data import is_stream
    from vitssl.eval.spec import build_eval_dataset, canonical_options

    t0 = time.perf_counter()
    layer = parse_layer(layer)
    model = checkpoint if isinstance(checkpoint, EvalModel) else EvalModel(checkpoint, device)
    dataset, name, options = build_eval_dataset(data_spec, split, absolute_root=True, option=option)
    streamed = is_stream(dataset)  # shards read whole, in order (vitssl.eval.shard_features); no row ranges
    n_items = len(dataset)  # type: ignore[arg-type]
    if streamed and rows is not None:
        raise ConfigError(f"{data_spec!r} streams its shards and has no rows to split; {_STREAM_HINT}")
    if rows is not None and not 0 <= rows[0] <= rows[1] <= n_items:
        raise ConfigError(f"rows {rows} lie outside the {n_items} items of {data_spec!r}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(model.path)
    key = {
        "format": CACHE_FORMAT,
        "checkpoint_sha256": model.checkpoint_hash,
        "dataset": name,
        "options": canonical_options(options),
        "split": options["split"],
        "layer": layer,
        "transform": model.transform,
        "skip_corrupt": bool(skip_corrupt),
        "rows": list(rows) if rows is not None and tuple(rows) != (0, n_items) else None,
    }
    folder = cache_folder(cache, key)
    found = None
    if dist.is_main_process():  # rank 0 decides, so every rank takes the same branch into the collectives
        found = _try_load(folder, key)
        if found is None and key["rows"] is not None:
            whole_key = {**key, "rows": None}
            whole = _try_load(cache_folder(cache, whole_key), whole_key)
            if whole is not None:  # an index shard of a dataset whose features are cached already
                found = _slice_rows(whole, rows[0], rows[1], key)  # type: ignore[index]
                found.save(folder)
    if dist.broadcast_object(found is not None):
        if found is None:  # other ranks read what rank 0 found (output folders are shared, as SLURM needs)
            found = FeatureSet.load(folder)
        _logger.info("features of %s (%s, %s) read from the cache %s", data_spec, key["split"], layer, folder)
        found.meta["cache_hit"] = True
        return found

    fn = model.feature_fn(layer)
    wanted = range(n_items) if rows is None else range(rows[0], rows[1])
    desc = f"features of {data_spec} ({key['split']}, {layer})"
    if streamed:
        from vitssl.eval.shard_features import extract_stream

        features, ids, n_skipped = extract_stream(
            fn, dataset, model.sample_fn, batch_size, model.device, num_workers, skip_corrupt, desc
        )
        n_items, wanted, got, skipped_rows = len(ids) + n_skipped, range(len(ids)), np.arange(len(ids)), []
        labels = np.full(len(ids), -1, dtype=np.int64)  # rows: positions in (shard, position) order
    else:
        features, got = extract_rows(
            fn, dataset, model.sample_fn, wanted, batch_size, model.device, num_workers, skip_corrupt, desc
        )
        labels = _dataset_labels(dataset)[got]
        ids = [str(dataset.sample_id(int(r))) for r in got]  # type: ignore[attr-defined]
        skipped_rows = sorted(set(wanted) - set(got.tolist())) if len(got) < len(wanted) else []
        n_skipped = len(skipped_rows)
    meta = {
        "key": key,
        "checkpoint": str(model.path),
        "objective": model.objective_name,
        "data_spec": data_spec,
        "classes": [str(c) for c in getattr(dataset, "classes", [])],
        "num_items": n_items,
        "count": len(got),
        "dim": int(features.shape[1]),
        "skipped": n_skipped,
        "skipped_rows": skipped_rows,
        "row_range": [wanted.start, wanted.stop],
        "world_size": dist.get_world_size(),
        "batch_size": batch_size,
        "device": str(model.device),
        "seconds": round(time.perf_counter() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "vitssl_version": __version__,
    }
    fs = FeatureSet(features, labels, ids, meta)
    if dist.is_main_process():
        fs.save(folder)
        _logger.info(
            "extracted %d x %d features of %s (%s, %s) in %.1f s -> %s",
            len(fs),
            fs.dim,
            data_spec,
            key["split"],
            layer,
            meta["seconds"],
            folder,
        )
    dist.barrier()
    fs.path = folder
    fs.meta["cache_hit"] = False
    return fs


__all__ = [
    "LAYER_HELP",
    "SKIP_CORRUPT_HINT",
    "CorruptSampleError",
    "EvalModel",
    "FeatureCacheError",
    "FeatureSet",
    "Progress",
    "cache_folder",
    "check_layer",
    "checkpoint_sha256",
    "corrupt_sample_error",
    "dataset_rows",
    "default_cache_dir",
    "describe_transform",
    "eval_checkpoint_error",
    "extract_cached",
    "extract_features",
    "extract_rows",
    "layer_features",
    "load_for_eval",
    "parse_layer",
]
