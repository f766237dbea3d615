"""Approximate cosine top-k through an inverted file (IVF-Flat) built in torch, its probes calibrated at build time.

How it works (:func:`knn_search_approx`):

1. Spherical k-means (:func:`spherical_kmeans`) on ``train_rows`` sampled bank rows places ``nlist`` unit
   centroids. Every bank row (normalised, read block by block) joins the list of its most similar centroid;
   the rows are laid out list by list in one float32 array (N x D x 4 bytes in memory, unlike exact search).
2. ``nprobe``, the lists each query searches, is chosen from the data: the exact top-k of ``sample_queries``
   queries (drawn from the queries themselves) is computed, and for each of their true neighbours the rank,
   among the query's centroids, of the list holding it. The smallest ``nprobe`` under which a share
   ``recall_target`` of the true neighbours is found is used (:func:`calibrate_nprobe`). Harder data (classes
   that overlap, neighbours spread over many lists) gets more probes instead of a worse answer.
3. Queries go in chunks; each list is searched against every query of the chunk that probes it at once, one
   matmul and ``topk`` per list (a GEMM reuses each list across its queries; faiss's CPU IVF scan reads a list
   once per query and runs at memory speed), and each query keeps the best k of its ``nprobe`` lists. On the
   CPU the lists are shared among one single-threaded worker per torch thread: the per-list operations are
   small (~1 ms), and on the 2-core development VM, under load, running each on two threads was 3-5x slower
   than one (the thread pool synchronises around every operation).

Parameters from the sizes (:func:`approx_params`): ``nlist`` is the power of two nearest sqrt(N_train), with at
least ``_MIN_ROWS_PER_LIST`` rows per list on average and at most sqrt(``_PROBES_GUESS`` x N_query) lists (the
largest power of two below).
That cap balances the two costs of a batch evaluation: assigning the bank to the lists costs N_train x nlist x
D multiply-adds, scanning nprobe lists for every query N_query x N_train x D x nprobe / nlist; they meet at
nlist = sqrt(nprobe x N_query), a few percent of exact search's N_query x N_train x D each (ImageNet, 1.28 M
train x 50 k val: 256 lists; 200 k x 10 k: 128). The k-means sees ``_TRAIN_ROWS_PER_LIST`` rows per list for
``_KMEANS_ITERATIONS`` iterations. Everything runs on any torch device (the CPU, or a GPU when torch sees one).
"""

from __future__ import annotations

import functools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from vitssl.eval._bank import bank_rows, block_rows_for, check_k, normalize_features, query_rows
from vitssl.eval.knn_torch import as_tensor, full_float32, merge_topk, resolve_device, torch_search
from vitssl.eval.store_view import row_blocks

# IVF lists hold at least this many bank rows on average (fewer: k-means has too little to place a list).
_MIN_ROWS_PER_LIST = 64
# The probes a query is expected to need, for the cost balance that caps nlist (see the module docstring).
_PROBES_GUESS = 4
# k-means training rows per list and iterations (the partition only needs to be coarse).
_TRAIN_ROWS_PER_LIST = 32
_KMEANS_ITERATIONS = 8
# Share of the sample queries' true top-k neighbours the probed lists must hold (see calibrate_nprobe).
DEFAULT_RECALL_TARGET = 0.99
# Queries whose exact top-k calibrates nprobe: N_query / 64 within these bounds (the sample's exact search costs
# sample / N_query of exact search over all queries).
_SAMPLE_QUERIES = (128, 256)
# Candidate scores a query chunk holds at once (chunk x nprobe x k): 16 Mi float32 = 64 MiB.
_CANDIDATE_ELEMENTS = 1 << 24


