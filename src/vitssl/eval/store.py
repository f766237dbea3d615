"""Feature stores: features on disk in per-rank shards of memory-mapped ``.npy``, read back as one view.

Extraction writes no features through the process group: every rank embeds the shards the plan gives it and
writes each one straight to disk, batch by batch, so no rank ever holds more than a batch of features (the
old path gathered every rank's features on every rank: memory grew with the dataset on each of them). Layout::

    <store>/
        manifest.json       what the features are (the cache key: checkpoint hash, dataset and options, split,
                            layer, transform, corrupt-sample handling, row range), dtype, dim, the shard plan
        shard-00000/        rows [start, stop) of the plan:
            features.npy    (n, C) float16 (default) or float32, dataset order
            labels.npy      (n,) int64 class labels, -1 for unlabelled data
            rows.npy        (n,) int64 dataset rows (n < stop - start only when corrupt rows were skipped)
            ids.json        n sample ids
            shard.json      written last: the shard is complete
        shard-00001/ ...

Rows are cut into contiguous shards (at least one per rank, at most ``shard_rows`` rows each) and shard ``i``
goes to rank ``i mod W``, so concatenating the shards in order gives dataset order whatever the world size.
While extraction runs the store lives in ``<store>.partial/``; each shard is written to a temporary folder and
renamed into place when complete, and the store is renamed to ``<store>`` once every shard is there. An
interrupted extraction resumes: the finished shards of a ``.partial`` folder are kept (at any world size, as
the plan is in the manifest), provided its manifest describes the same features; otherwise it is refused with
one line naming what differs.

:class:`FeatureStore` opens a complete store; its ``features`` is one memory-mapped (N, C) view over all shards
(:class:`ShardedRows`), read block by block by the streaming k-NN and linear probes.

The layout's names, the shard plan and the manifest are :mod:`vitssl.eval.store_format`; reading is
:mod:`vitssl.eval.store_view`; this module writes stores and exports the public names of all three.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vitssl import distributed as dist
from vitssl.eval.extract import CorruptSampleError, embed_batches
from vitssl.eval.progress import Progress
from vitssl.eval.store_format import (
    DEFAULT_DTYPE,
    DEFAULT_SHARD_ROWS,
    DTYPES,
    FEATURES_FILE,
    IDS_FILE,
    LABELS_FILE,
    MANIFEST_FILE,
    PARTIAL_SUFFIX,
    ROWS_FILE,
    SHARD_INFO_FILE,
    STORE_FORMAT,
    FeatureStoreError,
    is_store,
    manifest_difference,
    plan_shards,
    read_manifest,
)
from vitssl.eval.store_view import FeatureStore, ShardedRows, row_blocks
from vitssl.io import atomic_dir, atomic_write

_logger = logging.getLogger(__name__)

# The .npy header this module writes: fixed-size, so the final row count can be written over the first guess.
_NPY_HEADER_BYTES = 128


# --------------------------------------------------------------------------------------------------------------
# Writing one shard
# --------------------------------------------------------------------------------------------------------------


def _npy_header(dtype: np.dtype, shape: tuple[int, int]) -> bytes:
    """A version 1.0 ``.npy`` header of exactly ``_NPY_HEADER_BYTES`` bytes (C order)."""
    text = f"{{'descr': '{dtype.str}', 'fortran_order': False, 'shape': ({shape[0]}, {shape[1]}), }}"
    room = _NPY_HEADER_BYTES - 10  # magic (6), version (2), header length (2)
    if len(text) + 1 > room:
        raise ValueError(f"shape {shape} does not fit a {_NPY_HEADER_BYTES}-byte .npy header")
    text = text.ljust(room - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + room.to_bytes(2, "little") + text.encode("latin1")


class _NpyRowWriter:
    """Appends (b, C) blocks to an ``.npy`` file with plain writes (no memory map: written pages are the page
    cache's, not the process's), then writes the header of the final row count."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.rows = 0
        self.dim: int | None = None
        self._file = open(path, "wb")  # noqa: SIM115 (closed in close(), across many appends)
        self._file.write(b"\0" * _NPY_HEADER_BYTES)

    def append(self, block: np.ndarray) -> None:
        if self.dim is None:
            self.dim = int(block.shape[1])
        elif block.shape[1] != self.dim:
            raise ValueError(f"features of width {block.shape[1]} after {self.dim}: the feature function changed")
        self._file.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())
        self.rows += len(block)

    def close(self) -> None:
        self._file.seek(0)
        self._file.write(_npy_header(self.dtype, (self.rows, self.dim or 0)))
        self._file.close()


