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

GPU: with a GPU build of faiss that sees a GPU (``vitssl._faiss.gpu_available()``), IVF-Flat indexes are trained
and filled on the GPU and Flat / IVF-Flat indexes searched there; other index types, k or nprobe above 2048,
and ``use_gpu=False`` (every builder and :func:`search` take it) stay on the CPU. What is returned and written
is always a CPU index, so index directories do not depend on where they were built. GPU k-means may pick
slightly different centroids than CPU k-means: build the train step and a single build on the same kind of
device to keep them identical.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from vitssl import __version__
from vitssl._faiss import faiss, gpu_available
from vitssl.errors import UserError
from vitssl.eval.knn import normalize_features
from vitssl.eval.retrieval_metrics import mean_average_precision
from vitssl.io import atomic_dir, atomic_path, write_json

_logger = logging.getLogger(__name__)

FORMAT_NAME = "vitssl-index"
FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.jsonl"
MANIFEST_FILE = "manifest.json"
VECTORS_FILE = "vectors.npy"

Metric = Literal["ip", "l2"]
_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
# Below this many training vectors per centroid (IVF list, PQ codebook entry) faiss's k-means is poorly
# conditioned; faiss's own warning uses the same number (ClusteringParameters.min_points_per_centroid).
_FAISS_POINTS_PER_CENTROID = 39
# faiss GPU indexes return at most this many neighbours and visit at most this many IVF lists per query.
_GPU_MAX_K = 2048
# HNSW's default efSearch (16) gives poor recall at k = 10; 64 is a common operating point.
DEFAULT_EF_SEARCH = 64


class IndexFormatError(UserError, ValueError):
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


def _pow2_at_most(value: float) -> int:
    return 2 ** max(0, int(math.log2(max(1.0, value))))


def _suggest_factory(factory: str, n_train: int) -> str:
    """A smaller factory that ``n_train`` vectors can train well: fewer IVF lists, fewer PQ bits per code."""
    per_centroid = n_train / _FAISS_POINTS_PER_CENTROID
    suggestion = re.sub(
        r"IVF(\d+)", lambda m: f"IVF{min(int(m.group(1)), _pow2_at_most(per_centroid))}", factory, count=1
    )

    def fewer_bits(m: re.Match[str]) -> str:
        bits = min(int(m.group(2) or 8), max(1, int(math.log2(max(1.0, per_centroid)))))
        return f"PQ{m.group(1)}" if bits == 8 else f"PQ{m.group(1)}x{bits}"

    # PQ<m>[x<bits>] as a whole factory component only: not OPQ<m>, not fast-scan "PQ<m>x4fs" (4 bits fixed).
    suggestion = re.sub(r"(?<![A-Za-z])PQ(\d+)(?:x(\d+))?(?=,|$)", fewer_bits, suggestion)
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


@contextlib.contextmanager
def _quiet_kmeans(index: Any) -> Iterator[list[tuple[str, int]]]:
    """Silence faiss's per-k-means warnings while ``index`` trains; yields (what, centroids) of each k-means.

    faiss prints "WARNING clustering N points to K centroids: please provide at least ..." to the C-level
    stderr from every k-means with fewer than ``min_points_per_centroid`` (39) points per centroid: once for
    the IVF lists and once per PQ sub-quantizer (8 for PQ8), per OPQ iteration. That threshold feeds only this
    message, so it is set to 1 here and :func:`_check_training_size` logs one warning instead. OPQ trains a
    PQ of its own unless given one; it gets a quiet one for the duration.
    """
    stages: list[tuple[str, int]] = []
    opqs: list[Any] = []
    keep: list[Any] = []  # Python owners of the PQs lent to OPQ while it trains
    node = index
    while node is not None:
        node = faiss.downcast_index(node)
        if hasattr(node, "nlist") and hasattr(node, "cp"):  # IVF, also GPU IVF
            node.cp.min_points_per_centroid = 1
            node.cp.verbose = False
            stages.append(("IVF lists", int(node.nlist)))
        pq = getattr(node, "pq", None)
        if pq is not None and hasattr(pq, "cp"):
            pq.cp.min_points_per_centroid = 1
            stages.append(("centroids per PQ codebook", int(pq.ksub)))
        chain = getattr(node, "chain", None)  # IndexPreTransform
        for i in range(chain.size() if chain is not None else 0):
            vt = faiss.downcast_VectorTransform(chain.at(i))
            if isinstance(vt, faiss.OPQMatrix) and not vt.is_trained and vt.pq is None:
                opq_pq = faiss.ProductQuantizer(vt.d_out, vt.M, 8)  # what OPQ would make itself
                opq_pq.cp.min_points_per_centroid = 1
                vt.pq = opq_pq
                keep.append(opq_pq)
                opqs.append(vt)
                stages.append(("centroids per OPQ codebook", 256))
        node = getattr(node, "index", None)  # IDMap / pre-transform wrappers
    try:
        yield stages
    finally:
        for vt in opqs:
            vt.pq = None  # the lent PQ dies with this frame; OPQ must not keep a pointer to it


