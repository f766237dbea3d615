"""Index folders on disk: write one atomically, read and validate one (:class:`LoadedIndex`).

Index directory (written atomically: a temporary sibling directory renamed into place)::

    manifest.json   what the index is: format version, factory, metric, normalize, dimension, count,
                    checkpoint hash, feature key (layer / transform), search parameters, build seconds,
                    vitssl / faiss versions, shard info, trained-index hash, and a checksum of each file
    index.faiss     the faiss index (``faiss.write_index``); vectors carry faiss ids (int64)
    ids.jsonl       one line per stored vector in row order: {"id": <faiss id>, "sample": "<sample id>"}, and
                    "meta": {...} on the rows whose corpus gave metadata (a label, a file size); no other row has
                    the key, so an index without metadata is written as before it existed
    vectors.npy     optional (N, D) float32 vectors as added (normalised when ``normalize``), row order of
                    ids.jsonl: exact re-search for recall and merging of non-IVF shards need them; they cost
                    N x D x 4 bytes (1M x 384 = 1.5 GB) on top of the index
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from vitssl import __version__
from vitssl._faiss import faiss
from vitssl.errors import UserError
from vitssl.index import _gpu
from vitssl.index.factory import _faiss_message, set_search_params
from vitssl.io import atomic_dir, write_json

FORMAT_NAME = "vitssl-index"
FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.jsonl"
MANIFEST_FILE = "manifest.json"
VECTORS_FILE = "vectors.npy"


class IndexFormatError(UserError, ValueError):
    """An index directory is missing a file, is corrupt, or does not match what the caller expects."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _normalise_ids(ids: Sequence[str] | Mapping[int, str], count: int) -> tuple[np.ndarray, list[str]]:
    if isinstance(ids, Mapping):
        faiss_ids = np.fromiter((int(i) for i in ids), dtype=np.int64, count=len(ids))
        samples = [str(s) for s in ids.values()]
    else:
        faiss_ids = np.arange(len(ids), dtype=np.int64)
        samples = [str(s) for s in ids]
    if len(samples) != count:
        raise IndexFormatError(f"the id map has {len(samples)} entries but the index holds {count} vectors")
    if len(np.unique(faiss_ids)) != len(faiss_ids):
        raise IndexFormatError("the id map repeats faiss ids; every vector needs its own id")
    return faiss_ids, samples


def _check_overwrite(directory: Path, overwrite: bool) -> None:
    """Fail before any work when the output exists and may not be replaced (writing checks again at the end)."""
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists; pass overwrite=True (--overwrite) to replace it")


def _check_metadata(metadata: Sequence[Mapping[str, Any]] | None, count: int) -> list[dict[str, Any]] | None:
    """Metadata as the store keeps it: one dict per row, or None when no row has any."""
    if metadata is None:
        return None
    if len(metadata) != count:
        raise IndexFormatError(f"the metadata has {len(metadata)} entries but the index holds {count} vectors")
    rows = [dict(m) if m else {} for m in metadata]
    return rows if any(rows) else None


def _write_ids(
    path: Path, faiss_ids: np.ndarray, samples: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None
) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r, (i, s) in enumerate(zip(faiss_ids.tolist(), samples)):
            entry: dict[str, Any] = {"id": i, "sample": s}
            if metadata is not None and metadata[r]:
                entry["meta"] = dict(metadata[r])
            f.write(json.dumps(entry, allow_nan=False) + "\n")


_REQUIRED_MANIFEST = ("factory", "metric", "normalize")


