"""Tracking metrics (TrackEval) against motmetrics' reference values, the MOT17 rules, the tracker, the CLI."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from vitssl.cli import main
from vitssl.errors import DataError
from vitssl.video.track.associate import Tracker, box_iou, giou, match, results_to_rows, track_detections
from vitssl.video.track.metrics import COMBINED, evaluate
from vitssl.video.track.mot import list_sequences, read_mot, write_mot, xywh_to_xyxy
from vitssl.video.track.synth import write_sequences

motmetrics = pytest.importorskip("motmetrics")
TUD = Path(motmetrics.__file__).parent / "data"


def _tud(name: str) -> tuple[np.ndarray, np.ndarray]:
    return read_mot(TUD / name / "gt.txt"), read_mot(TUD / name / "test.txt")


def test_tud_campus_matches_the_values_motmetrics_tests_expect():
    gt, pred = _tud("TUD-Campus")
    res = evaluate(gt, pred, "mot15")["seq"]
    assert res["IDF1"] == pytest.approx(0.557659, abs=1e-5)
    assert res["MOTA"] == pytest.approx(0.526462, abs=1e-5)
    assert 1 - res["MOTP"] == pytest.approx(0.277201, abs=1e-5)  # motmetrics reports 1 - IoU
    assert res["IDSW"] == 7
    assert (res["FP"], res["FN"], res["Frag"]) == (13, 150, 7)
    assert res["IDP"] == pytest.approx(0.729730, abs=1e-5) and res["IDR"] == pytest.approx(0.451253, abs=1e-5)


def test_sequences_combine_as_counts_not_averages():
    names = ("TUD-Campus", "TUD-Stadtmitte")
    gt, pred = zip(*(_tud(n) for n in names))
    res = evaluate(dict(zip(names, gt)), dict(zip(names, pred)))
    assert list(res) == [*names, COMBINED]
    assert res["TUD-Stadtmitte"]["IDF1"] == pytest.approx(0.644619, abs=1e-5)
    assert res[COMBINED]["IDF1"] == pytest.approx(0.624296, abs=1e-5)  # motmetrics' OVERALL row
    assert res[COMBINED]["MOTA"] == pytest.approx(0.555116, abs=1e-5)
    assert 1 - res[COMBINED]["MOTP"] == pytest.approx(0.330177, abs=1e-5)
    assert res[COMBINED]["IDSW"] == 14 and res[COMBINED]["FN"] == 602


def _motmetrics_summary(gt: np.ndarray, pred: np.ndarray) -> dict:
    """motmetrics fed with IoU distances computed here (its own iou_matrix calls np.asfarray, gone in NumPy 2)."""
    acc = motmetrics.MOTAccumulator(auto_id=False)
    for frame in np.unique(np.concatenate([gt[:, 0], pred[:, 0]])).astype(int):
        g, p = gt[gt[:, 0] == frame], pred[pred[:, 0] == frame]
        dist = 1 - box_iou(xywh_to_xyxy(g[:, 2:6]), xywh_to_xyxy(p[:, 2:6]))  # (G, P)
        dist[dist > 0.5] = np.nan
        acc.update(g[:, 1].astype(int), p[:, 1].astype(int), dist, frameid=frame)
    mh = motmetrics.metrics.create()
    summary = mh.compute(acc, metrics=["mota", "idf1", "num_switches", "num_false_positives", "num_misses"])
    return summary.iloc[0].to_dict()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("track")
    write_sequences(root / "gt", num_sequences=2, num_frames=30, size=(64, 96), seed=11)
    sequences = list_sequences(root / "gt")
    preds = {}
    for seq in sequences:
        tracker = Tracker(score_thresh=0.4, cost="iou")
        rows = []
        for frame in range(1, seq.length + 1):
            det = seq.det[seq.det[:, 0] == frame]
            rows.append(results_to_rows(frame, tracker.update(frame, xywh_to_xyxy(det[:, 2:6]), det[:, 6])))
        preds[seq.name] = np.concatenate(rows)
        np.testing.assert_array_equal(track_detections(seq.det, tracker, seq.length), preds[seq.name])
        write_mot(root / "pred" / f"{seq.name}.txt", preds[seq.name])
    return root, {s.name: s.gt for s in sequences}, preds


def test_trackeval_agrees_with_motmetrics_on_tracker_output(synthetic):
    _, gts, preds = synthetic
    for name in gts:
        ours = evaluate(gts[name], preds[name])["seq"]
        ref = _motmetrics_summary(gts[name], preds[name])
        assert ours["MOTA"] == pytest.approx(ref["mota"], abs=1e-9)
        assert ours["IDF1"] == pytest.approx(ref["idf1"], abs=1e-9)
        assert (ours["FP"], ours["FN"]) == (ref["num_false_positives"], ref["num_misses"])


def test_the_iou_tracker_on_noisy_detections_tracks_the_generated_objects(synthetic):
    # a floor for any detector + tracker on these sequences: detections are the gt boxes with noise
    _, gts, preds = synthetic
    res = evaluate(gts, preds)[COMBINED]
    assert res["MOTA"] > 0.6 and res["IDF1"] > 0.6 and res["HOTA"] > 0.45


def test_a_perfect_prediction_scores_one_and_an_empty_one_zero(synthetic):
    _, gts, _ = synthetic
    perfect = evaluate(gts, gts)[COMBINED]
    assert perfect["MOTA"] == perfect["IDF1"] == perfect["MOTP"] == 1.0
    assert perfect["HOTA"] == pytest.approx(1.0)
    assert perfect["IDSW"] == perfect["FP"] == perfect["FN"] == 0
    empty = evaluate(gts, {k: np.zeros((0, 10)) for k in gts})[COMBINED]
    assert empty["MOTA"] == 0.0 and empty["FN"] == sum(len(g) for g in gts.values()) and empty["HOTA"] == 0.0


def test_swapped_ids_count_as_id_switches():
    gt = np.array([[f, i, 10 + 60 * (i - 1), 10, 30, 60, 1, 1, 1, -1] for f in range(1, 11) for i in (1, 2)], float)
    pred = gt.copy()
    pred[pred[:, 0] > 5, 1] = 3 - pred[pred[:, 0] > 5, 1]  # ids swap after frame 5
    res = evaluate(gt, pred)["seq"]
    assert res["IDSW"] == 2 and res["FP"] == res["FN"] == 0 and res["MOTA"] == pytest.approx(1 - 2 / 20)
    assert res["IDF1"] == pytest.approx(0.5)


def test_mot17_rules_drop_distractors_zero_marked_rows_and_other_classes():
    box = lambda x: [x, 10, 20, 40]
    gt = np.array(
        [
            [1, 1, *box(0), 1, 1, 1.0, -1],  # pedestrian: counts
            [1, 2, *box(50), 1, 8, 1.0, -1],  # distractor: a prediction on it is removed
            [1, 3, *box(100), 0, 1, 1.0, -1],  # zero-marked pedestrian: not counted, a prediction on it is an FP
            [1, 4, *box(150), 1, 3, 1.0, -1],  # car: not counted, not a distractor
            [1, 5, *box(200), 1, 1, 1.0, -1],  # pedestrian nobody predicted: FN
        ]
    )
    pred = np.array([[1, k, *box(x), 1, -1, -1, -1] for k, x in enumerate((0, 50, 100, 150), start=1)], float)
    mot17 = evaluate(gt, pred, "mot17")["seq"]
    assert (mot17["TP"], mot17["FP"], mot17["FN"], mot17["num_gt"]) == (1, 2, 1, 2)
    mot15 = evaluate(gt, pred, "mot15")["seq"]  # classes ignored, but the zero-marked row is dropped: its match is FP
    assert (mot15["TP"], mot15["FP"], mot15["FN"], mot15["num_gt"]) == (3, 1, 1, 4)
    mot20 = evaluate(
        np.vstack([gt, [[1, 6, *box(250), 1, 6, 1.0, -1]]]),
        np.vstack([pred, [[1, 9, *box(250), 1, -1, -1, -1]]]),
        "mot20",
    )
    mot17 = evaluate(
        np.vstack([gt, [[1, 6, *box(250), 1, 6, 1.0, -1]]]),
        np.vstack([pred, [[1, 9, *box(250), 1, -1, -1, -1]]]),
        "mot17",
    )
    assert mot20["seq"]["FP"] == 2 and mot17["seq"]["FP"] == 3  # MOT20 also drops a match on a non-MOT vehicle


def _trackeval_pipeline(root: Path, benchmark: str, lengths: dict[str, int]) -> dict:
    """TrackEval's own MOTChallenge reader and evaluator on files (gt under root/gt, results root/trk/t/data)."""
    import contextlib
    import io

    import trackeval

    dataset = trackeval.datasets.MotChallenge2DBox(
        {
            "GT_FOLDER": str(root / "gt"),
            "TRACKERS_FOLDER": str(root / "trk"),
            "BENCHMARK": benchmark,
            "SKIP_SPLIT_FOL": True,
            "SEQ_INFO": lengths,
            "TRACKERS_TO_EVAL": ["t"],
            "PRINT_CONFIG": False,
        }
    )
    quiet = {"PRINT_RESULTS": False, "PRINT_CONFIG": False, "TIME_PROGRESS": False, "OUTPUT_SUMMARY": False}
    quiet.update(OUTPUT_DETAILED=False, PLOT_CURVES=False, LOG_ON_ERROR=None)
    metrics = [trackeval.metrics.HOTA(), trackeval.metrics.CLEAR({"PRINT_CONFIG": False})]
    metrics.append(trackeval.metrics.Identity({"PRINT_CONFIG": False}))
    with contextlib.redirect_stdout(io.StringIO()):
        res, _ = trackeval.Evaluator(quiet).evaluate([dataset], metrics)
    return res["MotChallenge2DBox"]["t"]


