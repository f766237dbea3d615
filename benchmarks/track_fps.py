"""Frames per second of `vitssl track run` on the CPU at the demo's size, split into backbone, transformer and
association, for TransTrack and for its baseline (the same detector with frame-to-frame IoU association: no
track decoder, IoU matching), in the same run.

    python -m vitssl.demo track                  # trains the demo checkpoint once (runs/demo_track/train)
    python benchmarks/track_fps.py --json benchmarks/results/track_fps.json

Frames come from generated sequences at the demo's size (96x128, network input 64x96), run with the demo's
thread setting (one thread; tiny matrices gain nothing from more). Each mode runs ``--repeats`` times over every
sequence after one warm-up sequence; the table reports the run with the best total time, and both trackers'
MOTA / IDF1 on these held-out sequences (seed 11).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

DEFAULT_CHECKPOINT = "runs/demo_track/train/checkpoint_last.pth"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", default=DEFAULT_CHECKPOINT, help=f"a transtrack checkpoint ({DEFAULT_CHECKPOINT})"
    )
    parser.add_argument("--sequences", type=int, default=4, help="generated sequences (4)")
    parser.add_argument("--frames", type=int, default=40, help="frames per sequence (40)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode (3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1, as the demo)")
    parser.add_argument("--json", help="write the figures here (benchmarks/results/track_fps.json)")
    args = parser.parse_args(argv)

    from vitssl.errors import UserError
    from vitssl.video.track.infer import Timings, load_tracker
    from vitssl.video.track.metrics import evaluate
    from vitssl.video.track.mot import list_sequences
    from vitssl.video.track.synth import write_sequences

    torch.set_num_threads(args.threads)
    if not Path(args.checkpoint).is_file():
        print(
            f"track_fps: no checkpoint {args.checkpoint}; train one with `python -m vitssl.demo track`", file=sys.stderr
        )
        return 2
    out: dict = {"threads": args.threads, "torch": torch.__version__, "checkpoint": args.checkpoint, "modes": {}}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            write_sequences(tmp, num_sequences=args.sequences, num_frames=args.frames, size=(96, 128), seed=11)
            sequences = list_sequences(tmp)
            frames = {s.name: list(s.frames()) for s in sequences}  # decoded once: decoding is not timed
            for mode, baseline in (("transtrack", None), ("iou_baseline", "iou")):
                runner = load_tracker(args.checkpoint, {"baseline": baseline})
                runner.run(frames[sequences[0].name])  # warm-up
                best: Timings | None = None
                preds = {}
                for _ in range(args.repeats):
                    total = Timings()
                    for s in sequences:
                        preds[s.name], timings = runner.run(frames[s.name])
                        total.add(timings)
                    spent = total.backbone + total.transformer + total.association
                    if best is None or spent < best.backbone + best.transformer + best.association:
                        best = total
                assert best is not None
                fps = best.fps()
                out["modes"][mode] = {
                    "frames": best.frames,
                    "fps": round(fps["total"], 2),
                    "backbone_fps": round(fps["backbone"], 2),
                    "transformer_fps": round(fps["transformer"], 2),
                    "association_fps": round(fps["association"], 1),
                    "ms_per_frame": {
                        s: round(1000 * getattr(best, s) / best.frames, 3)
                        for s in ("backbone", "transformer", "association")
                    },
                }
                gt = {s.name: s.gt for s in sequences}
                scores = evaluate(gt, preds, "mot15", num_frames={s.name: s.length for s in sequences})["COMBINED"]
                out["modes"][mode].update({k: scores[k] for k in ("MOTA", "IDF1", "HOTA", "IDSW")})
                out["input_size"] = list(runner.input_size)
                print(f"{mode:<13} {best.summary()}")
    except UserError as err:
        print(f"track_fps: error: {err}", file=sys.stderr)
        return 2
    t, b = out["modes"]["transtrack"], out["modes"]["iou_baseline"]
    out["transtrack_vs_baseline"] = round(t["fps"] / b["fps"], 3)
    print(f"TransTrack runs at {out['transtrack_vs_baseline']:.2f}x the IoU baseline's frames per second")
    if args.json:
        from vitssl.io import write_json

        write_json(out, Path(args.json))
        print(f"wrote {args.json}")
    else:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
