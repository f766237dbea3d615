"""faiss index objects: a factory string to an empty index, training (with one clear warning or error about too
few training vectors), adding vectors with ids, search parameters, and a whole in-memory build.

Embeddings can come from any producer (image backbone, video head, ...): everything here takes (N, D) float
arrays. Index folders on disk are :mod:`vitssl.index.store`; searching them :mod:`vitssl.index.search`; where
faiss runs (CPU or GPU) :mod:`vitssl.index._gpu`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch

from vitssl._faiss import faiss
from vitssl.eval.knn import normalize_features
from vitssl.index import _gpu

_logger = logging.getLogger(__name__)

Metric = Literal["ip", "l2"]
_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
# Below this many training vectors per centroid (IVF list, PQ codebook entry) faiss's k-means is poorly
# conditioned; faiss's own warning uses the same number (ClusteringParameters.min_points_per_centroid).
_FAISS_POINTS_PER_CENTROID = 39

# HNSW's default efSearch (16) gives poor recall at k = 10; 64 is a common operating point.
DEFAULT_EF_SEARCH = 64


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
    """Train ``index`` on prepared vectors (on a GPU when :func:`~vitssl.index._gpu.decide_gpu` says so); returns
    a CPU index."""
    with _quiet_kmeans(index) as stages:
        _check_training_size(index, stages, x.shape[0], factory)
        on_gpu = _gpu.decide_gpu(index, use_gpu)
        target = _gpu.index_cpu_to_gpu(index) if on_gpu else index
        with _quiet_kmeans(target) if on_gpu else contextlib.nullcontext():
            try:
                target.train(x)
            except RuntimeError as err:
                raise ValueError(
                    f"faiss could not train index factory {factory!r} on {x.shape[0]} vectors: "
                    f"{_faiss_message(err)}. Use a smaller factory (fewer IVF lists, fewer PQ bits), "
                    f"{_suggest_factory(factory, x.shape[0])}, or train on more vectors"
                ) from None
    return _gpu.index_gpu_to_cpu(target) if on_gpu else target


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
        use_gpu: train IVF-Flat k-means on a GPU; None = when faiss has one (see :func:`vitssl.index._gpu.decide_gpu`).

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
    if faiss.try_extract_index_ivf(index) is None or not _gpu.decide_gpu(index, use_gpu):
        _add(index, x, ids)
        return index
    target = _gpu.index_cpu_to_gpu(index)
    _add(target, x, ids)
    return _gpu.index_gpu_to_cpu(target)


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
            (see :func:`vitssl.index._gpu.decide_gpu`). The result is a CPU index either way.

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


__all__ = [
    "DEFAULT_EF_SEARCH",
    "Metric",
    "build_index",
    "default_search_params",
    "new_index",
    "set_search_params",
    "train_index",
    "training_sample_indices",
]
