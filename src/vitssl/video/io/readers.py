"""The three frame readers behind :func:`vitssl.video.io.read_frames` (TorchCodec, PyAV, decord), and which of
them load here. The one module that imports decord and TorchCodec's decoder.

Each reader returns the frames ``wanted`` (sorted unique indices, all below the file's verified frame count)
upright, as uint8 ``(U, H, W, 3)``; they never resize.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from vitssl.errors import UserError
from vitssl.video.io.cache import _DECORD_OK, _OPEN_DECODERS, _TC_DECODERS, _TC_PID, _lru_get
from vitssl.video.io.probing import _corrupt, _decode, _Index, _open_av

if TYPE_CHECKING:
    import torch

DECODERS: tuple[str, ...] = ("auto", "torchcodec", "decord", "pyav")
READERS: tuple[str, ...] = ("torchcodec", "pyav", "decord")
AUTO_READERS: tuple[str, ...] = ("torchcodec", "pyav")  # what auto measures, preferred first (never decord)
_AVAILABLE: dict[str, str | None] = {}  # reader -> None when it works, else why not (checked once a process)
_TC_LIKELY: list[bool] = []  # whether torchcodec looks loadable, without importing it (probe's guess)


class ReaderUnavailableError(UserError, RuntimeError):
    """A reader asked for by name does not load here (torchcodec without FFmpeg), or cannot read a healthy file
    (decord's 4-"channel" widths): read it with another reader."""


def _upright(batch: np.ndarray, rotation: int) -> np.ndarray:
    """Frames ``(U, H, W, 3)`` turned ``rotation`` degrees counter-clockwise (the display matrix's angle)."""
    if rotation == 0:
        return batch
    return np.ascontiguousarray(np.rot90(batch, k=rotation // 90, axes=(1, 2)))  # (U, H', W', 3)


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


def _decord_works(key: tuple[str, int, int], path: str) -> bool:
    """Whether decord decodes this file as 3-channel frames (checked on frame 0, memoised per file)."""
    ok = _DECORD_OK.get(key)
    if ok is None:
        ok = _read_decord(path, np.zeros(1, dtype=np.int64)) is not None
        _DECORD_OK[key] = ok
    return ok
