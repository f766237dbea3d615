"""Approximate k-NN (vitssl.eval.knn_approx): IVF lists, probes calibrated on the queries, accuracy held."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitssl.eval import knn, knn_approx

CLASSES = 40


def _clustered(n: int, seed: int, dim: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Classes of 3 modes each around 8 superclass centres, with within-class variation and isotropic noise."""
    centres = np.random.default_rng(0)
    supers = centres.standard_normal((8, dim))
    modes = supers[np.arange(CLASSES) % 8][:, None] + 0.4 * centres.standard_normal((CLASSES, 3, dim))  # (C, 3, D)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    feats = modes[labels, rng.integers(0, 3, n)] + 0.7 * rng.standard_normal((n, dim))
    return (feats * rng.uniform(0.5, 2.0, (n, 1))).astype(np.float32), labels


@pytest.fixture(scope="module")
def data():
    return (*_clustered(8000, 1), *_clustered(1500, 2))


def test_parameters_follow_the_bank_and_query_sizes():
    assert knn_approx.approx_params(8000, 1500) == {"nlist": 64, "train_rows": 2048}  # sqrt(8000) ~ 89 -> 64
    assert knn_approx.approx_params(8000, 400)["nlist"] == 32  # at most sqrt(4 x 400) = 40 lists
    assert knn_approx.approx_params(200_000, 10_000)["nlist"] == 128
    assert knn_approx.approx_params(100)["nlist"] == 1  # at least 64 rows per list
    assert knn_approx.approx_params(1_281_167, 50_000) == {"nlist": 256, "train_rows": 8192}
    assert knn_approx.approx_params(1_281_167)["nlist"] == 1024


def test_approximate_search_holds_accuracy_while_probing_few_lists(data):
    train, labels, query, query_labels = data
    exact = knn.knn_evaluate(train, labels, query, query_labels, ks=[10, 20], num_classes=CLASSES)
    approx = knn.knn_evaluate(train, labels, query, query_labels, ks=[10, 20], num_classes=CLASSES, approx=True)
    search = approx["search"]
    assert search["index"] == "IVF-Flat" and search["nlist"] == 64 and search["sample_queries"] == 128
    assert search["nprobe"] <= search["nlist"] // 4  # really approximate: a quarter of the lists at most
    assert search["sample_recall"] >= knn_approx.DEFAULT_RECALL_TARGET
    for k in ("10", "20"):
        assert approx["results"][k]["top1"] >= exact["results"][k]["top1"] - 0.5  # 0.5 points: 7 of 1500 queries
    sims, idx, params = knn.knn_search_approx(train, query, 20)
    _, exact_idx = knn.knn_search(train, query, 20)
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(idx.tolist(), exact_idx.tolist())])
    assert recall >= 0.95 and params["nprobe"] == search["nprobe"]
    found = idx >= 0
    dots = knn.normalize_features(query) @ knn.normalize_features(train).T  # (Q, N)
    np.testing.assert_allclose(sims[found], dots[np.nonzero(found)[0], idx[found]], rtol=1e-5, atol=1e-6)


def test_fewer_probes_lose_neighbours_and_all_probes_are_exact(data):
    train, _, query, _ = data
    exact_sims, exact_idx = knn.knn_search(train, query, 20)
    recalls = []
    for nprobe in (1, 64):
        sims, idx, params = knn.knn_search_approx(train, query, 20, nprobe=nprobe)
        assert params["nprobe"] == nprobe and params["sample_recall"] is None
        recalls.append(np.mean([len(set(a) & set(b)) / 20 for a, b in zip(idx.tolist(), exact_idx.tolist())]))
    assert recalls[0] < 0.9  # one list is not enough on this data: the calibration has something to do
    np.testing.assert_allclose(sims, exact_sims, rtol=1e-5, atol=1e-6)  # every list probed: exact search
    assert recalls[1] > 0.999


def test_calibration_picks_the_fewest_lists_reaching_the_target():
    centroids = torch.eye(4)  # list l has centroid e_l
    sample = torch.nn.functional.normalize(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), dim=1)  # lists by rank: 0 1 2 3
    neighbour_lists = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2, 3, 0]])  # ranks 0 0 1 1 1 2 2 2 3 0
    assert knn_approx.calibrate_nprobe(sample, centroids, neighbour_lists, 0.5) == (2, pytest.approx(0.6))
    assert knn_approx.calibrate_nprobe(sample, centroids, neighbour_lists, 0.9)[0] == 3
    assert knn_approx.calibrate_nprobe(sample, centroids, neighbour_lists, 1.0) == (4, 1.0)


def test_neighbours_an_approximate_search_did_not_find_cast_no_vote():
    train, labels = _clustered(300, 5, dim=8)
    query, _ = _clustered(40, 6, dim=8)
    sims, idx, params = knn.knn_search_approx(train, query, 250, nlist=4, nprobe=1)
    assert params["nlist"] == 4 and (idx < 0).any()  # one list of ~75 rows cannot give 250 neighbours
    assert np.isneginf(sims[idx < 0]).all()
    for row in idx.tolist():
        kept = [i for i in row if i >= 0]
        assert len(kept) == len(set(kept))  # never a row twice
    scores = knn.knn_scores_from_neighbours(sims, idx, labels, num_classes=CLASSES)
    expected = np.zeros_like(scores, dtype=np.float64)
    for i, j in zip(*np.nonzero(idx >= 0)):
        expected[i, labels[idx[i, j]]] += np.exp(sims[i, j] / 0.07)
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


def test_bad_recall_target_is_refused(data):
    train, _, query, _ = data
    with pytest.raises(ValueError, match=r"recall_target must lie in \(0, 1\], got 1.5"):
        knn.knn_search_approx(train[:500], query[:10], 5, recall_target=1.5)
