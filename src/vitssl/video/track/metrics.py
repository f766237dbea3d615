"""MOTChallenge metrics through TrackEval (the MOTChallenge's own evaluation code): CLEAR-MOT, identity, HOTA.

:func:`evaluate` takes MOT arrays (:func:`vitssl.video.track.mot.read_mot`), prepares each sequence the way
TrackEval's MOTChallenge reader does, and runs TrackEval's ``HOTA``, ``CLEAR`` and ``Identity`` metrics on it,
combining sequences with TrackEval's own ``combine_sequences``. Nothing is re-implemented but the reading.
:func:`evaluate_files` does the same from files: ground truth as a MOT file, a MOTChallenge sequence folder
or a folder of them, results as a MOT file or a folder of ``SEQ.txt``.

Benchmarks (the rules that decide which rows count), TrackEval's ``MotChallenge2DBox`` with its preprocessing:

- ``mot15``: ground-truth rows whose "consider" flag (column 7, read as an integer) is 0 are dropped, whatever
  their class (MOT15 has none); every prediction counts.
- ``mot16`` / ``mot17``: per frame, predictions that match (IoU >= 0.5, Hungarian over all ground-truth boxes) a
  box of a distractor class (2 person on vehicle, 7 static person, 8 distractor, 12 reflection) are removed;
  then only ground-truth rows of class 1 (pedestrian) with a non-zero "consider" flag count. The visibility
  (column 9) decides nothing, as in TrackEval.
- ``mot20``: as ``mot17``, with class 6 (non-MOT vehicle) a distractor too.

As in TrackEval, every benchmark refuses a predicted class (column 8) above 1, and ``mot16/17/20`` refuse a
ground-truth class outside 1..13 in a frame that has both ground truth and predictions (the frames where the
distractor matching runs); elsewhere such a row is simply not a pedestrian.

Similarity is box IoU, matches need IoU >= 0.5. ``MOTP`` is the mean IoU of the CLEAR matches (TrackEval's
definition; motmetrics reports 1 - that), ``HOTA``, ``DetA``, ``AssA`` and ``LocA`` are means over TrackEval's
19 localisation thresholds.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.optimize import linear_sum_assignment

from vitssl.errors import DataError, MissingFileError
from vitssl.io import PathLike

Benchmark = Literal["mot15", "mot16", "mot17", "mot20"]
BENCHMARKS: tuple[str, ...] = ("mot15", "mot16", "mot17", "mot20")
COMBINED = "COMBINED"
PEDESTRIAN = 1
# TrackEval's MOTChallenge class ids: 1 pedestrian, 2 person on vehicle, 3 car, 4 bicycle, 5 motorbike,
# 6 non-MOT vehicle, 7 static person, 8 distractor, 9 occluder, 10 occluder on ground, 11 occluder full,
# 12 reflection, 13 crowd.
_VALID_CLASSES = np.arange(1, 14)
_DISTRACTORS = np.array([2, 7, 8, 12])
_DISTRACTORS_MOT20 = np.array([2, 6, 7, 8, 12])  # MOT20 adds the non-MOT vehicle
_EPS = np.finfo("float").eps

# The metrics that are fractions (printed in percent); the others are counts.
FRACTIONS = ("MOTA", "IDF1", "HOTA", "MOTP", "DetA", "AssA", "LocA", "IDP", "IDR", "Recall", "Precision")


def box_iou_xywh(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU of ``(G, 4)`` and ``(P, 4)`` left, top, width, height boxes as ``(G, P)`` (TrackEval's own function)."""
    from trackeval.datasets._base_dataset import _BaseDataset

    return _BaseDataset._calculate_box_ious(np.asarray(gt, float), np.asarray(pred, float), box_format="xywh")


def _frames(rows: np.ndarray, num_frames: int) -> list[np.ndarray]:
    """Rows grouped by frame: element ``t`` holds frame ``t + 1``'s rows."""
    order = np.argsort(rows[:, 0], kind="stable")
    rows = rows[order]
    bounds = np.searchsorted(rows[:, 0], np.arange(1, num_frames + 2))
    return [rows[bounds[t] : bounds[t + 1]] for t in range(num_frames)]