def _write_shard(
    folder: Path,
    index: int,
    bounds: Sequence[int],
    batches: Iterator[tuple[np.ndarray, np.ndarray, Any]],
    dtype: str,
    labels_of: Callable[[np.ndarray], np.ndarray],
    sample_id: Callable[[int], str],
) -> dict[str, Any]:
    """Write shard ``index`` (rows ``bounds``) from ``batches`` into ``folder``, atomically; return its info.

    ``labels_of`` maps (n,) dataset rows to their labels, ``sample_id`` one row to its id."""
    target = folder / f"shard-{index:05d}"
    with atomic_dir(target) as tmp:
        writer = _NpyRowWriter(tmp / FEATURES_FILE, np.dtype(dtype))
        got: list[np.ndarray] = []
        try:
            for feats, rows, _ in batches:
                if not np.all(np.isfinite(feats)):
                    bad = int(rows[np.flatnonzero(~np.isfinite(feats).all(axis=1))[0]])
                    raise FeatureStoreError(f"the features of dataset row {bad} are not finite (NaN or inf)")
                writer.append(feats)
                got.append(rows)
        finally:
            writer.close()
        rows = np.concatenate(got) if got else np.zeros(0, dtype=np.int64)
        np.save(tmp / ROWS_FILE, rows)
        np.save(tmp / LABELS_FILE, np.asarray(labels_of(rows), dtype=np.int64) if len(rows) else np.zeros(0, np.int64))
        (tmp / IDS_FILE).write_text(json.dumps([str(sample_id(int(r))) for r in rows]) + "\n", encoding="utf-8")
        skipped = (
            sorted(set(range(bounds[0], bounds[1])) - set(rows.tolist())) if len(rows) < bounds[1] - bounds[0] else []
        )
        info = {
            "index": index,
            "start": int(bounds[0]),
            "stop": int(bounds[1]),
            "count": len(rows),
            "dim": writer.dim,
            "dtype": dtype,
            "skipped_rows": skipped,
            "rank": dist.get_rank(),  # which process wrote it
        }
        (tmp / SHARD_INFO_FILE).write_text(json.dumps(info) + "\n", encoding="utf-8")
    return info


