"""Finding video files: the one lister and the suffixes that count as video (no torch, no decoder imported)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from vitssl.errors import MissingFileError

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".mkv", ".avi", ".webm", ".mov")


def is_video_file(path: str | os.PathLike, extensions: Sequence[str] = VIDEO_EXTENSIONS) -> bool:
    """Whether ``path`` is a file whose suffix (any case) is one of ``extensions``."""
    path = Path(path)
    return path.suffix.lower() in {e.lower() for e in extensions} and path.is_file()


def list_videos(
    root: str | os.PathLike, extensions: Sequence[str] = VIDEO_EXTENSIONS, relative: bool = False
) -> list[str]:
    """Every video file under ``root``, recursively, sorted: absolute paths, or relative to ``root``.

    Raises:
        MissingFileError: ``root`` is not a folder.
    """
    base = Path(root).expanduser().absolute()
    if not base.is_dir():
        raise MissingFileError(f"video folder {base} does not exist; pass root=<a folder of video files>")
    exts = {e.lower() for e in extensions}
    found = sorted(p for p in base.rglob("*") if p.suffix.lower() in exts and p.is_file())
    return [str(p.relative_to(base)) if relative else str(p) for p in found]


__all__ = ["VIDEO_EXTENSIONS", "is_video_file", "list_videos"]