def _check_training_size(index: Any, stages: Sequence[tuple[str, int]], n_train: int, factory: str) -> None:
    """Raise when faiss cannot train ``index`` on ``n_train`` vectors; log one warning when it trains poorly."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and n_train < ivf.nlist:
        raise ValueError(
            f"index factory {factory!r} partitions the vectors into {ivf.nlist} lists and needs at least "
            f"{ivf.nlist} training vectors (faiss recommends {_FAISS_POINTS_PER_CENTROID * ivf.nlist}), got "
            f"{n_train}: use a smaller factory, {_suggest_factory(factory, n_train)}"
        )
    short = [(what, k) for what, k in stages if n_train < _FAISS_POINTS_PER_CENTROID * k]
    if short:
        needs = ", ".join(f"{_FAISS_POINTS_PER_CENTROID * k} for the {k} {what}" for what, k in short)
        _logger.warning(
            "training %r on %d vectors, fewer than the %d per centroid faiss recommends (%s): recall may suffer; "
            "use a smaller factory, %s, or train on more vectors",
            factory,
            n_train,
            _FAISS_POINTS_PER_CENTROID,
            needs,
            _suggest_factory(factory, n_train),
        )


def _train(index: Any, x: np.ndarray, factory: str, use_gpu: bool | None) -> Any:
    """Train ``index`` on prepared vectors (on a GPU when :func:`_decide_gpu` says so); returns a CPU index."""
    with _quiet_kmeans(index) as stages:
        _check_training_size(index, stages, x.shape[0], factory)
        on_gpu = _decide_gpu(index, use_gpu)
        target = _index_cpu_to_gpu(index) if on_gpu else index
        with _quiet_kmeans(target) if on_gpu else contextlib.nullcontext():
            try:
                target.train(x)
            except RuntimeError as err:
                raise ValueError(
                    f"faiss could not train index factory {factory!r} on {x.shape[0]} vectors: "
                    f"{_faiss_message(err)}. Use a smaller factory (fewer IVF lists, fewer PQ bits), "
                    f"{_suggest_factory(factory, x.shape[0])}, or train on more vectors"
                ) from None
    return _index_gpu_to_cpu(target) if on_gpu else target


def train_index(
    train_embeddings: np.ndarray | torch.Tensor,
    factory: str,
    metric: Metric = "ip",
    normalize: bool = True,
    use_gpu: bool | None = None,
) -> Any:
    """Train an empty index for ``factory`` (IVF k-means, PQ codebooks, ...); a no-op for Flat / HNSW.

    With fewer than 39 training vectors per centroid (of the IVF lists or of a PQ codebook) it logs one
    warning that suggests a smaller factory; faiss's own per-k-means warnings are silenced.

    Args:
        train_embeddings: (N_train, D) training vectors (see :func:`training_sample_indices`).
        factory: faiss index factory string.
        metric: "ip" or "l2".
        normalize: L2-normalise the vectors first (must match the vectors added later).
        use_gpu: train IVF-Flat k-means on a GPU; None = when faiss has one (see :func:`_decide_gpu`).

    Returns:
        A trained, empty CPU index.

    Raises:
        ValueError: the factory cannot be trained on this many vectors (the message suggests a smaller one).
    """
    x = _prepare(train_embeddings, normalize, "train_embeddings")
    index = new_index(factory, x.shape[1], metric)
    if index.is_trained:
        return index
    return _train(index, x, factory, use_gpu)


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
    # The GPU build's parameter space also reaches GPU IVF indexes and falls back to the CPU one otherwise.
    space = faiss.GpuParameterSpace() if hasattr(faiss, "GpuParameterSpace") else faiss.ParameterSpace()
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


def _add_on_device(index: Any, x: np.ndarray, ids: np.ndarray, use_gpu: bool | None) -> Any:
    """Add vectors, assigning them to IVF lists on a GPU when allowed; returns the filled CPU index.

    Only IVF gains from it (the assignment is a search of the centroids); adding to a Flat index is a copy.
    """
    if faiss.try_extract_index_ivf(index) is None or not _decide_gpu(index, use_gpu):
        _add(index, x, ids)
        return index
    target = _index_cpu_to_gpu(index)
    _add(target, x, ids)
    return _index_gpu_to_cpu(target)


def build_index(
    embeddings: np.ndarray | torch.Tensor,
    factory: str = "Flat",
    metric: Metric = "ip",
    normalize: bool = True,
    train_size: int | None = None,
    seed: int = 0,
    ids: np.ndarray | Sequence[int] | None = None,
    use_gpu: bool | None = None,
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
        use_gpu: train and fill IVF-Flat indexes on a GPU; None = when faiss has one, False = never
            (see :func:`_decide_gpu`). The result is a CPU index either way.

    Returns:
        The CPU index, with :func:`default_search_params` applied.

    Raises:
        ValueError: the factory is invalid or cannot be trained on this many vectors (the message suggests a
            smaller factory).
    """
    x = _prepare(embeddings, normalize)
    id_arr = np.arange(x.shape[0], dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    if id_arr.shape != (x.shape[0],):
        raise ValueError(f"ids must have shape ({x.shape[0]},) to match the embeddings, got {id_arr.shape}")
    index = new_index(factory, x.shape[1], metric)
    if not index.is_trained:
        index = _train(index, x[training_sample_indices(x.shape[0], train_size, seed)], factory, use_gpu)
    index = _add_on_device(index, x, id_arr, use_gpu)
    params = default_search_params(index)
    set_search_params(index, params.get("nprobe"), params.get("efSearch"))
    return index


# --------------------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------------------


def _gpu_capable(index: Any) -> bool:
    """Whether faiss can run ``index`` on a GPU and copy it back unchanged: Flat, or IVF-Flat over a flat
    coarse quantizer, also inside an IDMap. (faiss has GPU IVF-PQ / IVF-SQ too, with their own limits on code
    sizes; other coarse quantizers, e.g. HNSW, would come back flat.)"""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexIDMap):  # IndexIDMap2 derives from it
        inner = faiss.downcast_index(inner.index)
    if type(inner) in (faiss.IndexFlat, faiss.IndexFlatIP, faiss.IndexFlatL2):
        return True
    return type(inner) is faiss.IndexIVFFlat and isinstance(faiss.downcast_index(inner.quantizer), faiss.IndexFlat)


