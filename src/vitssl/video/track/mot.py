"""MOTChallenge I/O: the MOT text format and sequences (an image folder or a video file) with their boxes.

The text format has one box per line, ``frame,id,left,top,width,height,conf,x,y,z``, frames 1-based, boxes in
pixels. Ground truth (``gt/gt.txt``) puts the "consider" flag in column 7 (0 = ignore), the class in column 8
(1 = pedestrian) and the visibility in column 9; detections (``det/det.txt``) have id -1 and a score in column 7;
tracker results have ``conf`` and ``-1,-1,-1``. :func:`read_mot` always returns ten columns.

A sequence on disk is either the MOTChallenge layout::

    SEQ/seqinfo.ini        [Sequence] name, imDir, frameRate, seqLength, imWidth, imHeight, imExt
    SEQ/img1/000001.jpg    frames, 1-based, zero-padded to six digits
    SEQ/gt/gt.txt          optional ground truth
    SEQ/det/det.txt        optional public detections

or a video file (mp4, mkv, avi, ...) with its ground truth beside it as ``STEM.gt.txt`` (or ``STEM.txt``) and
optional detections as ``STEM.det.txt``.
"""

from __future__ import annotations

import configparser
import dataclasses
import io
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from vitssl.errors import DataError, MissingFileError
from vitssl.io import PathLike, atomic_write
from vitssl.video.files import VIDEO_EXTENSIONS, is_video_file

MOT_COLUMNS = ("frame", "id", "left", "top", "width", "height", "conf", "x", "y", "z")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# Values given to the columns a short line leaves out: "consider" / score 1, the rest -1 (MOT's "unused").
_FILL = np.array([0, 0, 0, 0, 0, 0, 1, -1, -1, -1], dtype=np.float64)
_SPLIT = re.compile(r"[,\s]+")


