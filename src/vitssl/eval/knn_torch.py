"""Exact cosine top-k with torch: chunked matmul + ``topk`` over bank blocks, merged across blocks, any device.

The torch backend of :func:`vitssl.eval.knn.knn_search`. Queries go ``chunk_size`` at a time; for each chunk the
bank is read block by block (normalised float32, :func:`vitssl.eval._bank.unit_blocks`, the same blocks the faiss
path searches), each block scored against a sub-chunk of queries by one matmul (bounded to ``_SCORE_ELEMENTS``
scores), its top-k taken, and the running top-k of each query merged with it (concatenate, ``topk`` again).
Memory is bounded by the chunk, block and score sizes, never by the bank.

On a CUDA device the normalised bank is copied there once, block by block, when it fits in half the free GPU
memory (otherwise it is streamed again for every query chunk), and matmuls run in full float32 (TF32 off for
the call) so that scores agree with faiss's to 1e-5. This is the GPU path when faiss has no GPU support (the
faiss-gpu wheel is not installed).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from vitssl.eval._bank import block_rows_for, check_k, normalize_features, unit_blocks

# Scores held at once by one (query sub-chunk x bank block) matmul: 16 Mi float32 = 64 MiB.
_SCORE_ELEMENTS = 1 << 24
# Fraction of the free GPU memory the resident bank may take.
_GPU_BANK_FRACTION = 0.5


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch device; None = the first CUDA device when torch sees one, else the CPU.

    Raises:
        ValueError: the device is not one torch knows, or CUDA is asked for and torch sees no GPU.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1'): {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch sees no CUDA GPU here; pass device='cpu'")
    return dev


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Full-precision float32 matmuls for the block (TF32 would move scores by ~1e-3)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def as_tensor(rows: np.ndarray) -> torch.Tensor:
    """A tensor view of NumPy rows, read-only ones included (a memory-mapped store: they are only ever read)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        return torch.from_numpy(rows)


def _device_blocks(bank: Any, block_rows: int, dev: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, normalised float32 block on dev)``; CPU blocks are views of the NumPy blocks (no copy)."""
    for start, block in unit_blocks(bank, block_rows):
        tensor = as_tensor(block)
        yield start, tensor if dev.type == "cpu" else tensor.to(dev)


def merge_topk(
    best_s: torch.Tensor, best_i: torch.Tensor, new_s: torch.Tensor, new_i: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``k`` of two candidate sets per row (scores and ids side by side), best first."""
    scores = torch.cat([best_s, new_s], dim=1)  # (m, k + kk)
    ids = torch.cat([best_i, new_i], dim=1)
    top_s, pos = scores.topk(k, dim=1)  # sorted, descending
    return top_s, ids.gather(1, pos)


def torch_search(
    bank: Any,
    queries: Any,
    k: int,
    device: str | torch.device | None = "cpu",
    chunk_size: int = 16384,
    block_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k of each query among the bank rows with torch matmuls (see the module docstring).

    Args:
        bank: (N_train, D) rows (array, memory map or store view) as :func:`vitssl.eval._bank.bank_rows` gives,
            or a tensor of unit rows, used as it is.
        queries: (N_query, D) rows, read ``chunk_size`` at a time.
        k: neighbours per query, 1 <= k <= N_train.
        device: torch device to compute on; None = CUDA when torch sees a GPU.
        chunk_size: queries per pass over the bank.
        block_rows: bank rows per block; None = 64 MiB of float32 rows.

    Returns:
        ``(similarities (N_query, k) float32 sorted descending, indices (N_query, k) int64)`` as NumPy arrays.
    """
    n_train, dim = bank.shape
    check_k(k, n_train)
    dev = resolve_device(device)
    block_rows = block_rows or block_rows_for(dim)
    resident: list[tuple[int, torch.Tensor]] | None = None
    if isinstance(bank, torch.Tensor):  # unit rows already (the IVF's list-ordered bank): searched as they are
        resident = [(a, bank[a : a + block_rows].to(dev)) for a in range(0, n_train, block_rows)]
    elif dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        if n_train * dim * 4 <= _GPU_BANK_FRACTION * free:
            resident = list(_device_blocks(bank, block_rows, dev))
    n_query = queries.shape[0]
    sims = np.empty((n_query, k), dtype=np.float32)
    idx = np.empty((n_query, k), dtype=np.int64)
    with full_float32(), torch.no_grad():
        for start in range(0, n_query, chunk_size):
            q = as_tensor(normalize_features(queries[start : start + chunk_size], "query_features")).to(dev)
            best_s = torch.full((len(q), k), -torch.inf, device=dev)  # (nq, k)
            best_i = torch.full((len(q), k), -1, dtype=torch.int64, device=dev)
            blocks = resident if resident is not None else _device_blocks(bank, block_rows, dev)
            for offset, block in blocks:
                kk = min(k, len(block))
                sub = max(1, _SCORE_ELEMENTS // len(block))
                for a in range(0, len(q), sub):
                    scores = q[a : a + sub] @ block.T  # (sub, rows)
                    top_s, top_i = scores.topk(kk, dim=1)  # (sub, kk)
                    best_s[a : a + sub], best_i[a : a + sub] = merge_topk(
                        best_s[a : a + sub], best_i[a : a + sub], top_s, top_i + offset, k
                    )
            sims[start : start + len(q)] = best_s.cpu().numpy()
            idx[start : start + len(q)] = best_i.cpu().numpy()
    return sims, idx