@pytest.mark.parametrize("benchmark", ["mot17", "mot15"])
def test_evaluate_equals_trackevals_own_motchallenge_pipeline(tmp_path, benchmark):
    write_sequences(tmp_path / "gt", num_sequences=2, num_frames=30, size=(64, 96), seed=4)
    rng = np.random.default_rng(0)
    gts, preds, lengths = {}, {}, {}
    for seq in list_sequences(tmp_path / "gt"):
        gt = seq.gt.copy()
        if benchmark == "mot17":  # a distractor, a car and zero-marked rows, which the MOT17 rules treat apart
            ids = np.unique(gt[:, 1])
            gt[gt[:, 1] == ids[0], 7] = 8
            gt[gt[:, 1] == ids[1], 7] = 3
            gt[rng.random(len(gt)) < 0.1, 6] = 0
        write_mot(seq.root / "gt" / "gt.txt", gt)
        gts[seq.name], lengths[seq.name] = gt, seq.length
        preds[seq.name] = track_detections(seq.det, Tracker(cost="iou"), seq.length)
        write_mot(tmp_path / "trk" / "t" / "data" / f"{seq.name}.txt", preds[seq.name])
    ref = _trackeval_pipeline(tmp_path, benchmark.upper(), lengths)
    ours = evaluate(gts, preds, benchmark, num_frames=lengths)
    for name, ref_name in [*((n, n) for n in gts), (COMBINED, "COMBINED_SEQ")]:
        want = ref[ref_name]["pedestrian"]
        assert ours[name]["MOTA"] == pytest.approx(want["CLEAR"]["MOTA"], abs=1e-12)
        assert ours[name]["IDF1"] == pytest.approx(want["Identity"]["IDF1"], abs=1e-12)
        assert ours[name]["HOTA"] == pytest.approx(np.mean(want["HOTA"]["HOTA"]), abs=1e-12)
        assert (ours[name]["FP"], ours[name]["FN"]) == (want["CLEAR"]["CLR_FP"], want["CLEAR"]["CLR_FN"])


