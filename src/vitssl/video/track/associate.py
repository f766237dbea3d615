"""Box overlaps and the tracker that links per-frame detections into tracks by Hungarian matching.

One :class:`Tracker`, two modes, chosen per call of :meth:`Tracker.update`:

- TransTrack: the model's track decoder predicts, for each live track, where that object is in the current
  frame; those predicted boxes (``track_boxes``) are matched to the current frame's detections.
- IoU baseline: no ``track_boxes``; each live track's last box stands for where it is now (frame-to-frame
  association, as a detector without a track decoder does).

Either way the matching is the same: detections scoring at least ``score_thresh``, a cost of ``1 - IoU`` or
``1 - GIoU`` between every live track and every detection, Hungarian assignment
(``scipy.optimize.linear_sum_assignment``) of the pairs whose cost is at most ``match_thresh`` (see
:func:`match`); a matched
track takes the detection's box; an unmatched detection starts a new track; an unmatched track waits up to
``max_age`` frames for a match before it is dropped. TransTrack's defaults: score 0.4, GIoU, pairs above cost
1.2 rejected, tracks kept 32 frames.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np
from scipy.optimize import linear_sum_assignment

from vitssl.config import ConfigError

Cost = Literal["iou", "giou"]
# Largest accepted cost per cost kind when match_thresh is None: GIoU >= -0.2 (TransTrack), IoU >= 0.3 (SORT).
DEFAULT_MATCH_THRESH = {"giou": 1.2, "iou": 0.7}


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _pairwise(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Intersection, union and the two boxes' areas of every pair of ``(N, 4)`` and ``(M, 4)`` xyxy boxes."""
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)  # (N,)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # (M,)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])  # (N, M, 2)
    wh = np.clip(rb - lt, 0, None)  # (N, M, 2)
    inter = wh[..., 0] * wh[..., 1]  # (N, M)
    union = area_a[:, None] + area_b[None, :] - inter  # (N, M)
    return inter, union, area_a, area_b


def _numpy(x: Any) -> np.ndarray:
    """A float64 numpy copy of an array, list or (any-device) tensor."""
    return np.asarray(x.detach().cpu() if _is_torch(x) else x, dtype=np.float64)


def _as_boxes(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(-1, 4)


def box_iou(a: Any, b: Any) -> Any:
    """IoU of every pair of ``(N, 4)`` and ``(M, 4)`` xyxy boxes, ``(N, M)``; torch tensors go to torchvision.

    Args:
        a: boxes left, top, right, bottom (numpy array, list, or torch tensor).
        b: boxes in the same format and of the same kind as ``a``.
    """
    if _is_torch(a) or _is_torch(b):
        from torchvision.ops import box_iou as tv_box_iou

        return tv_box_iou(a, b)
    a, b = _as_boxes(a), _as_boxes(b)
    inter, union, _, _ = _pairwise(a, b)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)  # (N, M)


def giou(a: Any, b: Any) -> Any:
    """Generalised IoU of every pair of ``(N, 4)`` and ``(M, 4)`` xyxy boxes, ``(N, M)``, in [-1, 1].

    GIoU = IoU - (hull - union) / hull, with hull the smallest box enclosing both; torch tensors go to
    ``torchvision.ops.generalized_box_iou``.
    """
    if _is_torch(a) or _is_torch(b):
        from torchvision.ops import generalized_box_iou

        return generalized_box_iou(a, b)
    a, b = _as_boxes(a), _as_boxes(b)
    inter, union, _, _ = _pairwise(a, b)
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)  # (N, M)
    lt = np.minimum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = np.maximum(a[:, None, 2:], b[None, :, 2:])  # (N, M, 2)
    wh = np.clip(rb - lt, 0, None)  # (N, M, 2)
    hull = wh[..., 0] * wh[..., 1]  # (N, M)
    return iou - np.divide(hull - union, hull, out=np.zeros_like(hull), where=hull > 0)  # (N, M)


