"""Probing a video file with PyAV: its frame index (timestamps and keyframes from demuxing, the last GOP decoded)
and whether it is damaged (decoding stops before the end the header or the packets state).

:func:`_index` memoises the index per file (:mod:`vitssl.video.io.cache`); :func:`_full_check` decodes every frame
to find damage inside a file. The readers (:mod:`vitssl.video.io.readers`) read frames by this index.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vitssl.errors import SKIP_HINT, CorruptImageError, MissingFileError
from vitssl.video.io.cache import _CACHE_SIZE, _INDEX_CACHE, _lru_get

_DURATION_SLACK = 1  # frames a header's duration may overstate a healthy file by (rounding of the last frame)


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` finds: the frames that decode, whether the file is damaged, and what reads it."""

    path: str
    num_frames: int  # frames that decode (verified; fewer than the header says when the file is damaged)
    fps: float
    width: int  # as displayed: after the rotation of the display matrix
    height: int
    duration: float  # seconds: num_frames / fps
    codec: str  # e.g. "h264", "mpeg4"
    decoder: str  # "torchcodec", "pyav", "decord": what read_frames(decoder=<as asked>) uses; "auto": unmeasured
    damaged: bool = False  # decoding stops before the end the header (or the demuxed packets) states
    decoded_frames: int = -1  # == num_frames; named for readers of the JSON next to header_frames
    header_frames: int | None = None  # frames the container header states (count, else duration x fps)
    error: str | None = None  # where decoding stopped and why, for a damaged file
    rotation: int = 0  # degrees counter-clockwise that turn the stored frames upright: 0, 90, 180 or 270

    def __post_init__(self) -> None:
        if self.decoded_frames < 0:
            object.__setattr__(self, "decoded_frames", self.num_frames)


class CorruptVideoError(CorruptImageError):
    """A video that cannot be read: not a video, no frame decodes, or a wanted frame past where decoding stops.

    A ``CorruptImageError``, so ``TransformedDataset(skip_corrupt=True)`` skips and counts it.
    """


@dataclass(frozen=True)
class _Index:
    """Presentation timestamps and keyframes of a file's video stream, from demuxing (not decoding) it."""

    pts: tuple[int, ...] | None  # presentation order; None when the container gives no timestamps
    keyframes: tuple[int, ...]  # frame indices of the keyframes, ascending
    num_frames: int  # verified: frames 0 .. num_frames - 1 decode
    fps: float
    width: int  # stored (before rotation)
    height: int
    codec: str
    header_frames: int | None = None
    rotation: int = 0
    error: str | None = None  # set when the file is damaged: where decoding stopped and why

    @property
    def damaged(self) -> bool:
        return self.error is not None


def _corrupt(path: str, what: str) -> CorruptVideoError:
    return CorruptVideoError(f"cannot read video {path}: {what} ({SKIP_HINT})")


