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
and resizes the uint8 ``(T, H, W, 3)`` tensor. This package imports neither torch nor a reader at import time, so
``vitssl video probe`` answers fast.

The package holds the public calls; :mod:`~vitssl.video.io.probing` indexes files and finds damage,
:mod:`~vitssl.video.io.readers` holds the readers and says which load here, :mod:`~vitssl.video.io.cache` the
per-process memos (frame indexes, open decoders).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from vitssl.errors import SKIP_HINT, CorruptImageError
from vitssl.video import reader_choice
from vitssl.video.io.cache import _DECORD_OK as _DECORD_OK
from vitssl.video.io.cache import _INDEX_CACHE as _INDEX_CACHE
from vitssl.video.io.cache import _TC_DECODERS as _TC_DECODERS
from vitssl.video.io.cache import _lru_get as _lru_get
from vitssl.video.io.cache import clear_cache
from vitssl.video.io.probing import CorruptVideoError, VideoInfo, _corrupt, _full_check, _index, _key
from vitssl.video.io.probing import _build_index as _build_index
from vitssl.video.io.probing import _decode as _decode
from vitssl.video.io.probing import _Index as _Index
from vitssl.video.io.probing import _open_av as _open_av
from vitssl.video.io.readers import (
    _AVAILABLE,
    _TC_LIKELY,
    AUTO_READERS,
    DECODERS,
    READERS,
    ReaderUnavailableError,
    _decord_works,
    _read_decord,
    _read_pyav,
    _read_torchcodec,
    reader_problem,
    reader_version,
)
from vitssl.video.io.readers import _upright as _upright
from vitssl.video.reader_choice import ReaderChoice

if TYPE_CHECKING:
    import torch


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
