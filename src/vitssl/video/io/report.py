"""What ``vitssl video probe`` and ``vitssl video readers`` report, as library calls.

:func:`probe_files` probes many files, reporting a file where nothing decodes as damaged instead of raising;
:func:`readers_report` says which readers load here, how fast each reads a file, and which one ``auto`` uses.
Like the rest of :mod:`vitssl.video.io`, importing this imports no torch (``probe`` answers in about a second).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vitssl.errors import SKIP_HINT
from vitssl.video.reader_choice import ReaderChoice


@dataclass(frozen=True)
class ProbeReport:
    """One entry per file probed: :class:`~vitssl.video.io.VideoInfo` as a dict, or a damaged file's entry."""

    entries: list[dict[str, Any]]

    @property
    def damaged(self) -> int:
        """How many of the files are damaged."""
        return sum(bool(e["damaged"]) for e in self.entries)

    def lines(self) -> list[str]:
        """One line per file: frames, fps, upright size, duration, codec, reader; damage and where it stops."""
        return [format_probe(e) for e in self.entries]


def format_probe(entry: dict[str, Any]) -> str:
    """The one-line description of a :class:`ProbeReport` entry."""
    if "codec" not in entry:  # nothing decodes
        return f"{entry['path']}: DAMAGED: {entry['error']}"
    line = (
        f"{entry['path']}: {entry['num_frames']} frames, {entry['fps']:.2f} fps, {entry['width']}x{entry['height']}, "
        f"{entry['duration']:.2f} s, {entry['codec']}, {entry['decoder']}"
    )
    if entry["rotation"]:
        line += f", rotated {entry['rotation']}"
    return f"{line}, DAMAGED: {entry['error']}" if entry["damaged"] else line


def probe_files(paths: Iterable[str | os.PathLike], decoder: str = "auto", full: bool = False) -> ProbeReport:
    """:func:`~vitssl.video.io.probe` every file; one where no frame decodes is an entry marked damaged.

    Args:
        paths: video files.
        decoder: the reader to check, as for ``probe``.
        full: decode every frame, to find damage inside a file (slow).

    Raises:
        MissingFileError: a file does not exist (before any entry is returned).
        ReaderUnavailableError: the named reader does not load here or cannot read a healthy file.
    """
    from vitssl.video.io import CorruptVideoError, probe

    entries: list[dict[str, Any]] = []
    for path in paths:
        try:
            info = probe(path, decoder=decoder, full=full)
        except CorruptVideoError as err:  # nothing decodes: as damaged as a file gets
            message = str(err).replace(f" ({SKIP_HINT})", "")
            entries.append({"path": str(path), "num_frames": 0, "damaged": True, "decoded_frames": 0, "error": message})
            continue
        entries.append(dataclasses.asdict(info))
    return ProbeReport(entries)


@dataclass(frozen=True)
class ReadersReport:
    """The readers here (``rows``: name, version, problem and, measured on ``file``, frames/s) and auto's choice."""

    rows: list[dict[str, Any]]
    choice: ReaderChoice
    file: str | None = None

    def as_json(self) -> dict[str, Any]:
        """What ``vitssl video readers --json`` prints."""
        return {"auto": self.choice.reader, "auto_choice": dataclasses.asdict(self.choice), "readers": self.rows}

    def lines(self) -> list[str]:
        """A line per reader, then which reader ``decoder=auto`` uses and why."""
        out = []
        for row in self.rows:
            state = "available" if row["problem"] is None else f"unavailable: {row['problem']}"
            line = f"{row['name']:<10} {row['version'] or '-':<12} {state}"
            if "sequential_fps" in row:
                line += (
                    f"; sequential {row['sequential_fps']:.0f} frames/s, random clips {row['random_fps']:.0f} frames/s"
                )
            elif "error" in row:
                line += f"; cannot read {self.file}: {row['error']}"
            out.append(line)
        out.append(f"decoder=auto reads with {self.choice.describe()}")
        return out


def readers_report(
    file: str | os.PathLike | None = None, seconds: float = 2.0, remeasure: bool = False
) -> ReadersReport:
    """Which readers load here (with ``file``: each one's frames/s on it) and the one ``decoder="auto"`` uses.

    Args:
        file: a video to measure the readers on (:func:`~vitssl.video.io.measure_readers`); None lists them only.
        seconds: at most this long decoding ``file`` in order, per reader.
        remeasure: measure auto's choice again and rewrite this machine's cache entry.
    """
    from vitssl.video.io import READERS, auto_choice, measure_readers, reader_problem, reader_version

    if file is None:
        rows = [{"name": n, "version": reader_version(n), "problem": reader_problem(n)} for n in READERS]
    else:
        rows = measure_readers(file, seconds=seconds)
    choice = auto_choice(refresh=remeasure)  # measured here unless this machine's cache holds it
    return ReadersReport(rows, choice, None if file is None else str(file))
