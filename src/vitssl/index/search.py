"""Searching index folders and evaluating them: top-k search (on a GPU when it helps), exact search of the stored
vectors, recall@k against it and mAP against ground truth.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitssl._faiss import faiss
from vitssl.eval.retrieval_metrics import mean_average_precision
from vitssl.index import _gpu
from vitssl.index.factory import _metric_type, _prepare, default_search_params, set_search_params
from vitssl.index.store import IndexFormatError, LoadedIndex, load_index_dir


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
    if _gpu.decide_gpu(loaded.index, use_gpu, k, nprobe or stored.get("nprobe", 1)):
        if loaded._gpu_index is None:
            loaded._gpu_index = _gpu.index_cpu_to_gpu(loaded.index)  # carries the manifest's nprobe along
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


__all__ = ["evaluate_index", "exact_search", "recall_at_k", "search"]
