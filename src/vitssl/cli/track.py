"""Tracking commands: ``vitssl track evaluate --gt GT --pred PRED [--benchmark mot15|mot16|mot17|mot20] [--out OUT]``,
``vitssl track synth ROOT`` (generated sequences in the MOTChallenge layout) and ``vitssl track associate --seq
SEQ_OR_ROOT --out DIR`` (the IoU tracker on each sequence's public detections, ``det/det.txt``).

Building the parser imports neither TrackEval nor torch: :mod:`vitssl.video.track` is imported inside the commands.
"""

from __future__ import annotations

import argparse

from vitssl.cli._args import add_deprecated_spelling


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from vitssl.video.track.metrics import evaluate_files, format_table

    results = evaluate_files(args.gt, args.pred, args.benchmark, out=args.out)
    print(f"benchmark {args.benchmark}: {len(results) - 1} sequence(s); fractions in %")
    print(format_table(results))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from vitssl.video.track.synth import write_sequences

    height, width = args.size
    paths = write_sequences(
        args.root,
        num_sequences=args.num_sequences,
        num_frames=args.num_frames,
        size=(height, width),
        seed=args.seed,
        prefix=args.prefix,
    )
    for path in paths:
        print(path)
    return 0


def _cmd_associate(args: argparse.Namespace) -> int:
    from vitssl.video.track.associate import associate_sequences

    done = associate_sequences(
        args.seq,
        args.out,
        cost=args.cost,
        score_thresh=args.score_thresh,
        match_thresh=args.match_thresh,
        max_age=args.max_age,
    )
    for seq in done:
        print(f"{seq.name}: {len(seq.rows)} boxes in {seq.num_tracks} tracks -> {seq.path}")
    return 0


def register_commands(subparsers: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``evaluate``, ``synth`` and ``associate`` to the ``vitssl track`` group.

    Args:
        subparsers: top-level commands (unused: track adds none).
        groups: sub-command groups by name; uses ``groups["track"]``.
    """
    track = groups["track"]
    p = track.add_parser(
        "evaluate",
        help="MOTA, IDF1, HOTA, MOTP, ID switches, FP, FN of tracker results against ground truth (TrackEval)",
        description="Evaluate multi-object tracking results with TrackEval's CLEAR-MOT, identity and HOTA metrics "
        "(IoU >= 0.5). GT is a MOT txt file, a MOTChallenge sequence folder (SEQ/gt/gt.txt) or a folder of them; "
        "PRED is a MOT txt file (one sequence) or a folder with one SEQ.txt per sequence. Prints a table per "
        "sequence and COMBINED (counts summed over sequences, as TrackEval combines them).",
    )
    p.add_argument("--gt", required=True, metavar="GT", help="ground truth: a MOT txt file or a MOTChallenge folder")
    p.add_argument("--pred", required=True, metavar="PRED", help="results: a MOT txt file or a folder of SEQ.txt")
    p.add_argument(
        "--benchmark",
        choices=("mot15", "mot16", "mot17", "mot20"),  # vitssl.video.track.metrics.BENCHMARKS, kept lazy
        default="mot15",
        help="TrackEval's MotChallenge2DBox rules. mot15: zero-marked gt rows ignored; mot16/mot17/mot20: also "
        "pedestrians only and predictions matched to distractor classes removed (mot20 adds non-MOT vehicles) "
        "(default mot15)",
    )
    p.add_argument("--out", metavar="OUT.json", help="also write the metrics per sequence and COMBINED as JSON")
    add_deprecated_spelling(p, "--json", "--out", dest="out", metavar="OUT.json")
    p.set_defaults(func=_cmd_evaluate)

    p = track.add_parser(
        "synth",
        help="write generated tracking sequences (MOTChallenge layout, with gt.txt and noisy det.txt)",
        description="Write procedural sequences ROOT/PREFIX-01, ...: textured backgrounds and textured objects that "
        "enter, leave, bounce, cross and occlude each other; gt/gt.txt with visibility and det/det.txt with noisy "
        "detections. The same seed writes the same files.",
    )
    p.add_argument("root", metavar="ROOT", help="folder to hold the sequences")
    p.add_argument("--num-sequences", type=int, default=4, help="how many sequences (4)")
    p.add_argument("--num-frames", type=int, default=40, help="frames per sequence (40)")
    p.add_argument("--size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"), help="frame size (96 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--prefix", default="SYN", help="sequence name prefix (SYN)")
    p.set_defaults(func=_cmd_synth)

    from vitssl.cli.track_run import add_run_command  # `track run` (TransTrack inference) lives in its own module

    add_run_command(track)

    p = track.add_parser(
        "associate",
        help="track public detections (det/det.txt) with Hungarian IoU association; write SEQ.txt results",
        description="Link each sequence's detections into tracks, frame to frame: Hungarian matching on 1 - IoU "
        "(or 1 - GIoU) between each live track's last box and the detections scoring at least --score-thresh; "
        "unmatched detections start tracks, unmatched tracks wait --max-age frames. Writes OUT/SEQ.txt in the "
        "MOTChallenge results format, for `vitssl track evaluate`.",
    )
    p.add_argument("--seq", required=True, metavar="SEQ", help="a sequence (folder or video) or a folder of them")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the SEQ.txt results")
    p.add_argument("--cost", choices=("iou", "giou"), default="iou", help="association cost (iou)")
    p.add_argument("--score-thresh", type=float, default=0.4, help="ignore detections scoring below this (0.4)")
    p.add_argument("--match-thresh", type=float, default=None, help="largest accepted cost (iou 0.7, giou 1.2)")
    p.add_argument("--max-age", type=int, default=32, help="frames an unmatched track waits (32)")
    p.set_defaults(func=_cmd_associate)
