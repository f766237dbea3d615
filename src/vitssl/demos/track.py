"""``python -m vitssl.demo track [key=value ...]``: TransTrack against the IoU baseline on generated sequences.

Trains (or reuses) the recipe ``video/transtrack_demo`` on procedural sequences (written on first use), then runs
the trained model over held-out sequences of another seed twice: as TransTrack (track decoder + GIoU matching)
and as the IoU baseline (the same detections, frame-to-frame IoU association). Scores both with TrackEval's
MOTA / IDF1 / HOTA (mot15 rules), writes ``results.json`` (fractions), the MOT results of both, and one
rendered sequence into the run folder (``runs/demo_track``; overrides give ``runs/demo_track-<overrides>``).

What the demo keeps is what it reports: the training run (``train/``, reused by the next call with the same
settings), ``results.json``, ``results/`` and the rendered videos. The generated training and held-out sequences
are temporaries in ``<run folder>/_synthetic`` (a fixed path, so that a reused run's config stays the same),
removed when the demo ends, also when it fails; training data the user points ``data.train.root=`` at is theirs
and left alone.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from vitssl.config import load_config
from vitssl.demos.common import demo_root, train_or_reuse

_logger = logging.getLogger(__name__)

TRACK_RECIPE = "video/transtrack_demo"
TRACK_OUTPUT = "runs/demo_track"
HELD_OUT = {"num_sequences": 6, "num_frames": 40, "size": (96, 128), "seed": 7}  # seed 7: not a training seed
MODES = {"transtrack": None, "iou_baseline": "iou"}
_KEYS = ("MOTA", "IDF1", "HOTA", "MOTP", "IDSW", "FP", "FN")
SYNTHETIC = "_synthetic"  # the generated sequences' temporary folder inside the demo folder


def run_track_demo(overrides: list[str]) -> dict[str, Any]:
    """Train (or reuse) the demo tracker, evaluate TransTrack and the IoU baseline on held-out sequences.

    Args:
        overrides: ``key=value`` overrides of the recipe; ``output_dir=`` names the demo folder.

    Returns:
        What ``results.json`` holds: per mode the combined metrics (fractions and counts) and frames per second.
    """
    root_dir, settings = demo_root(overrides, TRACK_OUTPUT)
    scratch = root_dir / SYNTHETIC
    if not any(o.startswith("data.train.root=") for o in settings):
        settings = [*settings, f"data.train.root={scratch / 'train'}"]
    try:
        results = _run(root_dir, scratch / "heldout", settings)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def _run(root_dir: Path, held_dir: Path, settings: list[str]) -> dict[str, Any]:
    """Train (or reuse), write the held-out sequences into ``held_dir``, track, score, write ``results.json``."""
    from vitssl.engine.checkpoint import LAST_NAME
    from vitssl.io import write_json
    from vitssl.video.track.infer import track_path
    from vitssl.video.track.metrics import evaluate
    from vitssl.video.track.mot import list_sequences
    from vitssl.video.track.synth import write_sequences

    start = time.perf_counter()
    run_dir = root_dir / "train"
    cfg = load_config(TRACK_RECIPE, [*settings, f"output_dir={run_dir}"])
    result = train_or_reuse(cfg)
    _logger.info("training %s at step %d", result.status, result.step)
    train_seconds = time.perf_counter() - start

    shutil.rmtree(held_dir, ignore_errors=True)  # a half-written set left by a killed run
    write_sequences(held_dir, **HELD_OUT)
    sequences = list_sequences(held_dir)
    gt = {s.name: s.gt for s in sequences}
    lengths = {s.name: s.length for s in sequences}
    results: dict[str, Any] = {}
    for mode, baseline in MODES.items():
        render = root_dir / f"{mode}_{sequences[0].name}.mp4"
        preds, timings, _ = track_path(
            run_dir / LAST_NAME, held_dir, root_dir / "results" / mode, settings={"baseline": baseline}, render=render
        )
        combined = evaluate(gt, preds, "mot15", num_frames=lengths)["COMBINED"]
        results[mode] = {k: combined[k] for k in _KEYS}
        results[mode]["frames_per_second"] = {k: round(v, 2) for k, v in timings.fps().items()}
    results["held_out"] = {"sequences": len(sequences), "frames": sum(lengths.values()), **HELD_OUT}
    results["train_seconds"] = round(train_seconds, 1)
    results["seconds"] = round(time.perf_counter() - start, 1)
    write_json(results, root_dir / "results.json")
    return results


def format_track_table(results: dict[str, Any]) -> str:
    """The track demo's table: MOTA, IDF1, HOTA (percent), ID switches, FP, FN of both trackers."""
    held = results["held_out"]
    lines = [
        f"held-out generated sequences: {held['sequences']} sequences, {held['frames']} frames (percent)",
        f"{'tracker':<28}{'MOTA':>7}{'IDF1':>7}{'HOTA':>7}{'IDSW':>6}{'FP':>6}{'FN':>6}",
        "-" * 67,
    ]
    names = {"transtrack": "TransTrack (track decoder)", "iou_baseline": "IoU baseline (same dets)"}
    for mode, name in names.items():
        r = results[mode]
        lines.append(
            f"{name:<28}{100 * r['MOTA']:>7.1f}{100 * r['IDF1']:>7.1f}{100 * r['HOTA']:>7.1f}"
            f"{r['IDSW']:>6d}{r['FP']:>6d}{r['FN']:>6d}"
        )
    return "\n".join(lines)


__all__ = ["HELD_OUT", "SYNTHETIC", "TRACK_OUTPUT", "format_track_table", "run_track_demo"]
