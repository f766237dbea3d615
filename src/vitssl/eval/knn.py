"""Weighted k-NN classification on frozen features (the DINO protocol), exact or approximate search with faiss.

Protocol: features are L2-normalised, neighbours are the top-k training features by cosine similarity (an
exact inner-product search), each neighbour votes for its label with weight ``exp(sim / T)``, and the class
scores are the summed votes. ``knn_predict`` returns the scores; ``knn_evaluate`` turns them into top-1 /
top-5 accuracy for several k at once (one search with the largest k: the top-k of a sorted list is a prefix).

Speed and memory. Exact search is one float32 GEMM of queries against the training set plus a running top-k;
faiss does both without materialising the (N_query, N_train) similarity matrix. Queries go in chunks; for each
chunk the training set (the bank) is read block by block, from an array or straight from a memory-mapped
feature store (float16 or float32, :mod:`vitssl.eval.store`), each block normalised into one reused buffer
(or used as it is when it is unit-norm float32 already), searched, and the blocks' top-k merged in a faiss
heap: memory is bounded by the chunk and block sizes, never by the bank, and no index is built. On a GPU
(faiss-gpu) the bank is copied block by block into one GPU flat index. ``approx=True`` searches an IVF index
instead (parameters from the bank size: :func:`approx_params`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from vitssl._faiss import faiss, gpu_available
from vitssl.eval.metrics import accuracy_report, topk_hits
from vitssl.eval.store import ShardedRows, row_blocks

_logger = logging.getLogger(__name__)


ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

# Queries per search pass: bounds the normalised-query copy and the (chunk, k) heaps. Each pass streams the
# whole training set once, so passes should hold many queries.
DEFAULT_QUERY_CHUNK = 16384
# Training rows normalised and searched per faiss call when the features are not unit-norm yet: 64 MiB of
# float32 (43690 rows at D = 384) bounds the buffer while keeping the number of calls (each has a fixed cost) low.
_TRAIN_BLOCK_BYTES = 64 << 20
# exp(sim / T) with |sim| <= 1 must stay finite in float32 (max ~ e^88.7) after summing up to k votes.
_MAX_INV_TEMPERATURE = 80.0
# IVF lists hold at least this many bank rows on average (fewer: k-means has too little to place a list).
_IVF_MIN_ROWS_PER_LIST = 64
# nprobe = nlist / this (see approx_params).
_NPROBE_DIVISOR = 16
# Features whose norms all lie within this of 1 count as already normalised (float32 rounding is ~1e-7).
_NORM_TOLERANCE = 1e-5


def _to_numpy(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """A NumPy view of ``x`` (a copy only where unavoidable: GPU tensors, other dtypes)."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if x.dtype == torch.bfloat16:  # NumPy has no bfloat16 (features extracted under autocast)
            x = x.float()
        x = x.numpy()
    elif not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    return x


def _float32_rows(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """(N, D) C-contiguous float32 NumPy rows of ``x``; a view when it already is one."""
    arr = _to_numpy(x, name)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{name} must hold floating-point features, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)  # no copy when already contiguous float32


def _inverse_norms(arr: np.ndarray, name: str, offset: int = 0) -> tuple[np.ndarray, bool]:
    """Per-row 1 / L2 norm as float32 (0 for zero rows), and whether every non-zero row already has norm 1.

    ``offset`` is the first row's index in the whole array (named in the error about a non-finite row)."""
    # einsum computes the squared norms without an (N, D) temporary.
    norms = np.sqrt(np.einsum("ij,ij->i", arr, arr, dtype=np.float64))  # (N,)
    if not np.all(np.isfinite(norms)):
        bad = offset + int(np.flatnonzero(~np.isfinite(norms))[0])
        raise ValueError(f"{name} row {bad} is not finite (NaN or inf); check the feature extraction")
    nonzero = norms > 0
    is_unit = bool(np.all(np.abs(norms[nonzero] - 1.0) <= _NORM_TOLERANCE))
    return np.where(nonzero, 1.0 / np.where(nonzero, norms, 1.0), 0.0).astype(np.float32), is_unit