def _decide_gpu(index: Any, use_gpu: bool | None, k: int = 1, nprobe: int = 1) -> bool:
    """Whether to run ``index`` on a GPU.

    Args:
        index: the CPU index.
        use_gpu: None = yes when faiss has GPU support and sees a GPU and the index, ``k`` and ``nprobe`` fit
            (else the CPU, silently); True = yes, or an error saying why not; False = never.
        k: neighbours per query.
        nprobe: IVF lists visited per query.

    Raises:
        RuntimeError: ``use_gpu=True`` but faiss has no GPU support or sees no GPU.
        ValueError: ``use_gpu=True`` but the index type, ``k`` or ``nprobe`` has no GPU version.
    """
    if use_gpu is False:
        return False
    fits = _gpu_capable(index) and k <= _GPU_MAX_K and nprobe <= _GPU_MAX_K
    if use_gpu is None:
        return fits and gpu_available()
    if not gpu_available():
        raise RuntimeError(
            "use_gpu=True but faiss has no GPU support or sees no GPU (vitssl._faiss.faiss_info() says which); "
            "install the GPU build of faiss (see the README) or pass use_gpu=False"
        )
    if not fits:
        kind = type(faiss.downcast_index(index)).__name__
        raise ValueError(
            f"use_gpu=True: faiss runs Flat and IVF-Flat indexes with k and nprobe <= {_GPU_MAX_K} on a GPU, "
            f"not a {kind} with k={k}, nprobe={nprobe}; pass use_gpu=None to fall back to the CPU"
        )
    return True


