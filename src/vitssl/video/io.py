"""Reading video frames: PyAV by default, decord on request, and a frame count that can be trusted.

Which reader: ``benchmarks/video_reading.py`` reads 8-frame clips at random places of h264 files 1.7-2.9x faster
with PyAV (seek to the keyframe before the first wanted frame, decode forward, convert only the wanted frames
to RGB) than with decord's ``get_batch`` (which converts every decoded frame), on the development machine. So
``decoder="auto"`` reads with PyAV; ``decoder="decord"`` uses decord, and ``probe(..., decoder="decord")``
reports whether decord can read a file at all. The only module that imports decord; rules that follow from
decord 0.6.0's known faults:

* A ``VideoReader`` is opened inside each call with ``num_threads=1`` and never shared, so DataLoader workers
  (forked or spawned) hold no decoder state of another process.
* Frames are fetched with one ``get_batch`` of the sorted unique indices (frame-exact in any order), then the
  reader is rewound with ``seek(0)``; ``seek_accurate`` is never called directly (its memory grows).
* Some native widths (16, 24, 48, 72, ...) decode to 4- or 6-"channel" frames and ``get_batch`` fails with
  ``from_size == to_size``: any frame that is not ``(..., 3)`` sends the file to PyAV.
* ``len(VideoReader)`` can over-count (and ``get_batch`` past the real end hangs), so the frame count comes from
  PyAV: the presentation timestamps of the demuxed packets, with the last GOP decoded to check that its frames
  decode. Indices past that verified end are clamped to the last frame.

Frames are never resized here (decord's ``width``/``height`` resample differently from torch): the caller
crops and resizes the uint8 ``(T, H, W, 3)`` tensor.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vitssl.data.common import SKIP_HINT, CorruptImageError
from vitssl.errors import MissingFileError

DECODERS: tuple[str, ...] = ("auto", "decord", "pyav")
_CACHE_SIZE = 4096  # per-process memo of verified indexes (a few KB each), keyed by path, size and mtime


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` finds: the verified frame count and what will decode the file."""

    path: str
    num_frames: int  # frames that decode (verified, may be fewer than the header says)
    fps: float
    width: int
    height: int
    duration: float  # seconds: num_frames / fps
    codec: str  # e.g. "h264", "mpeg4"
    decoder: str  # "decord" or "pyav": what read_frames(decoder="auto") uses for this file


class CorruptVideoError(CorruptImageError):
    """A video that cannot be read: not a video, truncated before any frame, or failing to decode a frame.

    A ``CorruptImageError``, so ``TransformedDataset(skip_corrupt=True)`` skips and counts it.
    """


@dataclass(frozen=True)
class _Index:
    """Presentation timestamps and keyframes of a file's video stream, from demuxing (not decoding) it."""

    pts: tuple[int, ...] | None  # presentation order; None when the container gives no timestamps
    keyframes: tuple[int, ...]  # frame indices of the keyframes, ascending
    num_frames: int  # verified: the last GOP decodes up to here
    fps: float
    width: int
    height: int
    codec: str


_INDEX_CACHE: OrderedDict[tuple[str, int, int], _Index] = OrderedDict()
_DECORD_OK: dict[tuple[str, int, int], bool] = {}  # whether decord gives 3-channel frames for a file


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


def _decode(container: Any, stream: Any) -> Iterator[Any]:
    """Decoded frames of ``stream`` from where the container stands; stops quietly at a broken tail."""
    import av

    try:
        yield from container.decode(stream)
    except (av.InvalidDataError, av.EOFError):
        return  # a truncated file: the frames before the cut were yielded


