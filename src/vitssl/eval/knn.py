"""Weighted k-NN classification on frozen features (the DINO protocol), exact search with faiss.

Protocol: features are L2-normalised, neighbours are the top-k training features by cosine similarity (an
exact inner-product search), each neighbour votes for its label with weight ``exp(sim / T)``, and the class
scores are the summed votes. ``knn_predict`` returns the scores; ``knn_evaluate`` turns them into top-1 /
top-5 accuracy for several k at once (one search with the largest k: the top-k of a sorted list is a prefix).

Speed. Exact search is one float32 GEMM of queries against the training set plus a running top-k; faiss does
both without materialising the (N_query, N_train) similarity matrix. The training set is searched block by
block straight from the caller's array (``faiss.knn`` on the array itself when it is unit-norm already,
otherwise on blocks normalised into one reused buffer, their top-k merged in a faiss heap): the training
features are never copied whole, and no index is built.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from vitssl._faiss import faiss, gpu_available
from vitssl.eval.metrics import accuracy_report, topk_hits

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


def _inverse_norms(arr: np.ndarray, name: str) -> tuple[np.ndarray, bool]:
    """Per-row 1 / L2 norm as float32 (0 for zero rows), and whether every non-zero row already has norm 1."""
    # einsum computes the squared norms without an (N, D) temporary.
    norms = np.sqrt(np.einsum("ij,ij->i", arr, arr, dtype=np.float64))  # (N,)
    if not np.all(np.isfinite(norms)):
        bad = int(np.flatnonzero(~np.isfinite(norms))[0])
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


def knn_search(
    train_features: np.ndarray | torch.Tensor,
    query_features: np.ndarray | torch.Tensor,
    k: int,
    chunk_size: int = DEFAULT_QUERY_CHUNK,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine-similarity top-k neighbours of each query among the training features.

    The training set is never copied whole. Unit-norm, C-contiguous float32 training features are searched as
    they are, in one faiss call per query chunk. Other features are normalised block by block
    (``_TRAIN_BLOCK_BYTES``) into one reused buffer, each block searched, and the per-block top-k merged in a
    faiss heap: besides bounding memory, this avoids a fresh (N_train, D) allocation, whose first-touch page
    faults alone cost about 1 s for 100k x 384 on the development VM. Blocks are large because every faiss call
    has a fixed cost (measured there, noisily: 16 MiB blocks 2.9 s, 32 MiB 2.6 s, one call 2.4 s for 10k x 100k x 384).

    Args:
        train_features: (N_train, D) features.
        query_features: (N_query, D) features; normalised ``chunk_size`` rows at a time.
        k: neighbours per query; must not exceed N_train.
        chunk_size: queries per search pass (bounds the normalised query copy and the heaps).
        use_gpu: search on the GPU; None = when faiss has GPU support and sees a GPU.

    Returns:
        ``(similarities (N_query, k) float32 sorted descending, indices (N_query, k) int64 into the train rows)``.
    """
    train = _float32_rows(train_features, "train_features")
    inv_norms, train_is_unit = _inverse_norms(train, "train_features")
    queries = _to_numpy(query_features, "query_features")
    n_train, dim = train.shape
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(
            f"query_features must have shape (N, {dim}) to match train_features, got {tuple(queries.shape)}"
        )
    if not 1 <= k <= n_train:
        raise ValueError(f"k must lie in [1, {n_train}] (the number of training features), got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if use_gpu is None:
        use_gpu = gpu_available() and k <= _GPU_MAX_K
    elif use_gpu and not gpu_available():
        raise RuntimeError("use_gpu=True but faiss has no GPU support or sees no GPU; install faiss-gpu or pass False")

    block_rows = n_train if train_is_unit else max(1, _TRAIN_BLOCK_BYTES // (4 * dim))
    buffer = None if train_is_unit else np.empty((min(block_rows, n_train), dim), dtype=np.float32)

    def train_blocks():
        for start in range(0, n_train, block_rows):
            block = train[start : start + block_rows]
            if buffer is not None:
                block = np.multiply(block, inv_norms[start : start + len(block), None], out=buffer[: len(block)])
            yield start, block

    n_query = queries.shape[0]
    sims = np.empty((n_query, k), dtype=np.float32)
    idx = np.empty((n_query, k), dtype=np.int64)
    if use_gpu:
        # The GPU index holds the one device copy of the (normalised) training set, filled block by block.
        resources = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(resources, dim)
        for _, block in train_blocks():
            index.add(block)
        for start in range(0, n_query, chunk_size):
            q = normalize_features(queries[start : start + chunk_size], "query_features")
            sims[start : start + len(q)], idx[start : start + len(q)] = index.search(q, k)
        return sims, idx
    for start in range(0, n_query, chunk_size):
        q = normalize_features(queries[start : start + chunk_size], "query_features")
        heap = faiss.ResultHeap(len(q), k, keep_max=True)
        for offset, block in train_blocks():
            block_sims, block_idx = faiss.knn(q, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(block_sims, block_idx + offset)
        heap.finalize()  # sorts each row, best first
        sims[start : start + len(q)], idx[start : start + len(q)] = heap.D, heap.I
    return sims, idx


# Query rows voted at once: bounds the float64 vote buffer to _VOTE_CHUNK x num_classes.
_VOTE_CHUNK = 4096


def _vote(sims: np.ndarray, neighbour_labels: np.ndarray, temperature: float, num_classes: int) -> np.ndarray:
    """Class scores (N, num_classes) float32: sum over neighbours of exp(sim / T) into each neighbour's class."""
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

    Every k is clamped to the number of training features (with a warning), as all of them then vote.

    Args:
        train_features: (N_train, D) numpy array or torch tensor.
        train_labels: (N_train,) integer labels in ``[0, num_classes)``.
        query_features: (N_query, D) numpy array or torch tensor.
        ks: neighbour counts.
        temperature: T in the vote weight exp(sim / T).
        num_classes: number of classes; None = max label + 1.
        chunk_size: queries per faiss call.
        use_gpu: see :func:`knn_search`.

    Returns:
        ``{k: scores (N_query, num_classes) float32}``, torch tensors on the query's device when
        ``query_features`` is a tensor, NumPy arrays otherwise.
    """
    effective, sims, neighbour_labels, num_classes = _search_max_k(
        train_features, train_labels, query_features, ks, temperature, num_classes, chunk_size, use_gpu
    )
    return {
        k: _like(_vote(sims[:, :e], neighbour_labels[:, :e], temperature, num_classes), query_features)
        for k, e in effective.items()
    }


def _search_max_k(
    train_features: np.ndarray | torch.Tensor,
    train_labels: np.ndarray | torch.Tensor,
    query_features: np.ndarray | torch.Tensor,
    ks: Sequence[int],
    temperature: float,
    num_classes: int | None,
    chunk_size: int,
    use_gpu: bool | None,
) -> tuple[dict[int, int], np.ndarray, np.ndarray, int]:
    """Validate, clamp every k to N_train, search once with the largest: (k -> effective k, sims, labels, C)."""
    check_temperature(temperature)
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty list of positive neighbour counts, got {list(ks)}")
    n_train = int(train_features.shape[0])
    labels, num_classes = _check_labels(train_labels, n_train, num_classes)
    effective = {int(k): min(int(k), n_train) for k in ks}
    for k, e in effective.items():
        if e < k:
            _logger.warning("k=%d exceeds the %d training features; using k=%d (all of them vote)", k, n_train, e)
    k_max = max(effective.values())
    sims, idx = knn_search(train_features, query_features, k_max, chunk_size=chunk_size, use_gpu=use_gpu)
    return effective, sims, labels[idx], num_classes  # labels[idx]: (N_query, k_max)


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
    train_features: np.ndarray | torch.Tensor,
    train_labels: np.ndarray | torch.Tensor,
    val_features: np.ndarray | torch.Tensor,
    val_labels: np.ndarray | torch.Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = DEFAULT_QUERY_CHUNK,
    use_gpu: bool | None = None,
) -> dict[str, Any]:
    """Weighted k-NN accuracy of ``val`` against ``train`` for several k (one search).

    Args:
        train_features: (N_train, D) features.
        train_labels: (N_train,) labels.
        val_features: (N_val, D) features.
        val_labels: (N_val,) labels.
        ks: neighbour counts to report.
        temperature: T in the vote weight exp(sim / T).
        num_classes: number of classes; None = max label + 1 over train and val.
        chunk_size: queries per faiss call.
        use_gpu: see :func:`knn_search`.

    Returns:
        JSON-serialisable dict: ``temperature``, ``num_train``, ``num_val``, ``num_classes``, ``device``,
        ``search_seconds`` and ``results``: ``{str(k): {"k", "top1", "top5", "mean_per_class_top1",
        "per_class_top1"}}`` (percentages; ``per_class_top1`` holds None for classes absent from val; top-5 is
        top-min(5, num_classes)).
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
    train_np = _to_numpy(train_features, "train_features")
    gpu = (gpu_available() and max(ks) <= _GPU_MAX_K) if use_gpu is None else use_gpu
    t0 = time.perf_counter()
    effective, sims, neighbour_labels, num_classes = _search_max_k(
        train_np, train_labels, val_features, ks, temperature, num_classes, chunk_size, gpu
    )
    seconds = time.perf_counter() - t0
    # Vote and score chunk by chunk: the (N_val, num_classes) score matrices are never all held at once.
    top = min(5, num_classes)
    hits = {k: (np.zeros(len(vlab), dtype=bool), np.zeros(len(vlab), dtype=bool)) for k in effective}
    for start in range(0, len(vlab), _VOTE_CHUNK):
        stop = start + _VOTE_CHUNK
        for k, e in effective.items():
            scores = _vote(sims[start:stop, :e], neighbour_labels[start:stop, :e], temperature, num_classes)
            pred, hits[k][1][start:stop] = topk_hits(scores, vlab[start:stop], top)
            hits[k][0][start:stop] = pred == vlab[start:stop]
    n_train = int(train_np.shape[0])
    results = {str(k): {"k": e, **accuracy_report(*hits[k], vlab, num_classes)} for k, e in effective.items()}
    return {
        "temperature": temperature,
        "num_train": n_train,
        "num_val": int(vlab.shape[0]),
        "num_classes": num_classes,
        "device": "gpu" if gpu else "cpu",
        "search_seconds": seconds,
        "results": results,
    }


def format_knn_table(result: dict[str, Any]) -> str:
    """A short fixed-width table of a :func:`knn_evaluate` result: one row per k."""
    lines = [
        f"k-NN (T={result['temperature']:g}, {result['num_train']} train, {result['num_val']} val, "
        f"{result['num_classes']} classes, {result['device']})",
        f"{'k':>6} {'top-1':>8} {'top-5':>8} {'mean/class':>11}",
    ]
    for row in result["results"].values():
        lines.append(f"{row['k']:>6} {row['top1']:>8.2f} {row['top5']:>8.2f} {row['mean_per_class_top1']:>11.2f}")
    return "\n".join(lines)
