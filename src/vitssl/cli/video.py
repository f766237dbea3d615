"""Video commands: ``vitssl video probe FILE...``, ``video readers [FILE]``, ``video prepare SRC DST`` and
``video eval CHECKPOINT --data SPEC``.

Building the parser imports neither torch nor a reader: :mod:`vitssl.video.io` is imported inside the command,
and probing imports no model (no torch, no open_clip), so it answers in about a second.
"""

from __future__ import annotations

import argparse
import json
import sys

from vitssl.cli._args import add_deprecated_spelling, add_device_option
from vitssl.cli.eval import check_spec
from vitssl.eval.spec import SPEC_SYNTAX  # imports no torch

DECODER_CHOICES = ("auto", "torchcodec", "decord", "pyav")  # vitssl.video.io.DECODERS (kept import-free here)


def _cmd_probe(args: argparse.Namespace) -> int:
    from vitssl.video.io.report import probe_files

    # every file first, so that a missing one fails before anything is printed (--json stays one valid list)
    report = probe_files(args.files, decoder=args.decoder, full=args.full)
    print(json.dumps(report.entries, indent=2) if args.json else "\n".join(report.lines()))
    if report.damaged:
        print(f"{report.damaged} of {len(report.entries)} files are damaged", file=sys.stderr)
    return 1 if report.damaged == len(report.entries) else 0