def _check_rows(rows: np.ndarray, what: str) -> np.ndarray:
    from vitssl.video.track.mot import as_mot_rows

    try:
        rows = as_mot_rows(rows)  # (N, 10)
    except ValueError as err:
        raise DataError(f"{what}: {err}") from None
    if (rows[:, 0] < 1).any():
        raise DataError(f"{what}: frames are 1-based, found frame {int(rows[:, 0].min())}")
    return rows


def _duplicate_id(frames: list[np.ndarray]) -> tuple[int, int] | None:
    for t, rows in enumerate(frames):
        ids, counts = np.unique(rows[:, 1].astype(np.int64), return_counts=True)
        if (counts > 1).any():
            return t + 1, int(ids[counts > 1][0])
    return None


def _relabel(per_frame: list[np.ndarray]) -> tuple[list[np.ndarray], int]:
    """Ids mapped to 0..n-1 (TrackEval's metrics index arrays with them)."""
    unique = np.unique(np.concatenate(per_frame)) if per_frame else np.zeros(0, np.int64)
    return [np.searchsorted(unique, ids).astype(int) for ids in per_frame], len(unique)


def prepare_sequence(
    gt: np.ndarray, pred: np.ndarray, benchmark: Benchmark = "mot15", *, num_frames: int | None = None, name: str = ""
) -> dict[str, Any]:
    """The data dict TrackEval's metrics take for one sequence, built as its MOTChallenge reader builds it.

    Args:
        gt: ground-truth MOT rows ``(G, 6..10)``.
        pred: tracker MOT rows ``(P, 6..10)``.
        benchmark: "mot15", "mot16", "mot17" or "mot20" (see the module doc).
        num_frames: the sequence's length; default the last frame either file mentions.
        name: the sequence's name, for error messages.

    Raises:
        DataError: a frame with one id twice, a prediction past ``num_frames``, a predicted class other than
            pedestrian, or (mot16/17/20) a ground-truth class outside TrackEval's 1..13 in a frame with predictions.
    """
    if benchmark not in BENCHMARKS:
        raise DataError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    label = name or "sequence"
    gt = _check_rows(gt, f"{label} ground truth")
    pred = _check_rows(pred, f"{label} prediction")
    last = int(max(gt[:, 0].max(initial=0), pred[:, 0].max(initial=0)))
    if num_frames is None:
        num_frames = last
    elif last > num_frames:
        raise DataError(f"{label}: boxes at frame {last} but the sequence has {num_frames} frames")
    gt_frames, pred_frames = _frames(gt, num_frames), _frames(pred, num_frames)
    for frames, what in ((gt_frames, "ground truth"), (pred_frames, "prediction")):
        dup = _duplicate_id(frames)
        if dup is not None:
            hint = " (detections without ids, as in det.txt, need a tracker first)" if dup[1] == -1 else ""
            raise DataError(
                f"{label} {what}: id {dup[1]} appears twice in frame {dup[0]}; ids must be unique per frame{hint}"
            )
    if (pred[:, 7] > 1).any():
        raise DataError(
            f"{label} prediction: column 8 (class) must be -1 or 1 (pedestrian), found {int(pred[:, 7].max())} "
            "(TrackEval evaluates pedestrians only)"
        )
    preprocess = benchmark != "mot15"  # TrackEval never preprocesses MOT15
    distractors = _DISTRACTORS_MOT20 if benchmark == "mot20" else _DISTRACTORS

    gt_ids, pred_ids, similarity, confidences = [], [], [], []
    num_gt_dets = num_pred_dets = 0
    for t, (g, p) in enumerate(zip(gt_frames, pred_frames)):
        scores = box_iou_xywh(g[:, 2:6], p[:, 2:6]) if len(g) and len(p) else np.zeros((len(g), len(p)))  # (G, P)
        classes = g[:, 7].astype(np.int64)
        if preprocess and len(g) and len(p):
            invalid = np.setdiff1d(np.unique(classes), _VALID_CLASSES)
            if invalid.size:
                raise DataError(
                    f"{label} ground truth has classes {invalid.tolist()} at frame {t + 1}, outside {benchmark}'s "
                    "1..13 (a file without the class column reads as -1); evaluate it with benchmark mot15"
                )
            matching = scores.copy()
            matching[matching < 0.5 - _EPS] = 0
            rows, cols = linear_sum_assignment(-matching)
            matched = matching[rows, cols] > _EPS
            rows, cols = rows[matched], cols[matched]
            remove = cols[np.isin(classes[rows], distractors)]
            p = np.delete(p, remove, axis=0)
            scores = np.delete(scores, remove, axis=1)
        keep = g[:, 6].astype(np.int64) != 0  # the "consider" flag, for every benchmark
        if preprocess:
            keep &= classes == PEDESTRIAN
        g, scores = g[keep], scores[keep]
        gt_ids.append(g[:, 1].astype(np.int64))
        pred_ids.append(p[:, 1].astype(np.int64))
        confidences.append(p[:, 6])
        similarity.append(scores)
        num_gt_dets += len(g)
        num_pred_dets += len(p)
    gt_ids, num_gt_ids = _relabel(gt_ids)
    pred_ids, num_pred_ids = _relabel(pred_ids)
    return {
        "num_timesteps": num_frames,
        "num_gt_ids": num_gt_ids,
        "num_tracker_ids": num_pred_ids,
        "num_gt_dets": num_gt_dets,
        "num_tracker_dets": num_pred_dets,
        "gt_ids": gt_ids,
        "tracker_ids": pred_ids,
        "tracker_confidences": confidences,
        "similarity_scores": similarity,
        "seq": name,
    }


