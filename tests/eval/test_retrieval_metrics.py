"""The one ground-truth reader and the one AP / mAP (vitssl.eval.retrieval_metrics): AP against the standard
definition and scikit-learn, every id form the two former readers took, integer ids, and ``index eval`` on them."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from vitssl.cli import main
from vitssl.eval import retrieval_metrics as M
from vitssl.index import core


def _run(*argv: object) -> int:
    return main([str(a) for a in argv])


def _ap_by_definition(ranking: list, relevant: set, k: int | None) -> float:
    """AP transcribed from its textbook definition: (1 / n) * sum_{i=1..N} P(i) * rel(i), P(i) the precision of the
    first i results, rel(i) 1 when result i is relevant; n = |relevant| for a full ranking, min(k, |relevant|) for
    AP@k over the first N = k results."""
    ranking = ranking[:k] if k is not None else ranking
    rel = [1.0 if r in relevant else 0.0 for r in ranking]
    precision = [sum(rel[: i + 1]) / (i + 1) for i in range(len(rel))]
    n = len(relevant) if k is None else min(k, len(relevant))
    return sum(p * r for p, r in zip(precision, rel)) / n


# Relevance [1, 0, 1, 0, 0]: hits at ranks 1 and 3, so the precisions summed are 1/1 and 2/3.
_RANKING = ["a", "x", "b", "y", "z"]


@pytest.mark.parametrize(
    ("relevant", "k", "expected"),
    [
        ({"a", "b"}, 5, (1 + 2 / 3) / 2),  # AP@5: / min(5, 2)
        ({"a", "b", "c"}, 5, (1 + 2 / 3) / 3),  # AP@5: / min(5, 3); "c" was never retrieved
        ({"a", "b"}, 3, (1 + 2 / 3) / 2),  # AP@3 over [a, x, b]: / min(3, 2)
        ({"a", "b", "c"}, 3, (1 + 2 / 3) / 3),  # AP@3: / min(3, 3)
        ({"a", "b"}, 2, 1 / 2),  # AP@2 over [a, x]: / min(2, 2)
        ({"a", "b", "c"}, 2, 1 / 2),  # AP@2: / min(2, 3)
        ({"a", "b"}, None, (1 + 2 / 3) / 2),  # full ranking: / |R|
        ({"a", "b", "c"}, None, (1 + 2 / 3) / 3),
    ],
)
def test_average_precision_by_hand(relevant, k, expected):
    assert M.average_precision(_RANKING, relevant, k) == pytest.approx(expected)
    assert M.mean_average_precision([_RANKING], [relevant], k=k) == pytest.approx(expected)


def test_average_precision_equals_the_definition_and_sklearn():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    for _ in range(60):
        n = int(rng.integers(1, 40))
        relevant = set(rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False).tolist())
        ranking = rng.permutation(n).tolist()
        for k in (None, 1, 3, 10, 50):
            assert M.average_precision(ranking, relevant, k) == pytest.approx(_ap_by_definition(ranking, relevant, k))
        # a full ranking of the database is a score per item: sklearn's AP is the same number
        y_true = np.zeros(n)
        y_true[list(relevant)] = 1
        scores = np.empty(n)
        scores[ranking] = np.arange(n, 0, -1)  # rank 1 scores highest
        assert M.average_precision(ranking, relevant) == pytest.approx(average_precision_score(y_true, scores))
        # numpy rankings (faiss output, -1 padding) read as lists do
        padded = np.array([*ranking[:5], -1, -1])
        assert M.average_precision(padded, relevant, 7) == pytest.approx(
            _ap_by_definition(padded.tolist(), relevant, 7)
        )


def test_map_skips_queries_without_positives_and_perfect_top_k_is_one():
    relevant = set(range(140))
    perfect = [list(range(10))]
    assert M.mean_average_precision(perfect, [relevant], k=10) == 1.0
    assert M.mean_average_precision(perfect, [relevant], k=None) == pytest.approx(10 / 140)
    assert M.mean_average_precision(np.array([[7, 1], [3, 4]]), [{1, 5}, set()], k=None) == 0.5 / 2
    with pytest.raises(ValueError, match="k must be >= 1"):
        M.mean_average_precision(perfect, [relevant], k=0)
    with pytest.raises(M.GroundTruthError, match="no query has relevant items"):
        M.mean_average_precision(perfect, [set()])


def test_both_former_json_forms_and_integer_ids_read(tmp_path):
    gt = tmp_path / "gt.jsonl"
    # the image reader's form (sample ids / paths as the index names them), the video reader's (paths relative to
    # the file's folder, absolute paths), integer faiss ids, blank lines
    gt.write_text(
        '{"query": "q/1.jpg", "relevant": ["images/00001.jpg", "digits/val/17"]}\n\n'
        '{"query": "/abs/v.mp4", "relevant": ["/abs/w.mp4"]}\n'
        '{"query": 4, "relevant": [0, 7, "c/a1.mp4"]}\n'
    )
    truth = M.read_ground_truth(gt)
    q1 = str(tmp_path / "q/1.jpg")
    assert truth.queries == [q1, "/abs/v.mp4", 4]
    assert truth.positives[q1] == {str(tmp_path / "images/00001.jpg"), str(tmp_path / "digits/val/17")}
    assert truth.positives[4] == {0, 7, str(tmp_path / "c/a1.mp4")}
    assert truth.as_written[q1] == "q/1.jpg" and truth.as_written[str(tmp_path / "digits/val/17")] == "digits/val/17"
    samples = ["digits/val/17", str(tmp_path / "images/00001.jpg"), "/abs/w.mp4", "/x/a1.mp4"]
    matched = M.match_ids(
        {p for ps in truth.positives.values() for p in ps}, samples, faiss_ids=[7, 0, 5, 9], as_written=truth.as_written
    )
    assert matched == {
        str(tmp_path / "digits/val/17"): "digits/val/17",  # a sample id, as written
        str(tmp_path / "images/00001.jpg"): str(tmp_path / "images/00001.jpg"),  # a path against the file's folder
        "/abs/w.mp4": "/abs/w.mp4",
        0: str(tmp_path / "images/00001.jpg"),  # faiss ids
        7: "digits/val/17",
    }  # c/a1.mp4 is a path of another folder: not matched by its name alone
    assert M.match_ids(["a1"], samples) == {"a1": "/x/a1.mp4"}  # a bare dataset id matches by file stem
    for bad in ('{"query": "q/1.jpg"}', '{"query": 1.5, "relevant": []}', '{"query": "q", "relevant": "x"}'):
        gt.write_text(bad + "\n")
        with pytest.raises(M.GroundTruthError, match="line 1: expected"):
            M.read_ground_truth(gt)
    written = M.write_vitssl(tmp_path / "out.jsonl", [(3, [1, 2]), (str(tmp_path / "a.jpg"), [5])], tmp_path)
    assert M.read_ground_truth(written).positives == {3: {1, 2}, str(tmp_path / "a.jpg"): {5}}


def test_fivr_pickle_with_integer_ids(tmp_path):
    fivr = tmp_path / "fivr.pickle"
    annotation = {1: {"ND": [10], "DS": [11], "CS": [12]}}
    fivr.write_bytes(pickle.dumps({"annotation": annotation, "5k": {"queries": [1], "database": [10, 11, 12, 13]}}))
    truth = M.read_ground_truth(fivr, version="5k")
    assert truth.queries == ["1"] and truth.positives == {"1": {"10", "11"}}
    assert M.read_fivr(fivr, version="5k", task="CSVR").positives == {"1": {"10", "11", "12"}}


def test_index_eval_with_integer_ids_needs_no_checkpoint(tmp_path, capsys):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((30, 8)).astype(np.float32)
    idx = core.build_index_dir(tmp_path / "idx", vectors, [f"digits/val/{i}" for i in range(30)], "Flat")
    gt = tmp_path / "gt.jsonl"
    gt.write_text(
        json.dumps({"query": 3, "relevant": [3, 11, "digits/val/12"]})
        + "\n"
        + json.dumps({"query": 5, "relevant": [5, 20]})
        + "\n"
    )
    out = tmp_path / "map.json"
    assert _run("index", "eval", idx, "--ground-truth", gt, "-k", 30, "--out", out) == 0
    result = json.loads(out.read_text())
    expected = core.evaluate_index(idx, vectors[[3, 5]], [[3, 11, 12], [5, 20]], k=30)
    assert result["map_name"] == "mAP" and result["map"] == pytest.approx(expected["map"])
    assert result["num_queries"] == 2
    gt.write_text(json.dumps({"query": 3, "relevant": [3, 99, "digits/val/77"]}) + "\n")
    capsys.readouterr()
    assert _run("index", "eval", idx, "--ground-truth", gt) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 relevant ids are not in the index" in err[0] and "99" in err[0]