def match(cost: np.ndarray, max_cost: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one pairs (rows, cols) of ``cost`` that maximise the total margin ``max_cost - cost`` of the pairs.

    Leaving a track and a detection unmatched costs ``max_cost`` together (lapjv's ``cost_limit``, as SORT-style
    trackers use it), so a pair is taken only where it costs no more than that, and a cheap pair is never given
    up to make room for more, worse ones. Returns two int arrays of equal length, sorted by row.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    margin = np.clip(max_cost - np.nan_to_num(cost, nan=np.inf), 0.0, None)  # (T, D), 0 for unacceptable pairs
    rows, cols = linear_sum_assignment(margin, maximize=True)
    keep = cost[rows, cols] <= max_cost
    return rows[keep].astype(np.int64), cols[keep].astype(np.int64)


@dataclasses.dataclass
class Track:
    """A live track: its id, last matched box (xyxy), that box's score and the frame it was last matched in."""

    id: int
    box: np.ndarray
    score: float
    last_frame: int
    start_frame: int
    hits: int = 1


class Tracker:
    """Links detections into tracks frame by frame; see the module doc for the two modes.

    Args:
        score_thresh: detections scoring below this are ignored.
        match_thresh: the largest accepted cost (``1 - IoU`` or ``1 - GIoU``); None: 1.2 for GIoU (TransTrack),
            0.7 for IoU.
        cost: "giou" or "iou".
        max_age: frames an unmatched track waits for a match before it is dropped.
    """

    def __init__(
        self, score_thresh: float = 0.4, match_thresh: float | None = None, cost: Cost = "giou", max_age: int = 32
    ) -> None:
        if cost not in DEFAULT_MATCH_THRESH:
            raise ConfigError(f"unknown association cost {cost!r}; choose one of {', '.join(DEFAULT_MATCH_THRESH)}")
        if max_age < 0:
            raise ConfigError(f"tracker max_age must be >= 0 frames, got {max_age}")
        self.score_thresh = float(score_thresh)
        self.match_thresh = float(DEFAULT_MATCH_THRESH[cost] if match_thresh is None else match_thresh)
        self.cost = cost
        self.max_age = int(max_age)
        self.reset()

    def reset(self) -> None:
        """Forget every track and restart ids at 1 (call between sequences)."""
        self.tracks: dict[int, Track] = {}
        self.next_id = 1
        self.frame: int | None = None
        # After each update: {track id: index into that call's det_boxes} for the tracks it returned (the
        # detection each took; a model can carry that detection's embedding forward as the track's query).
        self.det_index: dict[int, int] = {}

    def _cost(self, track_boxes: np.ndarray, det_boxes: np.ndarray) -> np.ndarray:
        overlap = giou(track_boxes, det_boxes) if self.cost == "giou" else box_iou(track_boxes, det_boxes)
        return 1.0 - overlap  # (T, D)

    def update(
        self,
        frame: int,
        det_boxes: Any,
        det_scores: Any,
        track_boxes: dict[int, Any] | None = None,
    ) -> list[tuple[int, np.ndarray, float]]:
        """Associate one frame's detections with the live tracks.

        Args:
            frame: the frame number; frames must increase (gaps count towards ``max_age``).
            det_boxes: ``(N, 4)`` detections, xyxy pixels (array, list or tensor).
            det_scores: ``(N,)`` their scores.
            track_boxes: TransTrack mode: ``{track id: predicted xyxy box in this frame}`` for live tracks (ids
                from earlier results); a live track missing from it uses its last box, and ids of tracks that
                have just waited more than ``max_age`` frames are ignored (:meth:`live_ids` tells which ids are
                still live). None: IoU baseline mode, every live track uses its last box.

        Returns:
            ``[(id, box, score)]`` for every track matched or started in this frame, ordered by id: the box
            (xyxy float64) and score of its detection.

        Raises:
            ValueError: a frame not after the previous one, mismatched shapes, or ``track_boxes`` naming an id
                this tracker never issued.
        """
        if self.frame is not None and frame <= self.frame:
            raise ValueError(f"frames must increase: got frame {frame} after {self.frame} (reset() between sequences)")
        boxes, scores = _numpy(det_boxes).reshape(-1, 4), _numpy(det_scores).reshape(-1)
        if len(boxes) != len(scores):
            raise ValueError(f"{len(boxes)} detection boxes but {len(scores)} scores")
        kept = np.flatnonzero(scores >= self.score_thresh)  # (D,) indices into the given detections
        boxes, scores = boxes[kept], scores[kept]  # (D, 4), (D,)

        # Drop tracks that have waited too long, then predict where the others are.
        self.tracks = {i: t for i, t in self.tracks.items() if frame - t.last_frame <= self.max_age}
        predicted = dict(track_boxes or {})
        never = sorted(i for i in predicted if not 1 <= i < self.next_id)
        if never:
            raise ValueError(f"track_boxes names ids {never[:5]} that this tracker never issued")
        ids = sorted(self.tracks)  # predictions for tracks dropped just now are ignored
        prior = np.array(
            [_numpy(predicted[i]).reshape(4) if i in predicted else self.tracks[i].box for i in ids], dtype=np.float64
        ).reshape(-1, 4)  # (T, 4)

        rows, cols = match(self._cost(prior, boxes), self.match_thresh) if len(ids) and len(boxes) else ([], [])
        out: list[tuple[int, np.ndarray, float]] = []
        self.det_index = {}
        matched = set()
        for r, c in zip(rows, cols):
            track = self.tracks[ids[r]]
            track.box, track.score, track.last_frame = boxes[c].copy(), float(scores[c]), frame
            track.hits += 1
            matched.add(int(c))
            out.append((track.id, track.box.copy(), track.score))
            self.det_index[track.id] = int(kept[c])
        for c in range(len(boxes)):
            if c in matched:
                continue
            track = Track(self.next_id, boxes[c].copy(), float(scores[c]), frame, frame)
            self.tracks[track.id] = track
            self.next_id += 1
            out.append((track.id, track.box.copy(), track.score))
            self.det_index[track.id] = int(kept[c])
        self.frame = frame
        return sorted(out, key=lambda item: item[0])

    def live_ids(self) -> list[int]:
        """Ids of the tracks still waiting for matches (matched within ``max_age`` frames), sorted."""
        return sorted(self.tracks)


def results_to_rows(frame: int, results: list[tuple[int, np.ndarray, float]]) -> np.ndarray:
    """One frame's :meth:`Tracker.update` results as MOT rows ``frame,id,left,top,width,height,conf,-1,-1,-1``."""
    rows = np.full((len(results), 10), -1.0)
    for k, (track_id, box, score) in enumerate(results):
        box = np.asarray(box, dtype=np.float64).reshape(4)
        rows[k, :7] = (frame, track_id, box[0], box[1], box[2] - box[0], box[3] - box[1], score)
    return rows  # (N, 10)


def track_detections(det_rows: np.ndarray, tracker: Tracker, num_frames: int | None = None) -> np.ndarray:
    """Run ``tracker`` (reset first) over MOT detection rows, frame by frame: the IoU baseline on any detector.

    Args:
        det_rows: ``(N, 7..10)`` MOT rows ``frame,-1,left,top,width,height,score,...`` (a ``det.txt``, or a
            detector's output written the same way).
        tracker: the tracker to run, in IoU-baseline mode (no predicted track boxes).
        num_frames: frames to step through; default the last frame with a detection.

    Returns:
        The tracks as MOT rows ``frame,id,left,top,width,height,score,-1,-1,-1``, ``(M, 10)``.
    """
    det_rows = np.asarray(det_rows, dtype=np.float64)
    if det_rows.size == 0:
        det_rows = np.zeros((0, 10))
    if det_rows.ndim != 2 or det_rows.shape[1] < 7:
        raise ValueError(f"detection rows need a score in column 7, got shape {det_rows.shape}")
    tracker.reset()
    last = int(det_rows[:, 0].max(initial=0)) if num_frames is None else int(num_frames)
    order = np.argsort(det_rows[:, 0], kind="stable")
    det_rows = det_rows[order]
    bounds = np.searchsorted(det_rows[:, 0], np.arange(1, last + 2))
    out = [np.zeros((0, 10))]
    for frame in range(1, last + 1):
        rows = det_rows[bounds[frame - 1] : bounds[frame]]
        boxes = np.concatenate([rows[:, 2:4], rows[:, 2:4] + rows[:, 4:6]], axis=1)  # (D, 4) xyxy
        out.append(results_to_rows(frame, tracker.update(frame, boxes, rows[:, 6])))
    return np.concatenate(out)  # (M, 10)


@dataclasses.dataclass(frozen=True)
class AssociatedSequence:
    """What :func:`associate_sequences` wrote for one sequence."""

    name: str
    rows: np.ndarray  # (M, 10) MOT rows frame,id,left,top,width,height,score,-1,-1,-1
    path: Any  # the SEQ.txt written (a pathlib.Path)

    @property
    def num_tracks(self) -> int:
        return len(set(self.rows[:, 1].astype(int)))


def associate_sequences(
    seq: Any,
    out: Any,
    *,
    cost: Cost = "iou",
    score_thresh: float = 0.4,
    match_thresh: float | None = None,
    max_age: int = 32,
) -> list[AssociatedSequence]:
    """Track the public detections of each sequence with the IoU baseline and write ``out/SEQ.txt``.

    Args:
        seq: a sequence (MOTChallenge folder or video with ``STEM.det.txt``) or a folder of them.
        out: the folder for the ``SEQ.txt`` results.
        cost: "iou" or "giou".
        score_thresh: detections scoring below this are ignored.
        match_thresh: the largest accepted cost; None: 0.7 for IoU, 1.2 for GIoU.
        max_age: frames an unmatched track waits.

    Raises:
        DataError: a sequence without detections (``det/det.txt``, or ``STEM.det.txt``).
        ConfigError: a bad tracker setting.
        MissingFileError: ``seq`` does not exist.
    """
    from pathlib import Path

    from vitssl.errors import DataError
    from vitssl.video.track.mot import list_sequences, write_mot

    sequences = list_sequences(seq)
    missing = [s.name for s in sequences if s.det is None]
    if missing:
        raise DataError(f"sequence(s) {', '.join(missing)} have no detections (det/det.txt, or STEM.det.txt)")
    tracker = Tracker(score_thresh=score_thresh, match_thresh=match_thresh, cost=cost, max_age=max_age)
    done = []
    for s in sequences:
        rows = track_detections(s.det, tracker, s.length)
        done.append(AssociatedSequence(s.name, rows, write_mot(Path(out) / f"{s.name}.txt", rows)))
    return done