def _metrics() -> tuple[Any, Any, Any]:
    from trackeval.metrics import CLEAR, HOTA, Identity

    config = {"THRESHOLD": 0.5, "PRINT_CONFIG": False}
    return HOTA(), CLEAR(config), Identity(config)


def _summary(hota: dict, clear: dict, identity: dict, gt_ids: int, pred_ids: int) -> dict[str, float | int]:
    """TrackEval's result fields under the names the MOTChallenge tables use."""
    return {
        "MOTA": float(clear["MOTA"]),
        "IDF1": float(identity["IDF1"]),
        "HOTA": float(np.mean(hota["HOTA"])),
        "MOTP": float(clear["MOTP"]),
        "DetA": float(np.mean(hota["DetA"])),
        "AssA": float(np.mean(hota["AssA"])),
        "LocA": float(np.mean(hota["LocA"])),
        "IDP": float(identity["IDP"]),
        "IDR": float(identity["IDR"]),
        "Recall": float(clear["CLR_Re"]),
        "Precision": float(clear["CLR_Pr"]),
        "IDSW": int(clear["IDSW"]),
        "FP": int(clear["CLR_FP"]),
        "FN": int(clear["CLR_FN"]),
        "Frag": int(clear["Frag"]),
        "MT": int(clear["MT"]),
        "PT": int(clear["PT"]),
        "ML": int(clear["ML"]),
        "TP": int(clear["CLR_TP"]),
        "num_gt": int(clear["CLR_TP"] + clear["CLR_FN"]),
        "num_pred": int(clear["CLR_TP"] + clear["CLR_FP"]),
        "gt_ids": gt_ids,
        "pred_ids": pred_ids,
    }