def read_mot(path: PathLike) -> np.ndarray:
    """Read a MOT text file into a float64 ``(N, 10)`` array, rows in file order.

    Lines may have 6 to 10 comma- (or space-) separated numbers; missing columns become 1 for ``conf`` and -1
    for the others. Blank lines are skipped.

    Args:
        path: a ``gt.txt``, ``det.txt`` or results file.

    Raises:
        MissingFileError: no such file.
        DataError: a line that is not 6-10 numbers, a frame that is not an integer >= 1, an id that is not an
            integer, a non-finite box or a negative width or height; the message names ``file:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"MOT file {path} does not exist (expected frame,id,left,top,width,height,...)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read MOT file {path}: {err}") from None
    rows = _read_fast(text)
    if rows is None or not _valid(rows).all():
        rows = _read_lines(text, path)  # slow, line by line: names the first bad line
    return as_mot_rows(rows)  # (N, 10)


def _read_fast(text: str) -> np.ndarray | None:
    """The rows of a well-formed comma-separated file with one column count (numpy's parser), else None."""
    if not text.strip():
        return np.zeros((0, 10))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = np.loadtxt(io.StringIO(text), delimiter=",", ndmin=2, comments=None, dtype=np.float64)
    except ValueError:
        return None
    return rows if 6 <= rows.shape[1] <= 10 else None


def _valid(rows: np.ndarray) -> np.ndarray:
    """Per row: finite frame, id and box, integer frame >= 1, integer id, non-negative width and height."""
    head = rows[:, :6]
    with np.errstate(invalid="ignore"):
        return (
            np.isfinite(head).all(axis=1)
            & (head[:, 0] >= 1)
            & (head[:, 0] == np.round(head[:, 0]))
            & (head[:, 1] == np.round(head[:, 1]))
            & (head[:, 4] >= 0)
            & (head[:, 5] >= 0)
        )


def _read_lines(text: str, path: Path) -> np.ndarray:
    """Parse line by line (commas or spaces, 6-10 columns per line); the first bad line raises DataError."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        fields = [f for f in _SPLIT.split(line) if f]
        where = f"{path}:{number}"
        if not 6 <= len(fields) <= 10:
            raise DataError(f"{where}: expected 6 to 10 numbers (frame,id,left,top,width,height,...), got {line!r}")
        try:
            values = [float(f) for f in fields]
        except ValueError:
            raise DataError(f"{where}: not a number in {line!r}; MOT lines are comma-separated numbers") from None
        row = _FILL.copy()
        row[: len(values)] = values
        frame, track_id, _, _, width, height = row[:6]
        if not np.isfinite(row[:6]).all():
            raise DataError(f"{where}: non-finite value in {line!r}")
        if frame < 1 or frame != int(frame):
            raise DataError(f"{where}: frame must be an integer >= 1 (frames are 1-based), got {fields[0]!r}")
        if track_id != int(track_id):
            raise DataError(f"{where}: id must be an integer, got {fields[1]!r}")
        if width < 0 or height < 0:
            raise DataError(f"{where}: negative box size {width:g}x{height:g}")
        rows.append(row)
    return np.stack(rows) if rows else np.zeros((0, 10))  # (N, 10)


def as_mot_rows(rows: np.ndarray | Iterable[Iterable[float]]) -> np.ndarray:
    """``rows`` (``(N, 6..10)``) as float64 ``(N, 10)``, missing columns filled as :func:`read_mot` fills them.

    Raises:
        ValueError: not a 2-D array of 6 to 10 columns.
    """
    array = np.asarray(list(rows) if not isinstance(rows, np.ndarray) else rows, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 10), dtype=np.float64)
    if array.ndim != 2 or not 6 <= array.shape[1] <= 10:
        raise ValueError(f"MOT rows must be (N, 6..10) frame,id,left,top,width,height,..., got shape {array.shape}")
    full = np.tile(_FILL, (len(array), 1))
    full[:, : array.shape[1]] = array
    return full  # (N, 10)


# "12.0," -> "12,": Python's repr is the shortest text that reads back exactly; integers lose the ".0"
_TRAILING_ZERO = re.compile(r"\.0(?=[,\n])")


def format_mot(rows: np.ndarray | Iterable[Iterable[float]]) -> str:
    """The MOT text of ``rows`` (``(N, 6..10)``; missing columns filled as in :func:`read_mot`), ten columns.

    Frame and id are written as integers, the other values as the shortest text that reads back exactly.
    """
    full = as_mot_rows(rows)
    if len(full) == 0:
        return ""
    heads = full[:, :2].astype(np.int64).tolist()
    lines = [f"{f},{i},{','.join(map(repr, rest))}\n" for (f, i), rest in zip(heads, full[:, 2:].tolist())]
    return _TRAILING_ZERO.sub("", "".join(lines))


def write_mot(path: PathLike, rows: np.ndarray | Iterable[Iterable[float]]) -> Path:
    """Write ``rows`` as a MOT text file atomically (ten columns, frame and id as integers, exact floats).

    Args:
        path: destination file; its folder is created.
        rows: ``(N, 6..10)`` rows ``frame,id,left,top,width,height[,conf,x,y,z]``.

    Returns:
        ``path`` as a Path.
    """
    return atomic_write(path, format_mot(rows))


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """``(N, 4)`` left, top, width, height to left, top, right, bottom."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)  # (N, 4)


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """``(N, 4)`` left, top, right, bottom to left, top, width, height."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)  # (N, 4)


@dataclasses.dataclass
class Sequence:
    """One tracking sequence: where its frames are, its boxes and its geometry.

    Exactly one of ``frame_paths`` (an image sequence) and ``video_path`` is set. ``gt`` and ``det`` are
    :func:`read_mot` arrays, or None when the sequence has none.
    """

    name: str
    root: Path  # the sequence folder (or the video's folder)
    frame_paths: list[Path] | None
    video_path: Path | None
    gt: np.ndarray | None
    det: np.ndarray | None
    fps: float
    width: int
    height: int
    length: int  # number of frames

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i`` (1-based, as in the MOT files) as uint8 ``(H, W, 3)`` RGB."""
        if not 1 <= i <= self.length:
            raise IndexError(f"frame {i} is outside sequence {self.name} (frames 1..{self.length})")
        if self.frame_paths is not None:
            return _read_image(self.frame_paths[i - 1])
        from vitssl.video.io import read_frames

        return read_frames(self.video_path, [i - 1])[0].numpy()  # (H, W, 3)

    def frames(self) -> Iterable[tuple[int, np.ndarray]]:
        """``(i, frame)`` for every frame in order, 1-based (a video is decoded once, front to back)."""
        if self.frame_paths is not None:
            for i in range(1, self.length + 1):
                yield i, self.frame(i)
            return
        from vitssl.video.io import read_frames

        chunk = 64
        for start in range(0, self.length, chunk):
            batch = read_frames(self.video_path, range(start, min(start + chunk, self.length))).numpy()
            for offset, image in enumerate(batch):
                yield start + offset + 1, image


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))  # (H, W, 3)
    except FileNotFoundError:
        raise MissingFileError(f"frame {path} does not exist") from None
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"frame {path} is not a readable image ({err}); re-extract the sequence's frames") from None


def _optional_mot(path: Path) -> np.ndarray | None:
    return read_mot(path) if path.is_file() else None


def _read_seqinfo(path: Path) -> dict[str, str]:
    parser = configparser.ConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not a valid seqinfo.ini ({' '.join(str(err).split())})") from None
    if not parser.has_section("Sequence"):
        raise DataError(f"{path} has no [Sequence] section; see the MOTChallenge seqinfo.ini layout")
    return {key.lower(): value for key, value in parser.items("Sequence")}