def write_index_dir(
    directory: str | Path,
    index: Any,
    ids: Sequence[str] | Mapping[int, str],
    manifest: Mapping[str, Any],
    vectors: np.ndarray | None = None,
    overwrite: bool = False,
    metadata: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write an index directory atomically (see the module doc for the layout).

    Args:
        directory: target directory; must not exist unless ``overwrite``.
        index: the filled faiss index.
        ids: one sample id per stored vector in row (insertion) order: a sequence (faiss ids 0..N-1) or a
            mapping ``{faiss id: sample id}``.
        manifest: at least ``factory``, ``metric``, ``normalize``; usually also ``checkpoint`` (content hash),
            ``feature_key``, ``build_seconds``, ``search_params``. Count, dimension, versions, time and file
            checksums are filled in here.
        vectors: optional (N, D) float32 vectors as added, in row order; stored as vectors.npy.
        overwrite: replace an existing directory.
        metadata: optional JSON object per stored vector, in row order (``{}`` for a row without); written as the
            rows' ``"meta"`` in ids.jsonl (:func:`vitssl.index.pipeline.corpus_metadata` checks a corpus's).

    Returns:
        The directory.
    """
    directory = Path(directory)
    _check_overwrite(directory, overwrite)
    missing = [k for k in _REQUIRED_MANIFEST if k not in manifest]
    if missing:
        raise ValueError(f"manifest is missing {missing}; it needs at least {list(_REQUIRED_MANIFEST)}")
    if _gpu.is_gpu_index(index):  # faiss writes only CPU indexes
        index = _gpu.index_gpu_to_cpu(index)
    faiss_ids, samples = _normalise_ids(ids, int(index.ntotal))
    rows_meta = _check_metadata(metadata, int(index.ntotal))
    if vectors is not None and (vectors.shape != (index.ntotal, index.d) or vectors.dtype != np.float32):
        raise ValueError(
            f"vectors must be float32 of shape ({index.ntotal}, {index.d}) to match the index, "
            f"got {vectors.dtype} {vectors.shape}"
        )
    # The folder is the unit of atomicity: files inside the temporary folder need no temporaries of their own.
    with atomic_dir(directory, overwrite=overwrite) as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        _write_ids(tmp / IDS_FILE, faiss_ids, samples, rows_meta)
        if vectors is not None:
            np.save(tmp / VECTORS_FILE, vectors)
        _write_manifest(tmp, manifest, int(index.ntotal), int(index.d))
    return directory


def _write_manifest(tmp: Path, manifest: Mapping[str, Any], count: int, dimension: int) -> None:
    files = {}
    for name in (INDEX_FILE, IDS_FILE, VECTORS_FILE):
        path = tmp / name
        if path.exists():
            # vectors.npy gets its size checked at load, not its hash (hashing it would read N x D x 4 bytes).
            entry: dict[str, Any] = {"bytes": path.stat().st_size}
            if name != VECTORS_FILE:
                entry["sha256"] = _sha256(path)
            files[name] = entry
    full = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "checkpoint": None,
        "feature_key": None,
        "search_params": {},
        "shard": None,
        "trained_sha256": None,
        **dict(manifest),
        "count": count,
        "dimension": dimension,
        "has_vectors": (tmp / VECTORS_FILE).exists(),
        "files": files,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "vitssl_version": __version__,
        "faiss_version": faiss.__version__,
    }
    write_json(full, tmp / MANIFEST_FILE, sort_keys=True)


@dataclass
class LoadedIndex:
    """An index directory in memory: the faiss index, its manifest and its id map.

    Attributes:
        directory: where it was read from.
        index: the faiss index, with the manifest's search parameters applied.
        manifest: the parsed manifest.json.
        faiss_ids: (N,) int64 faiss ids in row order.
        samples: N sample ids (paths) in row order.
        metadata: N metadata dicts in row order (``{}`` for a row without), or None when no row has any (every
            index written before metadata existed).
    """

    directory: Path
    index: Any
    manifest: dict[str, Any]
    faiss_ids: np.ndarray
    samples: list[str]
    metadata: list[dict[str, Any]] | None = None
    _row_of: dict[int, int] = field(default_factory=dict, repr=False)
    _gpu_index: Any = field(default=None, repr=False)  # GPU copy made by the first GPU search, then reused

    def row_of(self, faiss_id: int) -> int:
        """Row of a faiss id (KeyError for unknown ids)."""
        if not self._row_of:
            self._row_of = {int(i): r for r, i in enumerate(self.faiss_ids.tolist())}
        return self._row_of[int(faiss_id)]

    def lookup(self, ids: np.ndarray) -> list[list[str | None]]:
        """Sample ids for an array of faiss ids, shaped like it (-1 = no result -> None)."""
        return [[None if i < 0 else self.samples[self.row_of(i)] for i in row] for row in np.atleast_2d(ids)]

    def meta_of(self, faiss_id: int) -> dict[str, Any]:
        """Metadata of a faiss id's row (``{}`` when it has none; KeyError for unknown ids)."""
        row = self.row_of(faiss_id)
        return dict(self.metadata[row]) if self.metadata is not None else {}

    def vectors(self) -> np.ndarray:
        """The stored (N, D) float32 vectors, memory-mapped read-only."""
        if not self.manifest.get("has_vectors"):
            raise IndexFormatError(
                f"{self.directory} was built without {VECTORS_FILE}; rebuild it with vectors stored "
                "(store_vectors=True) for exact re-search, evaluation or merging"
            )
        return np.load(self.directory / VECTORS_FILE, mmap_mode="r")


def _fail(directory: Path, what: str, fix: str = "rebuild it with `vitssl index build`") -> IndexFormatError:
    return IndexFormatError(f"index directory {directory}: {what}; {fix}")