def _key(path: str) -> tuple[str, int, int]:
    """Cache key: a replaced file (new size or mtime) is indexed again."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise MissingFileError(f"video file not found: {path}; check the path (or the dataset's list file)") from None
    if not os.path.isfile(path):
        raise MissingFileError(f"video path {path} is not a file; name a video file")
    return (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


def _open_av(path: str) -> Any:
    import av

    try:
        container = av.open(path)
    except av.FFmpegError as exc:
        raise _corrupt(path, f"not a readable video ({exc.__class__.__name__}: {exc.strerror})") from exc
    if not container.streams.video:
        container.close()
        raise _corrupt(path, "no video stream")
    return container


def _decode(container: Any, stream: Any, errors: list[str] | None = None) -> Iterator[Any]:
    """Decoded frames of ``stream`` from where the container stands; stops at the first decode error (noted)."""
    import av

    try:
        yield from container.decode(stream)
    except av.FFmpegError as exc:  # a truncated or broken packet: the frames before it were yielded
        if errors is not None:
            errors.append(f"{exc.__class__.__name__}: {getattr(exc, 'strerror', None) or exc}")


def _rotation(frame: Any) -> int:
    """Counter-clockwise degrees (0, 90, 180, 270) that turn a decoded frame upright, from its display matrix."""
    angle = getattr(frame, "rotation", 0) or 0  # PyAV: the DISPLAYMATRIX side data's angle, counter-clockwise
    return round(float(angle) / 90.0) % 4 * 90


def _header_frames(container: Any, stream: Any, fps: float) -> int | None:
    """Frames the header states: the stream's count (mp4's sample table), else its duration times the rate."""
    if stream.frames:
        return int(stream.frames)
    seconds = None
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / 1_000_000  # AV_TIME_BASE
    return round(seconds * fps) if seconds and fps > 0 else None


def _build_index(path: str) -> _Index:
    import av

    container = _open_av(path)
    try:
        stream = container.streams.video[0]
        stamps: list[int] = []
        key_stamps: list[int] = []
        missing_pts = False
        demux_error = None
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the flush packet at the end
                    continue
                stamp = packet.pts if packet.pts is not None else packet.dts
                if stamp is None:
                    missing_pts = True
                    break
                stamps.append(stamp)
                if packet.is_keyframe:
                    key_stamps.append(stamp)
        except av.FFmpegError as exc:
            demux_error = f"{exc.__class__.__name__}: {getattr(exc, 'strerror', None) or exc}"
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        codec = stream.codec_context.name
        width, height = stream.codec_context.width, stream.codec_context.height
        header = _header_frames(container, stream, fps)
        errors: list[str] = [demux_error] if demux_error else []
        rotation = 0

        if missing_pts or not stamps:
            # No timestamps: count frames in decode order (the whole file is decoded once, then memoised).
            container.seek(0)
            count = 0
            for frame in _decode(container, stream, errors):
                rotation = _rotation(frame) if count == 0 else rotation
                count += 1
            if count == 0:
                raise _corrupt(path, "no frame decodes")
            error = _damage(count, count, header, errors)
            return _Index(None, (0,), count, fps, width, height, codec, header, rotation, error)

        pts = sorted(set(stamps))
        position = {p: i for i, p in enumerate(pts)}
        keyframes = sorted({position[p] for p in key_stamps} | {0})
        # The tail check: decode the last GOP; if nothing of it decodes, step back a GOP.
        verified = 0
        for key in reversed(keyframes):
            container.seek(pts[key], stream=stream, backward=True, any_frame=False)
            last = -1
            for frame in _decode(container, stream, errors):
                rotation = _rotation(frame)
                last = max(last, position.get(frame.pts, -1))
            if last >= 0:
                verified = last + 1
                break
        if verified == 0:
            raise _corrupt(path, f"none of its {len(pts)} frames decodes")
        error = _damage(verified, len(pts), header, errors)
        keys = tuple(k for k in keyframes if k < verified)
        return _Index(tuple(pts[:verified]), keys, verified, fps, width, height, codec, header, rotation, error)
    finally:
        container.close()


def _damage(decoded: int, packets: int, header: int | None, errors: list[str]) -> str | None:
    """Why a file is damaged (where decoding stopped), or None for a healthy one."""
    expected = max(packets, header or 0)
    slack = 0 if decoded < packets else _DURATION_SLACK  # the packets are there but do not decode: no slack
    if decoded >= expected - slack:
        return None
    cause = errors[0] if errors else "its data ends there: cut short?"
    return f"decoding stops at frame {decoded} of {expected} ({cause})"


def _index(path: str) -> _Index:
    return _lru_get(_INDEX_CACHE, _key(path), _CACHE_SIZE, lambda: _build_index(path))


def _full_check(path: str, index: _Index) -> str | None:
    """Decode every frame from the start; where decoding first fails (mid-file damage), or None."""
    container = _open_av(path)
    errors: list[str] = []
    try:
        position = {p: i for i, p in enumerate(index.pts)} if index.pts is not None else None
        expected = 0
        for n, frame in enumerate(_decode(container, container.streams.video[0], errors)):
            i = n if position is None else position.get(frame.pts, -1)
            if i > expected:  # a frame missing in presentation order: the decoder dropped a broken one
                return f"decoding stops at frame {expected} of {index.num_frames} (frames up to {i - 1} are missing)"
            expected = max(expected, i + 1)
        if errors or expected < index.num_frames:
            cause = errors[0] if errors else "no further frame decodes"
            return f"decoding stops at frame {expected} of {index.num_frames} ({cause})"
    finally:
        container.close()
    return None
