"""Reading video frames: TorchCodec, PyAV or decord behind one call, damaged files reported, rotation honoured.

:func:`probe` indexes a file once with PyAV (demuxing, not decoding: the presentation timestamps and keyframes of
its packets, then the last GOP decoded) and says whether it is **damaged**: decoding stops before the end the
container's header states (a download cut short, a broken packet). :func:`read_frames` returns exactly the frames
asked for, upright, through one of three readers (``decoder=``):

* ``torchcodec``: ``VideoDecoder(path, seek_mode="exact").get_frames_at(indices)``, frame-exact, rotation
  honoured, ``device="cuda"`` decodes with NVDEC. It needs FFmpeg's shared libraries (``apt-get install
  ffmpeg``); without them it is reported unavailable and ``auto`` reads with PyAV.
* ``pyav``: seek to the keyframe before a wanted frame, decode forward, convert only the wanted frames to RGB;
  frames are turned upright by the display matrix's rotation here (FFmpeg's decoder does not).
* ``decord`` (only on request: unmaintained since 2022). A ``VideoReader`` is opened inside each call with
  ``num_threads=1`` and never shared (DataLoader workers hold no decoder state of another process); frames come
  from one ``get_batch`` of the sorted unique indices, then ``seek(0)``; ``seek_accurate`` is never called (its
  memory grows). Native widths 16, 24, 48, 72, ... decode to 4- or 6-"channel" frames or fail with
  ``from_size == to_size``: such a file raises (read it with ``pyav``). decord's ``len()`` can over-count, so
  the frame count always comes from the PyAV index. decord 0.6 applies the rotation itself.

``auto`` reads with the faster of torchcodec and PyAV on this machine, among those that load: the first ``auto``
read on a machine not measured before times both on a small generated video (about a second) and caches the
winner per machine (:mod:`vitssl.video.reader_choice`; ``vitssl video readers`` says which and why); decord is
never chosen by ``auto``. A CUDA ``device`` reads with torchcodec wherever it loads, unmeasured. No reader ever
pads: an index past the end raises ``ValueError``; a frame of a damaged file past where decoding stops raises
:class:`CorruptVideoError` naming the file and that frame, in every reader alike.

Frames are never resized here (decord's ``width``/``height`` resample differently from torch): the caller crops
and resizes the uint8 ``(T, H, W, 3)`` tensor. This module imports neither torch nor a reader at import time, so
``vitssl video probe`` answers fast.
"""

from __future__ import annotations

import importlib.metadata
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vitssl.errors import SKIP_HINT, CorruptImageError, MissingFileError, UserError
from vitssl.video import reader_choice
from vitssl.video.reader_choice import ReaderChoice

if TYPE_CHECKING:
    import torch

DECODERS: tuple[str, ...] = ("auto", "torchcodec", "decord", "pyav")
READERS: tuple[str, ...] = ("torchcodec", "pyav", "decord")
AUTO_READERS: tuple[str, ...] = ("torchcodec", "pyav")  # what auto measures, preferred first (never decord)
_CACHE_SIZE = 4096  # per-process memo of verified indexes (a few KB each), keyed by path, size and mtime
_OPEN_DECODERS = 8  # torchcodec decoders kept open per process (an exact-mode open scans the whole file)
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


class ReaderUnavailableError(UserError, RuntimeError):
    """A reader asked for by name does not load here (torchcodec without FFmpeg), or cannot read a healthy file
    (decord's 4-"channel" widths): read it with another reader."""


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


_INDEX_CACHE: OrderedDict[tuple[str, int, int], _Index] = OrderedDict()
_DECORD_OK: dict[tuple[str, int, int], bool] = {}  # whether decord gives 3-channel frames for a file
_TC_DECODERS: OrderedDict[tuple[Any, ...], Any] = OrderedDict()  # open torchcodec decoders of this process
_TC_PID: list[int] = [os.getpid()]  # decoders opened in a parent are never used in a forked worker
_AVAILABLE: dict[str, str | None] = {}  # reader -> None when it works, else why not (checked once a process)
_TC_LIKELY: list[bool] = []  # whether torchcodec looks loadable, without importing it (probe's guess)


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


def _lru_get(cache: OrderedDict, key: Any, size: int, make: Callable[[], Any]) -> Any:
    """``cache[key]``, made by ``make()`` on a miss; the least recently used entry goes past ``size``."""
    found = cache.get(key)
    if found is None:
        found = cache[key] = make()
        if len(cache) > size:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return found


def _index(path: str) -> _Index:
    return _lru_get(_INDEX_CACHE, _key(path), _CACHE_SIZE, lambda: _build_index(path))


