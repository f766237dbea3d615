"""Which reader ``decoder="auto"`` reads with: chosen by a short measurement, cached per machine.

Which of TorchCodec and PyAV samples clips faster depends on the machine (CPU, FFmpeg build, the reader
versions): on some CPUs PyAV is faster, because an exact-mode TorchCodec open scans the file. So the first
``auto`` read of a process on a machine not seen before times both on a small generated video (random clips of
8 consecutive frames, the decoder opened again for each clip, as when a training run samples many files; about
a second in all) and keeps the winner in a JSON file:

* ``$VITSSL_CACHE_DIR/video_readers.json``, else ``$XDG_CACHE_HOME/vitssl/...``, else ``~/.cache/vitssl/...``;
* one entry per machine key: the reader versions, the FFmpeg libraries (PyAV's own, and the system's that
  TorchCodec loads), the CPU model and core count. A home folder shared by the nodes of a cluster holds one entry
  per kind of node; a new reader version, FFmpeg or CPU measures again;
* written atomically (:mod:`vitssl.io`) under a lock, so DataLoader workers starting together measure once and
  the others read the result; a file that does not parse is ignored and rewritten.

Readers are compared by clips per second; within 10 % of each other the earlier one in the preference order
(TorchCodec, the PyTorch ecosystem's reader, then PyAV) wins, so noise never flips the choice between two
equals. This module knows nothing of how frames are read: the caller passes the candidates that load and a
``measure`` callable (tests inject figures).
"""

from __future__ import annotations

import contextlib
import ctypes.util
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from vitssl.io import write_json

_logger = logging.getLogger(__name__)

CACHE_NAME = "video_readers.json"
METHOD = 1  # version of the measurement below: part of the key, so changing it measures again
MARGIN = 1.10  # a reader must be this much faster than an earlier-preferred one to be chosen over it
_MAX_ENTRIES = 64  # machine keys kept in one cache file (most recent last)
_SAMPLE_FRAMES = 150  # 5 s at 30 fps: an exact-mode open scans every packet, so the sample is not too short
_PACKAGES = {"torchcodec": "torchcodec", "pyav": "av", "decord": "decord"}

Measure = Callable[[Sequence[str]], Mapping[str, float]]  # candidates -> clips/s of those that read (others left out)


@dataclass(frozen=True)
class ReaderChoice:
    """What ``auto`` reads with on this machine, and why."""

    reader: str
    source: str  # "measured" (just now), "cache" (an earlier measurement), "only" (one reader loads), "fallback"
    figures: dict[str, float] = field(default_factory=dict)  # clips/s of each reader measured
    measured_at: str | None = None  # UTC, ISO 8601
    cache_file: str | None = None
    key: dict[str, Any] = field(default_factory=dict)
    note: str | None = None  # why the measurement did not decide (fallback), or why the cache was not written

    def describe(self) -> str:
        """The reader and why, e.g. ``pyav (measured now: pyav 61.0 clips/s, torchcodec 44.9 clips/s; cached in F)``."""
        figures = ", ".join(f"{name} {fps:.1f} clips/s" for name, fps in self.figures.items())
        if self.source == "only":
            return f"{self.reader} (the only reader that loads here)"
        if self.source == "fallback":
            return f"{self.reader} (first in preference; the measurement failed: {self.note})"
        if self.source == "cache":
            return f"{self.reader} (measured {self.measured_at}: {figures}; from the cache {self.cache_file})"
        cached = f"cached in {self.cache_file}" if self.cache_file else self.note
        return f"{self.reader} (measured now: {figures}; {cached})"


_MEMO: dict[str, ReaderChoice | None] = {}  # key (JSON) -> choice of this process; None: not measured yet
_FACTS: dict[str, Any] = {}
_VERSIONS: dict[str, str | None] = {}  # package versions, read once a process (probe asks per file)


def cache_path() -> Path:
    """The cache file: ``$VITSSL_CACHE_DIR``, else ``$XDG_CACHE_HOME/vitssl``, else ``~/.cache/vitssl``."""
    folder = os.environ.get("VITSSL_CACHE_DIR")
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "vitssl")
    return Path(folder) / CACHE_NAME


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "Hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _machine_facts() -> dict[str, Any]:
    """CPU model, core count and FFmpeg libraries (once a process; imports PyAV, never torch)."""
    if not _FACTS:
        ffmpeg: dict[str, str | None] = {"system": ctypes.util.find_library("avcodec")}  # what TorchCodec loads
        try:
            import av

            ffmpeg["pyav"] = str(getattr(av, "ffmpeg_version_info", None) or av.library_versions.get("libavcodec"))
        except Exception:  # PyAV missing or broken: no version to key on
            ffmpeg["pyav"] = None
        _FACTS.update(cpu=_cpu_model(), cores=os.cpu_count(), ffmpeg=ffmpeg)
    return dict(_FACTS)


