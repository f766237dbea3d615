"""Video commands: ``vitssl video probe FILE... [--json]``.

Building the parser imports neither torch nor decord: :mod:`vitssl.video.io` is imported inside the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import TYPE_CHECKING

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


def register_commands(subparsers: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``probe`` to the ``vitssl video`` group.

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