def _build_index(path: str) -> _Index:
    container = _open_av(path)
    try:
        stream = container.streams.video[0]
        stamps: list[int] = []
        key_stamps: list[int] = []
        missing_pts = False
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
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        codec = stream.codec_context.name
        width, height = stream.codec_context.width, stream.codec_context.height

        if missing_pts or not stamps:
            # No timestamps: count frames in decode order (the whole file is decoded once, then memoised).
            container.seek(0)
            count = sum(1 for _ in _decode(container, stream))
            if count == 0:
                raise _corrupt(path, "no frame decodes")
            return _Index(None, (0,), count, fps, width, height, codec)

        pts = sorted(set(stamps))
        position = {p: i for i, p in enumerate(pts)}
        keyframes = sorted({position[p] for p in key_stamps} | {0})
        # The tail check: decode the last GOP; if nothing of it decodes, step back a GOP.
        verified = 0
        for key in reversed(keyframes):
            container.seek(pts[key], stream=stream, backward=True, any_frame=False)
            last = -1
            for frame in _decode(container, stream):
                index = position.get(frame.pts, -1)
                last = max(last, index)
            if last >= 0:
                verified = last + 1
                break
        if verified == 0:
            raise _corrupt(path, f"none of its {len(pts)} frames decodes")
        return _Index(
            tuple(pts[:verified]), tuple(k for k in keyframes if k < verified), verified, fps, width, height, codec
        )
    finally:
        container.close()


def _index(path: str) -> _Index:
    key = _key(path)
    found = _INDEX_CACHE.get(key)
    if found is None:
        found = _build_index(path)
        _INDEX_CACHE[key] = found
        if len(_INDEX_CACHE) > _CACHE_SIZE:
            _INDEX_CACHE.popitem(last=False)
    else:
        _INDEX_CACHE.move_to_end(key)
    return found


def _read_decord(path: str, wanted: np.ndarray, threads: int = 1) -> np.ndarray | None:
    """Frames ``wanted`` (sorted unique) as uint8 ``(U, H, W, 3)``, or None where decord mis-decodes the file."""
    import decord

    try:
        reader = decord.VideoReader(path, num_threads=threads)
    except (RuntimeError, decord.DECORDError):
        return None
    try:
        batch = reader.get_batch(wanted.tolist()).asnumpy()  # (U, H, W, C)
        reader.seek(0)  # rewind: leaves no half-decoded GOP behind
    except decord.DECORDError:  # from_size == to_size: the 4/6-"channel" widths
        return None
    finally:
        del reader
    if batch.ndim != 4 or batch.shape[-1] != 3:
        return None
    return batch


