"""``vitssl track run CHECKPOINT --seq SEQ_OR_VIDEO --out RESULTS [--render out.mp4] [--baseline iou]``.

Runs a TransTrack checkpoint over a sequence and writes MOT results; prints frames per second split into
backbone, transformer and association, and, when the sequences carry ground truth, MOTA / IDF1 / HOTA.
Building the parser imports no torch.
"""

from __future__ import annotations

import argparse

from vitssl.cli._args import add_device_option


def _cmd_run(args: argparse.Namespace) -> int:
    from vitssl.distributed import resolve_device
    from vitssl.video.track.infer import run_tracking
    from vitssl.video.track.metrics import format_table

    run = run_tracking(
        args.checkpoint,
        args.seq,
        args.out,
        score_thresh=args.score_thresh,
        match_thresh=args.match_thresh,
        max_age=args.max_age,
        baseline=args.baseline,
        render=args.render,
        device=resolve_device(args.device),
        threads=args.threads,
    )
    mode = "IoU baseline" if args.baseline else "TransTrack"
    print(f"{mode}: {len(run.results)} sequence(s), {run.timings.summary()}")
    for path in run.written:
        print(f"wrote {path}")
    if run.metrics is not None:
        print(format_table(run.metrics))
    return 0


def add_run_command(track: argparse._SubParsersAction) -> None:
    """Add ``run`` to the ``vitssl track`` group."""
    p = track.add_parser(
        "run",
        help="run a TransTrack checkpoint over a sequence or video and write MOT results (frames/s per stage)",
        description="Track objects through a MOTChallenge sequence folder, a video file (its gt as STEM.gt.txt "
        "beside it, optional) or a folder of sequences with a checkpoint of `vitssl train` (objective transtrack). "
        "Writes frame,id,left,top,width,height,score,-1,-1,-1 rows; prints frames per second of the backbone, the "
        "transformer and the association, and MOTA/IDF1 when ground truth exists. --baseline iou runs the same "
        "detector with frame-to-frame IoU association instead of the track decoder.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a transtrack checkpoint (e.g. checkpoint_last.pth)")
    p.add_argument("--seq", required=True, metavar="SEQ_OR_VIDEO", help="sequence folder, video, or folder of them")
    p.add_argument("--out", required=True, metavar="RESULTS", help="SEQ.txt file (one sequence) or results folder")
    p.add_argument("--render", metavar="OUT.mp4", help="also draw the (first) sequence's tracks into this video")
    p.add_argument("--baseline", choices=("iou",), help="associate by frame-to-frame IoU, no track decoder")
    p.add_argument("--score-thresh", type=float, help="detection score threshold (default: the checkpoint's, 0.4)")
    p.add_argument("--match-thresh", type=float, help="largest accepted 1-GIoU (1-IoU with --baseline iou) cost")
    p.add_argument("--max-age", type=int, help="frames an unmatched track is kept (default: the checkpoint's, 32)")
    add_device_option(p, "where the network runs")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: per-frame matrices are tiny; 2 threads ran 27x slower on a busy 2-core machine; "
        "0: torch's default, for large inputs)",
    )
    p.set_defaults(func=_cmd_run)