def _random_sequence(rng: np.random.Generator, benchmark: str, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth with zero-marked rows, every class and random visibility, and a tracker output over it.

    The prediction follows most boxes with jitter (distractors and zero-marked rows included), drops some, switches
    some identities mid-track and adds false positives, so every preprocessing rule changes the counts.
    """
    gt, pred = [], []
    fp_id = 1000
    for k in range(int(rng.integers(4, 10))):
        if benchmark == "mot15":
            cls = int(rng.choice([-1, 1, 3]))  # MOT15 has no classes: any value is read and ignored
        else:
            cls = 1 if rng.random() < 0.45 else int(rng.integers(2, 14))
        start = int(rng.integers(1, num_frames))
        stop = int(rng.integers(start, num_frames + 1))
        x, y = rng.uniform(0, 150), rng.uniform(0, 100)
        w, h = rng.uniform(8, 40), rng.uniform(16, 60)
        switch = int(rng.integers(start, stop + 1)) if rng.random() < 0.4 else None
        for frame in range(start, stop + 1):
            x, y = x + rng.normal(0, 3), y + rng.normal(0, 2)
            consider = 0 if rng.random() < 0.2 else 1
            gt.append([frame, k + 1, x, y, w, h, consider, cls, round(float(rng.random()), 3), -1])
            if rng.random() < 0.8:
                pid = 100 + k if switch is not None and frame >= switch else k + 1
                box = [x + rng.uniform(-4, 4), y + rng.uniform(-4, 4), w * rng.uniform(0.8, 1.2), h]
                pred.append([frame, pid, *box, round(float(rng.random()), 3), -1, -1, -1])
    for frame in range(1, num_frames + 1):
        for _ in range(int(rng.integers(0, 3))):
            fp_id += 1
            pred.append([frame, fp_id, *rng.uniform(0, 150, 2), *rng.uniform(10, 40, 2), 0.5, -1, -1, -1])
    return np.array(gt, float), np.array(pred, float)


def _write_trackeval_layout(root: Path, benchmark: str, gts: dict, preds: dict, lengths: dict) -> None:
    """TrackEval's default MOTChallenge layout: gt/BENCH-train/SEQ/{gt/gt.txt,seqinfo.ini}, gt/seqmaps/BENCH-train.txt,
    trackers/BENCH-train/TRACKER/data/SEQ.txt."""
    split = f"{benchmark.upper()}-train"
    for name, rows in gts.items():
        write_mot(root / "gt" / split / name / "gt" / "gt.txt", rows)
        (root / "gt" / split / name / "seqinfo.ini").write_text(f"[Sequence]\nname={name}\nseqLength={lengths[name]}\n")
        write_mot(root / "trackers" / split / "t" / "data" / f"{name}.txt", preds[name])
    (root / "gt" / "seqmaps").mkdir(parents=True)
    (root / "gt" / "seqmaps" / f"{split}.txt").write_text("name\n" + "".join(f"{n}\n" for n in gts))


def _trackeval_default_layout(root: Path, benchmark: str) -> dict:
    """TrackEval's MotChallenge2DBox + Evaluator on the default layout, with its default (preprocessing) config."""
    import contextlib
    import io

    import trackeval

    dataset = trackeval.datasets.MotChallenge2DBox(
        {"GT_FOLDER": str(root / "gt"), "TRACKERS_FOLDER": str(root / "trackers"), "BENCHMARK": benchmark.upper()}
        | {"SPLIT_TO_EVAL": "train", "PRINT_CONFIG": False}
    )
    quiet = {"PRINT_RESULTS": False, "PRINT_CONFIG": False, "TIME_PROGRESS": False, "OUTPUT_SUMMARY": False}
    quiet.update(OUTPUT_DETAILED=False, PLOT_CURVES=False, LOG_ON_ERROR=None)
    metrics = [trackeval.metrics.HOTA(), trackeval.metrics.CLEAR({"PRINT_CONFIG": False})]
    metrics.append(trackeval.metrics.Identity({"PRINT_CONFIG": False}))
    with contextlib.redirect_stdout(io.StringIO()):
        res, messages = trackeval.Evaluator(quiet).evaluate([dataset], metrics)
    assert messages["MotChallenge2DBox"]["t"] == "Success"
    return res["MotChallenge2DBox"]["t"]


@pytest.mark.parametrize("benchmark", ["mot15", "mot16", "mot17", "mot20"])
def test_track_evaluate_equals_trackeval_with_zero_marked_rows_and_distractors(tmp_path, benchmark):
    rng = np.random.default_rng({"mot15": 0, "mot16": 1, "mot17": 2, "mot20": 3}[benchmark])
    gts, preds, lengths = {}, {}, {}
    for i in range(3):
        name = f"SEQ-{i:02d}"
        lengths[name] = int(rng.integers(15, 30))
        gts[name], preds[name] = _random_sequence(rng, benchmark, lengths[name])
    if benchmark != "mot15":  # a class TrackEval does not know, in a frame without predictions: accepted, ignored
        last = max(lengths.values()) + 5
        lengths["SEQ-00"] = last
        gts["SEQ-00"] = np.vstack([gts["SEQ-00"], [[last, 99, 1, 1, 10, 10, 1, 14, 1.0, -1]]])
    _write_trackeval_layout(tmp_path, benchmark, gts, preds, lengths)
    ref = _trackeval_default_layout(tmp_path, benchmark)
    json_out = tmp_path / f"{benchmark}.json"
    split = f"{benchmark.upper()}-train"
    gt_dir, pred_dir = tmp_path / "gt" / split, tmp_path / "trackers" / split / "t" / "data"
    cli = ["track", "evaluate", "--gt", str(gt_dir), "--pred", str(pred_dir), "--benchmark", benchmark]
    status = main([*cli, "--out", str(json_out)])
    assert status == 0
    ours = json.loads(json_out.read_text())
    zero_marked = sum(int((g[:, 6] == 0).sum()) for g in gts.values())
    assert zero_marked > 20  # the rule this test is about has rows to act on
    for name, ref_name in [*((n, n) for n in gts), (COMBINED, "COMBINED_SEQ")]:
        want = ref[ref_name]["pedestrian"]
        assert ours[name]["MOTA"] == pytest.approx(want["CLEAR"]["MOTA"], abs=1e-9), name
        assert ours[name]["IDF1"] == pytest.approx(want["Identity"]["IDF1"], abs=1e-9), name
        assert ours[name]["HOTA"] == pytest.approx(np.mean(want["HOTA"]["HOTA"]), abs=1e-9), name
        assert (ours[name]["FP"], ours[name]["FN"]) == (want["CLEAR"]["CLR_FP"], want["CLEAR"]["CLR_FN"]), name


def test_bad_metric_inputs_are_data_errors():
    gt = np.array([[1, 1, 0, 0, 10, 10, 1, 1, 1, -1], [1, 1, 20, 0, 10, 10, 1, 1, 1, -1]], float)
    with pytest.raises(DataError, match="id 1 appears twice in frame 1"):
        evaluate(gt, gt[:1])
    no_class = np.array([[1, 1, 0, 0, 10, 10]], float)
    with pytest.raises(DataError, match=r"classes \[-1\] at frame 1, outside mot17's 1..13.*mot15"):
        evaluate(no_class, no_class, "mot17")
    with pytest.raises(DataError, match=r"column 8 \(class\) must be -1 or 1"):
        evaluate(gt[:1], np.array([[1, 1, 0, 0, 10, 10, 1, 2]], float), "mot15")
    assert evaluate(no_class, no_class, "mot15")["seq"]["MOTA"] == 1.0
    with pytest.raises(DataError, match="no prediction for sequence"):
        evaluate({"a": gt[:1], "b": gt[:1]}, {"a": gt[:1]})
    with pytest.raises(DataError, match="unknown benchmark"):
        evaluate(gt[:1], gt[:1], "mot99")
    with pytest.raises(DataError, match="frame 2 but the sequence has 1 frames"):
        evaluate(gt[:1], np.array([[2, 1, 0, 0, 10, 10]], float), num_frames=1)


# --- association -------------------------------------------------------------------------------------------------


def test_numpy_overlaps_match_torchvision():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.uniform(0, 50, (7, 2)), np.zeros((7, 2))], 1)
    a[:, 2:] = a[:, :2] + rng.uniform(1, 30, (7, 2))
    b = np.concatenate([rng.uniform(0, 50, (5, 2)), np.zeros((5, 2))], 1)
    b[:, 2:] = b[:, :2] + rng.uniform(1, 30, (5, 2))
    np.testing.assert_allclose(box_iou(a, b), box_iou(torch.tensor(a), torch.tensor(b)).numpy(), atol=1e-12)
    np.testing.assert_allclose(giou(a, b), giou(torch.tensor(a), torch.tensor(b)).numpy(), atol=1e-12)
    assert box_iou([[0, 0, 2, 2]], [[1, 0, 3, 2]])[0, 0] == pytest.approx(1 / 3)
    assert giou([[0, 0, 1, 1]], [[2, 0, 3, 1]])[0, 0] == pytest.approx(0 - 1 / 3)  # hull 3, union 2