def _finished_shard(folder: Path, index: int, bounds: Sequence[int]) -> dict[str, Any] | None:
    """The info of a complete shard ``index`` of ``folder`` covering ``bounds``, or None."""
    try:
        info = json.loads((folder / f"shard-{index:05d}" / SHARD_INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if [info.get("start"), info.get("stop")] == list(bounds) else None


# --------------------------------------------------------------------------------------------------------------
# Extraction into a store
# --------------------------------------------------------------------------------------------------------------


def extract_to_store(
    folder: str | os.PathLike,
    key: dict[str, Any],
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    sample_fn: Callable[[Any, Any], Any] | None,
    row_range: tuple[int, int],
    labels: np.ndarray,
    sample_id: Callable[[int], str],
    meta: dict[str, Any] | None = None,
    dtype: str = DEFAULT_DTYPE,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    skip_corrupt: bool = False,
    desc: str = "features",
    shard_rows: int = DEFAULT_SHARD_ROWS,
) -> Path:
    """Embed dataset rows ``row_range`` into the store ``folder``, each rank writing its own shards; resumable.

    Every rank calls this (it synchronises through barriers only: no features travel between ranks).

    Args:
        folder: the store to create; ``<folder>.partial`` holds it while it is written.
        key: what the features are (compared on resume; see :func:`manifest_difference`).
        feature_fn: maps a transformed batch to (B, C) features.
        dataset: map-style items ``(image, target)``.
        sample_fn: the evaluation transform; None when the items are tensors already.
        row_range: dataset rows ``[start, stop)``.
        labels: (len(dataset),) int64 labels of every dataset row (-1 when unlabelled).
        sample_id: dataset row -> sample id.
        meta: more entries for the manifest (checkpoint path, classes, versions, ...).
        dtype: ``float16`` or ``float32``.
        batch_size: images per forward pass and rank.
        device: where ``feature_fn`` runs.
        num_workers: data-loading processes per rank.
        skip_corrupt: leave out unreadable items (listed per shard) instead of failing.
        desc: what the progress display calls the loop.
        shard_rows: rows per shard at most.

    Returns:
        ``folder``, complete, on every rank.

    Raises:
        FeatureStoreError: a ``.partial`` folder of other features is in the way, or a shard is missing at the end.
        CorruptSampleError: an unreadable item (without ``skip_corrupt``), or no readable item at all.
    """
    if dtype not in DTYPES:
        raise FeatureStoreError(f"feature dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    folder = Path(folder)
    partial = folder.with_name(folder.name + PARTIAL_SUFFIX)
    rank, world = dist.get_rank(), dist.get_world_size()
    t0 = time.perf_counter()
    error = None
    if rank == 0:  # one process creates (or checks) the manifest; the others read it after the barrier
        try:
            _open_partial(partial, key, dtype, row_range, world, shard_rows, meta or {})
        except FeatureStoreError as err:
            error = str(err)
    error = dist.broadcast_object(error)
    if error:
        raise FeatureStoreError(error)
    plan = read_manifest(partial)["shards"]
    mine = [(i, b) for i, b in enumerate(plan) if i % world == rank]
    todo = [(i, b) for i, b in mine if _finished_shard(partial, i, b) is None]
    kept = len(mine) - len(todo)
    if kept:
        _logger.info("%s: %d finished shard(s) of %s kept", desc, kept, partial)
    total = sum(b[1] - b[0] for _, b in todo)
    with Progress(total, desc if world == 1 else f"{desc} [rank 0 of {world}]") as progress:
        for i, bounds in todo:
            rows = np.arange(bounds[0], bounds[1], dtype=np.int64)
            batches = embed_batches(
                feature_fn, dataset, sample_fn, rows, batch_size, device, num_workers, skip_corrupt, progress
            )
            _write_shard(partial, i, bounds, batches, dtype, labels.__getitem__, sample_id)
    dist.barrier()
    if rank == 0:
        try:
            _complete(partial, folder, time.perf_counter() - t0)
        except (FeatureStoreError, CorruptSampleError) as err:
            error = f"{type(err).__name__}: {err}"
    error = dist.broadcast_object(error)
    if error:
        kind, _, text = error.partition(": ")
        raise (CorruptSampleError if kind == "CorruptSampleError" else FeatureStoreError)(text)
    return folder


def _open_partial(
    partial: Path,
    key: dict[str, Any],
    dtype: str,
    row_range: tuple[int, int],
    world: int,
    shard_rows: int,
    meta: dict[str, Any],
) -> None:
    """Create ``partial`` with its manifest, or check that an existing one holds the same features."""
    wanted = {**key, "dtype": dtype}
    if is_store(partial):
        found = read_manifest(partial)
        differs = manifest_difference({**found["key"], "dtype": found.get("dtype")}, wanted)
        if differs:
            raise FeatureStoreError(
                f"feature store {partial} (an unfinished extraction) holds other features: {differs}; "
                "delete it to extract again"
            )
        return
    partial.mkdir(parents=True, exist_ok=True)
    manifest = {
        "store_format": STORE_FORMAT,
        "key": key,
        "dtype": dtype,
        "row_range": [int(row_range[0]), int(row_range[1])],
        "row_order": "dataset order: shards in order, rows ascending within a shard",
        "shards": plan_shards(int(row_range[0]), int(row_range[1]), world, shard_rows),
        "complete": False,
        **meta,
    }
    atomic_write(partial / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _complete(partial: Path, folder: Path, seconds: float) -> None:
    """Check every shard of ``partial`` is there, write the final manifest, rename it to ``folder``."""
    manifest = read_manifest(partial)
    infos = []
    for i, bounds in enumerate(manifest["shards"]):
        info = _finished_shard(partial, i, bounds)
        if info is None:
            raise FeatureStoreError(f"feature store {partial}: shard {i} ({bounds}) was not written; run again")
        infos.append(info)
    count = sum(info["count"] for info in infos)
    if count == 0:
        n = manifest["row_range"][1] - manifest["row_range"][0]
        raise CorruptSampleError(f"no readable image among the {n} items to embed (all skipped as corrupt)")
    skipped = [r for info in infos for r in info["skipped_rows"]]
    manifest.update(
        complete=True,
        count=count,
        dim=max(int(info["dim"] or 0) for info in infos),
        shard_counts=[info["count"] for info in infos],
        skipped=len(skipped),
        skipped_rows=skipped,
        seconds=round(seconds, 3),
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    atomic_write(partial / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if folder.exists():  # an older copy of the same key (e.g. written by a concurrent job): replace it whole
        shutil.rmtree(folder)
    os.replace(partial, folder)


def write_store(
    folder: str | os.PathLike,
    key: dict[str, Any],
    features: np.ndarray,
    labels: np.ndarray,
    rows: np.ndarray,
    ids: Sequence[str],
    row_range: tuple[int, int],
    meta: dict[str, Any],
    dtype: str = DEFAULT_DTYPE,
) -> Path:
    """Write features held in memory as a one-shard store (one process; e.g. a row slice of a cached store).

    Args:
        folder: the store to create (replaced when it exists).
        key: what the features are.
        features: (M, C) features of ``rows``.
        labels: (M,) labels.
        rows: (M,) ascending dataset rows inside ``row_range`` (rows of the range not listed count as skipped).
        ids: M sample ids.
        row_range: the rows ``[start, stop)`` the store covers.
        meta: more manifest entries.
        dtype: ``float16`` or ``float32``.
    """
    folder = Path(folder)
    partial = folder.with_name(folder.name + PARTIAL_SUFFIX)
    if partial.exists():
        shutil.rmtree(partial)
    t0 = time.perf_counter()
    rows = np.asarray(rows, dtype=np.int64)
    _open_partial(partial, key, dtype, row_range, 1, max(1, row_range[1] - row_range[0]), meta)
    position = {int(r): i for i, r in enumerate(rows)}
    batches = iter([(np.asarray(features, dtype=np.float32), rows, None)])
    _write_shard(
        partial, 0, list(row_range), batches, dtype, lambda r: np.asarray(labels)[np.searchsorted(rows, r)],
        lambda r: str(ids[position[r]]),
    )  # fmt: skip
    _complete(partial, folder, time.perf_counter() - t0)
    return folder


__all__ = [
    "DEFAULT_DTYPE",
    "DTYPES",
    "FeatureStore",
    "FeatureStoreError",
    "ShardedRows",
    "extract_to_store",
    "is_store",
    "manifest_difference",
    "plan_shards",
    "read_manifest",
    "row_blocks",
    "write_store",
]