def evaluate(
    gt: np.ndarray | Mapping[str, np.ndarray],
    pred: np.ndarray | Mapping[str, np.ndarray],
    benchmark: Benchmark = "mot15",
    *,
    num_frames: Mapping[str, int] | int | None = None,
) -> dict[str, dict[str, float | int]]:
    """MOTA, MOTP, IDF1, IDP, IDR, HOTA, DetA, AssA, IDSW, FP, FN, Frag, ... per sequence and ``COMBINED``.

    Args:
        gt: one sequence's ground-truth MOT rows, or a mapping sequence name -> rows.
        pred: the tracker's rows, the same kind as ``gt`` (a mapping must have exactly ``gt``'s names).
        benchmark: "mot15", "mot16", "mot17" or "mot20": TrackEval's rules for it (see the module doc).
        num_frames: each sequence's length (a mapping, or one int for a single sequence); default the last
            frame mentioned in either file.

    Returns:
        ``{name: {metric: value}}`` with one entry per sequence (``"seq"`` for a single array) and
        ``"COMBINED"`` (sequences combined as TrackEval does: counts summed, not per-sequence averages).
        Fractions are in [0, 1] (MOTA can be negative); counts are ints.

    Raises:
        DataError: mismatched sequence names, or bad rows (see :func:`prepare_sequence`).
    """
    if benchmark not in BENCHMARKS:
        raise DataError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    if isinstance(gt, Mapping) != isinstance(pred, Mapping):
        raise DataError("gt and pred must both be arrays (one sequence) or both mappings name -> rows")
    if not isinstance(gt, Mapping):
        gt, pred = {"seq": gt}, {"seq": pred}
        if num_frames is not None and not isinstance(num_frames, Mapping):
            num_frames = {"seq": int(num_frames)}
    missing = sorted(set(gt) - set(pred))
    extra = sorted(set(pred) - set(gt))
    if missing:
        raise DataError(f"no prediction for sequence(s) {', '.join(missing)}; write one results file per sequence")
    if extra:
        raise DataError(f"prediction for sequence(s) {', '.join(extra)} that the ground truth does not have")
    if not gt:
        raise DataError("no sequences to evaluate")
    if COMBINED in gt:
        raise DataError(f"a sequence may not be named {COMBINED}")
    lengths = dict(num_frames) if isinstance(num_frames, Mapping) else {}
    hota, clear, identity = _metrics()
    per_metric: dict[str, dict[str, dict]] = {"hota": {}, "clear": {}, "identity": {}}
    results: dict[str, dict[str, float | int]] = {}
    for name in sorted(gt):
        data = prepare_sequence(gt[name], pred[name], benchmark, num_frames=lengths.get(name), name=name)
        res = {
            "hota": hota.eval_sequence(data),
            "clear": clear.eval_sequence(data),
            "identity": identity.eval_sequence(data),
        }
        for key, value in res.items():
            per_metric[key][name] = value
        results[name] = _summary(
            res["hota"], res["clear"], res["identity"], int(data["num_gt_ids"]), int(data["num_tracker_ids"])
        )
    results[COMBINED] = _summary(
        hota.combine_sequences(per_metric["hota"]),
        clear.combine_sequences(per_metric["clear"]),
        identity.combine_sequences(per_metric["identity"]),
        sum(int(r["gt_ids"]) for r in results.values()),
        sum(int(r["pred_ids"]) for r in results.values()),
    )
    return results