def test_hungarian_with_a_cost_limit_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(60):
        n, m = (int(v) for v in rng.integers(1, 5, 2))
        cost = rng.uniform(0, 2, (n, m))
        rows, cols = match(cost, 1.0)
        assert (cost[rows, cols] <= 1.0).all() and len(set(rows)) == len(rows) and len(set(cols)) == len(cols)
        # brute force over every partial one-to-one assignment: the largest total margin 1 - cost
        best = 0.0
        for perm in itertools.permutations([*range(m), *[None] * n], n):
            pairs = [(r, c) for r, c in enumerate(perm) if c is not None]
            best = max(best, sum(1.0 - cost[r, c] for r, c in pairs if cost[r, c] <= 1.0))
        assert (1.0 - cost[rows, cols]).sum() == pytest.approx(best)
    # a cheap pair is kept rather than traded for two worse ones
    rows, cols = match(np.array([[0.1, 0.9], [0.9, 2.0]]), 1.0)
    assert list(zip(rows, cols)) == [(0, 0)]


def _boxes(*xs, y=10.0, w=20.0, h=40.0):
    return np.array([[x, y, x + w, y + h] for x in xs], float)


def test_iou_tracker_keeps_ids_starts_new_tracks_and_forgets_after_max_age():
    tracker = Tracker(score_thresh=0.4, cost="iou", max_age=2)
    out = tracker.update(1, _boxes(0, 100), [0.9, 0.8])
    assert [i for i, _, _ in out] == [1, 2]
    out = tracker.update(2, _boxes(103, 3, 200), [0.9, 0.9, 0.7])  # order shuffled, a new object at 200
    assert {i: b[0] for i, b, _ in out} == {1: 3, 2: 103, 3: 200}
    assert tracker.det_index == {1: 1, 2: 0, 3: 2}
    out = tracker.update(3, _boxes(6, 300), [0.95, 0.3])  # track 2 and 3 unmatched; 300 below the threshold
    assert [i for i, _, _ in out] == [1] and tracker.det_index == {1: 0}
    assert tracker.live_ids() == [1, 2, 3]
    out = tracker.update(4, _boxes(9, 106), [0.9, 0.9])  # two frames after its last match track 2 still matches
    assert [i for i, _, _ in out] == [1, 2] and out[1][2] == pytest.approx(0.9)
    out = tracker.update(7, _boxes(9, 106), [0.9, 0.9])  # three frames later: every track is gone, new ids
    assert [i for i, _, _ in out] == [4, 5]
    with pytest.raises(ValueError, match="frames must increase"):
        tracker.update(7, _boxes(0), [1.0])


