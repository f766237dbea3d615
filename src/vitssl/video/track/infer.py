"""Running a trained TransTrack over a sequence: detections, track queries, association, MOT rows and timings.

Per frame (frames resized to the model's input and normalised as in training):

1. backbone: the frame's pyramid features (kept for the next frame's fusion);
2. transformer: the encoder over the frame fused with the previous one, the detection decoder, and, for the
   live tracks, the track decoder whose queries are the embeddings of each track's last detection (or its last
   track-decoder output while it is unmatched) with its last box as reference;
3. association (:class:`vitssl.video.track.associate.Tracker`): detections scoring at least ``score_thresh``
   are matched to the track decoder's boxes of the live tracks by Hungarian matching on ``1 − GIoU`` (pairs above
   ``match_thresh`` rejected); unmatched detections start tracks, unmatched tracks live ``max_age`` frames.

The baseline (``baseline="iou"``) uses the same detector (the same steps 1 and 2 without the track decoder) and
associates each frame's detections with the tracks' last boxes by ``1 − IoU``: frame-to-frame IoU tracking.
Output rows are ``frame,id,left,top,width,height,score,-1,-1,-1`` in the frame's pixels, 1-based frames.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torchvision.ops import box_convert, nms

from vitssl.video.track.associate import Tracker, results_to_rows
from vitssl.video.track.data import frame_to_tensor
from vitssl.video.track.model import TransTrack

Baseline = Literal["iou"]


@dataclass
class Timings:
    """Seconds spent per stage over ``frames`` frames."""

    frames: int = 0
    backbone: float = 0.0
    transformer: float = 0.0
    association: float = 0.0

    def add(self, other: Timings) -> None:
        self.frames += other.frames
        self.backbone += other.backbone
        self.transformer += other.transformer
        self.association += other.association

    def fps(self) -> dict[str, float]:
        """Frames per second overall and of each stage alone."""
        total = self.backbone + self.transformer + self.association
        out = {"total": self.frames / total if total else float("nan")}
        for stage in ("backbone", "transformer", "association"):
            seconds = getattr(self, stage)
            out[stage] = self.frames / seconds if seconds else float("inf")
        return out

    def summary(self) -> str:
        f = self.fps()
        total = self.backbone + self.transformer + self.association
        share = {
            s: 100 * getattr(self, s) / total if total else 0.0 for s in ("backbone", "transformer", "association")
        }
        return (
            f"{self.frames} frames, {f['total']:.1f} frames/s: backbone {f['backbone']:.1f} frames/s "
            f"({share['backbone']:.0f}%), transformer {f['transformer']:.1f} frames/s ({share['transformer']:.0f}%), "
            f"association {f['association']:.0f} frames/s ({share['association']:.0f}%)"
        )


@dataclass
class _TrackState:
    """What a live track carries to the next frame: its query embedding (D,) and reference box (4,) cxcywh."""

    embed: torch.Tensor
    ref: torch.Tensor


@dataclass
class TrackerSettings:
    """Association settings (TransTrack's: score 0.4, GIoU, reject above 1.2, tracks kept 32 frames)."""

    score_thresh: float = 0.4  # detections scoring below this are ignored
    match_thresh: float | None = None  # largest accepted cost; None: 1.2 for 1 - GIoU, 0.7 for 1 - IoU
    max_age: int = 32  # frames an unmatched track is kept
    baseline: Baseline | None = None  # "iou": the same detector with frame-to-frame IoU association
    nms_thresh: float | None = None  # drop detections overlapping a better one by IoU above this; None: keep all


def _scores(logits: torch.Tensor, focal: bool) -> torch.Tensor:
    """Object scores (Q,) from class logits (Q, K): the best class's sigmoid (focal) or softmax without no-object."""
    if focal:
        return logits.sigmoid().max(-1).values
    return logits.softmax(-1)[:, :-1].max(-1).values


def _to_pixels(boxes: torch.Tensor, width: int, height: int) -> np.ndarray:
    """Normalised cxcywh (Q, 4) -> xyxy pixels (Q, 4) as float64."""
    scale = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
    return (box_convert(boxes, "cxcywh", "xyxy") * scale).double().cpu().numpy()


class SequenceTracker:
    """TransTrack inference over the frames of one sequence at a time.

    Args:
        model: the network (``objective.model`` of a ``transtrack`` checkpoint), in eval mode.
        input_size: the network input (h, w) it was trained at.
        mean: normalisation mean of the training data.
        std: normalisation std.
        settings: association settings.
        focal: the class head is sigmoid (focal loss) rather than softmax.
    """

    def __init__(
        self,
        model: TransTrack,
        input_size: tuple[int, int],
        mean: list[float],
        std: list[float],
        settings: TrackerSettings,
        focal: bool = True,
    ) -> None:
        self.model = model.eval()
        self.input_size, self.mean, self.std = tuple(input_size), list(mean), list(std)
        self.settings = settings
        self.focal = focal
        self.device = next(model.parameters()).device

    def _tracker(self) -> Tracker:
        s = self.settings
        cost = "iou" if s.baseline == "iou" else "giou"
        return Tracker(score_thresh=s.score_thresh, match_thresh=s.match_thresh, cost=cost, max_age=s.max_age)

    @torch.no_grad()
    def run(self, frames: Iterable[tuple[int, np.ndarray]]) -> tuple[np.ndarray, Timings]:
        """Track through ``(frame number, uint8 (H, W, 3) frame)`` pairs in order.

        Returns:
            ``(rows (N, 10), timings)``: MOT rows ``frame,id,left,top,width,height,score,-1,-1,-1``.
        """
        m, tracker, timings = self.model, self._tracker(), Timings()
        use_tracks = self.settings.baseline is None
        states: dict[int, _TrackState] = {}
        prev_feats: list[torch.Tensor] | None = None
        rows: list[np.ndarray] = []
        for number, image in frames:
            height, width = image.shape[:2]
            t0 = time.perf_counter()
            x = frame_to_tensor(image, self.input_size, self.mean, self.std)[None].to(self.device)  # (1, 3, h, w)
            feats = m.features(x)
            t1 = time.perf_counter()
            enc = m.encode(feats, feats if prev_feats is None else prev_feats)
            det = m.detect(enc)
            ids = sorted(states)
            trk = None
            if use_tracks and ids:
                queries = torch.stack([states[i].embed for i in ids])[None]  # (1, T, D)
                refs = torch.stack([states[i].ref for i in ids])[None]  # (1, T, 4)
                trk = m.track(enc, queries, refs)
            scores = _scores(det.logits[-1][0], self.focal)  # (Q,)
            keep = torch.nonzero(scores >= self.settings.score_thresh).flatten()  # (D,)
            if self.settings.nms_thresh is not None and len(keep) > 1:
                xyxy = box_convert(det.boxes[-1][0, keep], "cxcywh", "xyxy")  # (D, 4)
                keep = keep[nms(xyxy.float(), scores[keep].float(), self.settings.nms_thresh)]
            det_boxes = _to_pixels(det.boxes[-1][0, keep], width, height)  # (D, 4)
            det_scores = scores[keep].double().cpu().numpy()  # (D,)
            track_boxes = None
            if trk is not None:
                px = _to_pixels(trk.boxes[-1][0], width, height)  # (T, 4)
                track_boxes = {i: px[k] for k, i in enumerate(ids)}
            t2 = time.perf_counter()
            results = tracker.update(number, det_boxes, det_scores, track_boxes)
            # Carry each live track's query: its detection's embedding when matched, else its track output.
            by_box = {det_boxes[d].tobytes(): int(keep[d]) for d in range(len(keep))}
            new_states: dict[int, _TrackState] = {}
            for track_id, box, _ in results:
                q = by_box[np.asarray(box, dtype=np.float64).tobytes()]
                new_states[track_id] = _TrackState(det.embed[0, q], det.boxes[-1][0, q])
            if trk is not None:
                for k, i in enumerate(ids):
                    if i not in new_states:
                        new_states[i] = _TrackState(trk.embed[0, k], trk.boxes[-1][0, k])
            live = set(tracker.live_ids())
            states = {i: s for i, s in new_states.items() if i in live} if use_tracks else {}
            rows.append(results_to_rows(number, results))
            prev_feats = feats
            t3 = time.perf_counter()
            timings.frames += 1
            timings.backbone += t1 - t0
            timings.transformer += t2 - t1
            timings.association += t3 - t2
        out = np.concatenate(rows) if rows else np.zeros((0, 10))
        return out, timings


def load_tracker(
    checkpoint: str | Path, settings: dict[str, Any] | None = None, device: str | torch.device = "cpu"
) -> SequenceTracker:
    """A :class:`SequenceTracker` for a ``transtrack`` checkpoint; association defaults come from its config.

    Args:
        checkpoint: a checkpoint written by ``vitssl train`` with ``objective.name=transtrack``.
        settings: overrides of :class:`TrackerSettings` fields (None values keep the checkpoint's).
        device: where the network runs.

    Raises:
        CheckpointError: the file is missing, truncated or not a vitssl checkpoint.
        ConfigError: the checkpoint holds another objective.
    """
    from vitssl.config import ConfigError
    from vitssl.engine import load_objective

    def _check(cfg: Any) -> None:
        if cfg.objective.name != "transtrack":
            raise ConfigError(
                f"checkpoint {checkpoint} was trained with objective {cfg.objective.name!r}, not transtrack; "
                "train one with `vitssl train video/transtrack_demo` (or another transtrack recipe)"
            )

    objective, cfg, _ = load_objective(checkpoint, device=device, check=_check)
    oc = cfg.objective
    values = {"score_thresh": oc.score_thresh, "match_thresh": oc.match_thresh, "max_age": oc.max_age,
              "nms_thresh": oc.get("nms_thresh")}  # fmt: skip
    values.update({k: v for k, v in (settings or {}).items() if v is not None})
    if values.get("baseline") == "iou" and (settings or {}).get("match_thresh") is None:
        values["match_thresh"] = None  # the IoU cost's own default; 1.2 is a GIoU threshold
    return SequenceTracker(
        objective.model,
        objective.input_size(cfg.data),
        list(cfg.data.mean),
        list(cfg.data.std),
        TrackerSettings(**values),
        focal=bool(oc.focal),
    )


def track_path(
    checkpoint: str | Path,
    seq: str | Path,
    out: str | Path,
    *,
    settings: dict[str, Any] | None = None,
    render: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, np.ndarray], Timings, list[Path]]:
    """Run a ``transtrack`` checkpoint over a sequence (folder or video) or a folder of them and write MOT results.

    Args:
        checkpoint: the trained checkpoint.
        seq: one sequence (MOTChallenge folder or video file) or a folder of sequences.
        out: a ``.txt`` file (one sequence only), or a folder that receives ``SEQ.txt`` per sequence.
        settings: :class:`TrackerSettings` overrides (``baseline="iou"`` for the IoU baseline).
        render: an ``.mp4`` to draw the (first) sequence's tracks into.
        device: where the network runs.

    Returns:
        ``({sequence name: rows}, timings over all frames, written files)``.

    Raises:
        DataError: ``out`` names a .txt file for several sequences, or an unreadable sequence.
        MissingFileError: ``seq`` does not exist.
    """
    from vitssl.errors import DataError
    from vitssl.video.track.mot import list_sequences, write_mot

    sequences = list_sequences(seq)
    out = Path(out)
    if out.suffix.lower() == ".txt" and len(sequences) > 1:
        raise DataError(
            f"--out {out} is one file but {seq} holds {len(sequences)} sequences; give a folder for SEQ.txt files"
        )
    if render is not None and Path(render).suffix.lower() != ".mp4":
        raise DataError(f"--render {render}: the rendered video must be an .mp4 file")
    runner = load_tracker(checkpoint, settings, device)
    results: dict[str, np.ndarray] = {}
    timings = Timings()
    written = []
    for sequence in sequences:
        rows, t = runner.run(sequence.frames())
        timings.add(t)
        results[sequence.name] = rows
        target = out if out.suffix.lower() == ".txt" else out / f"{sequence.name}.txt"
        written.append(write_mot(target, rows))
    if render is not None:
        from vitssl.video.track.render import render_tracks

        written.append(render_tracks(sequences[0], results[sequences[0].name], render))
    return results, timings, written


