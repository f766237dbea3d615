"""Video commands: ``vitssl video probe FILE... [--json]`` and ``vitssl video eval CHECKPOINT --data SPEC``.

Building the parser imports neither torch nor decord: :mod:`vitssl.video.io` is imported inside the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vitssl.video.io import VideoInfo


def _format(info: VideoInfo) -> str:
    """One line per file: frames, fps, size, duration, codec, decoder."""
    return (
        f"{info.path}: {info.num_frames} frames, {info.fps:.2f} fps, {info.width}x{info.height}, "
        f"{info.duration:.2f} s, {info.codec}, {info.decoder}"
    )


def _cmd_probe(args: argparse.Namespace) -> int:
    from vitssl.video.io import probe

    # every file first, so that a corrupt one fails before anything is printed (--json stays one valid list)
    infos = [probe(path, decoder=args.decoder) for path in args.files]
    if args.json:
        print(json.dumps([dataclasses.asdict(info) for info in infos], indent=2))
    else:
        for info in infos:
            print(_format(info))
    return 0


def _format_scores(scores: dict[str, Any], png: str) -> str:
    """The ``video eval`` report: top-1 / top-5, mean class accuracy, a line per class, the figure's path."""
    clips, crops = scores["views"]
    head = f"{scores['checkpoint']} on {scores['data']} ({scores['split']}): {scores['num_videos']} videos, "
    head += f"{clips}x{crops} views (clips x crops)"
    top = f"top-1 {scores['top1']:.2f} %"
    if "top5" in scores:
        top += f"   top-5 {scores['top5']:.2f} %"
    top += f"   mean class accuracy {scores['mean_class_accuracy']:.2f} %"
    classes = list(scores["classes"]) + [f"class {i}" for i in range(len(scores["classes"]), len(scores["per_class"]))]
    width = max([len(c) for c in classes] + [5])
    totals = [sum(row) for row in scores["confusion"]]
    rows = [
        f"  {name:<{width}} {'-' if acc is None else f'{acc:6.2f} %'}  ({n} videos)"
        for name, acc, n in zip(classes, scores["per_class"], totals)
        if n or acc is not None
    ]
    return "\n".join([head, top, "per class:", *rows, f"confusion matrix: {png}"])


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vitssl.io import write_json
    from vitssl.video.evaluate import evaluate_checkpoint, parse_views, save_confusion_png

    views = parse_views(args.views)  # a bad --views fails before the checkpoint is read
    scores = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        split=args.split,
        views=views,
        batch_size=args.batch_size,
        device=args.device,
        num_workers=args.num_workers,
    )
    if args.confusion:
        png = Path(args.confusion)
    elif args.json:
        png = Path(args.json).with_suffix(".png")
    else:
        png = Path(args.checkpoint).absolute().parent / f"confusion_{scores['split']}.png"
    names = list(scores["classes"]) + [str(i) for i in range(len(scores["classes"]), len(scores["per_class"]))]
    save_confusion_png(scores["confusion"], names, png)
    scores["confusion_png"] = str(png)
    if args.json:
        write_json(scores, args.json)
    print(_format_scores(scores, str(png)))
    return 0


def register_commands(subparsers: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``probe`` and ``eval`` to the ``vitssl video`` group.

    Args:
        subparsers: top-level commands (unused: video adds none).
        groups: sub-command groups by name; uses ``groups["video"]``.
    """
    video = groups["video"]
    p = video.add_parser(
        "probe",
        help="verified frame count, fps, size, duration, codec and decoder of video files",
        description="Probe video files: the frame count is verified by decoding the last GOP (container headers "
        "and decord's len() can over-count); 'decoder' is what reads the file (PyAV by default, the faster reader "
        "here; --decoder decord checks that decord reads it). A corrupt or missing file is an error (exit status 2).",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="video files (mp4, mkv, avi, ...)")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects instead of one line per file")
    p.add_argument("--decoder", choices=("auto", "decord", "pyav"), default="auto", help="reader to check (auto)")
    p.set_defaults(func=_cmd_probe)

    e = video.add_parser(
        "eval",
        help="top-1 / top-5, per-class accuracy and a confusion matrix of a video_action checkpoint",
        description="Score a video_action checkpoint (vitssl train video/<recipe>) on labelled videos, multi-view "
        "(TimeSformer tests 1x3, ViViT 4x3: the softmax scores of clips x spatial crops are averaged per video). "
        "Prints top-1, top-5 (with 5 classes or more), the mean class accuracy and each class's accuracy, and "
        "writes a row-normalised confusion-matrix PNG.",
    )
    e.add_argument("checkpoint", help="a training checkpoint of the video_action objective (checkpoint_last.pth)")
    e.add_argument(
        "--data",
        required=True,
        help="NAME[:key=value,...], e.g. videofolder:root=DIR or video_csv:root=val.csv,prefix=DIR "
        "(num_frames defaults to the checkpoint's)",
    )
    e.add_argument("--split", default=None, help="split (default: the spec's own, else val)")
    e.add_argument("--views", default="1x1", help="CLIPSxCROPS per video, e.g. 1x3 or 4x3 (default 1x1)")
    e.add_argument("--json", default=None, metavar="OUT.json", help="also write the scores as JSON")
    e.add_argument(
        "--confusion",
        default=None,
        metavar="PNG",
        help="confusion-matrix figure (default: next to --json, else confusion_<split>.png by the checkpoint)",
    )
    e.add_argument("--batch-size", type=int, default=16, help="clips per forward pass (16)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (auto)")
    e.add_argument("--num-workers", type=int, default=0, help="data-loading processes (0)")
    e.set_defaults(func=_cmd_eval)