def _read_pyav(path: str, wanted: np.ndarray, index: _Index, seek: bool = True, threads: int = 1) -> np.ndarray:
    """Frames ``wanted`` (sorted unique, < index.num_frames) as uint8 ``(U, H, W, 3)``, frame-exact by pts.

    With ``seek``, decoding jumps to the keyframe before a wanted frame whenever that keyframe lies past the
    last decoded frame (cheaper than decoding the frames in between); else it decodes forward from frame 0.
    """
    import av

    wanted_set = {int(w) for w in wanted}
    out: dict[int, np.ndarray] = {}
    container = _open_av(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.thread_count = threads
        position = {p: i for i, p in enumerate(index.pts)} if index.pts is not None else None
        keys = np.asarray(index.keyframes)
        frames: Iterator[Any] | None = None
        last = -1  # index of the last decoded frame
        counter = -1  # decode-order count, for files without timestamps
        for target in wanted.tolist():
            if target in out:
                continue
            key = int(keys[np.searchsorted(keys, target, side="right") - 1]) if position is not None else 0
            if frames is None or (seek and position is not None and key > last):
                start = index.pts[key if seek else 0] if position is not None else None
                if start is None:
                    container.seek(0)
                else:
                    container.seek(start, stream=stream, backward=True, any_frame=False)
                frames, last, counter = _decode(container, stream), -1, -1
            for frame in frames:
                counter += 1
                i = counter if position is None else position.get(frame.pts, -1)
                if i < 0:
                    continue
                last = i
                if i in wanted_set and i not in out:
                    out[i] = frame.to_ndarray(format="rgb24")  # (H, W, 3)
                if i >= target:
                    break
            if target not in out:
                raise _corrupt(path, f"frame {target} of {index.num_frames} does not decode")
    except av.FFmpegError as exc:  # an FFmpeg error mid-stream (a truncated tail stops quietly in _decode)
        raise _corrupt(path, f"decoding failed ({exc.__class__.__name__}: {exc})") from exc
    finally:
        container.close()
    return np.stack([out[int(w)] for w in wanted])  # (U, H, W, 3)


def _decord_works(key: tuple[str, int, int], path: str) -> bool:
    """Whether decord decodes this file as 3-channel frames (checked on frame 0, memoised per file)."""
    ok = _DECORD_OK.get(key)
    if ok is None:
        ok = _read_decord(path, np.zeros(1, dtype=np.int64)) is not None
        _DECORD_OK[key] = ok
    return ok


def _check_decoder(decoder: str) -> None:
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, not {decoder!r}")


def probe(path: str | os.PathLike, decoder: str = "auto") -> VideoInfo:
    """Frame count (verified), frame rate, size, codec and the decoder that reads the file.

    ``auto`` reads with PyAV (the faster reader here, see the module doc); ``decord`` checks that decord decodes
    the file as 3-channel frames. The frame count is that of the demuxed packets whose last GOP decodes, never
    decord's ``len()`` (which can over-count).

    Args:
        path: a video file.
        decoder: "auto", or force "decord" / "pyav" (reported as such; "decord" fails where decord cannot).

    Raises:
        MissingFileError: no such file.
        CorruptVideoError: not a video, or no frame decodes; the message names the file.
    """
    _check_decoder(decoder)
    path = str(path)
    key = _key(path)
    index = _index(path)
    used = "pyav"
    if decoder == "decord":
        if not _decord_works(key, path):
            raise _corrupt(path, "decord does not decode it as 3-channel frames (read it with decoder='pyav')")
        used = "decord"
    fps = index.fps
    return VideoInfo(
        path=path,
        num_frames=index.num_frames,
        fps=fps,
        width=index.width,
        height=index.height,
        duration=index.num_frames / fps if fps > 0 else 0.0,
        codec=index.codec,
        decoder=used,
    )


def read_frames(path: str | os.PathLike, indices: Sequence[int], decoder: str = "auto") -> torch.Tensor:
    """The frames at ``indices``, in that order (duplicates allowed), as uint8 ``(T, H, W, 3)``.

    Indices past the verified end are clamped to the last frame (mmaction2's ``repeat_last``).

    Args:
        path: a video file.
        indices: frame indices, >= 0, any order.
        decoder: "auto" (PyAV, the faster reader here), "decord" or "pyav".

    Raises:
        MissingFileError: no such file.
        CorruptVideoError: not a video, or a wanted frame does not decode; the message names the file.
        ValueError: a negative index or an unknown decoder.
    """
    _check_decoder(decoder)
    path = str(path)
    wanted = np.asarray(indices, dtype=np.int64).reshape(-1)  # (T,)
    if wanted.size and wanted.min() < 0:
        raise ValueError(f"frame indices must be >= 0, got {int(wanted.min())} for {path}")
    key = _key(path)
    index = _index(path)
    if wanted.size == 0:
        return torch.empty((0, index.height, index.width, 3), dtype=torch.uint8)
    clamped = np.minimum(wanted, index.num_frames - 1)  # (T,)
    unique = np.unique(clamped)  # (U,) sorted
    batch = None
    if decoder == "decord":
        batch = _read_decord(path, unique)
        _DECORD_OK[key] = batch is not None
        if batch is None:
            raise _corrupt(path, "decord does not decode it as 3-channel frames (read it with decoder='pyav')")
    if batch is None:
        batch = _read_pyav(path, unique, index)
    order = np.searchsorted(unique, clamped)  # (T,) position of each wanted frame in the batch
    return torch.from_numpy(np.ascontiguousarray(batch[order]))  # (T, H, W, 3)


def clear_cache() -> None:
    """Forget the memoised frame indexes (tests; a long-running process that rewrites files in place)."""
    _INDEX_CACHE.clear()
    _DECORD_OK.clear()


__all__ = ["DECODERS", "CorruptVideoError", "VideoInfo", "clear_cache", "probe", "read_frames"]
