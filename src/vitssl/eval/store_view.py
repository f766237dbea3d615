"""Reading a feature store: its shards as one memory-mapped view (:class:`ShardedRows`), block by block
(:func:`row_blocks`), with labels, rows, ids and the manifest checks (:class:`FeatureStore`). See
:mod:`vitssl.eval.store` for the layout."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vitssl.eval.store_format import (
    FEATURES_FILE,
    IDS_FILE,
    LABELS_FILE,
    PARTIAL_SUFFIX,
    ROWS_FILE,
    FeatureStoreError,
    manifest_difference,
    read_manifest,
)


class ShardedRows:
    """Rows of several memory-mapped (n_i, C) arrays seen as one read-only (N, C) array.

    Supports ``len``, ``shape``, ``dtype``, integer / slice / integer-array / boolean-mask row indexing (slices
    within one shard are views of its memory map, nothing is read until used) and ``np.asarray`` (reads all).

    Args:
        parts: the shards' arrays, in row order; all of one dtype and width (empty ones may have width 0).
    """

    ndim = 2

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        self.parts = [p for p in parts if len(p)]
        dims = {int(p.shape[1]) for p in self.parts}
        dtypes = {p.dtype for p in self.parts}
        if len(dims) > 1 or len(dtypes) > 1:
            raise FeatureStoreError(f"shards of different widths {sorted(dims)} or dtypes {sorted(map(str, dtypes))}")
        self.dim = dims.pop() if dims else 0
        self.dtype = dtypes.pop() if dtypes else np.dtype(np.float32)
        self.offsets = np.cumsum([0, *(len(p) for p in self.parts)]).astype(np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.offsets[-1]), self.dim)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _range(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.zeros((0, self.dim), dtype=self.dtype)
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        last = int(np.searchsorted(self.offsets, stop, side="left")) - 1
        pieces = [
            self.parts[i][
                max(start, self.offsets[i]) - self.offsets[i] : min(stop, self.offsets[i + 1]) - self.offsets[i]
            ]
            for i in range(first, last + 1)
        ]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __getitem__(self, index: Any) -> np.ndarray:
        n = len(self)
        if isinstance(index, (int, np.integer)):
            i = int(index) + (n if index < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"row {index} out of range for {n} rows")
            return self._range(i, i + 1)[0]
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            return self._range(start, stop) if step == 1 else self[np.arange(start, stop, step)]
        rows = np.asarray(index)
        if rows.dtype == bool:
            if rows.shape != (n,):
                raise IndexError(f"boolean mask of shape {rows.shape} for {n} rows")
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64).ravel()
        rows = np.where(rows < 0, rows + n, rows)
        if len(rows) and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"row indices outside [0, {n})")
        out = np.empty((len(rows), self.dim), dtype=self.dtype)
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.parts[s][rows[sel] - self.offsets[s]]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._range(0, len(self))
        return np.array(out, dtype=dtype) if dtype is not None else np.array(out)

    def blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, rows)`` blocks of at most ``block_rows`` rows, in order, read one at a time."""
        for start in range(0, len(self), block_rows):
            yield start, self._range(start, min(start + block_rows, len(self)))


def row_blocks(features: Any, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, rows)`` blocks of an (N, C) array, memory map or :class:`ShardedRows`, in order."""
    if isinstance(features, ShardedRows):
        yield from features.blocks(block_rows)
        return
    for start in range(0, len(features), block_rows):
        yield start, features[start : start + block_rows]


class FeatureStore:
    """A complete feature store, opened for reading (nothing but labels and rows is read at once).

    Args:
        folder: the store folder.

    Attributes:
        manifest: the manifest.
        features: (N, C) memory-mapped view of every shard (a :class:`ShardedRows`, or the one shard's memory
            map when the store has a single non-empty shard).
        labels: (N,) int64.
        rows: (N,) int64 dataset rows.

    Raises:
        FeatureStoreError: not a complete store, or a shard is missing or inconsistent.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder)
        if not self.path.is_dir():
            partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
            more = f" (an unfinished extraction is in {partial}: run it again to finish)" if partial.is_dir() else ""
            raise FeatureStoreError(f"feature store {self.path} does not exist{more}")
        self.manifest = read_manifest(self.path)
        if not self.manifest.get("complete"):
            raise FeatureStoreError(f"feature store {self.path} is unfinished; run its extraction again to finish it")
        parts, labels, rows, self._shard_dirs = [], [], [], []
        for i, (bounds, count) in enumerate(zip(self.manifest["shards"], self.manifest["shard_counts"])):
            shard = self.path / f"shard-{i:05d}"
            try:
                feats = np.load(shard / FEATURES_FILE, mmap_mode="r") if count else None
                lab, r = np.load(shard / LABELS_FILE), np.load(shard / ROWS_FILE)
            except (OSError, ValueError) as err:
                raise FeatureStoreError(f"feature store {self.path}: shard {i} is unreadable ({err})") from None
            if (feats is not None and (feats.ndim != 2 or len(feats) != count)) or len(lab) != count or len(r) != count:
                raise FeatureStoreError(
                    f"feature store {self.path}: shard {i} holds other row counts than its manifest ({count}); "
                    "extract again"
                )
            if count and (str(feats.dtype) != self.manifest["dtype"] or r[0] < bounds[0] or r[-1] >= bounds[1]):
                raise FeatureStoreError(f"feature store {self.path}: shard {i} does not match the manifest")
            if feats is not None:
                parts.append(feats)
            labels.append(lab)
            rows.append(r)
            self._shard_dirs.append(shard)
        view = ShardedRows(parts)
        self.features: np.ndarray | ShardedRows = parts[0] if len(parts) == 1 else view
        self.labels = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, dtype=np.int64)
        self.rows = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, dtype=np.int64)

    @property
    def key(self) -> dict[str, Any]:
        return dict(self.manifest["key"])

    @property
    def dtype(self) -> str:
        return str(self.manifest["dtype"])

    def sample_ids(self) -> list[str]:
        """Every sample id, in row order (read from the shards' ``ids.json``)."""
        ids: list[str] = []
        for shard in self._shard_dirs:
            try:
                ids.extend(str(i) for i in json.loads((shard / IDS_FILE).read_text(encoding="utf-8")))
            except (OSError, ValueError) as err:
                raise FeatureStoreError(
                    f"feature store {self.path}: {shard.name}/{IDS_FILE} is unreadable ({err})"
                ) from None
        if len(ids) != len(self.rows):
            raise FeatureStoreError(f"feature store {self.path}: {len(ids)} sample ids for {len(self.rows)} rows")
        return ids

    def check(self, expected: dict[str, Any], what: str = "") -> None:
        """Refuse the store, naming what differs, unless its key holds ``expected`` entries.

        Args:
            expected: key entries the caller needs (e.g. ``checkpoint_sha256`` and ``layer``).
            what: how the store was given (``--train-features``), for the message.
        """
        found = {name: self.manifest["key"].get(name) for name in expected}
        differs = manifest_difference(found, expected)
        if differs:
            raise FeatureStoreError(
                f"{what + ' ' if what else ''}feature store {self.path} holds other features: {differs}"
            )


__all__ = ["FeatureStore", "ShardedRows", "row_blocks"]
