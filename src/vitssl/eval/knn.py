"""Weighted k-NN classification on frozen features (the DINO protocol), exact or approximate search.

Protocol: features are L2-normalised, neighbours are the top-k training features by cosine similarity (an
exact inner-product search), each neighbour votes for its label with weight ``exp(sim / T)``, and the class
scores are the summed votes. ``knn_predict`` returns the scores; ``knn_evaluate`` turns them into top-1 /
top-5 accuracy for several k at once (one search with the largest k: the top-k of a sorted list is a prefix).

Speed and memory. Exact search is one float32 GEMM of queries against the training set plus a running top-k,
never materialising the (N_query, N_train) similarity matrix. Queries go in chunks; for each chunk the training
set (the bank) is read block by block, from an array or straight from a memory-mapped feature store (float16 or
float32, :mod:`vitssl.eval.store`), each block normalised into one reused buffer (or used as it is when it is
unit-norm float32 already), searched, and the blocks' top-k merged: memory is bounded by the chunk and block
sizes, never by the bank, and no index is built. Two backends do the search (:func:`choose_backend`): torch
matmul + topk on the CPU or any CUDA device (:mod:`vitssl.eval.knn_torch`), and faiss (``faiss.knn`` and a
heap on the CPU; with faiss-gpu, one GPU flat index filled block by block). ``approx=True`` searches an IVF
index instead (:mod:`vitssl.eval.knn_approx`: lists from the bank and query sizes, probes calibrated on a
sample of the queries).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from vitssl._faiss import faiss, gpu_available
from vitssl.eval._bank import (
    TRAIN_BLOCK_BYTES,
    bank_rows,
    block_rows_for,
    check_k,
    normalize_features,
    query_rows,
    to_numpy,
    unit_blocks,
)
from vitssl.eval.knn_approx import approx_params, knn_search_approx  # noqa: F401  (re-exported)
from vitssl.eval.knn_torch import torch_search
from vitssl.eval.metrics import accuracy_report, topk_hits
from vitssl.eval.store_view import ShardedRows

_logger = logging.getLogger(__name__)


ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

# Queries per search pass: bounds the normalised-query copy and the (chunk, k) heaps. Each pass streams the
# whole training set once, so passes should hold many queries.
DEFAULT_QUERY_CHUNK = 16384
# Training rows normalised and searched per call: 64 MiB of float32 (21845 rows at D = 768) bounds the buffer
# while keeping the number of calls (each has a fixed cost) low.
_TRAIN_BLOCK_BYTES = TRAIN_BLOCK_BYTES
# exp(sim / T) with |sim| <= 1 must stay finite in float32 (max ~ e^88.7) after summing up to k votes.
_MAX_INV_TEMPERATURE = 80.0
# faiss GPU brute-force search supports k up to this value.
_GPU_MAX_K = 2048

Backend = Literal["auto", "faiss", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "faiss", "torch")


def _check_labels(labels: np.ndarray | torch.Tensor, n: int, num_classes: int | None) -> tuple[np.ndarray, int]:
    lab = to_numpy(labels, "train_labels")
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


def choose_backend(backend: Backend, use_gpu: bool | None, k: int) -> tuple[str, str]:
    """The exact-search backend and device a call runs on: ``("faiss" | "torch", "cpu" | "cuda")``.

    ``auto`` takes faiss's GPU flat index when faiss has GPU support and sees a GPU (and k <= 2048), else torch
    on a CUDA GPU when torch sees one (faiss-cpu installed: the usual pip setup), else torch on the CPU: measured
    on the development VM (benchmarks/RESULTS.md, "Evaluation at scale"), torch's matmul + topk ran exact search
    4-7x faster than faiss-cpu, whose bundled OpenBLAS 0.3.15 picks pre-AVX kernels on that CPU.
    ``use_gpu`` False keeps every backend on the CPU; True requires a GPU.

    Raises:
        ValueError: an unknown backend.
        RuntimeError: a GPU is required but the backend cannot use one here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    faiss_gpu = use_gpu is not False and gpu_available() and k <= _GPU_MAX_K
    torch_gpu = use_gpu is not False and torch.cuda.is_available()
    if backend == "faiss" or (backend == "auto" and faiss_gpu):
        if use_gpu and not faiss_gpu:
            raise RuntimeError(
                "use_gpu=True but faiss has no GPU support or sees no GPU (or k > 2048); install faiss-gpu, "
                "pass backend='torch' or use_gpu=False"
            )
        return "faiss", "cuda" if faiss_gpu else "cpu"
    if use_gpu and not torch_gpu:
        raise RuntimeError("use_gpu=True but torch sees no CUDA GPU; pass use_gpu=False")
    return "torch", "cuda" if torch_gpu else "cpu"


