"""The torch exact top-k backend (vitssl.eval.knn_torch) against the faiss backend, and the backend choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitssl.eval import knn, knn_torch
from vitssl.eval.store import ShardedRows


def _rows(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, dim)) * rng.uniform(0.5, 2.0, (n, 1))).astype(np.float32)


def _same_neighbours(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    """Scores to 1e-5; ids equal wherever the score is not tied (within 1e-6) with a neighbour's."""
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-5)
    s = want[0]
    before, after = np.diff(s, axis=1, prepend=np.inf), np.diff(s, axis=1, append=-np.inf)  # (Q, k) each
    untied = np.minimum(np.abs(before), np.abs(after)) > 1e-6
    assert untied.mean() > 0.9  # the check below covers almost every neighbour
    np.testing.assert_array_equal(got[1][untied], want[1][untied])


@pytest.mark.parametrize("k", [1, 7, 60])
def test_torch_backend_equals_faiss_backend_across_blocks_and_subchunks(monkeypatch, k):
    train, query = _rows(700, 16, 1), _rows(90, 16, 2)
    train[5] = train[3]  # an exact tie: either order is right
    monkeypatch.setattr(knn, "_TRAIN_BLOCK_BYTES", 83 * 16 * 4)  # 9 blocks of 83 rows, the last one short
    monkeypatch.setattr(knn_torch, "_SCORE_ELEMENTS", 83 * 13)  # 13 queries per matmul
    want = knn.knn_search(train, query, k, chunk_size=40, backend="faiss")
    for bank in (train, ShardedRows([train[:300], train[300:]])):  # in memory; two shards straddling blocks
        got = knn.knn_search(bank, query, k, chunk_size=40, backend="torch")
        _same_neighbours(got, want)


def test_float16_bank_gives_the_same_neighbours_on_both_backends():
    train, query = _rows(500, 24, 3).astype(np.float16), _rows(50, 24, 4)
    _same_neighbours(
        knn.knn_search(train, query, 20, backend="torch"), knn.knn_search(train, query, 20, backend="faiss")
    )
    scores = knn.knn_predict(torch.from_numpy(train.astype(np.float32)), np.arange(500) % 5, torch.from_numpy(query),
                             k=20, backend="torch")  # fmt: skip
    assert isinstance(scores, torch.Tensor) and scores.shape == (50, 5)


def test_backend_choice(monkeypatch):
    monkeypatch.setattr(knn, "gpu_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert knn.choose_backend("auto", None, 20) == ("torch", "cpu")  # faiss-cpu's old BLAS is slower here
    assert knn.choose_backend("faiss", None, 20) == ("faiss", "cpu")
    with pytest.raises(RuntimeError, match="torch sees no CUDA GPU"):
        knn.choose_backend("torch", True, 20)
    with pytest.raises(RuntimeError, match="faiss has no GPU support"):
        knn.choose_backend("faiss", True, 20)
    with pytest.raises(ValueError, match="backend must be one of auto, faiss, torch"):
        knn.choose_backend("numpy", None, 20)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert knn.choose_backend("auto", None, 20) == ("torch", "cuda")  # a GPU without faiss-gpu: torch on it
    assert knn.choose_backend("auto", False, 20) == ("torch", "cpu")
    monkeypatch.setattr(knn, "gpu_available", lambda: True)
    assert knn.choose_backend("auto", None, 20) == ("faiss", "cuda")
    assert knn.choose_backend("auto", None, 4096) == ("torch", "cuda")  # beyond faiss-gpu's k limit


def test_bad_devices_fail_with_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="torch sees no CUDA GPU here; pass device='cpu'"):
        knn_torch.resolve_device("cuda")
    with pytest.raises(ValueError, match="is not a torch device"):
        knn_torch.resolve_device("gpu0")
    assert knn_torch.resolve_device(None) == torch.device("cpu")
