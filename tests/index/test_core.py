"""Retrieval index directories (vitssl.index.core): build, store, query, shard + merge, evaluate, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from vitssl.eval.knn import normalize_features
from vitssl.index import core as retrieval
from vitssl.index.core import IndexFormatError

D = 32


def _corpus(n: int, seed: int = 0, clusters: int = 20) -> np.ndarray:
    centres = np.random.default_rng(100).standard_normal((clusters, D))
    rng = np.random.default_rng(seed)
    return (centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, D))).astype(np.float32)


def _samples(n: int, offset: int = 0) -> list[str]:
    return [f"images/{i:05d}.jpg" for i in range(offset, offset + n)]


def _exact(corpus: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    c = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.argsort(-(q @ c.T), axis=1)[:, :k]


@pytest.fixture(scope="module")
def corpus():
    return _corpus(3000)


@pytest.fixture(scope="module")
def queries():
    return _corpus(50, seed=1)


def test_flat_index_written_read_and_queried(tmp_path, corpus, queries):
    out = retrieval.build_index_dir(
        tmp_path / "idx", corpus, _samples(len(corpus)), "Flat", checkpoint="abc123", feature_key="cls"
    )
    assert sorted(p.name for p in out.iterdir()) == ["ids.jsonl", "index.faiss", "manifest.json", "vectors.npy"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left
    loaded = retrieval.load_index_dir(out, expect_dim=D, expect_checkpoint="abc123")
    m = loaded.manifest
    assert (m["factory"], m["metric"], m["normalize"], m["dimension"], m["count"]) == ("Flat", "ip", True, D, 3000)
    assert m["checkpoint"] == "abc123" and m["feature_key"] == "cls" and m["build_seconds"] > 0
    assert m["vitssl_version"] and m["faiss_version"]
    scores, ids = retrieval.search(out, queries, k=10)
    np.testing.assert_array_equal(ids, _exact(corpus, queries, 10))
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    assert loaded.lookup(ids[:1])[0][0] == f"images/{ids[0, 0]:05d}.jpg"
    # Reading it back gives the same neighbours as the in-memory index it was built from.
    in_memory = retrieval.build_index(corpus, "Flat")
    np.testing.assert_array_equal(in_memory.search(normalize_features(queries), 10)[1], ids)


def test_ivf_recall_against_flat(tmp_path, corpus, queries):
    out = retrieval.build_index_dir(tmp_path / "ivf", corpus, _samples(len(corpus)), "IVF16,Flat")
    assert retrieval.load_index_dir(out).manifest["search_params"] == {"nprobe": 8}
    low = retrieval.evaluate_index(out, queries, k=10, nprobe=1)
    high = retrieval.evaluate_index(out, queries, k=10, nprobe=8)
    assert set(high["recall"]) == {"1", "10"}
    assert high["recall"]["10"] >= 0.95 and high["recall"]["10"] >= low["recall"]["10"]
    assert high["search_params"]["nprobe"] == 8
    loaded = retrieval.load_index_dir(out)
    _, ids = retrieval.search(loaded, queries, 10, nprobe=16)  # all lists visited: exact
    np.testing.assert_array_equal(ids, _exact(corpus, queries, 10))
    assert retrieval.faiss.extract_index_ivf(loaded.index).nprobe == 8  # the override lasted one call


def test_ivf_pq_and_hnsw_recall(tmp_path, corpus, queries):
    for factory, floor in (("IVF16,PQ8", 0.5), ("HNSW16", 0.9)):
        out = retrieval.build_index_dir(tmp_path / factory.replace(",", "_"), corpus, _samples(3000), factory)
        result = retrieval.evaluate_index(out, queries, k=10)
        assert result["recall"]["10"] >= floor, (factory, result)
    assert retrieval.load_index_dir(tmp_path / "HNSW16").manifest["search_params"] == {"efSearch": 64}


def test_evaluate_samples_stored_vectors_and_computes_map(tmp_path, corpus):
    out = retrieval.build_index_dir(tmp_path / "flat", corpus, _samples(len(corpus)), "Flat")
    result = retrieval.evaluate_index(out, k=5, num_queries=20, seed=0)
    assert result["num_queries"] == 20 and result["recall"]["5"] == 1.0
    vectors = retrieval.load_index_dir(out).vectors()
    q = np.asarray(vectors[:3])
    truth = [[0], ["images/00001.jpg"], [2, 2999]]  # each query's own row is its best match
    gt = retrieval.evaluate_index(out, q, ground_truth=truth, k=5)
    # Query 3 finds row 2 first and not row 2999 in its top 5: AP@5 = 1 / min(5, 2).
    assert gt["map_name"] == "mAP@5"
    assert gt["map"] == pytest.approx((1 + 1 + 0.5) / 3) and gt["map_exact"] == gt["map"]


def test_evaluate_names_full_ranking_map(tmp_path, corpus):
    out = retrieval.build_index_dir(tmp_path / "small", corpus[:50], _samples(50), "Flat")
    q = np.asarray(retrieval.load_index_dir(out).vectors()[:2])
    gt = retrieval.evaluate_index(out, q, ground_truth=[[0, 49], [1]], k=50)  # k covers the whole index
    assert gt["map_name"] == "mAP" and 0 < gt["map"] <= 1 and gt["map"] == gt["map_exact"]


def test_recall_by_hand():
    approx = np.array([[1, 2, 3], [4, 5, -1]])
    exact = np.array([[1, 3, 9], [4, 6, 7]])
    assert retrieval.recall_at_k(approx, exact, 1) == 1.0
    assert retrieval.recall_at_k(approx, exact, 3) == pytest.approx((2 / 3 + 1 / 3) / 2)


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "HNSW16"])
def test_shards_merge_like_a_single_build(tmp_path, corpus, queries, factory):
    n, shards = len(corpus), 3
    trained = None
    if not retrieval.new_index(factory, D).is_trained:
        rows = retrieval.training_sample_indices(n, 2000, seed=0)
        trained = retrieval.write_trained_index(
            tmp_path / "trained.faiss", retrieval.train_index(corpus[rows], factory), factory, "ip", True, 2000, 0
        )
    dirs = []
    for i in reversed(range(shards)):  # any order
        start, stop = retrieval.shard_range(n, i, shards)
        dirs.append(
            retrieval.build_shard(
                tmp_path / f"shard{i}",
                corpus[start:stop],
                _samples(stop - start, start),
                (i, shards),
                start,
                factory,
                trained=trained,
                checkpoint="ck",
            )
        )
    merged = retrieval.load_index_dir(retrieval.merge_shards(dirs, tmp_path / "merged"), expect_checkpoint="ck")
    single = retrieval.load_index_dir(
        retrieval.build_index_dir(tmp_path / "single", corpus, _samples(n), factory, train_size=2000, seed=0)
    )
    assert merged.manifest["count"] == n and merged.manifest["merged_from"] == shards
    assert merged.samples == single.samples and np.array_equal(merged.faiss_ids, np.arange(n))
    np.testing.assert_array_equal(merged.vectors(), single.vectors())
    merged_ids = retrieval.search(merged, queries, 10)[1]
    if factory == "HNSW16":  # a graph built in pieces differs; it must still find the neighbours
        assert retrieval.recall_at_k(merged_ids, _exact(corpus, queries, 10), 10) >= 0.9
    else:
        np.testing.assert_array_equal(merged_ids, retrieval.search(single, queries, 10)[1])


def test_merge_rejects_missing_or_mismatched_shards(tmp_path, corpus):
    a = retrieval.build_shard(tmp_path / "a", corpus[:100], _samples(100), (0, 3), 0, checkpoint="x")
    b = retrieval.build_shard(tmp_path / "b", corpus[100:200], _samples(100, 100), (1, 3), 100, checkpoint="y")
    with pytest.raises(IndexFormatError, match=r"missing \[2\]"):
        retrieval.merge_shards([a, b], tmp_path / "m")
    c = retrieval.build_shard(tmp_path / "c", corpus[200:300], _samples(100, 200), (2, 3), 200, checkpoint="x")
    with pytest.raises(IndexFormatError, match="checkpoint"):
        retrieval.merge_shards([a, b, c], tmp_path / "m")
    with pytest.raises(ValueError, match="needs training"):
        retrieval.build_shard(tmp_path / "d", corpus[:100], _samples(100), (0, 1), 0, "IVF8,Flat")


def test_too_small_for_the_factory_suggests_a_smaller_one(corpus):
    with pytest.raises(ValueError, match=r"needs at least 4096 training vectors.*smaller factory, e\.g\. 'IVF16,Flat'"):
        retrieval.build_index(corpus[:1000], "IVF4096,Flat")
    with pytest.raises(ValueError, match="cannot build index factory 'NotAFactory'"):
        retrieval.build_index(corpus[:10], "NotAFactory")


@pytest.fixture()
def flat_dir(tmp_path, corpus):
    return retrieval.build_index_dir(tmp_path / "idx", corpus[:200], _samples(200), "Flat", checkpoint="ck")


def test_corrupt_index_file_fails_clearly(flat_dir):
    path = flat_dir / "index.faiss"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match=r"index\.faiss does not match its checksum"):
        retrieval.load_index_dir(flat_dir)
    path.write_bytes(b"garbage!" * (len(data) // 8) + b"x" * (len(data) % 8))  # same size, not an index
    with pytest.raises(IndexFormatError, match=r"index\.faiss cannot be read by faiss"):
        retrieval.load_index_dir(flat_dir, verify=False)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(IndexFormatError, match="truncated"):
        retrieval.load_index_dir(flat_dir)


def test_missing_files_and_count_mismatch_fail_clearly(flat_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(flat_dir, broken)
    (broken / "ids.jsonl").unlink()
    with pytest.raises(IndexFormatError, match=r"ids\.jsonl is missing"):
        retrieval.load_index_dir(broken)
    (flat_dir / "manifest.json").rename(tmp_path / "manifest.json")
    with pytest.raises(IndexFormatError, match=r"manifest\.json is missing"):
        retrieval.load_index_dir(flat_dir)
    (tmp_path / "manifest.json").rename(flat_dir / "manifest.json")
    # An id map one line short whose manifest entry was updated to match: the count check must catch it.
    ids = flat_dir / "ids.jsonl"
    ids.write_text("".join(ids.read_text().splitlines(keepends=True)[:-1]))
    manifest = json.loads((flat_dir / "manifest.json").read_text())
    manifest["files"]["ids.jsonl"] = {"bytes": ids.stat().st_size, "sha256": retrieval._sha256(ids)}
    (flat_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match=r"count mismatch: index\.faiss holds 200 vectors, ids\.jsonl has 199"):
        retrieval.load_index_dir(flat_dir)


def test_mismatched_dimension_or_checkpoint_fails_clearly(flat_dir, queries):
    with pytest.raises(IndexFormatError, match="dimension 32 but the query features have 64"):
        retrieval.load_index_dir(flat_dir, expect_dim=64)
    with pytest.raises(IndexFormatError, match="built from checkpoint 'ck', not 'other'"):
        retrieval.load_index_dir(flat_dir, expect_checkpoint="other")
    with pytest.raises(IndexFormatError, match="queries have dimension 16"):
        retrieval.search(flat_dir, queries[:, :16], 5)
    with pytest.raises(ValueError, match="nprobe applies to IVF indexes"):
        retrieval.search(flat_dir, queries, 5, nprobe=4)


def test_existing_directory_is_replaced_only_when_asked(flat_dir, corpus):
    with pytest.raises(FileExistsError, match="overwrite=True"):
        retrieval.build_index_dir(flat_dir, corpus[:50], _samples(50))
    retrieval.build_index_dir(flat_dir, corpus[:50], _samples(50), overwrite=True)
    assert retrieval.load_index_dir(flat_dir).manifest["count"] == 50
    assert [p.name for p in flat_dir.parent.iterdir()] == [flat_dir.name]