def knn_search(
    train_features: np.ndarray | torch.Tensor | ShardedRows,
    query_features: np.ndarray | torch.Tensor | ShardedRows,
    k: int,
    chunk_size: int = DEFAULT_QUERY_CHUNK,
    use_gpu: bool | None = None,
    backend: Backend = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine-similarity top-k neighbours of each query among the training features, streamed.

    Queries are taken ``chunk_size`` at a time; for each chunk the bank is read block by block
    (``_TRAIN_BLOCK_BYTES`` of float32), normalised (:func:`vitssl.eval._bank.unit_blocks`), searched and the
    blocks' top-k merged: by ``faiss.knn`` and a faiss heap (``backend="faiss"``), or by torch matmul + topk
    (``"torch"``, :func:`vitssl.eval.knn_torch.torch_search`). Both see the same blocks and give the same
    neighbours (ids equal except among equal scores, scores to 1e-5). Memory is bounded by the chunk and block
    sizes, not by the bank, which may be a memory-mapped feature store (float16 or float32): it is never copied
    whole, and no index is built.

    Args:
        train_features: (N_train, D) features: an array, tensor, memory map or a store's ``ShardedRows``.
        query_features: (N_query, D) features, read ``chunk_size`` rows at a time.
        k: neighbours per query; must not exceed N_train.
        chunk_size: queries per search pass (bounds the normalised query copy and the heaps).
        use_gpu: search on a GPU; None = when the backend can (see :func:`choose_backend`), False = never.
        backend: "faiss", "torch" or "auto" (:func:`choose_backend`).

    Returns:
        ``(similarities (N_query, k) float32 sorted descending, indices (N_query, k) int64 into the train rows)``.
    """
    bank = bank_rows(train_features)
    n_train, dim = bank.shape
    queries = query_rows(query_features, dim)
    check_k(k, n_train)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    backend, device = choose_backend(backend, use_gpu, k)
    block_rows = block_rows_for(dim, _TRAIN_BLOCK_BYTES)
    if backend == "torch":
        return torch_search(bank, queries, k, device, chunk_size, block_rows)

    n_query = queries.shape[0]
    sims = np.empty((n_query, k), dtype=np.float32)
    idx = np.empty((n_query, k), dtype=np.int64)
    if device == "cuda":
        # The GPU index holds the one device copy of the (normalised) training set, filled block by block.
        resources = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(resources, dim)
        for _, block in unit_blocks(bank, block_rows):
            index.add(block)
        for start in range(0, n_query, chunk_size):
            q = normalize_features(queries[start : start + chunk_size], "query_features")
            sims[start : start + len(q)], idx[start : start + len(q)] = index.search(q, k)
        return sims, idx
    for start in range(0, n_query, chunk_size):
        q = normalize_features(queries[start : start + chunk_size], "query_features")
        heap = faiss.ResultHeap(len(q), k, keep_max=True)
        for offset, block in unit_blocks(bank, block_rows):
            block_sims, block_idx = faiss.knn(q, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(block_sims, block_idx + offset)
        heap.finalize()  # sorts each row, best first
        sims[start : start + len(q)], idx[start : start + len(q)] = heap.D, heap.I
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
    labels, num_classes = _check_labels(train_labels, int(to_numpy(train_labels, "train_labels").shape[0]), num_classes)
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
    backend: Backend = "auto",
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
        backend: exact-search backend (:func:`choose_backend`).

    Returns:
        ``{k used: scores (N_query, num_classes) float32}``, torch tensors on the query's device when
        ``query_features`` is a tensor, NumPy arrays otherwise.
    """
    used, sims, neighbour_labels, num_classes, _ = _search_max_k(
        train_features,
        train_labels,
        query_features,
        ks,
        temperature,
        num_classes,
        chunk_size,
        use_gpu,
        backend=backend,
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
    backend: Backend = "auto",
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
        sims, idx = knn_search(train_features, query_features, used[-1], chunk_size, use_gpu, backend)
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
    backend: Backend = "auto",
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
        backend: exact-search backend (:func:`choose_backend`).

    Returns:
        (N_query, num_classes) float32 scores: a torch tensor on the query's device when ``query_features`` is
        a tensor, a NumPy array otherwise.
    """
    scores = knn_predict_multi_k(
        train_features, train_labels, query_features, (k,), temperature, num_classes, chunk_size, use_gpu, backend
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
    backend: Backend = "auto",
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
        approx: search an IVF index (:func:`~vitssl.eval.knn_approx.knn_search_approx`, parameters from the bank
            and query sizes, probes calibrated on a sample of the queries) instead of exactly.
        backend: exact-search backend (:func:`choose_backend`); the IVF always runs on torch.

    Returns:
        JSON-serialisable dict: ``temperature``, ``num_train``, ``num_val``, ``num_classes``, ``device`` ("cpu"
        or "gpu"), ``backend`` ("faiss" or "torch"), ``search`` ("exact" or the IVF parameters), ``search_seconds``
        and ``results``: ``{str(k): {"k", "top1", "top5", "mean_per_class_top1", "per_class_top1"}}``
        (percentages; ``per_class_top1`` holds None for classes absent from val; top-5 is top-min(5, C)).
    """
    vlab = to_numpy(val_labels, "val_labels")
    if vlab.ndim != 1 or vlab.shape[0] != val_features.shape[0]:
        raise ValueError(f"val_labels must have shape ({val_features.shape[0]},), got {tuple(vlab.shape)}")
    vlab = vlab.astype(np.int64)
    if num_classes is None:
        tlab = to_numpy(train_labels, "train_labels")
        num_classes = int(max(tlab.max(initial=-1), vlab.max(initial=-1))) + 1
    if vlab.size and (vlab.min() < 0 or vlab.max() >= num_classes):
        raise ValueError(f"val_labels must lie in [0, {num_classes}), found [{int(vlab.min())}, {int(vlab.max())}]")
    bank = bank_rows(train_features)
    t0 = time.perf_counter()
    used, sims, neighbour_labels, num_classes, params = _search_max_k(
        bank, train_labels, val_features, ks, temperature, num_classes, chunk_size, use_gpu, approx, backend
    )
    if params is not None:
        backend_used, device = "torch", "cuda" if params["device"] == "gpu" else "cpu"
    else:
        backend_used, device = choose_backend(backend, use_gpu, used[-1])
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
        "device": "gpu" if device == "cuda" else "cpu",
        "backend": backend_used,
        "search": params if params is not None else "exact",
        "search_seconds": seconds,
        "results": results,
    }


def format_knn_table(result: dict[str, Any]) -> str:
    """A short fixed-width table of a :func:`knn_evaluate` result: one row per k."""
    lines = [
        f"k-NN (T={result['temperature']:g}, {result['num_train']} train, {result['num_val']} val, "
        f"{result['num_classes']} classes, {result.get('backend', 'faiss')} {result['device']}"
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
