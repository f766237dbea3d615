"""Weighted k-NN (vitssl.eval.knn) against a brute-force NumPy reference of the DINO formula."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import itertools
import json
import os
import platform
import sys

import numpy as np
import pytest
import torch

from vitssl import _faiss
from vitssl.eval import knn
from vitssl.eval.store import ShardedRows

NUM_CLASSES = 7


def _clustered(n: int, dim: int, seed: int, centres_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    centres = np.random.default_rng(centres_seed).standard_normal((NUM_CLASSES, dim))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n)
    feats = centres[labels] + 1.5 * rng.standard_normal((n, dim))
    return (feats * rng.uniform(0.3, 3.0, (n, 1))).astype(np.float32), labels


def _reference(train: np.ndarray, labels: np.ndarray, query: np.ndarray, k: int, t: float, c: int):
    """The DINO formula in float64 NumPy: normalise, full similarity matrix, top-k, exp(sim / T) votes."""
    tr = train.astype(np.float64)
    tr /= np.linalg.norm(tr, axis=1, keepdims=True)
    q = query.astype(np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    sims = q @ tr.T  # (Q, N)
    top = np.argsort(-sims, axis=1)[:, :k]  # (Q, k)
    scores = np.zeros((len(q), c))
    for i in range(len(q)):
        for j in top[i]:
            scores[i, labels[j]] += np.exp(sims[i, j] / t)
    return scores, top


@pytest.fixture(scope="module")
def data():
    train, train_labels = _clustered(600, 24, seed=1)
    query, query_labels = _clustered(80, 24, seed=2)
    return train, train_labels, query, query_labels


@pytest.mark.parametrize("k", [1, 10, 20])
def test_knn_predict_equals_numpy_reference(data, k):
    train, labels, query, _ = data
    scores = knn.knn_predict(train, labels, query, k=k, temperature=0.07, num_classes=NUM_CLASSES)
    ref_scores, ref_top = _reference(train, labels, query, k, 0.07, NUM_CLASSES)
    _, idx = knn.knn_search(train, query, k)
    for got, want in zip(idx, ref_top):
        assert set(got.tolist()) == set(want.tolist())
    assert scores.shape == (len(query), NUM_CLASSES) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=0)
    np.testing.assert_array_equal(scores.argmax(1), ref_scores.argmax(1))


def test_multi_k_is_prefix_of_one_search(data):
    train, labels, query, _ = data
    multi = knn.knn_predict_multi_k(train, labels, query, ks=[10, 20, 100, 200], num_classes=NUM_CLASSES)
    assert list(multi) == [10, 20, 100, 200]
    for k, scores in multi.items():
        single = knn.knn_predict(train, labels, query, k=k, num_classes=NUM_CLASSES)
        np.testing.assert_allclose(scores, single, rtol=1e-6)


def test_torch_in_torch_out_numpy_in_numpy_out(data):
    train, labels, query, _ = data
    as_np = knn.knn_predict(train, labels, query, 20, 0.07, NUM_CLASSES)
    as_torch = knn.knn_predict(torch.from_numpy(train), torch.from_numpy(labels), torch.from_numpy(query), 20, 0.07)
    assert isinstance(as_np, np.ndarray) and isinstance(as_torch, torch.Tensor)
    assert as_torch.dtype == torch.float32 and as_torch.shape == (len(query), NUM_CLASSES)
    np.testing.assert_allclose(as_torch.numpy(), as_np, rtol=1e-6)


def test_normalised_contiguous_features_are_not_copied(data):
    train = data[0]
    normed = knn.normalize_features(train)
    assert normed is not train  # raw features need the one copy
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, rtol=1e-6)
    assert knn.normalize_features(normed) is normed
    as_tensor = torch.from_numpy(normed)
    assert np.shares_memory(knn.normalize_features(as_tensor), normed)
    # A non-contiguous view must be copied into a contiguous array for faiss.
    assert knn.normalize_features(np.asfortranarray(normed)).flags.c_contiguous


def test_zero_rows_stay_zero():
    x = np.array([[0.0, 0.0], [3.0, 4.0]], dtype=np.float32)
    np.testing.assert_allclose(knn.normalize_features(x), [[0, 0], [0.6, 0.8]])


def test_queries_are_searched_and_voted_in_chunks(data, monkeypatch):
    train, labels, query, query_labels = data
    whole = knn.knn_predict(train, labels, query, 20, num_classes=NUM_CLASSES)
    whole_eval = knn.knn_evaluate(train, labels, query, query_labels, ks=[20], num_classes=NUM_CLASSES)
    monkeypatch.setattr(knn, "_VOTE_CHUNK", 9)
    monkeypatch.setattr(knn, "_TRAIN_BLOCK_BYTES", 50 * 24 * 4)  # training blocks of 50 rows, fewer than k
    chunked = knn.knn_predict(train, labels, query, 20, num_classes=NUM_CLASSES, chunk_size=7)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)
    for raw in (train, knn.normalize_features(train)):  # blocks normalised into the buffer / searched whole
        blocked = knn.knn_predict(raw, labels, query, 200, num_classes=NUM_CLASSES, chunk_size=7)
        np.testing.assert_allclose(blocked, _reference(train, labels, query, 200, 0.07, NUM_CLASSES)[0], rtol=1e-5)
    chunked_eval = knn.knn_evaluate(train, labels, query, query_labels, ks=[20], num_classes=NUM_CLASSES, chunk_size=7)
    assert chunked_eval["results"] == whole_eval["results"]


def test_bfloat16_features_are_accepted(data):
    train, labels, query, _ = data
    scores = knn.knn_predict(torch.from_numpy(train).bfloat16(), labels, torch.from_numpy(query).bfloat16(), 10)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()


def test_k_larger_than_train_set_uses_all(caplog):
    train, labels = _clustered(12, 8, seed=3)
    query, _ = _clustered(5, 8, seed=4)
    scores = knn.knn_predict(train, labels, query, k=20, num_classes=NUM_CLASSES)
    ref, _ = _reference(train, labels, query, 12, 0.07, NUM_CLASSES)
    np.testing.assert_allclose(scores, ref, rtol=1e-5)
    assert "exceeds the 12 training features" in caplog.text


def test_votes_from_external_neighbours_skip_missing():
    labels = np.array([0, 1, 1, 2])
    sims = np.array([[0.9, 0.5, 0.1]], dtype=np.float32)
    neighbours = np.array([[1, 2, -1]])
    scores = knn.knn_scores_from_neighbours(sims, neighbours, labels, temperature=0.1, num_classes=3)
    np.testing.assert_allclose(scores, [[0.0, np.exp(9.0) + np.exp(5.0), 0.0]], rtol=1e-6)


def test_bad_inputs_fail_with_the_offending_value(data):
    train, labels, query, _ = data
    with pytest.raises(ValueError, match=r"train_labels must lie in \[0, 3\)"):
        knn.knn_predict(train, labels, query, 5, 0.07, num_classes=3)
    with pytest.raises(ValueError, match="temperature"):
        knn.knn_predict(train, labels, query, 5, 0.001, NUM_CLASSES)
    with pytest.raises(ValueError, match=r"query_features must have shape \(N, 24\)"):
        knn.knn_predict(train, labels, query[:, :10], 5, 0.07, NUM_CLASSES)
    with pytest.raises(ValueError, match="train_labels must have shape"):
        knn.knn_predict(train, labels[:-1], query, 5, 0.07, NUM_CLASSES)
    bad = train.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="row 3 is not finite"):
        knn.knn_predict(bad, labels, query, 5, 0.07, NUM_CLASSES)


def test_knn_evaluate_reports_every_k_and_per_class(data):
    train, labels, query, query_labels = data
    query_labels = query_labels.copy()
    query_labels[query_labels == 6] = 0  # class 6 absent from val -> per-class None
    result = knn.knn_evaluate(train, labels, query, query_labels, ks=[5, 20], num_classes=NUM_CLASSES)
    json.dumps(result)  # the CLI writes it as is
    assert set(result["results"]) == {"5", "20"} and result["device"] == "cpu"
    row = result["results"]["20"]
    scores = knn.knn_predict(train, labels, query, 20, 0.07, NUM_CLASSES)
    assert row["top1"] == pytest.approx((scores.argmax(1) == query_labels).mean() * 100)
    top5 = np.argsort(-scores, axis=1)[:, :5]
    assert row["top5"] == pytest.approx((top5 == query_labels[:, None]).any(1).mean() * 100)
    assert row["top5"] >= row["top1"]
    assert row["per_class_top1"][6] is None and len(row["per_class_top1"]) == NUM_CLASSES
    table = knn.format_knn_table(result)
    assert "top-1" in table and len(table.splitlines()) == 4


def _store_view(features: np.ndarray, tmp_path, cuts=(0, 130, 131, 400)) -> ShardedRows:
    """``features`` written as memory-mapped shards (as a feature store holds them), read back as one view."""
    bounds = [*cuts, len(features)]
    tmp_path = tmp_path / f"store{len(list(tmp_path.iterdir()))}"  # never over files another view maps
    tmp_path.mkdir()
    parts = []
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        np.save(tmp_path / f"part{i}.npy", features[a:b])
        parts.append(np.load(tmp_path / f"part{i}.npy", mmap_mode="r"))
    return ShardedRows(parts)


class _NoWholeCopy(ShardedRows):
    def __array__(self, dtype=None, copy=None):
        raise AssertionError("the bank was read whole")


@pytest.mark.parametrize("unit", [False, True])
def test_in_memory_and_store_banks_give_identical_results(data, tmp_path, monkeypatch, unit):
    train, labels, query, query_labels = data
    train = knn.normalize_features(train) if unit else train
    monkeypatch.setattr(knn, "_TRAIN_BLOCK_BYTES", 97 * 24 * 4)  # blocks of 97 rows straddle the shard cuts
    view = _store_view(train, tmp_path)
    streamed = _NoWholeCopy(view.parts)
    for k in (1, 20, 200):
        got, want = knn.knn_search(streamed, query, k, chunk_size=33), knn.knn_search(train, query, k, chunk_size=33)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    in_memory = knn.knn_evaluate(train, labels, query, query_labels, ks=[5, 20], num_classes=NUM_CLASSES)
    stored = knn.knn_evaluate(streamed, labels, _store_view(query, tmp_path, (0, 50)), query_labels, ks=[5, 20])
    assert stored["results"] == in_memory["results"]


def test_float16_store_searches_its_own_values(data, tmp_path):
    train, _labels, query, _ = data
    half = train.astype(np.float16)
    got = knn.knn_search(_store_view(half, tmp_path), query, 20)
    want = knn.knn_search(half.astype(np.float32), query, 20)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)


def test_k_above_the_bank_is_clamped_once_never_duplicated(data, tmp_path, caplog):
    _, _, query, query_labels = data
    train, labels = _clustered(12, 24, seed=3)
    for bank in (train, _store_view(train, tmp_path, (0, 5))):  # in memory and streamed from shards
        caplog.clear()
        result = knn.knn_evaluate(bank, labels, query, query_labels, ks=[5, 20, 100], num_classes=NUM_CLASSES)
        assert list(result["results"]) == ["5", "12"] and [r["k"] for r in result["results"].values()] == [5, 12]
        assert caplog.text.count("exceeds the 12 training features") == 1 and "k=20, 100" in caplog.text
        assert len(knn.format_knn_table(result).splitlines()) == 4  # two rows, not three
        scores = knn.knn_predict_multi_k(bank, labels, query, (20, 100, 5), num_classes=NUM_CLASSES)
        assert sorted(scores) == [5, 12]
        ref, _ = _reference(train, labels, query, 12, 0.07, NUM_CLASSES)
        np.testing.assert_allclose(scores[12], ref, rtol=1e-5)
    _sims, idx = knn.knn_search(train, query, 12)
    assert all(len(set(row)) == 12 for row in idx.tolist())  # every training row once per query


class _RecordingFaissFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Stands in for faiss on import and records OPENBLAS_CORETYPE as OpenBLAS would see it while loading."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []

    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == "faiss" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        self.seen.append(os.environ.get("OPENBLAS_CORETYPE"))


@pytest.mark.parametrize(
    ("flags", "user_value", "seen"),
    [
        (set(_faiss._SKYLAKEX_FLAGS), None, "SkylakeX"),  # Zen 4/5, newer Xeons: AVX-512 kernels
        ({"avx2", "avx512f"}, None, None),  # incomplete AVX-512: OpenBLAS decides
        ({"avx2", "fma"}, None, None),  # no AVX-512: OpenBLAS decides
        (set(_faiss._SKYLAKEX_FLAGS), "Haswell", "Haswell"),  # the user's choice wins
    ],
)
def test_faiss_import_blas_kernel_choice(monkeypatch, flags, user_value, seen):
    finder = _RecordingFaissFinder()
    monkeypatch.delitem(sys.modules, "faiss")  # restored at teardown
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    monkeypatch.setattr(_faiss, "_cpu_flags", lambda: flags)
    if user_value is None:
        monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    else:
        monkeypatch.setenv("OPENBLAS_CORETYPE", user_value)
    _faiss._import_faiss()
    assert finder.seen == [seen]
    # The variable lives only during the import: subprocesses (e.g. SLURM jobs elsewhere) never inherit it.
    assert os.environ.get("OPENBLAS_CORETYPE") == user_value


@pytest.mark.skipif(platform.machine() != "x86_64" or not os.path.exists("/proc/cpuinfo"), reason="x86-64 Linux")
def test_cpu_flags_reads_proc_cpuinfo():
    assert "sse2" in _faiss._cpu_flags()  # every x86-64 CPU has SSE2