def _int_field(info: dict[str, str], key: str, path: Path) -> int | None:
    if key.lower() not in info:
        return None
    try:
        return int(float(info[key.lower()]))
    except ValueError:
        raise DataError(f"{path}: {key}={info[key.lower()]!r} is not a number") from None


def _load_folder(folder: Path) -> Sequence:
    ini = folder / "seqinfo.ini"
    info = _read_seqinfo(ini) if ini.is_file() else {}
    image_dir = folder / info.get("imdir", "img1")
    if not image_dir.is_dir():
        raise DataError(f"sequence {folder} has no frame folder {image_dir.name}/ (expected SEQ/img1/000001.jpg)")
    suffix = info.get("imext", "").lower()
    suffixes = (suffix,) if suffix else IMAGE_SUFFIXES
    frame_paths = sorted(
        (p for p in image_dir.iterdir() if p.suffix.lower() in suffixes and not p.name.startswith(".")),
        key=lambda p: (int(p.stem), "") if p.stem.isdigit() else (float("inf"), p.name),  # 2.jpg before 10.jpg
    )
    if not frame_paths:
        raise DataError(f"sequence {folder} has no frames in {image_dir} (expected 000001{suffixes[0]}, ...)")
    length = _int_field(info, "seqLength", ini)
    if length is None:
        length = len(frame_paths)
    if len(frame_paths) < length:
        raise DataError(
            f"sequence {folder}: seqinfo.ini says seqLength={length} but {image_dir} has "
            f"{len(frame_paths)} frames; fix seqLength or restore the frames"
        )
    frame_paths = frame_paths[:length]
    width, height = _int_field(info, "imWidth", ini), _int_field(info, "imHeight", ini)
    if width is None or height is None:
        height, width = _read_image(frame_paths[0]).shape[:2]
    fps = float(info.get("framerate", 30) or 30)
    return Sequence(
        name=info.get("name", folder.name) or folder.name,
        root=folder,
        frame_paths=frame_paths,
        video_path=None,
        gt=_optional_mot(folder / "gt" / "gt.txt"),
        det=_optional_mot(folder / "det" / "det.txt"),
        fps=fps,
        width=width,
        height=height,
        length=length,
    )


def _load_video(path: Path) -> Sequence:
    from vitssl.video.io import probe

    info = probe(path)
    gt_path = next((p for p in (path.with_suffix(".gt.txt"), path.with_suffix(".txt")) if p.is_file()), None)
    return Sequence(
        name=path.stem,
        root=path.parent,
        frame_paths=None,
        video_path=path,
        gt=read_mot(gt_path) if gt_path is not None else None,
        det=_optional_mot(path.with_suffix(".det.txt")),
        fps=float(info.fps),
        width=int(info.width),
        height=int(info.height),
        length=int(info.num_frames),
    )


def is_sequence(path: PathLike) -> bool:
    """Whether ``path`` looks like one sequence: a folder with ``seqinfo.ini`` or ``img1/``, or a video file."""
    path = Path(path)
    if path.is_dir():
        return (path / "seqinfo.ini").is_file() or (path / "img1").is_dir()
    return is_video_file(path)


def load_sequence(path: PathLike) -> Sequence:
    """Load one sequence: a MOTChallenge folder or a video file with its boxes beside it (see the module doc).

    Raises:
        MissingFileError: ``path`` does not exist.
        DataError: a folder without frames, a bad seqinfo.ini, a malformed MOT file, or a file that is not a
            video.
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"sequence {path} does not exist (a MOTChallenge folder SEQ/ or a video file)")
    if path.is_dir():
        return _load_folder(path)
    if path.suffix.lower() not in VIDEO_EXTENSIONS:
        raise DataError(f"{path} is neither a MOTChallenge sequence folder nor a video ({', '.join(VIDEO_EXTENSIONS)})")
    return _load_video(path)


def list_sequences(root: PathLike) -> list[Sequence]:
    """Every sequence under ``root``, sorted by name: sub-folders in the MOTChallenge layout and video files.

    ``root`` may itself be one sequence. Raises MissingFileError when it does not exist and DataError when it
    holds no sequence.
    """
    root = Path(root)
    if not root.exists():
        raise MissingFileError(f"sequence root {root} does not exist")
    if is_sequence(root):
        return [load_sequence(root)]
    found = [p for p in sorted(root.iterdir()) if not p.name.startswith(".") and is_sequence(p)]
    if not found:
        raise DataError(f"{root} holds no sequences (folders SEQ/img1/000001.jpg + SEQ/seqinfo.ini, or videos)")
    return sorted((load_sequence(p) for p in found), key=lambda s: s.name)