def machine_key(candidates: Sequence[str]) -> dict[str, Any]:
    """What a measurement holds for: the candidates' versions, FFmpeg, CPU model and cores, the method."""
    for name in candidates:
        if name not in _VERSIONS:
            try:
                _VERSIONS[name] = importlib.metadata.version(_PACKAGES.get(name, name))
            except importlib.metadata.PackageNotFoundError:
                _VERSIONS[name] = None
    return {"method": METHOD, "readers": {name: _VERSIONS[name] for name in candidates}, **_machine_facts()}


def _key_text(key: Mapping[str, Any]) -> str:
    return json.dumps(key, sort_keys=True)


def _read_entries(path: Path) -> list[dict[str, Any]]:
    """The well-formed entries of the cache file; [] for a missing file, and (logged) for one that does not parse."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        _logger.warning("ignoring the video reader cache %s (%s); it is measured again and rewritten", path, exc)
        return []
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        _logger.warning("ignoring the video reader cache %s (no list of entries); it is rewritten", path)
        return []
    good = []
    for entry in entries:
        if (
            isinstance(entry, dict)
            and isinstance(entry.get("key"), dict)
            and isinstance(entry.get("reader"), str)
            and isinstance(entry.get("figures"), dict)
            and all(isinstance(v, (int, float)) for v in entry["figures"].values())
        ):
            good.append(entry)
    return good


def _lookup(entries: list[dict[str, Any]], key: Mapping[str, Any], candidates: Sequence[str]) -> dict | None:
    text = _key_text(key)
    for entry in reversed(entries):
        if _key_text(entry["key"]) == text and entry["reader"] in candidates:
            return entry
    return None


def _from_entry(entry: Mapping[str, Any], source: str, path: Path) -> ReaderChoice:
    figures = {str(k): float(v) for k, v in entry["figures"].items()}
    return ReaderChoice(entry["reader"], source, figures, entry.get("measured_at"), str(path), dict(entry["key"]))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside the cache file (processes of one machine measure one at a time); best effort."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115 (closed below)
    except (ImportError, OSError):  # no fcntl (Windows) or a folder we cannot write: measure unlocked
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        handle.close()  # releases the lock


def pick(figures: Mapping[str, float], preference: Sequence[str]) -> str:
    """The fastest reader of ``figures``; within :data:`MARGIN` of the fastest, the earliest in ``preference``."""
    best = max(figures.values())
    return next(name for name in preference if name in figures and figures[name] * MARGIN >= best)


def cached_choice(candidates: Sequence[str]) -> ReaderChoice | None:
    """The choice this process made or the cache file holds for this machine, without measuring; None if none.

    Cheap (no torch is imported): what ``probe`` reports for ``auto``.
    """
    if len(candidates) == 1:
        return ReaderChoice(candidates[0], "only")
    key = machine_key(candidates)
    text = _key_text(key)
    if text not in _MEMO:
        path = cache_path()
        entry = _lookup(_read_entries(path), key, candidates)
        _MEMO[text] = None if entry is None else _from_entry(entry, "cache", path)
    return _MEMO[text]


def choose_reader(candidates: Sequence[str], measure: Measure, refresh: bool = False) -> ReaderChoice:
    """The reader ``auto`` uses: from this process's memo or the cache file, else measured now and cached.

    Args:
        candidates: readers that load here, in order of preference (never empty).
        measure: times the candidates, returning clips/s of each one that read the sample (failures left out).
        refresh: measure again even when the cache holds a choice (``vitssl video readers --remeasure``).
    """
    if not candidates:
        raise ValueError("no video reader loads here: install PyAV (pip install av)")
    if len(candidates) == 1:
        return ReaderChoice(candidates[0], "only")
    key = machine_key(candidates)
    text = _key_text(key)
    found = None if refresh else _MEMO.get(text)
    if found is not None:  # a failed measurement too: it is not retried on every read
        return found
    path = cache_path()
    with _locked(path):
        entry = None if refresh else _lookup(_read_entries(path), key, candidates)  # another process may have
        if entry is not None:
            choice = _from_entry(entry, "cache", path)
        else:
            choice = _measure_and_store(candidates, measure, key, path)
    _MEMO[text] = choice
    return choice


def _measure_and_store(candidates: Sequence[str], measure: Measure, key: dict[str, Any], path: Path) -> ReaderChoice:
    began = time.perf_counter()
    try:
        figures = {name: float(fps) for name, fps in measure(candidates).items() if name in candidates and fps > 0}
    except Exception as exc:  # the measurement is an optimisation: never let it stop a read
        figures, note = {}, f"{exc.__class__.__name__}: {exc}"
    else:
        note = "no reader read the sample video"
    if not figures:
        _logger.warning("video readers not measured (%s); decoder=auto reads with %s", note, candidates[0])
        return ReaderChoice(candidates[0], "fallback", note=note, key=key)
    figures = {name: round(fps, 2) for name, fps in sorted(figures.items(), key=lambda kv: -kv[1])}
    reader = pick(figures, candidates)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    entry = {"key": key, "reader": reader, "figures": figures, "measured_at": stamp}
    entry["seconds"] = round(time.perf_counter() - began, 3)
    others = [e for e in _read_entries(path) if _key_text(e["key"]) != _key_text(key)]
    try:
        write_json({"entries": [*others[-(_MAX_ENTRIES - 1) :], entry]}, path)
    except OSError as exc:  # a read-only home: the choice holds for this process only
        _logger.warning(
            "cannot write the video reader cache %s (%s); set VITSSL_CACHE_DIR to a writable folder", path, exc
        )
        return ReaderChoice(reader, "measured", figures, stamp, None, key, note=f"not cached: {exc}")
    _logger.info("decoder=auto reads with %s on this machine (clips/s: %s); cached in %s", reader, figures, path)
    return ReaderChoice(reader, "measured", figures, stamp, str(path), key)


# --------------------------------------------------------------------------------------------------------------
# The measurement: random clips of a small generated video
# --------------------------------------------------------------------------------------------------------------


def write_sample_video(
    path: Path, frames: int = _SAMPLE_FRAMES, width: int = 320, height: int = 240, gop: int = 32
) -> Path:
    """A textured h264 mp4 (a grain that pans 2 pixels a frame: a bitrate like camera footage), for timing."""
    import av

    rng = np.random.default_rng(0)
    grain = rng.integers(0, 256, size=(height // 4 + 1, (width + 2 * frames) // 4 + 1, 3), dtype=np.uint8)
    grain = np.repeat(np.repeat(grain, 4, axis=0), 4, axis=1)[:height]  # (H, W + 2 * frames, 3)
    with av.open(str(path), "w") as container:
        try:
            stream = container.add_stream("libx264", rate=30, options={"preset": "veryfast", "crf": "23"})
        except Exception:  # a PyAV build without x264
            stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.gop_size = gop
        for i in range(frames):
            image = np.ascontiguousarray(grain[:, 2 * i : 2 * i + width])  # (H, W, 3)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def measure_clip_speeds(
    candidates: Sequence[str],
    read: Callable[[str, Sequence[int], str], Any],
    reset: Callable[[], None],
    clips: int = 4,
    clip_len: int = 8,
    rounds: int = 3,
) -> dict[str, float]:
    """Clips/s of each candidate on :func:`write_sample_video`'s video: the median of ``clips x rounds`` timings.

    Each reader reads one frame first (imports, library loads and the file's index are not timed); the readers
    take turns, in alternating order, so that a burst of other load on the machine hits them alike.

    Args:
        candidates: reader names.
        read: ``read(path, indices, reader)`` returns the frames (``vitssl.video.io.read_frames``).
        reset: closes open decoders before each clip (each clip pays its open, as with many files).
        clips: random clip starts per round.
        clip_len: consecutive frames a clip.
        rounds: turns each reader takes.

    Returns:
        reader -> clips per second, for the readers that read the sample (a reader that raises is left out).
    """
    timings: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="vitssl-readers-") as folder:
        path = str(write_sample_video(Path(folder) / "sample.mp4"))
        frames = _SAMPLE_FRAMES
        starts = np.random.default_rng(0).integers(0, frames - clip_len + 1, size=clips).tolist()
        working = []
        for name in candidates:
            try:
                read(path, [0], name)  # warm up: imports and library loads are not what is compared
                working.append(name)
                timings[name] = []
            except Exception as exc:
                _logger.warning("video reader %s cannot read the sample video (%s): not measured", name, exc)
        for turn in range(rounds):
            for name in working if turn % 2 == 0 else working[::-1]:
                for start in starts:
                    if name not in timings:
                        break
                    reset()
                    began = time.perf_counter()
                    try:
                        read(path, range(start, start + clip_len), name)
                    except Exception as exc:
                        _logger.warning("video reader %s failed on the sample video (%s): not chosen", name, exc)
                        del timings[name]
                        break
                    timings[name].append(time.perf_counter() - began)
    return {name: 1.0 / max(statistics.median(times), 1e-9) for name, times in timings.items()}


def forget() -> None:
    """Forget this process's choices and reader versions (tests; after installing a reader in a running process)."""
    _MEMO.clear()
    _VERSIONS.clear()


__all__ = [
    "CACHE_NAME",
    "MARGIN",
    "METHOD",
    "ReaderChoice",
    "cache_path",
    "cached_choice",
    "choose_reader",
    "forget",
    "machine_key",
    "measure_clip_speeds",
    "pick",
    "write_sample_video",
]