def approx_params(n_train: int, n_query: int | None = None) -> dict[str, int]:
    """IVF parameters from the bank (and query) sizes: ``nlist`` and the k-means ``train_rows`` (module docstring).

    Args:
        n_train: bank rows.
        n_query: queries to search; None = no cap on nlist from the query count.
    """
    nlist = 1 << max(0, round(math.log2(max(1.0, math.sqrt(max(1, n_train))))))
    cap = max(1, n_train // _MIN_ROWS_PER_LIST)
    if n_query is not None:
        cap = min(cap, max(1, math.isqrt(_PROBES_GUESS * n_query)))
    nlist = min(nlist, 1 << (cap.bit_length() - 1))  # powers of two both
    return {"nlist": nlist, "train_rows": min(n_train, _TRAIN_ROWS_PER_LIST * nlist)}


def spherical_kmeans(x: torch.Tensor, nlist: int, niter: int = _KMEANS_ITERATIONS, seed: int = 0) -> torch.Tensor:
    """Unit centroids (nlist, D) of unit rows ``x`` (n, D) by cosine k-means; an emptied list is re-seeded with a
    random row. Starts from ``nlist`` distinct random rows (``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    centroids = x[torch.randperm(n, generator=gen)[:nlist].to(x.device)].clone()  # (L, D)
    for _ in range(niter):
        assign = _nearest(x, centroids)  # (n,)
        onehot = torch.zeros((nlist, n), dtype=x.dtype, device=x.device)
        onehot[assign, torch.arange(n, device=x.device)] = 1.0
        sums = onehot @ x  # (L, D): a GEMM; index_add_ measured 10x slower on the CPU
        counts = torch.bincount(assign, minlength=nlist)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            sums[empty] = x[torch.randint(0, n, (len(empty),), generator=gen).to(x.device)]
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return centroids


def _nearest(x: torch.Tensor, centroids: torch.Tensor, rows: int = 8192) -> torch.Tensor:
    """Index of the most similar centroid of each row (rows at a time, bounding the score matrix)."""
    return torch.cat([(x[a : a + rows] @ centroids.T).argmax(dim=1) for a in range(0, len(x), rows)])


def calibrate_nprobe(
    sample: torch.Tensor,
    centroids: torch.Tensor,
    neighbour_lists: torch.Tensor,
    recall_target: float,
) -> tuple[int, float]:
    """The fewest lists to probe so that a share ``recall_target`` of the sample's true neighbours is found.

    Args:
        sample: (S, D) unit queries.
        centroids: (L, D) unit centroids.
        neighbour_lists: (S, k) the list holding each of the sample's exact top-k neighbours.
        recall_target: share of those neighbours to find, in (0, 1].

    Returns:
        ``(nprobe, recall at that nprobe on the sample)``.
    """
    order = (sample @ centroids.T).argsort(dim=1, descending=True)  # (S, L): lists by similarity
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))  # list -> rank
    ranks = rank.gather(1, neighbour_lists).flatten().sort().values  # (S k,) probe rank of each true neighbour
    need = max(1, math.ceil(recall_target * len(ranks)))
    nprobe = int(ranks[need - 1]) + 1
    return nprobe, float((ranks < nprobe).float().mean())


def knn_search_approx(
    train_features: Any,
    query_features: Any,
    k: int,
    chunk_size: int = 16384,
    use_gpu: bool | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    seed: int = 0,
    recall_target: float = DEFAULT_RECALL_TARGET,
    sample_queries: int | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Approximate cosine top-k through an IVF-Flat index whose probes are calibrated on the queries (module doc).

    Similarities of the neighbours found are exact; a query whose probed lists hold fewer than k rows gets index
    -1 and similarity -inf for the rest (no vote).

    Args:
        train_features: (N_train, D) features (array, tensor, memory map or a store's ``ShardedRows``).
        query_features: (N_query, D) features.
        k: neighbours per query (at most N_train).
        chunk_size: queries per pass (further bounded so that chunk x nprobe x k candidates fit 64 MiB).
        use_gpu: build and search on a CUDA GPU through torch; None = when torch sees one.
        nlist: inverted lists; None = :func:`approx_params`.
        nprobe: lists searched per query; None = calibrated to ``recall_target`` (:func:`calibrate_nprobe`).
        seed: k-means and sampling seed.
        recall_target: share of the sample queries' exact top-k the probed lists must hold.
        sample_queries: queries whose exact top-k calibrates nprobe (at most N_query); None = N_query / 64,
            at least 128 and at most 256.

    Returns:
        ``(similarities (N_query, k) sorted descending, indices (N_query, k), params)``: params holds ``index``
        ("IVF-Flat"), ``nlist``, ``nprobe``, ``train_rows``, ``device``, the calibration's ``sample_queries``,
        ``recall_target`` and ``sample_recall`` (None when nprobe was given) and ``build_seconds``.
    """
    bank = bank_rows(train_features)
    n_train, dim = bank.shape
    queries = query_rows(query_features, dim)
    check_k(k, n_train)
    if not 0 < recall_target <= 1:
        raise ValueError(f"recall_target must lie in (0, 1], got {recall_target}")
    n_query = queries.shape[0]
    dev = resolve_device(None if use_gpu is None else ("cuda" if use_gpu else "cpu"))
    t0 = time.perf_counter()
    params: dict[str, Any] = approx_params(n_train, n_query)
    if nlist:
        nlist = min(int(nlist), n_train)
        params.update(nlist=nlist, train_rows=min(n_train, _TRAIN_ROWS_PER_LIST * nlist))
    nlist = params["nlist"]
    rng = np.random.default_rng(seed)
    with full_float32(), torch.no_grad():
        sample_rows = np.sort(rng.choice(n_train, params["train_rows"], replace=False))
        train_x = as_tensor(normalize_features(np.asarray(bank[sample_rows]), "train_features")).to(dev)
        centroids = spherical_kmeans(train_x, nlist, seed=seed)  # (L, D)
        del train_x
        unit, assign = _assign_bank(bank, centroids, block_rows_for(dim))
        order = torch.argsort(assign, stable=True)  # bank rows list by list, ascending within a list
        bounds = torch.searchsorted(assign[order], torch.arange(nlist + 1, device=dev))  # list l: order[b[l]:b[l+1]]
        params.update(sample_queries=None, recall_target=None, sample_recall=None)
        if nprobe is None:
            lo, hi = _SAMPLE_QUERIES
            n_sample = min(n_query, sample_queries or max(lo, min(hi, n_query // 64)))
            picked = np.sort(rng.choice(n_query, n_sample, replace=False))
            sample_np = normalize_features(np.asarray(queries[picked]), "query_features")
            _, true_rows = torch_search(unit, sample_np, k, dev)  # (S, k) exact neighbours
            sample = as_tensor(sample_np).to(dev)
            nprobe, recall = calibrate_nprobe(sample, centroids, assign[as_tensor(true_rows).to(dev)], recall_target)
            params.update(sample_queries=n_sample, recall_target=recall_target, sample_recall=recall)
        nprobe = max(1, min(int(nprobe), nlist))
        params.update(nprobe=nprobe, build_seconds=time.perf_counter() - t0)
        threads = torch.get_num_threads()
        try:
            sims, idx = _search_lists(unit, order, bounds, centroids, queries, k, nprobe, chunk_size, dev)
        finally:
            torch.set_num_threads(threads)
    return sims, idx, {"index": "IVF-Flat", **params, "device": "gpu" if dev.type == "cuda" else "cpu"}


def _assign_bank(bank: Any, centroids: torch.Tensor, block_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised bank (N, D) float32, in bank order (its one whole copy), and each row's list (N,).

    One pass over the bank; the lists are gathered from this copy when searched (a list-ordered second copy
    would double the peak memory)."""
    dev = centroids.device
    n_train, dim = bank.shape
    unit = torch.empty((n_train, dim), dtype=torch.float32, device=dev)
    assign = torch.empty(n_train, dtype=torch.int64, device=dev)
    for start, block in row_blocks(bank, block_rows):
        rows = unit[start : start + len(block)]
        rows.copy_(as_tensor(np.asarray(block)))  # float16 -> float32 in torch (threaded), no NumPy buffer
        norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)  # (rows, 1)
        if not bool(torch.isfinite(norms).all()):
            bad = start + int(torch.nonzero(~torch.isfinite(norms.flatten()))[0])
            raise ValueError(f"train_features row {bad} is not finite (NaN or inf); check the feature extraction")
        rows.div_(norms.clamp_min(torch.finfo(torch.float32).tiny))  # zero rows stay zero
        assign[start : start + len(block)] = _nearest(rows, centroids)
    return unit, assign


def _search_lists(
    unit: torch.Tensor,
    order: torch.Tensor,
    bounds: torch.Tensor,
    centroids: torch.Tensor,
    queries: Any,
    k: int,
    nprobe: int,
    chunk_size: int,
    dev: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query chunk: its nprobe nearest lists, each list searched against all its queries in one matmul."""
    nlist = len(centroids)
    n_query = queries.shape[0]
    sims = np.full((n_query, k), -np.inf, dtype=np.float32)
    idx = np.full((n_query, k), -1, dtype=np.int64)
    chunk = max(1, min(chunk_size, _CANDIDATE_ELEMENTS // (nprobe * k)))
    workers = torch.get_num_threads() if dev.type == "cpu" else 1
    bounds_cpu = bounds.cpu().tolist()
    for qstart in range(0, n_query, chunk):
        q = as_tensor(normalize_features(queries[qstart : qstart + chunk], "query_features")).to(dev)
        nq = len(q)
        probes = (q @ centroids.T).topk(nprobe, dim=1).indices.flatten()  # (nq nprobe,): (query, slot) pairs
        pairs = torch.argsort(probes, stable=True)  # pairs grouped by list
        starts = torch.searchsorted(probes[pairs], torch.arange(nlist + 1, device=dev)).cpu().tolist()
        cand_s = torch.full((nq, nprobe * k), -torch.inf, device=dev)
        cand_i = torch.full((nq, nprobe * k), -1, dtype=torch.int64, device=dev)

        scan = functools.partial(
            _scan_lists, q=q, unit=unit, order=order, bounds=bounds_cpu, pairs=pairs, starts=starts, nprobe=nprobe,
            k=k, cand_s=cand_s, cand_i=cand_i, one_thread=workers > 1
        )  # fmt: skip
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:  # torch releases the GIL inside its operations
                list(pool.map(scan, [range(w, nlist, workers) for w in range(workers)]))
        else:
            scan(range(nlist))
        top_s, top_i = merge_topk(cand_s[:, :0], cand_i[:, :0], cand_s, cand_i, k)  # lists are disjoint
        found = top_i >= 0
        sims[qstart : qstart + nq] = top_s.cpu().numpy()
        idx[qstart : qstart + nq] = torch.where(found, order[top_i.clamp(min=0)], -1).cpu().numpy()
    return sims, idx


def _scan_lists(
    lists: range,
    q: torch.Tensor,
    unit: torch.Tensor,
    order: torch.Tensor,
    bounds: list[int],
    pairs: torch.Tensor,
    starts: list[int],
    nprobe: int,
    k: int,
    cand_s: torch.Tensor,
    cand_i: torch.Tensor,
    one_thread: bool,
) -> None:
    """Search ``lists`` against the queries probing them, writing each (query, probe slot)'s top-k candidates.

    ``pairs[starts[l]:starts[l + 1]]`` are the flattened (query, slot) pairs probing list l; each cell of
    ``cand_s`` / ``cand_i`` (``(nq, nprobe x k)``, positions into ``order``) is written by one list only, so
    workers scanning disjoint lists never write the same cell."""
    if one_thread:
        torch.set_num_threads(1)  # lists in parallel, each on one thread (see the module docstring)
    for lst in lists:
        a, b = bounds[lst], bounds[lst + 1]
        pa, pb = starts[lst], starts[lst + 1]
        if a == b or pa == pb:
            continue
        qi, slot = pairs[pa:pb] // nprobe, pairs[pa:pb] % nprobe
        kk = min(k, b - a)
        s, i = (q[qi] @ unit[order[a:b]].T).topk(kk, dim=1)  # (m, kk)
        cols = slot[:, None] * k + torch.arange(kk, device=q.device)  # this probe's slots of the candidate row
        cand_s[qi[:, None], cols] = s
        cand_i[qi[:, None], cols] = i + a