def format_table(results: Mapping[str, Mapping[str, float | int]], columns: tuple[str, ...] | None = None) -> str:
    """A fixed-width text table of :func:`evaluate`'s results: fractions in percent, counts as integers."""
    columns = columns or ("MOTA", "IDF1", "HOTA", "MOTP", "DetA", "AssA", "IDP", "IDR", "IDSW", "FP", "FN", "Frag")
    width = max(12, *(len(name) + 2 for name in results))
    lines = [f"{'sequence':<{width}}" + "".join(f"{c:>8}" for c in columns)]
    for name, res in results.items():
        cells = []
        for c in columns:
            value = res[c]
            cells.append(f"{100 * value:>8.1f}" if c in FRACTIONS else f"{int(value):>8d}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)


def _gt_sequence(folder: Path) -> tuple[str, Path, int | None]:
    """(name, gt file, length or None) of a MOTChallenge sequence folder, from its seqinfo.ini if present."""
    import configparser

    name, length = folder.name, None
    ini = folder / "seqinfo.ini"
    if ini.is_file():
        parser = configparser.ConfigParser()
        try:
            parser.read(ini, encoding="utf-8")
            name = parser.get("Sequence", "name", fallback=name) or name
            length = parser.getint("Sequence", "seqLength", fallback=None)
        except (configparser.Error, ValueError, UnicodeDecodeError) as err:
            raise DataError(f"{ini} is not a valid seqinfo.ini ({' '.join(str(err).split())})") from None
    return name, folder / "gt" / "gt.txt", length


def read_ground_truth(path: PathLike) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Ground truth from a MOT file, one sequence folder (``SEQ/gt/gt.txt``) or a folder of them.

    A single file is named after its sequence folder when it sits in ``SEQ/gt/gt.txt``, else after its stem.

    Returns:
        ``({name: rows}, {name: length})``; lengths come from seqinfo.ini files and are absent without one.

    Raises:
        MissingFileError: ``path`` does not exist, or a sequence folder has no ``gt/gt.txt``.
        DataError: a folder holding no sequence, or a malformed file.
    """
    from vitssl.video.track.mot import read_mot

    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"ground truth {path} does not exist (a MOT txt file or a MOTChallenge folder)")
    if path.is_file():
        name = path.parent.parent.name if path.parent.name == "gt" and path.name == "gt.txt" else path.stem
        return {name: read_mot(path)}, {}
    if (path / "gt" / "gt.txt").is_file() or (path / "seqinfo.ini").is_file():
        folders = [path]
    else:
        folders = sorted(p for p in path.iterdir() if p.is_dir() and (p / "gt").is_dir())
        if not folders:
            raise DataError(f"{path} holds no sequences with ground truth (expected SEQ/gt/gt.txt)")
    gt, lengths = {}, {}
    for folder in folders:
        name, file, length = _gt_sequence(folder)
        if not file.is_file():
            raise MissingFileError(f"sequence {folder} has no ground truth {file}")
        if name in gt:
            raise DataError(f"two sequences under {path} are named {name} (seqinfo.ini name=); rename one")
        gt[name] = read_mot(file)
        if length is not None:
            lengths[name] = length
    return gt, lengths


def read_predictions(path: PathLike, names: list[str]) -> dict[str, np.ndarray]:
    """Tracker results for the sequences ``names``: one MOT file (for one sequence) or a folder of ``SEQ.txt``.

    Raises:
        MissingFileError: ``path`` does not exist, or the folder has no ``SEQ.txt`` for a sequence.
        DataError: one file for several sequences, or a malformed file.
    """
    from vitssl.video.track.mot import read_mot

    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"predictions {path} do not exist (a MOT txt file or a folder of SEQ.txt files)")
    if path.is_file():
        if len(names) != 1:
            raise DataError(
                f"{path} is one results file but the ground truth has {len(names)} sequences; pass a folder with "
                f"one SEQ.txt per sequence ({', '.join(names[:3])}, ...)"
            )
        return {names[0]: read_mot(path)}
    missing = [name for name in names if not (path / f"{name}.txt").is_file()]
    if missing:
        raise MissingFileError(
            f"{path} has no results for sequence(s) {', '.join(missing)} (expected {missing[0]}.txt)"
        )
    return {name: read_mot(path / f"{name}.txt") for name in names}


def evaluate_files(
    gt: PathLike, pred: PathLike, benchmark: Benchmark = "mot15", out: PathLike | None = None
) -> dict[str, dict[str, float | int]]:
    """:func:`evaluate` on files: ground truth as :func:`read_ground_truth`, results as :func:`read_predictions`.

    Args:
        gt: a MOT txt file, a MOTChallenge sequence folder or a folder of them.
        pred: a MOT txt file (one sequence) or a folder with one ``SEQ.txt`` per sequence.
        benchmark: TrackEval's rules (see :data:`BENCHMARKS`).
        out: also write the metrics per sequence and ``COMBINED`` as JSON here.
    """
    gt_rows, lengths = read_ground_truth(gt)
    pred_rows = read_predictions(pred, sorted(gt_rows))
    results = evaluate(gt_rows, pred_rows, benchmark, num_frames=lengths)
    if out is not None:
        from vitssl.io import write_json

        write_json(results, Path(out))
    return results