def load_index_dir(
    directory: str | Path,
    expect_dim: int | None = None,
    expect_checkpoint: str | None = None,
    expect_feature_key: str | None = None,
    verify: bool = True,
) -> LoadedIndex:
    """Read and validate an index directory.

    Args:
        directory: the directory written by :func:`write_index_dir`.
        expect_dim: fail unless the index has this dimension (the query features' dimension).
        expect_checkpoint: fail unless the index was built from this checkpoint hash.
        expect_feature_key: fail unless the index was built from this feature layer / transform key.
        verify: check the sha256 of index.faiss and ids.jsonl against the manifest (reads them once more).

    Returns:
        The loaded index.

    Raises:
        IndexFormatError: a file is missing or corrupt, the id map and index disagree, or an expectation fails.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise IndexFormatError(f"{directory} is not a directory; pass the directory `vitssl index build` wrote")
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise _fail(directory, f"{MANIFEST_FILE} is missing (not an index directory, or an interrupted build)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _fail(directory, f"{MANIFEST_FILE} is not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        raise _fail(
            directory,
            f"{MANIFEST_FILE} describes format {manifest.get('format')!r} version {manifest.get('format_version')!r}, "
            f"expected {FORMAT_NAME!r} version {FORMAT_VERSION}",
        )
    absent = [k for k in (*_REQUIRED_MANIFEST, "count", "dimension", "files") if k not in manifest]
    if absent:
        raise _fail(directory, f"{MANIFEST_FILE} lacks the keys {absent}")
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise _fail(directory, f"{name} is missing")
        if path.stat().st_size != entry["bytes"]:
            raise _fail(
                directory,
                f"{name} has {path.stat().st_size} bytes, the manifest says {entry['bytes']} (truncated or modified)",
            )
        if verify and "sha256" in entry and _sha256(path) != entry["sha256"]:
            raise _fail(directory, f"{name} does not match its checksum in {MANIFEST_FILE} (corrupt or modified)")
    for name in (INDEX_FILE, IDS_FILE):
        if name not in manifest["files"]:
            raise _fail(directory, f"{MANIFEST_FILE} does not list {name}")
    try:
        index = faiss.read_index(str(directory / INDEX_FILE))
    except RuntimeError as err:
        raise _fail(directory, f"{INDEX_FILE} cannot be read by faiss ({_faiss_message(err)})") from None
    faiss_ids, samples, metadata = _read_ids(directory)
    if not (index.ntotal == len(samples) == manifest["count"]):
        raise _fail(
            directory,
            f"count mismatch: {INDEX_FILE} holds {index.ntotal} vectors, {IDS_FILE} has {len(samples)} entries, "
            f"{MANIFEST_FILE} says {manifest['count']}",
        )
    if index.d != manifest["dimension"]:
        raise _fail(directory, f"{INDEX_FILE} has dimension {index.d}, {MANIFEST_FILE} says {manifest['dimension']}")
    if expect_dim is not None and index.d != expect_dim:
        raise _fail(
            directory,
            f"the index has dimension {index.d} but the query features have {expect_dim} (another model or layer)",
            "use the checkpoint and feature layer the index was built with, or rebuild the index",
        )
    if expect_checkpoint is not None and manifest.get("checkpoint") != expect_checkpoint:
        raise _fail(
            directory,
            f"the index was built from checkpoint {manifest.get('checkpoint')!r}, not {expect_checkpoint!r}",
            "query with the checkpoint the index was built from, or rebuild the index",
        )
    if expect_feature_key is not None and manifest.get("feature_key") != expect_feature_key:
        raise _fail(
            directory,
            f"the index was built from features {manifest.get('feature_key')!r}, not {expect_feature_key!r}",
            "query with the same feature layer and transform, or rebuild the index",
        )
    if manifest.get("has_vectors"):
        vec = np.load(directory / VECTORS_FILE, mmap_mode="r")
        if vec.shape != (index.ntotal, index.d) or vec.dtype != np.float32:
            raise _fail(
                directory, f"{VECTORS_FILE} is {vec.dtype} {vec.shape}, expected float32 ({index.ntotal}, {index.d})"
            )
    params = manifest.get("search_params", {})
    set_search_params(index, params.get("nprobe"), params.get("efSearch"))
    return LoadedIndex(directory, index, manifest, faiss_ids, samples, metadata)


def _read_ids(directory: Path) -> tuple[np.ndarray, list[str], list[dict[str, Any]] | None]:
    ids, samples, metadata = [], [], []
    with open(directory / IDS_FILE, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                entry = json.loads(line)
                ids.append(int(entry["id"]))
                samples.append(str(entry["sample"]))
                meta = entry.get("meta", {})
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                raise _fail(directory, f"{IDS_FILE} line {line_no} is not a {{'id', 'sample'}} JSON object") from None
            if not isinstance(meta, dict):
                raise _fail(directory, f"{IDS_FILE} line {line_no} has a 'meta' that is not a JSON object")
            metadata.append(meta)
    return np.asarray(ids, dtype=np.int64), samples, metadata if any(metadata) else None


def record_manifest(directory: str | os.PathLike, **entries: Any) -> None:
    """Add entries (``video``, ``source``) to an index folder's manifest (atomically; it carries no checksum)."""
    path = Path(directory) / MANIFEST_FILE
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest.update(entries)
    write_json(manifest, path, sort_keys=True)


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IDS_FILE",
    "INDEX_FILE",
    "MANIFEST_FILE",
    "VECTORS_FILE",
    "IndexFormatError",
    "LoadedIndex",
    "load_index_dir",
    "record_manifest",
    "write_index_dir",
]