def test_predicted_track_boxes_follow_objects_that_jump():
    # two objects swap places between frames: frame-to-frame IoU cannot follow them, the predicted boxes can
    first, second = _boxes(0, 100), _boxes(100, 0)
    baseline = Tracker(cost="iou")
    baseline.update(1, first, [0.9, 0.9])
    # each track takes the detection where it was: the ids stay in place while the objects swapped
    assert {i: b[0] for i, b, _ in baseline.update(2, second, [0.9, 0.9])} == {1: 0, 2: 100}
    transtrack = Tracker(cost="giou")
    transtrack.update(1, first, [0.9, 0.9])
    predicted = {1: _boxes(98)[0], 2: _boxes(2)[0]}  # the track decoder's boxes in frame 2
    out = transtrack.update(2, second, [0.9, 0.9], track_boxes=predicted)
    assert {i: b[0] for i, b, _ in out} == {1: 100, 2: 0}
    # a far prediction is rejected (cost above match_thresh) and the detection starts a new track
    out = transtrack.update(3, _boxes(100), [0.9], track_boxes={1: _boxes(400)[0], 2: _boxes(0)[0]})
    assert [i for i, _, _ in out] == [3]
    with pytest.raises(ValueError, match="never issued"):
        transtrack.update(4, _boxes(0), [0.9], track_boxes={99: _boxes(0)[0]})
    # a prediction for a track that has just aged out is ignored: the detection starts a new track
    short = Tracker(max_age=1)
    short.update(1, _boxes(0), [0.9])
    out = short.update(3, _boxes(0), [0.9], track_boxes={1: _boxes(0)[0]})
    assert [i for i, _, _ in out] == [2] and short.live_ids() == [2]