@dataclass
class TrackingRun:
    """What :func:`run_tracking` did: the rows per sequence, the timings, the files written and, when every
    sequence has ground truth, the metrics (mot15 rules) per sequence and ``COMBINED``."""

    results: dict[str, np.ndarray]
    timings: Timings
    written: list[Path]
    metrics: dict[str, dict[str, float | int]] | None = None


def run_tracking(
    checkpoint: str | Path,
    seq: str | Path,
    out: str | Path,
    *,
    score_thresh: float | None = None,
    match_thresh: float | None = None,
    max_age: int | None = None,
    baseline: Baseline | None = None,
    render: str | Path | None = None,
    device: str | torch.device = "cpu",
    threads: int = 1,
) -> TrackingRun:
    """``vitssl track run``: :func:`track_path` with the tracker settings given, then the metrics where the
    sequences carry ground truth.

    Args:
        checkpoint: a ``transtrack`` checkpoint.
        seq: one sequence (MOTChallenge folder or video file) or a folder of sequences.
        out: a ``.txt`` file (one sequence only), or a folder for ``SEQ.txt`` per sequence.
        score_thresh: detection score threshold; None: the checkpoint's.
        match_thresh: largest accepted ``1 - GIoU`` (``1 - IoU`` for the baseline) cost; None: the default.
        max_age: frames an unmatched track is kept; None: the checkpoint's.
        baseline: "iou": the same detector with frame-to-frame IoU association instead of the track decoder.
        render: an ``.mp4`` to draw the (first) sequence's tracks into.
        device: where the network runs.
        threads: torch CPU threads for this process (per-frame matrices are tiny: 1); 0 leaves torch's default.
    """
    from vitssl.video.track.metrics import evaluate
    from vitssl.video.track.mot import list_sequences

    if threads:
        torch.set_num_threads(threads)
    settings = {"score_thresh": score_thresh, "match_thresh": match_thresh, "max_age": max_age, "baseline": baseline}
    results, timings, written = track_path(checkpoint, seq, out, settings=settings, render=render, device=device)
    sequences = {s.name: s for s in list_sequences(seq)}
    metrics = None
    if sequences and all(s.gt is not None for s in sequences.values()):  # mot15 rules: zero-marked gt ignored
        gt = {name: s.gt for name, s in sequences.items()}
        lengths = {name: s.length for name, s in sequences.items()}
        metrics = evaluate(gt, results, "mot15", num_frames=lengths)
    return TrackingRun(results, timings, written, metrics)