def _cmd_readers(args: argparse.Namespace) -> int:
    from vitssl.video.io.report import readers_report

    report = readers_report(args.file, seconds=args.seconds, remeasure=args.remeasure)
    print(json.dumps(report.as_json(), indent=2) if args.json else "\n".join(report.lines()))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from vitssl.video.prepare import MANIFEST, prepare_videos

    manifest = prepare_videos(
        args.src,
        args.dst,
        fps=args.fps,
        short_side=args.short_side,
        gop=args.gop,
        crf=args.crf,
        skip_corrupt=args.skip_corrupt,
    )
    frames = sum(v["frames"] for v in manifest["videos"])
    print(f"{len(manifest['videos'])} videos ({frames} frames) in {args.dst}; manifest {args.dst}/{MANIFEST}")
    if manifest["skipped"]:
        print(f"skipped {len(manifest['skipped'])} unreadable or damaged videos (listed in the manifest, skipped)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from vitssl.video.action_report import evaluate_action_checkpoint, format_action_scores

    check_spec(args.data, "--data")  # a malformed spec fails before the checkpoint is read
    scores = evaluate_action_checkpoint(
        args.checkpoint,
        args.data,
        split=args.split,
        views=args.views,
        batch_size=args.batch_size,
        device=args.device,
        num_workers=args.num_workers,
        out=args.out,
        confusion=args.confusion,
    )
    print(format_action_scores(scores))
    return 0


def register_commands(subparsers: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``probe``, ``readers``, ``prepare`` and ``eval`` to the ``vitssl video`` group.

    Args:
        subparsers: top-level commands (unused: video adds none).
        groups: sub-command groups by name; uses ``groups["video"]``.
    """
    video = groups["video"]
    p = video.add_parser(
        "probe",
        help="frames that decode, damage, fps, upright size, duration, codec and reader of video files",
        description="Probe video files: the frame count is verified by decoding the last GOP (container headers "
        "and decord's len() can over-count); a file whose decoding stops before the end its header states is "
        "reported DAMAGED with the frame where it stops. Sizes are as displayed (a phone video's rotation "
        "applied). 'decoder' is the reader that reads the file (auto: the one this machine's measurement chose, "
        "'auto' until the first read measures; probe never measures). Exit status 1 when every file is damaged, "
        "2 for a missing file.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="video files (mp4, mkv, avi, ...)")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects instead of one line per file")
    p.add_argument("--decoder", choices=DECODER_CHOICES, default="auto", help="reader to check (auto)")
    p.add_argument("--full", action="store_true", help="decode every frame, to find damage inside a file (slow)")
    p.set_defaults(func=_cmd_probe)

    r = video.add_parser(
        "readers",
        help="which video readers work here, their versions and, on FILE, frames/s of each",
        description="List the video readers (torchcodec, pyav, decord): installed version and whether they load "
        "(torchcodec needs FFmpeg's shared libraries: apt-get install ffmpeg). With FILE, measure each on it: "
        "sequential frames/s and random-access frames/s (8 clips of 8 frames at random starts). The last line "
        "says which reader decoder=auto uses and why: the faster of torchcodec and PyAV in a short measurement on "
        "a generated video, cached per machine in $VITSSL_CACHE_DIR (else ~/.cache/vitssl)/video_readers.json.",
    )
    r.add_argument("file", nargs="?", default=None, metavar="FILE", help="a video to measure the readers on")
    r.add_argument("--seconds", type=float, default=2.0, help="at most this long decoding in order (2)")
    r.add_argument("--json", action="store_true", help="print JSON instead of a line per reader")
    r.add_argument("--remeasure", action="store_true", help="measure auto's choice again and rewrite its cache entry")
    r.set_defaults(func=_cmd_readers)

    q = video.add_parser(
        "prepare",
        help="re-encode videos for fast random access: short GOP, fixed fps and short side, with a manifest",
        description="Re-encode a video file or a folder of videos (layout kept) as h264 mp4 with a keyframe every "
        "--gop frames (1: all-intra), optionally at a fixed --fps and --short-side, frames upright; writes "
        "DST/manifest.json. Random clip sampling then decodes at most a GOP per clip. A second run re-encodes only "
        "changed sources. A damaged source stops the run naming it, unless --skip-corrupt.",
    )
    q.add_argument("src", metavar="SRC", help="a video file or a folder of videos")
    q.add_argument("dst", metavar="DST", help="output folder")
    q.add_argument("--fps", type=float, default=None, help="output frame rate (default: keep every frame)")
    q.add_argument("--short-side", type=int, default=None, help="output short side in pixels (default: keep)")
    q.add_argument("--gop", type=int, default=8, help="keyframe interval in frames; 1 = all-intra (8)")
    q.add_argument("--crf", type=int, default=18, help="x264 quality, lower is better (18)")
    q.add_argument("--skip-corrupt", action="store_true", help="leave damaged sources out (listed in the manifest)")
    q.set_defaults(func=_cmd_prepare)

    e = video.add_parser(
        "eval",
        help="top-1 / top-5, per-class accuracy and a confusion matrix of a video_action checkpoint",
        description="Score a video_action checkpoint (vitssl train video/<recipe>) on labelled videos, multi-view "
        "(TimeSformer tests 1x3, ViViT 4x3: the softmax scores of clips x spatial crops are averaged per video). "
        "Prints top-1, top-5 (with 5 classes or more), the mean class accuracy and each class's accuracy, and "
        "writes a row-normalised confusion-matrix PNG.",
    )
    e.add_argument(
        "checkpoint", help="a training checkpoint of the video_action objective (checkpoint_last.pth) or its run folder"
    )
    e.add_argument(
        "--data",
        required=True,
        metavar="SPEC",
        help=f"labelled videos, e.g. videofolder:root=DIR or video_csv:root=val.csv,prefix=DIR (num_frames defaults "
        f"to the checkpoint's); syntax {SPEC_SYNTAX}",
    )
    e.add_argument("--split", default=None, help="split (default: the spec's own, else val)")
    e.add_argument("--views", default="1x1", help="CLIPSxCROPS per video, e.g. 1x3 or 4x3 (default 1x1)")
    e.add_argument("--out", default=None, metavar="OUT.json", help="also write the scores as JSON")
    add_deprecated_spelling(e, "--json", "--out", dest="out", metavar="OUT.json")
    e.add_argument(
        "--confusion",
        default=None,
        metavar="PNG",
        help="confusion-matrix figure (default: next to --out, else confusion_<split>.png by the checkpoint)",
    )
    e.add_argument("--batch-size", type=int, default=16, help="clips per forward pass (16)")
    add_device_option(e, "where the model runs")
    e.add_argument("--num-workers", type=int, default=0, help="data-loading processes (0)")
    e.set_defaults(func=_cmd_eval)
