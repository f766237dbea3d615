"""Near-duplicate video retrieval: the generated benchmark, frame sampling and features, PCA whitening, chamfer
similarity, ground-truth readers and AP, and video indexes built, sharded, queried and evaluated through the CLI."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from vitssl.cli import main
from vitssl.eval import retrieval_metrics as G
from vitssl.index import video as V
from vitssl.video import frames as Fr
from vitssl.video.neardup import TRANSFORMS, make_neardup_benchmark


def _run(*argv: object) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """A tiny generated benchmark: 4 sources x 7 copies + 2 distractors, 32 px, 4 s at 4 fps."""
    root = tmp_path_factory.mktemp("neardup") / "bench"
    return make_neardup_benchmark(root, num_sources=4, num_distractors=2, size=32, duration=4.0, fps=4.0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from vitssl.config import load_config
    from vitssl.engine import train

    out = tmp_path_factory.mktemp("run")
    train(
        load_config("pretrain/test_tiny", [f"output_dir={out}", "train.epochs=1", "data.train.kwargs.num_samples=16"])
    )
    return out / "checkpoint_last.pth"


# --------------------------------------------------------------------------------------------------------------
# AP, readers
# --------------------------------------------------------------------------------------------------------------


def test_average_precision_by_hand():
    # positives at ranks 1, 3 and 5; the fourth positive is never retrieved: (1/1 + 2/3 + 3/5) / 4
    ap = G.average_precision(["a", "x", "b", "y", "c"], {"a", "b", "c", "d"})
    assert ap == pytest.approx((1 + 2 / 3 + 3 / 5) / 4)
    assert G.average_precision(["a", "b"], {"a", "b"}) == 1.0
    result = G.evaluate_ranking(
        {"q1": ["a", "x", "b"], "q2": ["y", "c"]}, {"q1": {"a", "b"}, "q2": {"c"}, "q3": {"z"}}, ks=(1, 2)
    )
    assert result["mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 2) / 2)
    assert result["recall@1"] == pytest.approx((0.5 + 0.0) / 2) and result["recall@2"] == pytest.approx((0.5 + 1) / 2)
    assert result["num_queries"] == 2 and result["skipped_queries"] == 1


def test_readers_of_the_public_formats(tmp_path):
    cc = tmp_path / "cc_web_video.pickle"
    cc.write_bytes(
        pickle.dumps(
            {
                "index": {0: "1_1_Y", 1: "1_2_Y", 2: "1_3_Y", 3: "2_1_Y"},
                "queries": ["1_1_Y", "2_1_Y"],
                "ground_truth": [{"1_2_Y": "E", "1_3_Y": "X", "2_1_Y": "-1"}, {"1_3_Y": "V"}],
                "excluded": [{"1_2_Y"}, set()],
            }
        )
    )
    gt = G.read_ground_truth(cc)
    assert gt.name == "cc_web_video" and gt.queries == ["1_1_Y", "2_1_Y"]
    assert gt.positives == {"1_1_Y": {"1_2_Y"}, "2_1_Y": {"1_3_Y"}} and gt.database == [
        "1_1_Y",
        "1_2_Y",
        "1_3_Y",
        "2_1_Y",
    ]
    assert G.read_cc_web_video(cc, clean=True).positives["1_1_Y"] == set()

    fivr = tmp_path / "fivr.pickle"
    annotation = {"q1": {"ND": ["a"], "DS": ["b"], "CS": ["c"], "IS": ["d", "gone"]}}
    fivr.write_bytes(pickle.dumps({"annotation": annotation, "200k": {"queries": ["q1"], "database": list("abcdq")}}))
    assert G.read_ground_truth(fivr).positives == {"q1": {"a", "b"}}  # DSVR by default
    assert G.read_fivr(fivr, task="ISVR").positives == {"q1": {"a", "b", "c", "d"}}  # "gone" is not in the database

    evve = tmp_path / "evve.pickle"
    events = {"party": ({"q1", "q2"}, {"v1", "v2"}, {"n1"}), "storm": ({"q3"}, {"v3"}, set())}
    evve.write_bytes(
        pickle.dumps({"annotation": events, "queries": ["q1", "q2", "q3"], "database": ["v1", "v2", "v3"]})
    )
    gt = G.read_ground_truth(evve)
    assert gt.name == "evve" and gt.positives == {"q1": {"v1", "v2"}, "q2": {"v1", "v2"}, "q3": {"v3"}}

    own = tmp_path / "gt.jsonl"
    own.write_text('{"query": "s/a.mp4", "relevant": ["c/a1.mp4", "/abs/b.mp4"]}\n')
    assert G.read_ground_truth(own).positives == {str(tmp_path / "s/a.mp4"): {str(tmp_path / "c/a1.mp4"), "/abs/b.mp4"}}

    bad = tmp_path / "bad.pickle"
    bad.write_bytes(pickle.dumps({"something": 1}))
    with pytest.raises(G.GroundTruthError, match="none of CC_WEB_VIDEO, FIVR, EVVE"):
        G.read_ground_truth(bad)


def test_the_parser_mirrors_the_library_constants():
    from vitssl.cli import video_index as cli

    assert cli.GT_FORMATS == G.FORMATS and tuple(G.FIVR_TASKS) == cli.FIVR_TASK_NAMES
    assert cli.RERANKS == V.RERANKS and cli.DEFAULT_RERANK_K == V.DEFAULT_RERANK_K


def test_match_ids_by_path_or_file_stem():
    samples = ["/data/v/abc.mp4", "/data/v/def.webm"]
    assert G.match_ids(["abc", "/data/v/def.webm", "zzz"], samples) == {
        "abc": samples[0],
        "/data/v/def.webm": samples[1],
    }
    assert G.match_ids(["/elsewhere/abc.mp4"], samples) == {}  # a path matches that file only


# --------------------------------------------------------------------------------------------------------------
# chamfer, PCA, frames
# --------------------------------------------------------------------------------------------------------------


def test_chamfer_matches_a_loop_and_the_batched_form():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((5, 8)).astype(np.float32)
    ds = [rng.standard_normal((m, 8)).astype(np.float32) for m in (1, 3, 7)]

    def loop(a, b):
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        return np.mean([max(float(x @ y) for y in b) for x in a])

    expected = [loop(q, d) for d in ds]
    assert [V.chamfer_similarity(q, d) for d in ds] == pytest.approx(expected, abs=1e-5)
    assert V.chamfer_scores(q, ds) == pytest.approx(expected, abs=1e-5)
    assert V.chamfer_similarity(q, q) == pytest.approx(1.0, abs=1e-6)


def test_pca_whitening_whitens_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16)) * 3 + 5).astype(np.float32)
    pca = Fr.PCAWhitening(8).fit(x)
    y = pca.apply(x)
    assert y.shape == (500, 8)
    # decorrelated with equal variances; faiss's eigenvalues are those of the scatter matrix, so the variance is 1/N
    assert np.cov(y, rowvar=False, ddof=0) * len(x) == pytest.approx(np.eye(8), abs=1e-3)
    loaded = Fr.PCAWhitening.load(pca.save(tmp_path / "pca.faiss"))
    assert np.allclose(loaded.apply(x[:10]), y[:10], atol=1e-5) and loaded.d_in == 16
    with pytest.raises(Fr.DataError, match="at least 64 training frames"):
        Fr.PCAWhitening(64, 64).fit(rng.standard_normal((10, 64)).astype(np.float32))
    with pytest.raises(Fr.MissingFileError):
        Fr.PCAWhitening.load(tmp_path / "absent.faiss")


def test_sample_frames_at_a_rate_and_a_count(tmp_path):
    from tests._videos import decode_index, write_video

    path = write_video(tmp_path / "v.mp4", num_frames=40, fps=20)  # 2 s
    frames, stamps = Fr.sample_frames(path, fps=5)
    assert [decode_index(f) for f in frames] == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36]
    assert stamps == pytest.approx(np.arange(10) * 0.2)
    frames, _ = Fr.sample_frames(path, num_frames=4)
    assert [decode_index(f) for f in frames] == [5, 15, 25, 35]  # segment centres


def test_frame_features_are_cached_per_video(tmp_path, monkeypatch):
    from tests._videos import write_video

    paths = [write_video(tmp_path / f"v{i}.mp4", num_frames=20, fps=10) for i in range(2)]
    model = Fr.ThumbnailModel(4)
    first = Fr.video_frame_features(model, paths, fps=2, cache_dir=tmp_path / "cache")
    assert [f.shape for f in first] == [(4, 48), (4, 48)] and all(f.dtype == np.float32 for f in first)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2

    def no_decoding(*a, **k):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(Fr, "sample_frames", no_decoding)
    again = Fr.video_frame_features(model, paths, fps=2, cache_dir=tmp_path / "cache")
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    with pytest.raises(AssertionError, match="decoded"):  # another sampling is another key
        Fr.video_frame_features(model, paths, fps=1, cache_dir=tmp_path / "cache")


# --------------------------------------------------------------------------------------------------------------
# the benchmark and the commands
# --------------------------------------------------------------------------------------------------------------


def test_benchmark_layout(bench):
    info = json.loads((bench / "benchmark.json").read_text())
    train = (bench / "train.txt").read_text().split()
    test = (bench / "test.txt").read_text().split()
    assert len(train) + len(test) == 4 * (1 + len(TRANSFORMS)) + 2 and not set(train) & set(test)
    gt = G.read_ground_truth(bench / "ground_truth.jsonl")
    assert len(gt.queries) == 4 and all(len(p) == len(TRANSFORMS) for p in gt.positives.values())
    for query, copies in gt.positives.items():
        split = test if query in test else train
        assert query in split and copies <= set(split) and all(Path(c).is_file() for c in copies)
    assert (
        info["test_sources"]
        and make_neardup_benchmark(bench, num_sources=4, num_distractors=2, size=32, duration=4.0, fps=4.0) == bench
    )  # same settings: reused


def test_index_build_query_eval_with_an_image_checkpoint(bench, ckpt, tmp_path, capsys):
    idx = tmp_path / "idx"
    assert (
        _run("index", "build", ckpt, "--data", f"videos:root={bench}/test,fps=1", "--out", idx, "--device", "cpu") == 0
    )
    manifest = json.loads((idx / "manifest.json").read_text())
    test = (bench / "test.txt").read_text().split()
    assert manifest["count"] == len(test) and manifest["video"]["method"] == "mean"
    store = V.FrameStore.load(idx)
    assert len(store) == len(test) and store.get(0).shape[1] == manifest["dimension"]

    query = test[0]
    out = tmp_path / "q.json"
    grid = tmp_path / "sheet.png"
    assert (
        _run("index", "query", idx, "--video", query, "-k", "3", "--rerank", "chamfer", "--out", out, "--grid", grid)
        == 0
    )
    hits = json.loads(out.read_text())["queries"][0]["neighbours"]
    assert len(hits) == 3 and hits[0]["sample"] == query and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for rerank in ((), ("--rerank", "chamfer")):
        res = tmp_path / f"eval{len(rerank)}.json"
        gt = bench / "ground_truth.jsonl"
        assert _run("index", "eval", idx, "--ground-truth", gt, "--out", res, *rerank) == 0
        result = json.loads(res.read_text())
        assert 0.0 < result["mAP"] <= 1.0 and 0.0 <= result["recall@1"] <= result["recall@10"] <= 1.0
        assert result["num_queries"] == sum(1 for q in G.read_ground_truth(gt).queries if q in test)
    assert "mAP" in capsys.readouterr().out


def test_sharded_build_equals_the_single_build(bench, tmp_path):
    spec = f"videos:root={bench}/train"
    assert _run("index", "build", "thumbnails:size=4", "--data", spec, "--out", tmp_path / "one") == 0
    assert _run("index", "build", "thumbnails:size=4", "--data", spec, "--out", tmp_path / "sh", "--shards", "2") == 0
    one, sharded = V.load_video_index(tmp_path / "one")[0], V.load_video_index(tmp_path / "sh")[0]
    assert one.loaded.samples == sharded.loaded.samples
    assert np.array_equal(one.loaded.faiss_ids, sharded.loaded.faiss_ids)
    assert np.array_equal(one.loaded.vectors(), sharded.loaded.vectors())
    assert np.array_equal(one.frames.offsets, sharded.frames.offsets)
    assert np.array_equal(np.asarray(one.frames.vectors), np.asarray(sharded.frames.vectors))


def test_corrupt_video_stops_the_build_in_one_line_or_is_skipped(bench, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = (bench / "test.txt").read_text().split()[:2]
    for p in good:
        (corpus / Path(p).name).write_bytes(Path(p).read_bytes())
    (corpus / "broken.mp4").write_bytes(b"not a video at all" * 10)
    capsys.readouterr()
    assert _run("index", "build", "thumbnails", "--data", f"videos:root={corpus}", "--out", tmp_path / "i1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.mp4" in err[0] and "--skip-corrupt" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "i1").exists()
    assert (
        _run(
            "index",
            "build",
            "thumbnails",
            "--data",
            f"videos:root={corpus}",
            "--out",
            tmp_path / "i2",
            "--skip-corrupt",
        )
        == 0
    )
    manifest = json.loads((tmp_path / "i2" / "manifest.json").read_text())
    assert manifest["count"] == 2 and [Path(p).name for p in manifest["video"]["skipped"]] == ["broken.mp4"]


def test_query_errors_are_one_line(bench, tmp_path, capsys):
    idx = tmp_path / "idx"
    assert _run("index", "build", "thumbnails", "--data", f"videos:root={bench}/test", "--out", idx) == 0
    capsys.readouterr()
    assert _run("index", "query", idx, "--video", tmp_path / "missing.mp4") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.mp4" in err[0]
    assert _run("index", "query", idx) == 2
    assert "--video FILE" in capsys.readouterr().err
    assert _run("index", "query", idx, "--image", tmp_path / "x.png") == 2
    assert "is a video index; query it with --video" in capsys.readouterr().err


def test_video_corpora_from_data_specs(bench, tmp_path):
    from vitssl.config import ConfigError

    test = sorted((bench / "test.txt").read_text().split())
    assert list(V.video_corpus(f"videos:root={bench}/test").paths) == test
    folder = V.video_corpus(f"videofolder:root={bench},fps=2", split="test")
    assert sorted(folder.paths) == test and folder.fps == 2.0
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p} {i % 2}\n" for i, p in enumerate(test[:3])))
    csv = V.video_corpus(f"video_csv:root={listing},num_frames=3")
    assert list(csv.paths) == test[:3] and csv.num_frames == 3
    assert list(V.video_corpus(f"videos:list={bench}/test.txt").paths) == (bench / "test.txt").read_text().split()
    with pytest.raises(ConfigError, match="name a folder or a list file"):
        V.video_corpus(f"videos:root={bench},list={bench}/test.txt")
    with pytest.raises(ConfigError, match="bogus"):
        V.video_corpus(f"videos:root={bench},bogus=1")
    with pytest.raises(ConfigError, match="no video files"):
        V.video_corpus(f"videos:root={tmp_path}")


def test_two_local_processes_build_the_same_index(bench, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for p in (bench / "test.txt").read_text().split()[:4]:
        (corpus / Path(p).name).write_bytes(Path(p).read_bytes())
    (corpus / "broken.mp4").write_bytes(b"\x00" * 300)  # one rank meets it and skips it
    common = ["index", "build", "thumbnails:size=4", "--data", f"videos:root={corpus}", "--skip-corrupt"]
    assert _run(*common, "--out", tmp_path / "two", "launch.tasks_per_node=2") == 0
    assert _run(*common, "--out", tmp_path / "one") == 0
    two, one = V.load_video_index(tmp_path / "two")[0], V.load_video_index(tmp_path / "one")[0]
    assert two.loaded.samples == one.loaded.samples and len(one.loaded.samples) == 4
    assert np.array_equal(two.loaded.vectors(), one.loaded.vectors())
    assert np.array_equal(np.asarray(two.frames.vectors), np.asarray(one.frames.vectors))
    assert two.info["skipped"] == one.info["skipped"] == [str(corpus / "broken.mp4")]
