"""Frozen features of a checkpoint, cached on disk as feature stores (extracted once, every rank its own shards).

``extract_cached`` keys a feature set by (checkpoint content hash, dataset name and options, split, layer,
the evaluation transform's description, corrupt-sample handling, row range, stored dtype) and keeps it as a
feature store (:mod:`vitssl.eval.store`: per-rank memory-mapped ``.npy`` shards and a manifest) in its own folder
under ``cache_dir`` (default ``<checkpoint folder>/features/``), named ``<dataset>-<split>-<layer>-<key hash>``.
A later call with the same key opens it with no backbone forward, memory-mapped; any change of a key part extracts
again into a new folder; an interrupted extraction resumes from its finished shards. Features are stored as
float16 by default (``dtype="float32"`` keeps full precision; halves the disk and read volume, and k-NN /
linear-probe accuracies move by far less than their run-to-run noise).

:class:`FeatureSet` is what the probes take: features, labels, sample ids and the manifest. It also reads and
writes the older in-memory folder layout (``features.npy`` float32, ``labels.npy``, ``ids.json``, ``meta.json``)
that other producers (the video frame cache) write with :meth:`FeatureSet.save`.

The extraction loop lives in :mod:`vitssl.eval.extract`, checkpoints and layers in :mod:`vitssl.eval.model`,
the progress display in :mod:`vitssl.eval.progress`; their public names are re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vitssl import distributed as dist
from vitssl.config import ConfigError
from vitssl.data.common import IMAGE_DECODE_REVISION
from vitssl.errors import UserError
from vitssl.eval.extract import (
    SKIP_CORRUPT_HINT,
    STREAM_HINT,
    CorruptSampleError,
    corrupt_sample_error,
    extract_features,
    extract_rows,
)
from vitssl.eval.model import (
    EvalModel,
    check_layer,
    checkpoint_sha256,
    describe_transform,
    eval_checkpoint_error,
    layer_features,
    load_for_eval,
)
from vitssl.eval.progress import Progress
from vitssl.eval.spec import LAYER_HELP, parse_layer
from vitssl.eval.store import (
    DEFAULT_DTYPE,
    DEFAULT_SHARD_ROWS,
    DTYPES,
    PARTIAL_SUFFIX,
    FeatureStore,
    FeatureStoreError,
    extract_to_store,
    is_store,
    write_store,
)
from vitssl.io import atomic_dir

_logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the folder layout or the meaning of a key part changes (2: feature stores)
FEATURES_FILE = "features.npy"
LABELS_FILE = "labels.npy"
IDS_FILE = "ids.json"
META_FILE = "meta.json"
DEFAULT_CACHE_NAME = "features"  # <checkpoint folder>/features/
# Manifest entries a row slice of a cached set keeps from the whole set.
_CARRIED_META = ("checkpoint", "objective", "data_spec", "classes", "num_items", "vitssl_version")


class FeatureCacheError(UserError, ValueError):
    """A feature folder is incomplete or inconsistent (its files disagree with each other or with meta.json)."""


# --------------------------------------------------------------------------------------------------------------
# Feature sets and the cache
# --------------------------------------------------------------------------------------------------------------


@dataclass
class FeatureSet:
    """Features of a dataset, with labels and sample ids, in dataset order.

    Attributes:
        features: (N, C): a float32 array (in memory or a legacy folder's), or a store's memory-mapped view
            (float16 or float32; :class:`~vitssl.eval.store.ShardedRows` when it has several shards).
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
        """Open a feature store (:mod:`vitssl.eval.store`, memory-mapped) or read a folder written by :meth:`save`.

        Raises:
            FeatureCacheError: a file is missing, unreadable or inconsistent with the others.
        """
        directory = Path(directory)
        if is_store(directory) or (
            not directory.is_dir() and directory.with_name(directory.name + PARTIAL_SUFFIX).is_dir()
        ):
            try:
                store = FeatureStore(directory)
            except FeatureStoreError as err:
                raise FeatureCacheError(str(err)) from None
            return cls(store.features, store.labels, store.sample_ids(), dict(store.manifest), directory)
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
    if not folder.is_dir():  # (an unfinished "<folder>.partial" is resumed by the extraction)
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


def _slice_rows(full: FeatureSet, start: int, stop: int, key: dict[str, Any], folder: Path) -> FeatureSet:
    """The rows ``[start, stop)`` of a cached whole set, written as the store of ``key`` at ``folder``."""
    rows = dataset_rows(full.meta)
    keep = (rows >= start) & (rows < stop)
    ids = [s for s, k in zip(full.sample_ids, keep) if k]
    extra = {k: v for k, v in full.meta.items() if k in _CARRIED_META}
    write_store(
        folder, key, np.asarray(full.features[keep]), full.labels[keep], rows[keep], ids, (start, stop),
        {**extra, "sliced_from": str(full.path)}, key["dtype"],
    )  # fmt: skip
    return FeatureSet.load(folder)


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
    dtype: str = DEFAULT_DTYPE,
    shard_rows: int = DEFAULT_SHARD_ROWS,
) -> FeatureSet:
    """Features of a dataset from the cache, or extracted (every rank its own shards, no gather) and cached.

    Args:
        checkpoint: a checkpoint path, or an :class:`EvalModel` already loaded (to share it between calls).
        data_spec: ``NAME[:key=value,...]`` (see :mod:`vitssl.eval.spec`).
        split: split (``--split``); default the spec's own, else ``val``.
        layer: ``pooled``, ``cls``, ``mean``, ``lastN`` or ``lastNavg``.
        cache_dir: where feature stores live; default ``<checkpoint folder>/features``.
        batch_size: images per forward pass and rank.
        device: where the model runs when ``checkpoint`` is a path.
        num_workers: data-loading processes per rank.
        skip_corrupt: leave out unreadable samples (counted in ``meta["skipped"]``) instead of failing.
        rows: only dataset rows ``[start, stop)`` (an index shard); sliced from the whole set's cached features
            when those exist.
        option: the command-line option ``data_spec`` came from (``--train``, ``--val``), named in errors.
        dtype: stored precision, ``float16`` (default) or ``float32``.
        shard_rows: rows per store shard at most (the unit an interrupted extraction resumes from).

    Returns:
        The :class:`FeatureSet` (features memory-mapped), the same on every rank; ``meta["cache_hit"]`` says
        whether it was read.

    Raises:
        ConfigError: bad spec, layer, dtype or rows, or a layer the backbone cannot give.
        CheckpointError: unusable checkpoint.
        CorruptSampleError: an unreadable image (without ``skip_corrupt``).
        FeatureStoreError: an unfinished store of other features is in the way.
    """
    from vitssl import __version__
    from vitssl.data import is_stream
    from vitssl.eval.spec import build_eval_dataset, canonical_options

    t0 = time.perf_counter()
    layer = parse_layer(layer)
    if dtype not in DTYPES:
        raise ConfigError(f"feature dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    model = checkpoint if isinstance(checkpoint, EvalModel) else EvalModel(checkpoint, device)
    dataset, name, options = build_eval_dataset(data_spec, split, absolute_root=True, option=option)
    streamed = is_stream(dataset)  # shards read whole, in order (vitssl.eval.shard_features); no row ranges
    n_items = len(dataset)  # type: ignore[arg-type]
    if streamed and rows is not None:
        raise ConfigError(f"{data_spec!r} streams its shards and has no rows to split; {STREAM_HINT}")
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
        "image_decode": IMAGE_DECODE_REVISION,
        "skip_corrupt": bool(skip_corrupt),
        "rows": list(rows) if rows is not None and tuple(rows) != (0, n_items) else None,
        "dtype": dtype,
    }
    folder = cache_folder(cache, key)
    found = None
    if dist.is_main_process():  # rank 0 decides, so every rank takes the same branch into the collectives
        found = _try_load(folder, key)
        if found is None and key["rows"] is not None:
            whole_key = {**key, "rows": None}
            whole = _try_load(cache_folder(cache, whole_key), whole_key)
            if whole is not None:  # an index shard of a dataset whose features are cached already
                found = _slice_rows(whole, rows[0], rows[1], key, folder)  # type: ignore[index]
    if dist.broadcast_object(found is not None):
        if found is None:  # other ranks open what rank 0 found (output folders are shared, as SLURM needs)
            found = FeatureSet.load(folder)
        _logger.info("features of %s (%s, %s) read from the cache %s", data_spec, key["split"], layer, folder)
        found.meta["cache_hit"] = True
        return found

    fn = model.feature_fn(layer)
    wanted = (0, n_items) if rows is None else (rows[0], rows[1])
    desc = f"features of {data_spec} ({key['split']}, {layer})"
    meta = {
        "checkpoint": str(model.path),
        "objective": model.objective_name,
        "data_spec": data_spec,
        "classes": [str(c) for c in getattr(dataset, "classes", [])],
        "num_items": n_items,
        "world_size": dist.get_world_size(),
        "batch_size": batch_size,
        "device": str(model.device),
        "vitssl_version": __version__,
    }
    if streamed:  # the stream's own order is (shard, position): gathered, then written by rank 0 (one shard)
        from vitssl.eval.shard_features import extract_stream

        features, ids, n_skipped = extract_stream(
            fn, dataset, model.sample_fn, batch_size, model.device, num_workers, skip_corrupt, desc
        )
        if dist.is_main_process():
            labels = np.full(len(ids), -1, dtype=np.int64)  # rows: positions in (shard, position) order
            meta = {**meta, "num_items": len(ids) + n_skipped, "stream_skipped": n_skipped}
            positions = np.arange(len(ids), dtype=np.int64)
            write_store(folder, key, features, labels, positions, ids, (0, len(ids)), meta, dtype)
        dist.barrier()
    else:
        extract_to_store(
            folder,
            key,
            fn,
            dataset,
            model.sample_fn,
            wanted,
            _dataset_labels(dataset),
            dataset.sample_id,  # type: ignore[attr-defined]
            meta,
            dtype=dtype,
            batch_size=batch_size,
            device=model.device,
            num_workers=num_workers,
            skip_corrupt=skip_corrupt,
            desc=desc,
            shard_rows=shard_rows,
        )
    fs = FeatureSet.load(folder)
    if dist.is_main_process():
        _logger.info(
            "extracted %d x %d features of %s (%s, %s) in %.1f s -> %s",
            len(fs),
            fs.dim,
            data_spec,
            key["split"],
            layer,
            time.perf_counter() - t0,
            folder,
        )
    fs.meta["cache_hit"] = False
    return fs


__all__ = [
    "DEFAULT_DTYPE",
    "DTYPES",
    "LAYER_HELP",
    "SKIP_CORRUPT_HINT",
    "CorruptSampleError",
    "EvalModel",
    "FeatureCacheError",
    "FeatureSet",
    "FeatureStoreError",
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
