"""Re-encode a video collection for training: short GOP (or all-intra), fixed frame rate and short side.

Random clip sampling seeks to the keyframe before each wanted frame and decodes forward, so its cost grows with
the keyframe interval: camera and web videos carry one keyframe every 2-10 s (60-300 frames). :func:`prepare_videos`
writes every video of a file or folder again as h264 mp4 (x264 ``tune=fastdecode``, yuv420p, no B-frames; larger
files that decode faster) with a keyframe every
``gop`` frames (1: every frame is a keyframe), optionally at a fixed ``fps`` (each output tick shows the latest
source frame at or before it) and with its short side scaled to ``short_side`` (even sizes; area filter). Frames
are written upright (a phone video's rotation applied), so the output carries no display matrix. The folder
layout is kept (``a/b.mkv`` -> ``DST/a/b.mp4``); every output is written atomically, and ``DST/manifest.json``
lists source and output of each video (frames, fps, size) and the skipped ones with their reason. A second run
re-encodes only sources whose size or modification time changed.

Damaged or unreadable sources (:func:`vitssl.video.io.probe`) stop the run with a one-line error naming the file,
or with ``skip_corrupt`` are left out and listed in the manifest.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

from vitssl.errors import SKIP_HINT, DataError, MissingFileError
from vitssl.video.files import VIDEO_EXTENSIONS, list_videos
from vitssl.video.io import CorruptVideoError, probe
from vitssl.video.io.probing import _open_av
from vitssl.video.io.readers import _upright

_logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PREPARE_FORMAT = 1


def _sources(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise MissingFileError(f"video source {src} does not exist; name a video file or a folder of videos")
    found = [src / rel for rel in list_videos(src, relative=True)]
    if not found:
        raise MissingFileError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) under {src}; name a folder that holds some")
    return found


def _out_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """Output size: the short side scaled to ``short_side`` (aspect kept), both sides even (yuv420p)."""
    if short_side is not None:
        scale = short_side / min(width, height)
        width, height = round(width * scale), round(height * scale)
    return max(2, width - width % 2), max(2, height - height % 2)


def prepare_video(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    fps: float | None = None,
    short_side: int | None = None,
    gop: int = 8,
    crf: int = 18,
    preset: str = "veryfast",
) -> dict[str, Any]:
    """Re-encode one video (see the module doc); returns its manifest entry.

    Raises:
        CorruptVideoError: the source is unreadable or damaged (names it).
    """
    import av

    from vitssl.io import atomic_path

    src, dst = str(src), Path(dst)
    info = probe(src)
    if info.damaged:
        raise CorruptVideoError(f"damaged video {src}: {info.error} ({SKIP_HINT})")
    rate = float(fps) if fps else (info.fps if info.fps > 0 else 25.0)
    width, height = _out_size(info.width, info.height, short_side)
    rotation = info.rotation
    written = 0
    with atomic_path(dst) as tmp:
        out = av.open(str(tmp), mode="w", format="mp4")
        options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "bf": "0", "crf": str(crf)}
        options.update(preset=preset, tune="fastdecode")  # no CABAC, no deblocking: cheaper to decode again
        stream = out.add_stream("libx264", rate=Fraction(rate).limit_denominator(1001), options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # fixed fps: output tick k (time k / rate) shows the latest source frame at or before it
        ticks = None if fps is None else max(1, round(info.num_frames / (info.fps or rate) * rate))

        def encode(frame: Any) -> None:
            nonlocal written
            frame.pts = written
            for packet in stream.encode(frame):
                out.mux(packet)
            written += 1

        def emit(frame: Any, until: float) -> None:
            """Encode ``frame`` once (every frame kept) or for each output tick before ``until`` seconds."""
            if ticks is None:
                encode(frame)
                return
            while written < ticks and written / rate < until - 1e-9:
                encode(frame)

        source = _open_av(src)
        try:
            previous, start = None, None
            for frame in source.decode(source.streams.video[0]):
                rgb = _upright(frame.to_ndarray(format="rgb24")[None], rotation)[0]  # (H, W, 3) upright
                picture = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
                    width, height, format="yuv420p", interpolation="AREA"
                )
                t = float(frame.time or 0.0)
                start = t if start is None else start
                if ticks is None:
                    emit(picture, 0.0)  # every source frame, once
                elif previous is not None:
                    emit(previous, t - start)  # the ticks before this frame show the previous one
                previous = picture
            if ticks is not None and previous is not None:
                emit(previous, ticks / rate)
        finally:
            source.close()
        for packet in stream.encode():
            out.mux(packet)
        out.close()
    stat = os.stat(src)
    return {
        "source": os.path.abspath(src),
        "source_bytes": stat.st_size,
        "source_mtime_ns": stat.st_mtime_ns,
        "output": str(dst.absolute()),
        "frames": written,
        "fps": rate,
        "width": width,
        "height": height,
        "source_frames": info.num_frames,
        "source_fps": info.fps,
    }


def prepare_videos(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    fps: float | None = None,
    short_side: int | None = None,
    gop: int = 8,
    crf: int = 18,
    skip_corrupt: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Re-encode a video file or every video under a folder into ``dst`` (see the module doc).

    Args:
        src: a video file or a folder of videos (searched recursively).
        dst: output folder (created); ``dst/manifest.json`` describes it.
        fps: output frame rate; None keeps every source frame (and the source's rate).
        short_side: output short side in pixels; None keeps the size (rounded down to even).
        gop: keyframe interval in frames (1: all-intra).
        crf: x264 quality (lower is better; 18 is visually lossless).
        skip_corrupt: leave unreadable or damaged sources out (listed in the manifest) instead of stopping.
        progress: called with 1 after each source.

    Returns:
        The manifest (also written to ``dst/manifest.json``).

    Raises:
        MissingFileError: ``src`` does not exist or holds no videos.
        CorruptVideoError: an unreadable or damaged source (without ``skip_corrupt``); names it.
        DataError: a bad option.
    """
    from vitssl.errors import CorruptImageError
    from vitssl.io import write_json

    if gop < 1 or crf < 0 or (fps is not None and not fps > 0) or (short_side is not None and short_side < 2):
        raise DataError(
            f"prepare needs gop >= 1, crf >= 0, fps > 0 and short_side >= 2; got gop={gop}, crf={crf}, fps={fps}, "
            f"short_side={short_side}"
        )
    src, dst = Path(src), Path(dst)
    sources = _sources(src)
    options = {"fps": fps, "short_side": short_side, "gop": gop, "crf": crf, "codec": "h264", "bframes": 0}
    previous: dict[str, dict[str, Any]] = {}
    manifest_path = dst / MANIFEST
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
            if old.get("format") == PREPARE_FORMAT and old.get("options") == options:
                previous = {v["source"]: v for v in old.get("videos", [])}
        except (OSError, ValueError, KeyError, TypeError):
            previous = {}
    videos, skipped = [], []
    for path in sources:
        rel = path.relative_to(src) if src.is_dir() else Path(path.name)
        out = dst / rel.with_suffix(".mp4")
        stat = path.stat()
        kept = previous.get(str(path.absolute()))
        if (
            kept is not None
            and kept["source_bytes"] == stat.st_size
            and kept["source_mtime_ns"] == stat.st_mtime_ns
            and Path(kept["output"]).is_file()
        ):
            videos.append(kept)
        else:
            try:
                videos.append(prepare_video(path, out, fps=fps, short_side=short_side, gop=gop, crf=crf))
            except CorruptImageError as err:
                if not skip_corrupt:
                    raise
                reason = str(err).replace(f" ({SKIP_HINT})", "")
                _logger.warning("skipping %s: %s", path, reason)
                skipped.append({"source": str(path.absolute()), "error": reason})
        if progress is not None:
            progress(1)
    if skipped:
        _logger.warning(
            "skipped %d of %d videos: %s", len(skipped), len(sources), ", ".join(s["source"] for s in skipped)
        )
    manifest = {
        "format": PREPARE_FORMAT,
        "source": str(src.absolute()),
        "options": options,
        "videos": videos,
        "skipped": skipped,
    }
    write_json(manifest, manifest_path)
    return manifest


__all__ = ["MANIFEST", "prepare_video", "prepare_videos"]