@functools.lru_cache(maxsize=1)
def _gpu_resources() -> Any:
    """One StandardGpuResources per process: it holds the cuBLAS handles and a scratch memory pool."""
    return faiss.StandardGpuResources()


def _index_cpu_to_gpu(index: Any) -> Any:
    """A GPU copy of a CPU index on the current device (``CUDA_VISIBLE_DEVICES`` picks it per rank)."""
    return faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)


def _index_gpu_to_cpu(index: Any) -> Any:
    """A CPU copy of a GPU index (only CPU indexes can be written or merged)."""
    return faiss.index_gpu_to_cpu(index)


def _is_gpu_index(index: Any) -> bool:
    while index is not None:
        index = faiss.downcast_index(index)
        if type(index).__name__.startswith("Gpu"):
            return True
        index = getattr(index, "index", None)
    return False


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


def _check_overwrite(directory: Path, overwrite: bool) -> None:
    """Fail before any work when the output exists and may not be replaced (writing checks again at the end)."""
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists; pass overwrite=True (--overwrite) to replace it")


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
    _check_overwrite(directory, overwrite)
    missing = [k for k in _REQUIRED_MANIFEST if k not in manifest]
    if missing:
        raise ValueError(f"manifest is missing {missing}; it needs at least {list(_REQUIRED_MANIFEST)}")
    if _is_gpu_index(index):  # faiss writes only CPU indexes
        index = _index_gpu_to_cpu(index)
    faiss_ids, samples = _normalise_ids(ids, int(index.ntotal))
    if vectors is not None and (vectors.shape != (index.ntotal, index.d) or vectors.dtype != np.float32):
        raise ValueError(
            f"vectors must be float32 of shape ({index.ntotal}, {index.d}) to match the index, "
            f"got {vectors.dtype} {vectors.shape}"
        )
    # The folder is the unit of atomicity: files inside the temporary folder need no temporaries of their own.
    with atomic_dir(directory, overwrite=overwrite) as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        _write_ids(tmp / IDS_FILE, faiss_ids, samples)
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
    """

    directory: Path
    index: Any
    manifest: dict[str, Any]
    faiss_ids: np.ndarray
    samples: list[str]
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
    use_gpu: bool | None = None,
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
        use_gpu: build IVF-Flat indexes on a GPU; None = when faiss has one, False = never (see :func:`build_index`).

    Returns:
        The directory.
    """
    t0 = time.perf_counter()
    _check_overwrite(Path(directory), overwrite)
    x = _prepare(embeddings, normalize)
    index = build_index(x, factory, metric, normalize=False, train_size=train_size, seed=seed, use_gpu=use_gpu)
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
    if _is_gpu_index(index):
        index = _index_gpu_to_cpu(index)
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
        sha256 = _sha256(tmp)
    info = {
        "factory": factory,
        "metric": metric,
        "normalize": normalize,
        "dimension": int(index.d),
        "train_count": int(train_count),
        "seed": seed,
        "sha256": sha256,
    }
    write_json(info, path.with_name(path.name + ".json"))
    return path


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
    use_gpu: bool | None = None,
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
        use_gpu: assign vectors to IVF lists on a GPU; None = when faiss has one, False = never.

    Returns:
        The shard directory.
    """
    t0 = time.perf_counter()
    _check_overwrite(Path(directory), overwrite)
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
    index = _add_on_device(index, x, np.arange(first_id, first_id + x.shape[0], dtype=np.int64), use_gpu)
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
    out_dir = Path(out_dir)
    _check_overwrite(out_dir, overwrite)
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
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
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
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k search of an index directory (or a loaded one); queries are normalised like the stored vectors.

    Args:
        index: a :class:`LoadedIndex` or an index directory.
        queries: (Q, D) query vectors.
        k: results per query.
        nprobe: IVF lists to visit for this call (None = the manifest's value).
        ef_search: HNSW search breadth for this call (None = the manifest's value).
        use_gpu: search Flat and IVF-Flat indexes on a GPU (copied there on first use and kept with the
            :class:`LoadedIndex`); None = when faiss has one and k, nprobe <= 2048; False = never.

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
    stored = {**default_search_params(loaded.index), **loaded.manifest.get("search_params", {})}
    target = loaded.index
    if _decide_gpu(loaded.index, use_gpu, k, nprobe or stored.get("nprobe", 1)):
        if loaded._gpu_index is None:
            loaded._gpu_index = _index_cpu_to_gpu(loaded.index)  # carries the manifest's nprobe along
        target = loaded._gpu_index
    if nprobe is None and ef_search is None:
        return target.search(q, k)
    # Overrides apply to this call only; the index goes back to the manifest's parameters.
    set_search_params(target, nprobe, ef_search)
    try:
        return target.search(q, k)
    finally:
        set_search_params(
            target,
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


def evaluate_index(
    index: LoadedIndex | str | Path,
    queries: np.ndarray | torch.Tensor | None = None,
    ground_truth: Sequence[Iterable[int | str]] | None = None,
    k: int = 10,
    num_queries: int = 1000,
    seed: int = 0,
    nprobe: int | None = None,
    ef_search: int | None = None,
    use_gpu: bool | None = None,
) -> dict[str, Any]:
    """Recall@k of an index against exact search of its stored vectors, and mAP@k when ground truth is given.

    Args:
        index: a :class:`LoadedIndex` or an index directory (needs vectors.npy).
        queries: (Q, D) query vectors; None = ``num_queries`` stored vectors drawn with ``seed``.
        ground_truth: per query, relevant faiss ids (int) or sample ids (str).
        k: cut-off for recall and mAP.
        num_queries: sample size when ``queries`` is None.
        seed: sample seed.
        nprobe: IVF lists to visit (None = the manifest's value).
        ef_search: HNSW search breadth (None = the manifest's value).
        use_gpu: search the index on a GPU (see :func:`search`); exact search stays on the CPU.

    Returns:
        JSON-serialisable dict: ``k``, ``num_queries``, ``factory``, ``search_params``, ``recall`` ({"1": ..,
        "10": .., str(k): ..}, cut-offs up to k), ``index_seconds``, ``exact_seconds``, ``queries_per_second``, and
        with ground truth ``map`` and ``map_exact`` (the same metric on the exact ranking) and ``map_name``, which
        says what they are: ``"mAP@<k>"`` (AP@k over the top k, normalised by min(k, relevant)) or, when k
        covers the whole index, ``"mAP"`` (AP of the full ranking); see
        :func:`vitssl.eval.retrieval_metrics.mean_average_precision`.
    """
    loaded = _as_loaded(index)
    if queries is None:
        vectors = loaded.vectors()
        rows = np.sort(np.random.default_rng(seed).choice(len(vectors), min(num_queries, len(vectors)), replace=False))
        queries = np.asarray(vectors[rows])
    t0 = time.perf_counter()
    _, approx = search(loaded, queries, k, nprobe=nprobe, ef_search=ef_search, use_gpu=use_gpu)
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
        # k >= N ranks the whole index: then AP@k is AP, and is called so.
        cutoff = None if k >= loaded.index.ntotal else k
        result["map_name"] = "mAP" if cutoff is None else f"mAP@{k}"
        result["map"] = mean_average_precision(approx, truth, k=cutoff)
        result["map_exact"] = mean_average_precision(exact, truth, k=cutoff)
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