def test_results_rows_are_mot_rows():
    rows = results_to_rows(7, [(3, np.array([10.0, 20.0, 40.0, 80.0]), 0.5)])
    np.testing.assert_array_equal(rows, [[7, 3, 10, 20, 30, 60, 0.5, -1, -1, -1]])


# --- command line ------------------------------------------------------------------------------------------------


def test_track_evaluate_prints_a_table_and_writes_json(synthetic, tmp_path, capsys):
    root, gts, preds = synthetic
    out = tmp_path / "m.json"
    assert main(["track", "evaluate", "--gt", str(root / "gt"), "--pred", str(root / "pred"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "SYN-01" in printed and "SYN-02" in printed and COMBINED in printed
    data = json.loads(out.read_text())
    assert set(data) == {"SYN-01", "SYN-02", COMBINED}
    for res in data.values():
        assert {"MOTA", "IDF1", "HOTA", "MOTP", "IDSW", "FP", "FN"} <= set(res)
    assert data[COMBINED]["MOTA"] == pytest.approx(evaluate(gts, preds)[COMBINED]["MOTA"])
    old = tmp_path / "old.json"
    with pytest.warns(FutureWarning, match=r"--json is deprecated.*use --out"):  # the old spelling, one release
        assert (
            main(["track", "evaluate", "--gt", str(root / "gt"), "--pred", str(root / "pred"), "--json", str(old)]) == 0
        )
    assert json.loads(old.read_text()) == data
    # one sequence folder against one results file, MOT17 rules
    args = ["--gt", str(root / "gt" / "SYN-01"), "--pred", str(root / "pred" / "SYN-01.txt"), "--benchmark", "mot17"]
    assert main(["track", "evaluate", *args]) == 0
    assert "SYN-01" in capsys.readouterr().out


def test_track_associate_writes_the_iou_baseline_results(synthetic, tmp_path, capsys):
    root, gts, preds = synthetic
    assert main(["track", "associate", "--seq", str(root / "gt"), "--out", str(tmp_path / "p"), "--cost", "iou"]) == 0
    for name in gts:
        np.testing.assert_array_equal(read_mot(tmp_path / "p" / f"{name}.txt"), preds[name])
    capsys.readouterr()
    assert main(["track", "associate", "--seq", str(root / "gt"), "--out", str(tmp_path / "q"), "--max-age", "-1"]) == 2
    assert "max_age must be >= 0" in capsys.readouterr().err


def test_track_evaluate_errors_are_one_line_with_status_2(synthetic, tmp_path, capsys):
    root, _, _ = synthetic
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "SYN-01.txt").write_text("1,1,1,1,1,1\n")
    (tmp_path / "bad.txt").write_text("1,1,x,1,1,1\n")
    cases = [
        (["--gt", str(tmp_path / "nope"), "--pred", str(root / "pred")], "does not exist"),
        (["--gt", str(root / "gt"), "--pred", str(tmp_path / "pred")], "SYN-02"),
        (["--gt", str(root / "gt"), "--pred", str(tmp_path / "bad.txt")], "one results file"),
        (["--gt", str(tmp_path / "bad.txt"), "--pred", str(tmp_path / "bad.txt")], "bad.txt:1"),
    ]
    for args, needle in cases:
        assert main(["track", "evaluate", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("vitssl track: error:") and needle in err and "\n" not in err and "Traceback" not in err