def _upright(batch: np.ndarray, rotation: int) -> np.ndarray:
    """Frames ``(U, H, W, 3)`` turned ``rotation`` degrees counter-clockwise (the display matrix's angle)."""
    if rotation == 0:
        return batch
    return np.ascontiguousarray(np.rot90(batch, k=rotation // 90, axes=(1, 2)))  # (U, H', W', 3)


# --------------------------------------------------------------------------------------------------------------
# Readers: each returns the frames ``wanted`` (sorted unique, all < index.num_frames) upright, uint8 (U, H, W, 3)
# --------------------------------------------------------------------------------------------------------------


def _read_decord(path: str, wanted: np.ndarray, threads: int = 1) -> np.ndarray | None:
    """Frames ``wanted`` as uint8 ``(U, H, W, 3)`` (decord rotates them), or None where decord mis-decodes."""
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
    """Frames ``wanted``, frame-exact by pts, turned upright.

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
                    out[i] = frame.to_ndarray(format="rgb24")  # (H, W, 3) as stored
                if i >= target:
                    break
            if target not in out:
                raise _corrupt(path, f"frame {target} of {index.num_frames} does not decode")
    except av.FFmpegError as exc:
        raise _corrupt(path, f"decoding failed ({exc.__class__.__name__}: {exc})") from exc
    finally:
        container.close()
    return _upright(np.stack([out[int(w)] for w in wanted]), index.rotation)  # (U, H, W, 3)


def _torchcodec_decoder(path: str, key: tuple[str, int, int], device: str) -> Any:
    """An open exact-mode ``VideoDecoder`` of this process (opening scans the file, so a few stay open)."""
    from torchcodec.decoders import VideoDecoder

    if _TC_PID[0] != os.getpid():  # a forked worker: the parent's decoders are not ours to use
        _TC_DECODERS.clear()
        _TC_PID[0] = os.getpid()

    def open_decoder() -> Any:
        try:
            return VideoDecoder(path, seek_mode="exact", dimension_order="NHWC", device=device)
        except (RuntimeError, ValueError) as exc:
            raise _corrupt(path, f"torchcodec cannot open it ({_last_line(exc)})") from exc

    return _lru_get(_TC_DECODERS, (*key, device), _OPEN_DECODERS, open_decoder)


def _read_torchcodec(path: str, key: tuple[str, int, int], wanted: np.ndarray, device: str = "cpu") -> torch.Tensor:
    """Frames ``wanted`` through TorchCodec (upright: it applies the rotation), on ``device``."""
    decoder = _torchcodec_decoder(path, key, device)
    try:
        return decoder.get_frames_at(wanted.tolist()).data  # (U, H, W, 3)
    except (RuntimeError, IndexError) as exc:
        raise _corrupt(path, f"torchcodec failed to decode frames {wanted.tolist()} ({_last_line(exc)})") from exc


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1][:200] if text else exc.__class__.__name__


# --------------------------------------------------------------------------------------------------------------
# Which readers work here
# --------------------------------------------------------------------------------------------------------------


def reader_problem(name: str) -> str | None:
    """None when reader ``name`` imports and loads here, else why not (one line; checked once a process)."""
    if name not in READERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, not {name!r}")
    if name not in _AVAILABLE:
        module = {"torchcodec": "torchcodec.decoders", "pyav": "av", "decord": "decord"}[name]
        try:
            importlib.import_module(module)
            _AVAILABLE[name] = None
        except Exception as exc:  # torchcodec raises RuntimeError/OSError when FFmpeg's libraries do not load
            hint = " (install FFmpeg's libraries: apt-get install ffmpeg)" if name == "torchcodec" else ""
            _AVAILABLE[name] = f"{name} does not load: {_last_line(exc)}{hint}"
    return _AVAILABLE[name]


def reader_version(name: str) -> str | None:
    """The installed version of reader ``name``'s package, or None."""
    package = {"torchcodec": "torchcodec", "pyav": "av", "decord": "decord"}[name]
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def resolve_decoder(decoder: str, device: str = "cpu") -> str:
    """The reader ``decoder`` names; ``auto`` is :func:`auto_choice`'s (measured once per machine, then cached).

    Args:
        decoder: "auto", "torchcodec", "pyav" or "decord".
        device: where frames are decoded; for a CUDA device ``auto`` is torchcodec wherever it loads.

    Raises:
        ValueError: an unknown name.
        ReaderUnavailableError: a reader asked for by name that does not load here.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, not {decoder!r}")
    if decoder == "auto":
        if str(device) != "cpu":  # NVDEC: only torchcodec decodes on the GPU
            return "torchcodec" if reader_problem("torchcodec") is None else "pyav"
        return auto_choice().reader
    problem = reader_problem(decoder)
    if problem is not None:
        raise ReaderUnavailableError(f"{problem}; or read with decoder=auto / decoder=pyav")
    return decoder


def _measure_here(candidates: Sequence[str]) -> dict[str, float]:
    """Clips/s of each candidate on a generated video, read through :func:`read_frames` with no decoder kept open."""
    return reader_choice.measure_clip_speeds(
        candidates,
        read=lambda path, indices, name: read_frames(path, indices, decoder=name),
        reset=lambda: clear_cache(indexes=False),
    )


def auto_choice(refresh: bool = False, measure: reader_choice.Measure | None = None) -> ReaderChoice:
    """The reader ``decoder="auto"`` reads with on the CPU here, and why (measured, cached, or the only one).

    Args:
        refresh: measure again and rewrite the cache entry of this machine.
        measure: the measurement (candidates -> clips/s); default: random clips of a generated video.
    """
    candidates = [name for name in AUTO_READERS if reader_problem(name) is None]
    return reader_choice.choose_reader(candidates, measure or _measure_here, refresh=refresh)


def _auto_name_fast() -> str:
    """What ``auto`` resolves to, without importing torchcodec (and torch) and without measuring.

    "auto" while this machine has two readers and no measurement yet (the first read measures).
    """
    if "torchcodec" in _AVAILABLE:
        torchcodec = _AVAILABLE["torchcodec"] is None
    else:
        if not _TC_LIKELY:  # once a process: probe asks for every file of a dataset
            import ctypes.util
            import importlib.util

            likely = (
                importlib.util.find_spec("torchcodec") is not None and ctypes.util.find_library("avutil") is not None
            )
            _TC_LIKELY.append(likely)
        torchcodec = _TC_LIKELY[0]
    candidates = [
        name for name in AUTO_READERS if (torchcodec if name == "torchcodec" else reader_problem(name) is None)
    ]
    if not candidates:
        return "pyav"  # probe has read the file with PyAV: it loads
    found = reader_choice.cached_choice(candidates)
    return "auto" if found is None else found.reader


# --------------------------------------------------------------------------------------------------------------
# The public calls
# --------------------------------------------------------------------------------------------------------------


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


def probe(path: str | os.PathLike, decoder: str = "auto", full: bool = False) -> VideoInfo:
    """Frames that decode, whether the file is damaged, frame rate, upright size, codec and the reader to use.

    The frame count is that of the demuxed packets whose last GOP decodes, never decord's ``len()`` (which can
    over-count). A file whose decoding stops before the end its header (or its packets) state is reported
    ``damaged`` with ``error`` saying at which frame; :func:`read_frames` raises for frames past that point.

    Args:
        path: a video file.
        decoder: "auto" (reported as the reader this machine's measurement chose, "auto" before the first
            measurement: probe never measures), or "torchcodec" / "pyav" / "decord" to check that this reader
            reads it ("decord" fails where decord mis-decodes the file).
        full: also decode every frame (slow: the whole file), to find damage in the middle of a file.

    Raises:
        MissingFileError: no such file.
        CorruptVideoError: not a video, or no frame decodes; the message names the file.
        ReaderUnavailableError: the named reader does not load here, or cannot read this (healthy) file.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, not {decoder!r}")
    path = str(path)
    key = _key(path)
    index = _index(path)
    used = _auto_name_fast() if decoder == "auto" else resolve_decoder(decoder)
    if decoder == "decord" and not _decord_works(key, path):  # the file is fine, the reader is not
        raise ReaderUnavailableError(
            f"decord cannot read video {path}: it does not decode it as 3-channel frames (read it with decoder='pyav')"
        )
    error = index.error
    if error is None and full:
        error = _full_check(path, index)
    width, height = (index.height, index.width) if index.rotation in (90, 270) else (index.width, index.height)
    fps = index.fps
    return VideoInfo(
        path=path,
        num_frames=index.num_frames,
        fps=fps,
        width=width,
        height=height,
        duration=index.num_frames / fps if fps > 0 else 0.0,
        codec=index.codec,
        decoder=used,
        damaged=error is not None,
        header_frames=index.header_frames,
        error=error,
        rotation=index.rotation,
    )


def _decord_works(key: tuple[str, int, int], path: str) -> bool:
    """Whether decord decodes this file as 3-channel frames (checked on frame 0, memoised per file)."""
    ok = _DECORD_OK.get(key)
    if ok is None:
        ok = _read_decord(path, np.zeros(1, dtype=np.int64)) is not None
        _DECORD_OK[key] = ok
    return ok


def read_frames(
    path: str | os.PathLike, indices: Sequence[int], decoder: str = "auto", device: str = "cpu"
) -> torch.Tensor:
    """The frames at ``indices``, in that order (duplicates allowed), upright, as uint8 ``(T, H, W, 3)``.

    Args:
        path: a video file.
        indices: frame indices in ``[0, num_frames)``, any order.
        decoder: "auto" (the faster of torchcodec and PyAV here: measured on the first read on a machine not
            measured before, about a second, then cached per machine; torchcodec for a CUDA device),
            "torchcodec", "decord" or "pyav".
        device: where torchcodec decodes and returns the frames ("cuda" for NVDEC); other readers: "cpu" only.

    Raises:
        MissingFileError: no such file.
        CorruptVideoError: not a video, or a wanted frame does not decode (a damaged file: the message names the
            file and the frame where decoding stops).
        ValueError: an index outside the video, an unknown decoder, or a device a CPU reader cannot use.
        ReaderUnavailableError: the named reader does not load here.
    """
    import torch

    reader = resolve_decoder(decoder, str(device))
    if reader != "torchcodec" and str(device) != "cpu":
        raise ValueError(f"decoder {reader!r} decodes on the CPU only; use decoder=torchcodec for device={device}")
    path = str(path)
    wanted = np.asarray(indices, dtype=np.int64).reshape(-1)  # (T,)
    if wanted.size and wanted.min() < 0:
        raise ValueError(f"frame indices must be >= 0, got {int(wanted.min())} for {path}")
    key = _key(path)
    index = _index(path)
    if wanted.size == 0:
        h, w = (index.width, index.height) if index.rotation in (90, 270) else (index.height, index.width)
        return torch.empty((0, h, w, 3), dtype=torch.uint8)
    beyond = int(wanted.max())
    if beyond >= index.num_frames:
        if index.damaged:
            raise _corrupt(path, f"frame {beyond} does not decode: {index.error}")
        raise ValueError(f"frame index {beyond} is past the end of {path} ({index.num_frames} frames)")
    unique = np.unique(wanted)  # (U,) sorted
    order = torch.from_numpy(np.searchsorted(unique, wanted))  # (T,) position of each wanted frame in the batch
    if reader == "torchcodec":
        return _read_torchcodec(path, key, unique, str(device))[order.to(device)]  # (T, H, W, 3)
    if reader == "decord":
        batch = _read_decord(path, unique)
        _DECORD_OK[key] = batch is not None
        if batch is None:
            raise _corrupt(path, "decord does not decode it as 3-channel frames (read it with decoder='pyav')")
    else:
        batch = _read_pyav(path, unique, index)
    return torch.from_numpy(np.ascontiguousarray(batch))[order]  # (T, H, W, 3)


def measure_readers(path: str | os.PathLike, clip: int = 8, clips: int = 8, seconds: float = 2.0) -> list[dict]:
    """Availability, version and frames/s of every reader on one file: sequential (all frames in order, at most
    ``seconds`` of decoding) and random access (``clips`` clips of ``clip`` consecutive frames at random starts).

    Returns:
        One dict per reader: ``name``, ``version``, ``available``, ``problem`` and, where it reads the file,
        ``sequential_fps`` / ``random_fps`` (frames per second, first open included) or ``error``.
    """
    path = str(path)
    info = probe(path)
    rng = np.random.default_rng(0)
    usable = info.num_frames
    starts = rng.integers(0, max(usable - clip, 0) + 1, size=clips)
    rows = []
    for name in READERS:
        row: dict[str, Any] = {"name": name, "version": reader_version(name), "problem": reader_problem(name)}
        row["available"] = row["problem"] is None
        if row["available"]:
            try:
                clear_cache(indexes=False)
                began, done = time.perf_counter(), 0
                for start in range(0, usable, 32):  # sequential: chunks in order, bounded by `seconds`
                    done += len(read_frames(path, range(start, min(start + 32, usable)), decoder=name))
                    if time.perf_counter() - began > seconds:
                        break
                row["sequential_fps"] = done / (time.perf_counter() - began)
                clear_cache(indexes=False)
                began = time.perf_counter()
                for s in starts:
                    read_frames(path, range(int(s), min(int(s) + clip, usable)), decoder=name)
                row["random_fps"] = sum(min(int(s) + clip, usable) - int(s) for s in starts) / (
                    time.perf_counter() - began
                )
            except (CorruptImageError, ValueError) as exc:
                row["error"] = str(exc).replace(f" ({SKIP_HINT})", "")
        rows.append(row)
    return rows


def clear_cache(indexes: bool = True) -> None:
    """Forget memoised frame indexes and open decoders (tests; a process that rewrites files in place).

    Args:
        indexes: also forget the frame indexes (False: only the open torchcodec decoders and decord checks).
    """
    if indexes:
        _INDEX_CACHE.clear()
    _DECORD_OK.clear()
    _TC_DECODERS.clear()


__all__ = [
    "AUTO_READERS",
    "DECODERS",
    "READERS",
    "CorruptVideoError",
    "ReaderChoice",
    "ReaderUnavailableError",
    "VideoInfo",
    "auto_choice",
    "clear_cache",
    "measure_readers",
    "probe",
    "read_frames",
    "reader_problem",
    "reader_version",
    "resolve_decoder",
]
