"""Rows a k-NN search reads: validation, L2 normalisation and block-by-block reading of the training bank.

Shared by the search backends (faiss in :mod:`vitssl.eval.knn`, torch in :mod:`vitssl.eval.knn_torch`, the IVF
in :mod:`vitssl.eval.knn_approx`), so every backend sees the same normalised float32 blocks, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from vitssl.eval.store_view import ShardedRows, row_blocks

# Features whose norms all lie within this of 1 count as already normalised (float32 rounding is ~1e-7).
_NORM_TOLERANCE = 1e-5
# Training rows normalised and searched per call when the features are not unit-norm yet: 64 MiB of float32
# (21845 rows at D = 768) bounds the buffer while keeping the number of calls (each has a fixed cost) low.
TRAIN_BLOCK_BYTES = 64 << 20


def to_numpy(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
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
    arr = to_numpy(x, name)
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


def bank_rows(train_features: Any) -> Any:
    """The bank as something :func:`~vitssl.eval.store.row_blocks` reads block by block, without a copy: a NumPy
    array or memory map, a store's :class:`~vitssl.eval.store.ShardedRows`, or a CPU tensor's NumPy view."""
    if isinstance(train_features, (ShardedRows, np.ndarray)):
        bank = train_features
    else:
        bank = to_numpy(train_features, "train_features")
    if bank.ndim != 2:
        raise ValueError(f"train_features must be 2-D (N, D), got shape {tuple(bank.shape)}")
    if not np.issubdtype(bank.dtype, np.floating):
        raise TypeError(f"train_features must hold floating-point features, got dtype {bank.dtype}")
    return bank


def query_rows(query_features: Any, dim: int) -> Any:
    """The queries as rows read chunk by chunk (a store view or a NumPy view), checked against the bank width."""
    queries = query_features if isinstance(query_features, ShardedRows) else to_numpy(query_features, "query_features")
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(
            f"query_features must have shape (N, {dim}) to match train_features, got {tuple(queries.shape)}"
        )
    return queries


def check_k(k: int, n_train: int) -> None:
    """Raise ValueError unless 1 <= k <= n_train."""
    if not 1 <= k <= n_train:
        raise ValueError(f"k must lie in [1, {n_train}] (the number of training features), got {k}")


def block_rows_for(dim: int, block_bytes: int = TRAIN_BLOCK_BYTES) -> int:
    """Bank rows per block: ``block_bytes`` of float32 rows of width ``dim`` (at least one)."""
    return max(1, block_bytes // (4 * max(1, dim)))


def unit_blocks(bank: Any, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, L2-normalised float32 rows)`` blocks of the bank, read one at a time.

    A block that is C-contiguous float32 and unit-norm already is used as it is (a view); others are converted
    and normalised into one reused buffer (so a consumer must be done with a block before asking for the next).
    The arithmetic depends only on the block's values, so a bank in memory and the same bank in a float32 store
    give the same blocks, bit for bit.
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
