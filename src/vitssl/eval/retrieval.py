"""Retrieval indexes over embeddings: build, store, shard, merge, query and evaluate faiss indexes.

Embeddings can come from any producer (image backbone, video clip head, ...): everything here takes (N, D)
float arrays plus one sample id (a file path or ``dataset.sample_id(i)``) per row.

Index directory (written atomically: a temporary sibling directory renamed into place)::

    manifest.json   what the index is: format version, factory, metric, normalize, dimension, count,
                    checkpoint hash, feature key (layer / transform), search parameters, build seconds,
                    vitssl / faiss versions, shard info, trained-index hash, and a checksum of each file
    index.faiss     the faiss index (``faiss.write_index``); vectors carry faiss ids (int64)
    ids.jsonl       one line per stored vector in row order: {"id": <faiss id>, "sample": "<sample id>"}
    vectors.npy     optional (N, D) float32 vectors as added (normalised when ``normalize``), row order of
                    ids.jsonl: exact re-search for recall and merging of non-IVF shards need them; they cost
                    N x D x 4 bytes (1M x 384 = 1.5 GB) on top of the index

Sharded build of a corpus of N items in n shards (``--shard i/n``; each shard can be a SLURM array task):

1. Train (only factories that need it: IVF, PQ, ...): ``rows = training_sample_indices(N, train_size, seed)``,
   embed those items, ``write_trained_index(work / "trained.faiss", train_index(embeddings, factory, ...))``.
   The sample depends on (N, train_size, seed) only, so every shard - and a single-process build with the
   same arguments - uses the same trained quantizer.
2. Shard i: ``start, stop = shard_range(N, i, n)``; embed rows [start, stop);
   ``build_shard(dir_i, embeddings, samples, shard=(i, n), first_id=start, trained=work / "trained.faiss")``.
   Faiss ids are global row numbers, so they stay unique across shards.
3. ``merge_shards([dir_0, ..., dir_{n-1}], out)``: IVF shards are merged list by list (``faiss.merge_into``;
   same trained quantizer required and checked through its hash), IDMap'd flat-code indexes (Flat, PQ, SQ)
   with ``merge_from``, other indexes (HNSW) by adding the stored vectors of shards 1..n-1 to shard 0 in order.
   For Flat and IVF the merged index equals a single build of the whole corpus; an HNSW graph built in pieces
   differs from one built at once (it is approximate either way).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from vitssl import __version__
from vitssl.eval._io import make_tmp_dir, replace_dir
from vitssl.eval.knn import faiss, normalize_features  # importing faiss through knn selects its BLAS kernels

_logger = logging.getLogger(__name__)

FORMAT_NAME = "vitssl-index"
FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.jsonl"
MANIFEST_FILE = "manifest.json"
VECTORS_FILE = "vectors.npy"

Metric = Literal["ip", "l2"]
_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
# Below this many training vectors per IVF list faiss warns that k-means is poorly conditioned.
_FAISS_POINTS_PER_CENTROID = 39
# HNSW's default efSearch (16) gives poor recall at k = 10; 64 is a common operating point.
DEFAULT_EF_SEARCH = 64


class IndexFormatError(ValueError):
    """An index directory is missing a file, is corrupt, or does not match what the caller expects."""


# --------------------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------------------


def _metric_type(metric: str) -> int:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {sorted(_METRICS)}, got {metric!r}")
    return _METRICS[metric]


def _prepare(embeddings: np.ndarray | torch.Tensor, normalize: bool, name: str = "embeddings") -> np.ndarray:
    """(N, D) contiguous float32, L2-normalised when asked; copies only when needed."""
    if normalize:
        return normalize_features(embeddings, name)
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().numpy()
    arr = np.ascontiguousarray(embeddings, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf values; check the feature extraction")
    return arr


def _native_ids(index: Any) -> bool:
    """IVF indexes (also behind a pre-transform) store ids themselves; others need an IDMap2 wrapper."""
    return faiss.try_extract_index_ivf(index) is not None


def new_index(factory: str, dimension: int, metric: Metric = "ip") -> Any:
    """An empty, untrained faiss index for ``factory`` that accepts ``add_with_ids``.

    Args:
        factory: a ``faiss.index_factory`` string ("Flat", "IVF1024,Flat", "IVF4096,PQ64", "HNSW32", ...).
        dimension: vector dimension.
        metric: "ip" (inner product; cosine on normalised vectors) or "l2".

    Returns:
        The index; non-IVF indexes are wrapped in ``IndexIDMap2`` so they keep the caller's ids.
    """
    metric_type = _metric_type(metric)
    try:
        index = faiss.index_factory(dimension, factory, metric_type)
    except RuntimeError as err:
        raise ValueError(
            f"faiss cannot build index factory {factory!r} for dimension {dimension}: {_faiss_message(err)}. "
            "Examples of valid factories: 'Flat', 'IVF1024,Flat', 'IVF4096,PQ64', 'HNSW32'"
        ) from None
    if not (factory.startswith("IDMap") or _native_ids(index)):
        index = faiss.index_factory(dimension, "IDMap2," + factory, metric_type)
    _skip_polysemous_training(index)
    return index


def _skip_polysemous_training(index: Any) -> None:
    """Turn off the polysemous training that factory "PQ<m>" strings request.

    It only reorders each PQ codebook so that Hamming distances between codes mimic real distances, which only
    polysemous search (``polysemous_ht`` > 0) uses; we never enable it, so results are the same without it, and
    it dominated the build time (24 s of 24 s for "IVF16,PQ8" on 3000 vectors on the 2-core machine).
    """
    while index is not None:
        index = faiss.downcast_index(index)
        if hasattr(index, "do_polysemous_training"):
            index.do_polysemous_training = False
        index = getattr(index, "index", None)


def _faiss_message(err: Exception) -> str:
    """The human part of a faiss C++ exception (drops the 'Error in <signature> at <file>:<line>:' prefix)."""
    text = str(err).strip()
    match = re.search(r"at \S+:\d+: (.*)", text, flags=re.S)
    return match.group(1).strip() if match else text


def _suggest_factory(factory: str, n_train: int) -> str:
    nlist = 2 ** max(0, int(math.log2(max(1, n_train // _FAISS_POINTS_PER_CENTROID))))
    suggestion = re.sub(r"IVF\d+", f"IVF{nlist}", factory, count=1)
    return f"e.g. {suggestion!r}, or 'Flat' for exact search"


def training_sample_indices(num_items: int, train_size: int | None, seed: int = 0) -> np.ndarray:
    """Rows of a corpus used to train an index: all of them, or a sorted random sample of ``train_size``.

    Depends only on its arguments, so a sharded build and a single build agree on the sample.

    Args:
        num_items: corpus size N.
        train_size: sample size; None = all rows.
        seed: sample seed.

    Returns:
        (min(N, train_size),) sorted int64 row indices.
    """
    if train_size is None or train_size >= num_items:
        return np.arange(num_items, dtype=np.int64)
    if train_size < 1:
        raise ValueError(f"train_size must be >= 1 or None (all rows), got {train_size}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_items, size=train_size, replace=False)).astype(np.int64)


def train_index(
    train_embeddings: np.ndarray | torch.Tensor, factory: str, metric: Metric = "ip", normalize: bool = True
) -> Any:
    """Train an empty index for ``factory`` (IVF k-means, PQ codebooks, ...); a no-op for Flat / HNSW.

    Args:
        train_embeddings: (N_train, D) training vectors (see :func:`training_sample_indices`).
        factory: faiss index factory string.
        metric: "ip" or "l2".
        normalize: L2-normalise the vectors first (must match the vectors added later).

    Returns:
        A trained, empty index.
    """
    x = _prepare(train_embeddings, normalize, "train_embeddings")
    index = new_index(factory, x.shape[1], metric)
    if index.is_trained:
        return index
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and x.shape[0] < ivf.nlist:
        raise ValueError(
            f"index factory {factory!r} partitions the vectors into {ivf.nlist} lists and needs at least "
            f"{ivf.nlist} training vectors (faiss recommends {_FAISS_POINTS_PER_CENTROID * ivf.nlist}), got "
            f"{x.shape[0]}: use a smaller factory, {_suggest_factory(factory, x.shape[0])}"
        )
    if ivf is not None and x.shape[0] < _FAISS_POINTS_PER_CENTROID * ivf.nlist:
        _logger.warning(
            "training %r on %d vectors: faiss recommends >= %d (%d per list); recall may suffer",
            factory,
            x.shape[0],
            _FAISS_POINTS_PER_CENTROID * ivf.nlist,
            _FAISS_POINTS_PER_CENTROID,
        )
    try:
        index.train(x)
    except RuntimeError as err:
        raise ValueError(
            f"faiss could not train index factory {factory!r} on {x.shape[0]} vectors: {_faiss_message(err)}. "
            f"Use a smaller factory (fewer IVF lists, fewer PQ bits), {_suggest_factory(factory, x.shape[0])}, "
            "or train on more vectors"
        ) from None
    return index


def default_search_params(index: Any) -> dict[str, int]:
    """Search parameters recorded with a new index: nprobe for IVF (1/32 of the lists, 8..nlist), efSearch
    for HNSW; {} for exact indexes."""
    params: dict[str, int] = {}
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        params["nprobe"] = int(min(ivf.nlist, max(8, ivf.nlist // 32)))
    if _find_hnsw(index) is not None:
        params["efSearch"] = DEFAULT_EF_SEARCH
    return params


def _find_hnsw(index: Any) -> Any:
    """The IndexHNSW inside ``index`` (through IDMap / pre-transform wrappers), or None."""
    while True:
        downcast = faiss.downcast_index(index)
        if hasattr(downcast, "hnsw"):
            return downcast
        inner = getattr(downcast, "index", None)
        if inner is None:
            return None
        index = inner


def set_search_params(index: Any, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """Set IVF ``nprobe`` / HNSW ``efSearch`` on ``index`` (through wrappers); None leaves a value unchanged.

    Raises:
        ValueError: the index has no such parameter (e.g. nprobe on a Flat index).
    """
    space = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
        if value is None:
            continue
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
        try:
            space.set_index_parameter(index, name, int(value))
        except RuntimeError:
            kind = type(faiss.downcast_index(index)).__name__
            hint = "IVF indexes" if name == "nprobe" else "HNSW indexes"
            raise ValueError(f"{name} applies to {hint}; this index is a {kind}") from None


def _add(index: Any, x: np.ndarray, ids: np.ndarray) -> None:
    index.add_with_ids(x, np.ascontiguousarray(ids, dtype=np.int64))


def build_index(
    embeddings: np.ndarray | torch.Tensor,
    factory: str = "Flat",
    metric: Metric = "ip",
    normalize: bool = True,
    train_size: int | None = None,
    seed: int = 0,
    ids: np.ndarray | Sequence[int] | None = None,
) -> Any:
    """Build a filled faiss index over ``embeddings``.

    Factories that need training (IVF, PQ) are trained on ``training_sample_indices(N, train_size, seed)``.

    Args:
        embeddings: (N, D) vectors.
        factory: faiss index factory string ("Flat", "IVF1024,Flat", "IVF4096,PQ64", "HNSW32", ...).
        metric: "ip" (inner product; cosine when normalised) or "l2".
        normalize: L2-normalise the vectors before adding them (queries must then be normalised too).
        train_size: training sample size; None = all vectors.
        seed: training sample seed.
        ids: (N,) int64 faiss ids; None = 0..N-1.

    Returns:
        The index, with :func:`default_search_params` applied.

    Raises:
        ValueError: the factory is invalid or cannot be trained on this many vectors (the message suggests a
            smaller factory).
    """
    x = _prepare(embeddings, normalize)
    sample = training_sample_indices(x.shape[0], train_size, seed)
    index = new_index(factory, x.shape[1], metric)
    if not index.is_trained:
        index = train_index(x[sample], factory, metric, normalize=False)
    id_arr = np.arange(x.shape[0], dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    if id_arr.shape != (x.shape[0],):
        raise ValueError(f"ids must have shape ({x.shape[0]},) to match the embeddings, got {id_arr.shape}")
    _add(index, x, id_arr)
    params = default_search_params(index)
    set_search_params(index, params.get("nprobe"), params.get("efSearch"))
    return index


# --------------------------------------------------------------------------------------------------------------
# Index directories
# --------------------------------------------------------------------------------------------------------------


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


def _replace_dir(tmp: Path, directory: Path, overwrite: bool) -> None:
    """Move a finished temporary directory into place; the old one (if any) disappears only afterwards."""
    if directory.exists() and not overwrite:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileExistsError(f"{directory} already exists; pass overwrite=True (--overwrite) to replace it")
    replace_dir(tmp, directory)


def _write_ids(path: Path, faiss_ids: np.ndarray, samples: Sequence[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, s in zip(faiss_ids.tolist(), samples):
            f.write(json.dumps({"id": i, "sample": s}) + "\n")


_REQUIRED_MANIFEST = ("factory", "metric", "normalize")


def write_index_dir(
    directory: str | Path,
    index: Any,
    ids: Sequence[str] | Mapping[int, str],
    manifest: Mapping[str, Any],
    vectors: np.ndarray | None = None,
    overwrite: bool = False,
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

    Returns:
        The directory.
    """
    directory = Path(directory)
    missing = [k for k in _REQUIRED_MANIFEST if k not in manifest]
    if missing:
        raise ValueError(f"manifest is missing {missing}; it needs at least {list(_REQUIRED_MANIFEST)}")
    faiss_ids, samples = _normalise_ids(ids, int(index.ntotal))
    if vectors is not None and (vectors.shape != (index.ntotal, index.d) or vectors.dtype != np.float32):
        raise ValueError(
            f"vectors must be float32 of shape ({index.ntotal}, {index.d}) to match the index, "
            f"got {vectors.dtype} {vectors.shape}"
        )
    tmp = make_tmp_dir(directory)
    try:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        _write_ids(tmp / IDS_FILE, faiss_ids, samples)
        if vectors is not None:
            np.save(tmp / VECTORS_FILE, vectors)
        _write_manifest(tmp, manifest, int(index.ntotal), int(index.d))
        _replace_dir(tmp, directory, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    with open(tmp / MANIFEST_FILE, "w", encoding="utf-8") as f:
        json.dump(full, f, indent=2, sort_keys=True)
        f.write("\n")


@dataclass
class LoadedIndex:
    """An index directory in memory: the faiss index, its manifest and its id map.

    Attributes:
        directory: where it was read from.
        index: the faiss index, with the manifest's search parameters applied.
        manifest: the parsed manifest.json.
        faiss_ids: (N,) int64 faiss ids in row order.
        samples: N sample ids (paths) in row order.
    """

    directory: Path
    index: Any
    manifest: dict[str, Any]
    faiss_ids: np.ndarray
    samples: list[str]
    _row_of: dict[int, int] = field(default_factory=dict, repr=False)

    def row_of(self, faiss_id: int) -> int:
        """Row of a faiss id (KeyError for unknown ids)."""
        if not self._row_of:
            self._row_of = {int(i): r for r, i in enumerate(self.faiss_ids.tolist())}
        return self._row_of[int(faiss_id)]

    def lookup(self, ids: np.ndarray) -> list[list[str | None]]:
        """Sample ids for an array of faiss ids, shaped like it (-1 = no result -> None)."""
        return [[None if i < 0 else self.samples[self.row_of(i)] for i in row] for row in np.atleast_2d(ids)]

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
    faiss_ids, samples = _read_ids(directory)
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
    return LoadedIndex(directory, index, manifest, faiss_ids, samples)


def _read_ids(directory: Path) -> tuple[np.ndarray, list[str]]:
    ids, samples = [], []
    with open(directory / IDS_FILE, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                entry = json.loads(line)
                ids.append(int(entry["id"]))
                samples.append(str(entry["sample"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise _fail(directory, f"{IDS_FILE} line {line_no} is not a {{'id', 'sample'}} JSON object") from None
    return np.asarray(ids, dtype=np.int64), samples


def build_index_dir(
    directory: str | Path,
    embeddings: np.ndarray | torch.Tensor,
    samples: Sequence[str],
    factory: str = "Flat",
    metric: Metric = "ip",
    normalize: bool = True,
    train_size: int | None = None,
    seed: int = 0,
    checkpoint: str | None = None,
    feature_key: str | None = None,
    store_vectors: bool = True,
    overwrite: bool = False,
) -> Path:
    """Build an index over ``embeddings`` and write it as an index directory (single-process build).

    Args:
        directory: output directory.
        embeddings: (N, D) vectors.
        samples: N sample ids (paths), row order; faiss ids are 0..N-1.
        factory: faiss index factory string.
        metric: "ip" or "l2".
        normalize: L2-normalise vectors (and later queries).
        train_size: training sample size for IVF / PQ; None = all vectors.
        seed: training sample seed.
        checkpoint: checkpoint content hash recorded in the manifest (checked at query time).
        feature_key: feature layer / transform key recorded in the manifest.
        store_vectors: also write vectors.npy (exact re-search, evaluation, merging).
        overwrite: replace an existing directory.

    Returns:
        The directory.
    """
    t0 = time.perf_counter()
    x = _prepare(embeddings, normalize)
    index = build_index(x, factory, metric, normalize=False, train_size=train_size, seed=seed)
    manifest = {
        "factory": factory,
        "metric": metric,
        "normalize": normalize,
        "checkpoint": checkpoint,
        "feature_key": feature_key,
        "train_size": len(training_sample_indices(x.shape[0], train_size, seed)),
        "seed": seed,
        "search_params": default_search_params(index),
        "build_seconds": time.perf_counter() - t0,
    }
    return write_index_dir(directory, index, list(samples), manifest, x if store_vectors else None, overwrite)


# --------------------------------------------------------------------------------------------------------------
# Sharded building
# --------------------------------------------------------------------------------------------------------------


def shard_range(num_items: int, shard_index: int, num_shards: int) -> tuple[int, int]:
    """Rows [start, stop) of shard ``shard_index`` of ``num_shards`` contiguous, near-equal shards."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard must be i/n with 0 <= i < n, got {shard_index}/{num_shards}")
    return num_items * shard_index // num_shards, num_items * (shard_index + 1) // num_shards


def write_trained_index(
    path: str | Path, index: Any, factory: str, metric: Metric, normalize: bool, train_count: int, seed: int
) -> Path:
    """Write a trained, empty index (``trained.faiss``) and its description (``trained.faiss.json``).

    Args:
        path: file to write, conventionally ``<work dir>/trained.faiss``.
        index: the trained empty index from :func:`train_index`.
        factory: its factory string.
        metric: "ip" or "l2".
        normalize: whether its training vectors were normalised.
        train_count: number of training vectors.
        seed: training sample seed.

    Returns:
        The path.
    """
    path = Path(path)
    if index.ntotal != 0:
        raise ValueError(f"a trained index to share between shards must be empty, this one holds {index.ntotal}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    faiss.write_index(index, str(tmp))
    info = {
        "factory": factory,
        "metric": metric,
        "normalize": normalize,
        "dimension": int(index.d),
        "train_count": int(train_count),
        "seed": seed,
        "sha256": _sha256(tmp),
    }
    os.replace(tmp, path)
    _atomic_write_text(path.with_name(path.name + ".json"), json.dumps(info, indent=2) + "\n")
    return path


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_trained_index(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """Read ``trained.faiss`` and its description, verifying the checksum."""
    path = Path(path)
    info_path = path.with_name(path.name + ".json")
    if not path.is_file() or not info_path.is_file():
        raise IndexFormatError(
            f"trained index {path} or its description {info_path.name} is missing; run the train step first"
        )
    info = json.loads(info_path.read_text(encoding="utf-8"))
    if _sha256(path) != info.get("sha256"):
        raise IndexFormatError(f"trained index {path} does not match its checksum (corrupt); rerun the train step")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as err:
        raise IndexFormatError(
            f"trained index {path} cannot be read ({_faiss_message(err)}); rerun the train step"
        ) from None
    return index, info


def build_shard(
    directory: str | Path,
    embeddings: np.ndarray | torch.Tensor,
    samples: Sequence[str],
    shard: tuple[int, int],
    first_id: int,
    factory: str = "Flat",
    metric: Metric = "ip",
    normalize: bool = True,
    trained: str | Path | None = None,
    checkpoint: str | None = None,
    feature_key: str | None = None,
    store_vectors: bool = True,
    overwrite: bool = False,
) -> Path:
    """Build shard ``i/n`` of a corpus as its own index directory (see the module doc for the flow).

    Args:
        directory: output directory of this shard.
        embeddings: (N_shard, D) vectors of rows [first_id, first_id + N_shard) of the corpus.
        samples: their sample ids.
        shard: ``(i, n)``.
        first_id: corpus row of the shard's first vector (``shard_range(N, i, n)[0]``); faiss ids are rows.
        factory: faiss index factory string.
        metric: "ip" or "l2".
        normalize: L2-normalise vectors.
        trained: ``trained.faiss`` from the train step; required for factories that need training.
        checkpoint: checkpoint content hash.
        feature_key: feature layer / transform key.
        store_vectors: also write vectors.npy (needed to merge HNSW shards).
        overwrite: replace an existing directory.

    Returns:
        The shard directory.
    """
    t0 = time.perf_counter()
    x = _prepare(embeddings, normalize)
    index = new_index(factory, x.shape[1], metric)
    trained_sha = None
    if trained is not None:
        index, info = read_trained_index(trained)
        expected = {"factory": factory, "metric": metric, "normalize": normalize, "dimension": x.shape[1]}
        wrong = {k: info.get(k) for k, v in expected.items() if info.get(k) != v}
        if wrong:
            raise IndexFormatError(
                f"trained index {trained} was made with {wrong}, but this shard uses "
                f"{ {k: expected[k] for k in wrong} }; rerun the train step with the shard's settings"
            )
        if index.ntotal != 0:
            raise IndexFormatError(f"trained index {trained} is not empty ({index.ntotal} vectors)")
        trained_sha = info["sha256"]
    elif not index.is_trained:
        raise ValueError(
            f"index factory {factory!r} needs training: run the train step (train_index + write_trained_index on "
            "training_sample_indices of the whole corpus) and pass trained=<trained.faiss> to every shard"
        )
    _add(index, x, np.arange(first_id, first_id + x.shape[0], dtype=np.int64))
    params = default_search_params(index)
    set_search_params(index, params.get("nprobe"), params.get("efSearch"))
    i, n = shard
    manifest = {
        "factory": factory,
        "metric": metric,
        "normalize": normalize,
        "checkpoint": checkpoint,
        "feature_key": feature_key,
        "shard": {"index": int(i), "count": int(n), "first_id": int(first_id)},
        "trained_sha256": trained_sha,
        "search_params": params,
        "build_seconds": time.perf_counter() - t0,
    }
    ids = {first_id + r: s for r, s in enumerate(samples)}
    return write_index_dir(directory, index, ids, manifest, x if store_vectors else None, overwrite)


_MERGE_KEYS = ("factory", "metric", "normalize", "dimension", "checkpoint", "feature_key", "trained_sha256")


def merge_shards(shard_dirs: Sequence[str | Path], out_dir: str | Path, overwrite: bool = False) -> Path:
    """Merge shard index directories into one index directory (see the module doc for how and when it equals a
    single build).

    Args:
        shard_dirs: the directories of all n shards, in any order.
        out_dir: output directory.
        overwrite: replace an existing output directory.

    Returns:
        The output directory.

    Raises:
        IndexFormatError: shards are missing, duplicated or built with different settings.
    """
    t0 = time.perf_counter()
    if not shard_dirs:
        raise ValueError("merge_shards needs at least one shard directory")
    shards = [load_index_dir(d) for d in shard_dirs]
    for s in shards:
        if not s.manifest.get("shard"):
            raise IndexFormatError(f"{s.directory} is not a shard (its manifest has no shard entry)")
    shards.sort(key=lambda s: s.manifest["shard"]["index"])
    n = shards[0].manifest["shard"]["count"]
    seen = [s.manifest["shard"]["index"] for s in shards]
    if any(s.manifest["shard"]["count"] != n for s in shards) or seen != list(range(n)):
        raise IndexFormatError(
            f"merge needs each of the {n} shards exactly once; got shard indices {seen} "
            f"(missing {sorted(set(range(n)) - set(seen))})"
        )
    ref = shards[0].manifest
    for s in shards[1:]:
        diff = {k: (ref.get(k), s.manifest.get(k)) for k in _MERGE_KEYS if ref.get(k) != s.manifest.get(k)}
        if diff:
            raise IndexFormatError(
                f"shard {s.directory} was built differently from {shards[0].directory}: {diff} "
                "(first shard's value, this shard's value); rebuild the shards with the same settings"
            )
    faiss_ids = np.concatenate([s.faiss_ids for s in shards])
    if len(np.unique(faiss_ids)) != len(faiss_ids):
        raise IndexFormatError("shards share faiss ids; build each shard with first_id = its first corpus row")

    base = shards[0].index
    for s in shards[1:]:
        if _native_ids(base):
            faiss.merge_into(base, s.index, False)
        else:
            _merge_non_ivf(base, s)
    has_vectors = all(s.manifest.get("has_vectors") for s in shards)
    samples = [x for s in shards for x in s.samples]
    manifest = {k: v for k, v in ref.items() if k not in ("files", "count", "dimension", "has_vectors", "created")}
    manifest.update(
        shard=None,
        merged_from=n,
        build_seconds=sum(s.manifest.get("build_seconds", 0.0) for s in shards) + time.perf_counter() - t0,
    )
    out_dir = Path(out_dir)
    tmp = make_tmp_dir(out_dir)
    try:
        faiss.write_index(base, str(tmp / INDEX_FILE))
        _write_ids(tmp / IDS_FILE, faiss_ids, samples)
        if has_vectors:
            # Streamed shard by shard, so the merged vectors never need to fit in memory.
            out = np.lib.format.open_memmap(
                tmp / VECTORS_FILE, mode="w+", dtype=np.float32, shape=(len(samples), int(ref["dimension"]))
            )
            row = 0
            for s in shards:
                v = s.vectors()
                out[row : row + len(v)] = v
                row += len(v)
            out.flush()
            del out
        _write_manifest(tmp, manifest, int(base.ntotal), int(base.d))
        _replace_dir(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _merge_non_ivf(base: Any, shard: LoadedIndex) -> None:
    """Append a shard to an IDMap'd non-IVF index: flat-code indexes merge codes, others re-add vectors."""
    try:
        base.merge_from(shard.index)
        return
    except RuntimeError:
        pass  # e.g. HNSW graphs cannot be concatenated
    if not shard.manifest.get("has_vectors"):
        raise IndexFormatError(
            f"shard {shard.directory} ({shard.manifest['factory']!r}) can only be merged by re-adding its vectors, "
            f"but it has no {VECTORS_FILE}; rebuild the shards with store_vectors=True"
        )
    _add(base, np.ascontiguousarray(shard.vectors()), shard.faiss_ids)


# --------------------------------------------------------------------------------------------------------------
# Searching and evaluating
# --------------------------------------------------------------------------------------------------------------


def _as_loaded(index: LoadedIndex | str | Path) -> LoadedIndex:
    return index if isinstance(index, LoadedIndex) else load_index_dir(index)


def search(
    index: LoadedIndex | str | Path,
    queries: np.ndarray | torch.Tensor,
    k: int = 10,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k search of an index directory (or a loaded one); queries are normalised like the stored vectors.

    Args:
        index: a :class:`LoadedIndex` or an index directory.
        queries: (Q, D) query vectors.
        k: results per query.
        nprobe: IVF lists to visit for this call (None = the manifest's value).
        ef_search: HNSW search breadth for this call (None = the manifest's value).

    Returns:
        ``(scores (Q, k) float32, faiss ids (Q, k) int64)``, best first; inner products for "ip" (higher is
        better), squared distances for "l2" (lower is better); id -1 where fewer than k results exist. Map ids
        to sample ids with ``LoadedIndex.lookup``.
    """
    loaded = _as_loaded(index)
    q = _prepare(queries, bool(loaded.manifest["normalize"]), "queries")
    if q.shape[1] != loaded.index.d:
        raise IndexFormatError(
            f"queries have dimension {q.shape[1]} but the index at {loaded.directory} has {loaded.index.d}; "
            "embed the queries with the checkpoint and layer the index was built from"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if nprobe is None and ef_search is None:
        return loaded.index.search(q, k)
    # Overrides apply to this call only; the loaded index goes back to the manifest's parameters.
    set_search_params(loaded.index, nprobe, ef_search)
    try:
        return loaded.index.search(q, k)
    finally:
        stored = {**default_search_params(loaded.index), **loaded.manifest.get("search_params", {})}
        set_search_params(
            loaded.index,
            stored.get("nprobe") if nprobe is not None else None,
            stored.get("efSearch") if ef_search is not None else None,
        )


def exact_search(loaded: LoadedIndex, queries: np.ndarray | torch.Tensor, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force search of the stored vectors (the ground truth for recall): same outputs as :func:`search`."""
    q = _prepare(queries, bool(loaded.manifest["normalize"]), "queries")
    vectors = loaded.vectors()
    metric = _metric_type(loaded.manifest["metric"])
    scores, rows = faiss.knn(q, np.ascontiguousarray(vectors), min(k, len(vectors)), metric=metric)
    ids = np.where(rows >= 0, loaded.faiss_ids[np.maximum(rows, 0)], -1)
    if k > len(vectors):  # pad like faiss does when fewer than k vectors exist
        pad = k - len(vectors)
        fill = -np.inf if loaded.manifest["metric"] == "ip" else np.inf
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=fill)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    return scores, ids


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean over queries of |top-k approx ∩ top-k exact| / |top-k exact| (-1 entries ignored).

    Args:
        approx_ids: (Q, >= k) ids from the index under test.
        exact_ids: (Q, >= k) ids from exact search.
        k: cut-off.

    Returns:
        Recall in [0, 1].
    """
    approx_ids, exact_ids = np.asarray(approx_ids), np.asarray(exact_ids)
    if approx_ids.shape[0] != exact_ids.shape[0]:
        raise ValueError(
            f"approx_ids and exact_ids need the same number of queries: {approx_ids.shape[0]} vs {exact_ids.shape[0]}"
        )
    if approx_ids.shape[1] < k or exact_ids.shape[1] < k:
        raise ValueError(f"both id arrays need at least k={k} columns, got {approx_ids.shape} and {exact_ids.shape}")
    recalls = []
    for a, e in zip(approx_ids[:, :k], exact_ids[:, :k]):
        truth = set(e[e >= 0].tolist())
        if truth:
            recalls.append(len(truth.intersection(a[a >= 0].tolist())) / len(truth))
    return float(np.mean(recalls)) if recalls else float("nan")


def mean_average_precision(
    ranked_ids: Sequence[Sequence[Any]] | np.ndarray, ground_truth: Sequence[Collection]
) -> float:
    """Mean average precision of ranked results: AP = (1/|R|) Σ over relevant ranks r of precision@r.

    |R| counts all relevant items of a query, also those below the cut-off, so a short ranking cannot score
    well by omission. Queries without relevant items are skipped (with a warning).

    Args:
        ranked_ids: per query, ids best first (a (Q, k) array or lists).
        ground_truth: per query, the relevant ids.

    Returns:
        mAP in [0, 1].
    """
    if len(ranked_ids) != len(ground_truth):
        raise ValueError(f"ranked_ids has {len(ranked_ids)} queries but ground_truth has {len(ground_truth)}")
    aps, skipped = [], 0
    for ranking, relevant in zip(ranked_ids, ground_truth):
        relevant = set(relevant.tolist() if isinstance(relevant, np.ndarray) else relevant)
        if not relevant:
            skipped += 1
            continue
        hits, precision_sum = 0, 0.0
        for rank, item in enumerate(ranking.tolist() if isinstance(ranking, np.ndarray) else ranking, 1):
            if item in relevant:
                hits += 1
                precision_sum += hits / rank
        aps.append(precision_sum / len(relevant))
    if skipped:
        _logger.warning("mAP: skipped %d queries without relevant items", skipped)
    if not aps:
        raise ValueError("no query has relevant items in the ground truth; mAP is undefined")
    return float(np.mean(aps))


def read_ground_truth(path: str | Path) -> list[tuple[str, list[str]]]:
    """Read a ground-truth file: JSON lines ``{"query": "<path>", "relevant": ["<sample id>", ...]}``."""
    path = Path(path)
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                out.append((str(entry["query"]), [str(r) for r in entry["relevant"]]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(
                    f'{path} line {line_no}: expected {{"query": path, "relevant": [sample ids]}} ({err})'
                ) from None
    return out


def evaluate_index(
    index: LoadedIndex | str | Path,
    queries: np.ndarray | torch.Tensor | None = None,
    ground_truth: Sequence[Iterable[int | str]] | None = None,
    k: int = 10,
    num_queries: int = 1000,
    seed: int = 0,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> dict[str, Any]:
    """Recall@k of an index against exact search of its stored vectors, and mAP when ground truth is given.

    Args:
        index: a :class:`LoadedIndex` or an index directory (needs vectors.npy).
        queries: (Q, D) query vectors; None = ``num_queries`` stored vectors drawn with ``seed``.
        ground_truth: per query, relevant faiss ids (int) or sample ids (str).
        k: cut-off for recall and mAP.
        num_queries: sample size when ``queries`` is None.
        seed: sample seed.
        nprobe: IVF lists to visit (None = the manifest's value).
        ef_search: HNSW search breadth (None = the manifest's value).

    Returns:
        JSON-serialisable dict: ``k``, ``num_queries``, ``factory``, ``search_params``, ``recall`` ({"1": ..,
        "10": .., str(k): ..}, cut-offs up to k), ``index_seconds``, ``exact_seconds``, ``queries_per_second``, and
        with ground truth ``map`` and ``map_exact`` (the same metric on the exact ranking).
    """
    loaded = _as_loaded(index)
    if queries is None:
        vectors = loaded.vectors()
        rows = np.sort(np.random.default_rng(seed).choice(len(vectors), min(num_queries, len(vectors)), replace=False))
        queries = np.asarray(vectors[rows])
    t0 = time.perf_counter()
    _, approx = search(loaded, queries, k, nprobe=nprobe, ef_search=ef_search)
    index_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, exact = exact_search(loaded, queries, k)
    exact_s = time.perf_counter() - t0
    cutoffs = sorted({c for c in (1, 10, k) if c <= k})
    params = default_search_params(loaded.index)
    params.update(loaded.manifest.get("search_params", {}))
    params.update({k_: v for k_, v in (("nprobe", nprobe), ("efSearch", ef_search)) if v is not None})
    result: dict[str, Any] = {
        "k": k,
        "num_queries": len(approx),
        "factory": loaded.manifest["factory"],
        "search_params": params,
        "recall": {str(c): recall_at_k(approx, exact, c) for c in cutoffs},
        "index_seconds": index_s,
        "exact_seconds": exact_s,
        "queries_per_second": len(approx) / index_s if index_s > 0 else float("inf"),
    }
    if ground_truth is not None:
        truth = [_to_faiss_ids(loaded, g) for g in ground_truth]
        result["map"] = mean_average_precision(approx, truth)
        result["map_exact"] = mean_average_precision(exact, truth)
    return result


def _to_faiss_ids(loaded: LoadedIndex, items: Iterable[int | str]) -> set[int]:
    out = set()
    by_sample: dict[str, int] | None = None
    for item in items:
        if isinstance(item, str):
            if by_sample is None:
                by_sample = dict(zip(loaded.samples, loaded.faiss_ids.tolist()))
            if item not in by_sample:
                raise ValueError(f"ground-truth sample {item!r} is not in the index at {loaded.directory}")
            out.add(by_sample[item])
        else:
            out.add(int(item))
    return out


# --------------------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------------------


def _thumbnail(path: str | None, size: int) -> np.ndarray:
    """An RGB thumbnail (size, size, 3) of an image file; a grey tile when it is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    tile = np.full((size, size, 3), 200, dtype=np.uint8)
    if path is None:
        return tile
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((size, size))
            arr = np.asarray(img)
    except (OSError, UnidentifiedImageError) as err:
        _logger.warning("query grid: cannot read %s (%s); drawing a blank tile", path, err)
        return tile
    y, x = (size - arr.shape[0]) // 2, (size - arr.shape[1]) // 2
    tile[y : y + arr.shape[0], x : x + arr.shape[1]] = arr
    return tile


def save_query_grid_png(
    query_paths: Sequence[str],
    neighbour_paths: Sequence[Sequence[str | None]],
    scores: np.ndarray | Sequence[Sequence[float]],
    path: str | Path,
    thumb_size: int = 128,
) -> Path:
    """Draw one row per query: the query image, then its neighbours left to right with their scores.

    Args:
        query_paths: Q query image files.
        neighbour_paths: per query, k neighbour image files (None = no result).
        scores: (Q, k) scores shown under the neighbours.
        path: output PNG.
        thumb_size: tile size in pixels.

    Returns:
        The PNG path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if len(query_paths) != len(neighbour_paths) or len(query_paths) != len(scores):
        raise ValueError(
            f"query_paths ({len(query_paths)}), neighbour_paths ({len(neighbour_paths)}) and scores "
            f"({len(scores)}) must have one entry per query"
        )
    rows = len(query_paths)
    cols = 1 + max((len(n) for n in neighbour_paths), default=0)
    inch = thumb_size / 100
    fig = Figure(figsize=(cols * inch, rows * (inch + 0.3)), dpi=100)
    FigureCanvasAgg(fig)  # attaches an Agg canvas; no pyplot, so no global backend change
    for r, (q, neigh) in enumerate(zip(query_paths, neighbour_paths)):
        for c in range(cols):
            ax = fig.add_subplot(rows, cols, r * cols + c + 1)
            ax.set_axis_off()
            if c == 0:
                ax.imshow(_thumbnail(q, thumb_size))
                ax.set_title("query", fontsize=8, color="tab:blue")
            elif c - 1 < len(neigh):
                ax.imshow(_thumbnail(neigh[c - 1], thumb_size))
                ax.set_title(f"{float(scores[r][c - 1]):.3f}", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