def normalize_features(x: np.ndarray | torch.Tensor, name: str = "features") -> np.ndarray:
    """Return ``x`` as L2-normalised, C-contiguous float32 NumPy rows, copying only when needed.

    Already-normalised contiguous float32 input (CPU tensor or array) is returned as is, without a copy; other
    input is copied once. Zero rows stay zero (their similarity to everything is 0).

    Args:
        x: (N, D) features.
        name: how errors refer to ``x``.

    Returns:
        (N, D) float32 array.
    """
    arr = _float32_rows(x, name)
    inv, is_unit = _inverse_norms(arr, name)
    return arr if is_unit else arr * inv[:, None]


def _check_labels(labels: np.ndarray | torch.Tensor, n: int, num_classes: int | None) -> tuple[np.ndarray, int]:
    lab = _to_numpy(labels, "train_labels")
    if lab.ndim != 1 or lab.shape[0] != n:
        raise ValueError(f"train_labels must have shape ({n},) to match train_features, got {tuple(lab.shape)}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise TypeError(f"train_labels must be integer class indices, got dtype {lab.dtype}")
    lab = lab.astype(np.int64, copy=False)
    if num_classes is None:
        num_classes = int(lab.max()) + 1 if n else 0
    if n and (lab.min() < 0 or lab.max() >= num_classes):
        raise ValueError(
            f"train_labels must lie in [0, {num_classes}) for num_classes={num_classes}; "
            f"found values in [{int(lab.min())}, {int(lab.max())}]"
        )
    return lab, num_classes


# faiss GPU brute-force search supports k up to this value.
_GPU_MAX_K = 2048


def _bank_rows(train_features: Any) -> Any:
    """The bank as something :func:`~vitssl.eval.store.row_blocks` reads block by block, without a copy: a NumPy
    array or memory map, a store's :class:`~vitssl.eval.store.ShardedRows`, or a CPU tensor's NumPy view."""
    if isinstance(train_features, (ShardedRows, np.ndarray)):
        bank = train_features
    else:
        bank = _to_numpy(train_features, "train_features")
    if bank.ndim != 2:
        raise ValueError(f"train_features must be 2-D (N, D), got shape {tuple(bank.shape)}")
    if not np.issubdtype(bank.dtype, np.floating):
        raise TypeError(f"train_features must hold floating-point features, got dtype {bank.dtype}")
    return bank


def _unit_blocks(bank: Any, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, L2-normalised float32 rows)`` blocks of the bank, read one at a time.

    A block that is C-contiguous float32 and unit-norm already is used as it is (a view); others are converted
    and normalised into one reused buffer. The arithmetic depends only on the block's values, so a bank in
    memory and the same bank in a float32 store give the same blocks, bit for bit.
    """
    buffer: np.ndarray | None = None
    for start, block in row_blocks(bank, block_rows):
        if block.dtype == np.float32 and block.flags.c_contiguous:
            inv, is_unit = _inverse_norms(block, "train_features", start)
            if is_unit:
                yield start, block
                continue
        if buffer is None:
            buffer = np.empty((min(block_rows, len(bank)), bank.shape[1]), dtype=np.float32)
        out = buffer[: len(block)]
        np.copyto(out, block, casting="same_kind")  # float16 / float64 -> float32
        inv, _ = _inverse_norms(out, "train_features", start)
        np.multiply(out, inv[:, None], out=out)
        yield start, out


def _query_rows(query_features: Any, dim: int) -> Any:
    queries = query_features if isinstance(query_features, ShardedRows) else _to_numpy(query_features, "query_features")
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(
            f"query_features must have shape (N, {dim}) to match train_features, got {tuple(queries.shape)}"
        )
    return queries


def knn_search(
    train_features: np.ndarray | torch.Tensor | ShardedRows,
    query_features: np.ndarray | torch.Tensor | ShardedRows,
    k: int,
    chunk_size: int = DEFAULT_QUERY_CHUNK,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine-similarity top-k neighbours of each query among the training features, streamed.

    Queries are taken ``chunk_size`` at a time; for each chunk the bank is read block by block
    (``_TRAIN_BLOCK_BYTES`` of float32), normalised (:func:`_unit_blocks`), searched with ``faiss.knn`` and the
    blocks' top-k merged in a faiss heap. Memory is bounded by the chunk and block sizes, not by the bank, which
    may be a memory-mapped feature store (float16 or float32): it is never copied whole, and no index is built.
    Blocks are large because every faiss call has a fixed cost (measured on the development VM, noisily: 16 MiB
    blocks 2.9 s, 32 MiB 2.6 s, one call 2.4 s for 10k x 100k x 384).

    Args:
        train_features: (N_train, D) features: an array, tensor, memory map or a store's ``ShardedRows``.
        query_features: (N_query, D) features, read ``chunk_size`` rows at a time.
        k: neighbours per query; must not exceed N_train.
        chunk_size: queries per search pass (bounds the normalised query copy and the heaps).
        use_gpu: search on the GPU (faiss's GPU flat index, filled block by block); None = when faiss has GPU
            support and sees a GPU.

    Returns:
        ``(similarities (N_query, k) float32 sorted descending, indices (N_query, k) int64 into the train rows)``.
    """
    bank = _bank_rows(train_features)
    n_train, dim = bank.shape
    queries = _query_rows(query_features, dim)
    if not 1 <= k <= n_train:
        raise ValueError(f"k must lie in [1, {n_train}] (the number of training features), got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if use_gpu is None:
        use_gpu = gpu_available() and k <= _GPU_MAX_K
    elif use_gpu and not gpu_available():
        raise RuntimeError("use_gpu=True but faiss has no GPU support or sees no GPU; install faiss-gpu or pass False")
    block_rows = max(1, _TRAIN_BLOCK_BYTES // (4 * dim))

    n_query = queries.shape[0]
    sims = np.empty((n_query, k), dtype=np.float32)
    idx = np.empty((n_query, k), dtype=np.int64)
    if use_gpu:
        # The GPU index holds the one device copy of the (normalised) training set, filled block by block.
        resources = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(resources, dim)
        for _, block in _unit_blocks(bank, block_rows):
            index.add(block)
        for start in range(0, n_query, chunk_size):
            q = normalize_features(queries[start : start + chunk_size], "query_features")
            sims[start : start + len(q)], idx[start : start + len(q)] = index.search(q, k)
        return sims, idx
    for start in range(0, n_query, chunk_size):
        q = normalize_features(queries[start : start + chunk_size], "query_features")
        heap = faiss.ResultHeap(len(q), k, keep_max=True)
        for offset, block in _unit_blocks(bank, block_rows):
            block_sims, block_idx = faiss.knn(q, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(block_sims, block_idx + offset)
        heap.finalize()  # sorts each row, best first
        sims[start : start + len(q)], idx[start : start + len(q)] = heap.D, heap.I
    return sims, idx


def approx_params(n_train: int) -> dict[str, int]:
    """IVF parameters from the bank size: ``nlist`` lists (a power of two near sqrt(N), at least one list per
    ``_IVF_MIN_ROWS_PER_LIST`` rows), ``nprobe`` = nlist / ``_NPROBE_DIVISOR`` lists searched per query and
    ``train_rows`` = 40 x nlist rows for k-means (faiss asks for at least 39 per centroid).

    A query then compares with about nlist + N x nprobe / nlist vectors instead of N; on clustered features the
    true neighbours sit in a few nearby lists, so top-1 changes little (benchmarks/eval_scale.py measures both).
    """
    nlist = 1 << max(0, round(math.log2(max(1.0, math.sqrt(max(1, n_train))))))
    cap = max(1, n_train // _IVF_MIN_ROWS_PER_LIST)
    nlist = min(nlist, 1 << (cap.bit_length() - 1))  # powers of two both
    return {"nlist": nlist, "nprobe": max(1, nlist // _NPROBE_DIVISOR), "train_rows": min(n_train, 40 * nlist)}


def knn_search_approx(
    train_features: np.ndarray | torch.Tensor | ShardedRows,
    query_features: np.ndarray | torch.Tensor | ShardedRows,
    k: int,
    chunk_size: int = DEFAULT_QUERY_CHUNK,
    use_gpu: bool | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Approximate cosine top-k through an inverted file (IVF-Flat, inner product).

    Spherical k-means on ``train_rows`` bank rows places ``nlist`` centroids; every bank row (normalised, read
    block by block) joins the list of its nearest centroid; a query searches the ``nprobe`` lists nearest to
    it. Similarities of the neighbours found are exact; a query whose lists hold fewer than k rows gets index
    -1 and similarity -inf for the rest (no vote). The lists hold the bank as float32 in memory (N x D x 4
    bytes), unlike the exact search.

    On the CPU the lists are searched list by list, every query that probes a list at once, as one BLAS GEMM
    (``faiss.knn``): faiss's own IVF scan reads each probed list once per query and runs at memory speed (about
    2.6 GFLOP/s measured on the development VM at D = 768), a GEMM reuses each list across its queries. On a
    GPU, faiss's ``GpuIndexIVFFlat`` does the whole search.

    Args:
        train_features: (N_train, D) features (array, tensor, memory map or ``ShardedRows``).
        query_features: (N_query, D) features.
        k: neighbours per query (at most N_train).
        chunk_size: queries per pass (bounds the (chunk, nprobe x k) candidate buffers).
        use_gpu: build and search on the GPU; None = when faiss has GPU support and sees a GPU.
        nlist: inverted lists; None = :func:`approx_params`.
        nprobe: lists searched per query; None = nlist / ``_NPROBE_DIVISOR``.
        seed: k-means and sampling seed.

    Returns:
        ``(similarities (N_query, k) sorted descending, indices (N_query, k), params)`` with the parameters used.
    """
    bank = _bank_rows(train_features)
    n_train, dim = bank.shape
    queries = _query_rows(query_features, dim)
    if not 1 <= k <= n_train:
        raise ValueError(f"k must lie in [1, {n_train}] (the number of training features), got {k}")
    params = approx_params(n_train)
    if nlist:
        params.update(nlist=min(int(nlist), n_train), train_rows=min(n_train, 40 * int(nlist)))
    params["nprobe"] = min(params["nlist"], int(nprobe or max(1, params["nlist"] // _NPROBE_DIVISOR)))
    gpu = (gpu_available() and k <= _GPU_MAX_K and params["nprobe"] <= _GPU_MAX_K) if use_gpu is None else use_gpu
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n_train, params["train_rows"], replace=False))
    kmeans = faiss.Kmeans(dim, params["nlist"], niter=10, seed=seed, spherical=True, gpu=bool(gpu))
    kmeans.train(normalize_features(np.asarray(bank[sample], dtype=np.float32), "train_features"))
    centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)  # (nlist, D), unit norm
    block_rows = max(1, _TRAIN_BLOCK_BYTES // (4 * dim))
    search = _ivf_search_gpu if gpu else _ivf_search_cpu
    sims, idx = search(bank, queries, centroids, params["nprobe"], k, chunk_size, block_rows)
    return sims, idx, {**params, "index": "IVF-Flat", "device": "gpu" if gpu else "cpu"}


def _ivf_search_gpu(
    bank: Any, queries: Any, centroids: np.ndarray, nprobe: int, k: int, chunk_size: int, block_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """faiss's GPU IVF-Flat with the given (already trained) centroids."""
    nlist, dim = centroids.shape
    quantizer = faiss.IndexFlatIP(dim)
    quantizer.add(centroids)
    cpu_index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    cpu_index.is_trained = True
    index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu_index)
    for _, block in _unit_blocks(bank, block_rows):
        index.add(block)
    index.nprobe = nprobe
    sims = np.empty((queries.shape[0], k), dtype=np.float32)
    idx = np.empty((queries.shape[0], k), dtype=np.int64)
    for start in range(0, queries.shape[0], chunk_size):
        q = normalize_features(queries[start : start + chunk_size], "query_features")
        sims[start : start + len(q)], idx[start : start + len(q)] = index.search(q, k)
    sims[idx < 0] = -np.inf
    return sims, idx


def _ivf_search_cpu(
    bank: Any, queries: Any, centroids: np.ndarray, nprobe: int, k: int, chunk_size: int, block_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """IVF search list by list, each list against all the queries that probe it (one GEMM per list)."""
    nlist, dim = centroids.shape
    n_train = bank.shape[0]
    # Normalise and assign every bank row to its nearest centroid, then lay the rows out list by list.
    unit = np.empty((n_train, dim), dtype=np.float32)
    assign = np.empty(n_train, dtype=np.int64)
    for start, block in _unit_blocks(bank, block_rows):
        unit[start : start + len(block)] = block
        assign[start : start + len(block)] = faiss.knn(block, centroids, 1, metric=faiss.METRIC_INNER_PRODUCT)[1][:, 0]
    order = np.argsort(assign, kind="stable")  # bank rows, list by list, ascending within a list
    bounds = np.searchsorted(assign[order], np.arange(nlist + 1))
    lists = unit[order]  # (N, D): list l is lists[bounds[l]:bounds[l + 1]]
    del unit
    n_query = queries.shape[0]
    sims = np.full((n_query, k), -np.inf, dtype=np.float32)
    idx = np.full((n_query, k), -1, dtype=np.int64)
    for qstart in range(0, n_query, chunk_size):
        q = normalize_features(queries[qstart : qstart + chunk_size], "query_features")
        nq = len(q)
        probes = faiss.knn(q, centroids, nprobe, metric=faiss.METRIC_INNER_PRODUCT)[1]  # (nq, nprobe)
        cand_s = np.full((nq, nprobe * k), -np.inf, dtype=np.float32)
        cand_i = np.full((nq, nprobe * k), -1, dtype=np.int64)
        pairs = np.argsort(probes.ravel(), kind="stable")  # (query, slot) pairs, grouped by list
        starts = np.searchsorted(probes.ravel()[pairs], np.arange(nlist + 1))
        for lst in range(nlist):
            a, b = bounds[lst], bounds[lst + 1]
            pa, pb = starts[lst], starts[lst + 1]
            if a == b or pa == pb:
                continue
            qi, slot = np.divmod(pairs[pa:pb], nprobe)
            kk = int(min(k, b - a))
            s, i = faiss.knn(q[qi], lists[a:b], kk, metric=faiss.METRIC_INNER_PRODUCT)  # (m, kk)
            cols = slot[:, None] * k + np.arange(kk)  # (m, kk): this probe's slots of the candidate row
            cand_s[qi[:, None], cols] = s
            cand_i[qi[:, None], cols] = order[a + i]
        top = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]  # (nq, k); lists are disjoint: no row twice
        sims[qstart : qstart + nq] = np.take_along_axis(cand_s, top, axis=1)
        idx[qstart : qstart + nq] = np.where(
            np.isneginf(sims[qstart : qstart + nq]), -1, np.take_along_axis(cand_i, top, axis=1)
        )
    return sims, idx


# Query rows voted at once: bounds the float64 vote buffer to _VOTE_CHUNK x num_classes.
_VOTE_CHUNK = 4096


def _vote(sims: np.ndarray, neighbour_labels: np.ndarray, temperature: float, num_classes: int) -> np.ndarray:
    """Class scores (N, num_classes) float32: sum over neighbours of exp(sim / T) into each neighbour's class
    (a neighbour with similarity -inf, one not found, adds 0)."""
    n = sims.shape[0]
    scores = np.empty((n, num_classes), dtype=np.float32)
    for start in range(0, n, _VOTE_CHUNK):
        s, lab = sims[start : start + _VOTE_CHUNK], neighbour_labels[start : start + _VOTE_CHUNK]
        rows = len(s)
        weights = np.exp(s.astype(np.float64) / temperature)  # (rows, k)
        flat = (np.arange(rows, dtype=np.int64)[:, None] * num_classes + lab).ravel()  # (rows * k,)
        votes = np.bincount(flat, weights=weights.ravel(), minlength=rows * num_classes)
        scores[start : start + rows] = votes.reshape(rows, num_classes)
    return scores


def knn_scores_from_neighbours(
    sims: np.ndarray,
    neighbours: np.ndarray,
    train_labels: np.ndarray | torch.Tensor,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> np.ndarray:
    """Weighted votes from neighbours found elsewhere (e.g. an approximate index): the vote step of the protocol.

    Args:
        sims: (N_query, k) cosine similarities of the neighbours.
        neighbours: (N_query, k) row indices into ``train_labels``; -1 (faiss: no neighbour found) casts no vote.
        train_labels: (N_train,) integer labels.
        temperature: T in the vote weight exp(sim / T).
        num_classes: number of classes; None = max label + 1.

    Returns:
        (N_query, num_classes) float32 NumPy scores.
    """
    check_temperature(temperature)
    labels, num_classes = _check_labels(
        train_labels, int(_to_numpy(train_labels, "train_labels").shape[0]), num_classes
    )
    sims = np.asarray(sims, dtype=np.float32)
    neighbours = np.asarray(neighbours, dtype=np.int64)
    if sims.shape != neighbours.shape or sims.ndim != 2:
        raise ValueError(f"sims and neighbours must both be (N_query, k), got {sims.shape} and {neighbours.shape}")
    missing = neighbours < 0
    # A missing neighbour votes for class 0 with weight 0, which leaves every score unchanged.
    sims = np.where(missing, -np.inf, sims)
    return _vote(sims, labels[np.where(missing, 0, neighbours)], temperature, num_classes)


def check_temperature(temperature: float) -> None:
    """Raise ValueError unless ``temperature`` is a usable vote temperature (float32 votes stay finite)."""
    if not temperature > 0 or 1.0 / temperature > _MAX_INV_TEMPERATURE:
        raise ValueError(
            f"temperature must be >= {1 / _MAX_INV_TEMPERATURE:g} (exp(sim/T) overflows float32 below), "
            f"got {temperature}; the DINO protocol uses 0.07"
        )


def _like(scores: np.ndarray, template: Any) -> Any:
    """Return ``scores`` as a torch tensor on the template's device when the template is a tensor."""
    if isinstance(template, torch.Tensor):
        return torch.from_numpy(scores).to(template.device)
    return scores


def knn_predict_multi_k(
    train_features: ArrayT,
    train_labels: np.ndarray | torch.Tensor,
    query_features: ArrayT,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = DEFAULT_QUERY_CHUNK,
    use_gpu: bool | None = None,
) -> dict[int, ArrayT]:
    """Weighted k-NN class scores for several k from ONE search with the largest k.

    A k above the number of training features is clamped to it (with a warning); ks that clamp to the same
    value give ONE entry, keyed by the k actually used, never the same neighbours twice.

    Args:
        train_features: (N_train, D) numpy array, torch tensor, memory map or store view.
        train_labels: (N_train,) integer labels in ``[0, num_classes)``.
        query_features: (N_query, D) numpy array or torch tensor.
        ks: neighbour counts.
        temperature: T in the vote weight exp(sim / T).
        num_classes: number of classes; None = max label + 1.
        chunk_size: queries per faiss call.
        use_gpu: see :func:`knn_search`.

    Returns:
        ``{k used: scores (N_query, num_classes) float32}``, torch tensors on the query's device when
        ``query_features`` is a tensor, NumPy arrays otherwise.
    """
    used, sims, neighbour_labels, num_classes, _ = _search_max_k(
        train_features, train_labels, query_features, ks, temperature, num_classes, chunk_size, use_gpu
    )
    return {
        k: _like(_vote(sims[:, :k], neighbour_labels[:, :k], temperature, num_classes), query_features) for k in used
    }


def clamp_ks(ks: Sequence[int], n_train: int) -> list[int]:
    """The distinct neighbour counts to report, ascending: each k clamped to ``n_train`` (logged once).

    Args:
        ks: the neighbour counts asked for (positive).
        n_train: training features in the bank.
    """
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty list of positive neighbour counts, got {list(ks)}")
    over = sorted({int(k) for k in ks if int(k) > n_train})
    if over:
        _logger.warning(
            "k=%s exceeds the %d training features; using k=%d instead (all of them vote), reported once",
            ", ".join(map(str, over)),
            n_train,
            n_train,
        )
    return sorted({min(int(k), n_train) for k in ks})


def _search_max_k(
    train_features: Any,
    train_labels: np.ndarray | torch.Tensor,
    query_features: Any,
    ks: Sequence[int],
    temperature: float,
    num_classes: int | None,
    chunk_size: int,
    use_gpu: bool | None,
    approx: bool = False,
) -> tuple[list[int], np.ndarray, np.ndarray, int, dict[str, Any] | None]:
    """Validate, clamp the ks (:func:`clamp_ks`), search once with the largest.

    Returns:
        ``(ks used, sims (N_query, k_max), neighbour labels (N_query, k_max), C, approximate-search parameters
        or None)``; a neighbour an approximate search did not find has similarity -inf (no vote).
    """
    check_temperature(temperature)
    n_train = int(train_features.shape[0])
    labels, num_classes = _check_labels(train_labels, n_train, num_classes)
    used = clamp_ks(ks, n_train)
    params = None
    if approx:
        sims, idx, params = knn_search_approx(train_features, query_features, used[-1], chunk_size, use_gpu)
    else:
        sims, idx = knn_search(train_features, query_features, used[-1], chunk_size=chunk_size, use_gpu=use_gpu)
    return used, sims, labels[np.maximum(idx, 0)], num_classes, params  # labels: (N_query, k_max)


def knn_predict(
    train_features: ArrayT,
    train_labels: np.ndarray | torch.Tensor,
    query_features: ArrayT,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = DEFAULT_QUERY_CHUNK,
    use_gpu: bool | None = None,
) -> ArrayT:
    """Weighted k-NN class scores (DINO): sum over the k most cosine-similar training features of exp(sim / T).

    Args:
        train_features: (N_train, D) numpy array or torch tensor; not copied when already L2-normalised,
            C-contiguous float32 on the CPU.
        train_labels: (N_train,) integer labels in ``[0, num_classes)``.
        query_features: (N_query, D) numpy array or torch tensor.
        k: neighbours per query (clamped to N_train with a warning).
        temperature: T in the vote weight exp(sim / T).
        num_classes: number of classes; None = max label + 1.
        chunk_size: queries per faiss call.
        use_gpu: see :func:`knn_search`.

    Returns:
        (N_query, num_classes) float32 scores: a torch tensor on the query's device when ``query_features`` is
        a tensor, a NumPy array otherwise.
    """
    scores = knn_predict_multi_k(
        train_features, train_labels, query_features, (k,), temperature, num_classes, chunk_size, use_gpu
    )
    return next(iter(scores.values()))


def knn_evaluate(
    train_features: np.ndarray | torch.Tensor | ShardedRows,
    train_labels: np.ndarray | torch.Tensor,
    val_features: np.ndarray | torch.Tensor | ShardedRows,
    val_labels: np.ndarray | torch.Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = DEFAULT_QUERY_CHUNK,
    use_gpu: bool | None = None,
    approx: bool = False,
) -> dict[str, Any]:
    """Weighted k-NN accuracy of ``val`` against ``train`` for several k (one search).

    Args:
        train_features: (N_train, D) features; a feature store's memory-mapped view is streamed.
        train_labels: (N_train,) labels.
        val_features: (N_val, D) features, read ``chunk_size`` rows at a time.
        val_labels: (N_val,) labels.
        ks: neighbour counts to report (clamped to N_train, each distinct k once: :func:`clamp_ks`).
        temperature: T in the vote weight exp(sim / T).
        num_classes: number of classes; None = max label + 1 over train and val.
        chunk_size: queries per faiss call.
        use_gpu: see :func:`knn_search`.
        approx: search an IVF index (:func:`knn_search_approx`) instead of exactly.

    Returns:
        JSON-serialisable dict: ``temperature``, ``num_train``, ``num_val``, ``num_classes``, ``device``,
        ``search`` ("exact" or the IVF parameters), ``search_seconds`` and ``results``: ``{str(k): {"k",
        "top1", "top5", "mean_per_class_top1", "per_class_top1"}}`` (percentages; ``per_class_top1`` holds None
        for classes absent from val; top-5 is top-min(5, num_classes)).
    """
    vlab = _to_numpy(val_labels, "val_labels")
    if vlab.ndim != 1 or vlab.shape[0] != val_features.shape[0]:
        raise ValueError(f"val_labels must have shape ({val_features.shape[0]},), got {tuple(vlab.shape)}")
    vlab = vlab.astype(np.int64)
    if num_classes is None:
        tlab = _to_numpy(train_labels, "train_labels")
        num_classes = int(max(tlab.max(initial=-1), vlab.max(initial=-1))) + 1
    if vlab.size and (vlab.min() < 0 or vlab.max() >= num_classes):
        raise ValueError(f"val_labels must lie in [0, {num_classes}), found [{int(vlab.min())}, {int(vlab.max())}]")
    bank = _bank_rows(train_features)
    gpu = (gpu_available() and max(ks) <= _GPU_MAX_K) if use_gpu is None else use_gpu
    t0 = time.perf_counter()
    used, sims, neighbour_labels, num_classes, params = _search_max_k(
        bank, train_labels, val_features, ks, temperature, num_classes, chunk_size, gpu, approx
    )
    seconds = time.perf_counter() - t0
    # Vote and score chunk by chunk: the (N_val, num_classes) score matrices are never all held at once.
    top = min(5, num_classes)
    hits = {k: (np.zeros(len(vlab), dtype=bool), np.zeros(len(vlab), dtype=bool)) for k in used}
    for start in range(0, len(vlab), _VOTE_CHUNK):
        stop = start + _VOTE_CHUNK
        for k in used:
            scores = _vote(sims[start:stop, :k], neighbour_labels[start:stop, :k], temperature, num_classes)
            pred, hits[k][1][start:stop] = topk_hits(scores, vlab[start:stop], top)
            hits[k][0][start:stop] = pred == vlab[start:stop]
    results = {str(k): {"k": k, **accuracy_report(*hits[k], vlab, num_classes)} for k in used}
    return {
        "temperature": temperature,
        "num_train": int(bank.shape[0]),
        "num_val": int(vlab.shape[0]),
        "num_classes": num_classes,
        "device": "gpu" if gpu else "cpu",
        "search": params if params is not None else "exact",
        "search_seconds": seconds,
        "results": results,
    }


def format_knn_table(result: dict[str, Any]) -> str:
    """A short fixed-width table of a :func:`knn_evaluate` result: one row per k."""
    lines = [
        f"k-NN (T={result['temperature']:g}, {result['num_train']} train, {result['num_val']} val, "
        f"{result['num_classes']} classes, {result['device']}"
        + (
            f", approximate: IVF nlist {result['search']['nlist']} nprobe {result['search']['nprobe']}"
            if isinstance(result.get("search"), dict)
            else ""
        )
        + ")",
        f"{'k':>6} {'top-1':>8} {'top-5':>8} {'mean/class':>11}",
    ]
    for row in result["results"].values():
        lines.append(f"{row['k']:>6} {row['top1']:>8.2f} {row['top5']:>8.2f} {row['mean_per_class_top1']:>11.2f}")
    return "\n".join(lines)
