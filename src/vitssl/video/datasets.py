"""Video datasets: items are ``(clip, label)`` with ``clip`` a uint8 tensor ``(T, H, W, 3)``.

- ``videofolder``: ``root/[<split>/]<class>/<video>`` trees, like ``imagefolder``.
- ``video_csv``: a list file, either ``path label`` lines (Kinetics / Something-Something style) or a CSV with a
  header naming a path and a label column; labels are class ids or class names.
- ``motion``: a procedural, file-free set whose class is the direction a textured blob moves, so no single frame
  tells the class: a test bed for heads that must use time.
- ``motion_frames``: single frames drawn the same way, each with the blob's centre as its target (image data for
  a backbone that must learn where things are).

File-backed sets list their files at construction but probe a video (its frame count) only when it is first read,
and remember the count: a Kinetics folder holds 240k files. A clip's frame indices are drawn with numpy's global
generator while the item is read, which ``TransformedDataset`` seeds per (seed, epoch, index), so training clips
are random yet exactly reproducible. Unreadable, damaged (decoding stops before the end the file states; see
:func:`vitssl.video.io.probe`) or vanished videos raise ``CorruptVideoError`` naming the file (and where decoding
stops), a ``CorruptImageError``: with ``data.skip_corrupt`` the training loop skips them, logs each by name and
counts them (``skipped_corrupt`` in the metrics); without it the run stops with that one-line error.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vitssl.data.common import DATASETS, SKIP_HINT, check_procedural, require_root
from vitssl.data.folder import scan_class_tree
from vitssl.errors import DataError, MissingFileError
from vitssl.video.files import VIDEO_EXTENSIONS
from vitssl.video.io import DECODERS, CorruptVideoError, probe, read_frames
from vitssl.video.samplers import DENSE_SPACINGS, dense_indices, segment_indices

SAMPLERS: tuple[str, ...] = ("segment", "dense")

_FOLDER_LAYOUT = (
    "one sub-folder per class with videos inside (root/<class>/<video>.mp4), or root/<split>/<class>/<video>"
)
_LIST_LAYOUT = (
    'a list file of "path label" lines, or a CSV with a header naming the path and label columns '
    "(or a folder holding <split>.csv, <split>.txt or <split>.tsv)"
)
# Folder names that mark a root as holding splits; if one of them exists, the requested split must exist too.
_INT = re.compile(r"[+-]?\d+")


class VideoDataset(Dataset):
    """Base of every vitssl video dataset: items are ``(uint8 clip (T, H, W, 3), int label)``.

    Subclasses fill ``classes`` and ``targets`` (one int label per item, known without decoding) and implement
    ``load_clip`` and ``sample_id``.
    """

    classes: list[str]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(self)}")
        index = index % len(self)
        return self.load_clip(index), self.targets[index]

    def load_clip(self, index: int) -> torch.Tensor:
        """The clip of item ``index``, uint8 ``(T, H, W, 3)``; raises ``CorruptVideoError`` naming the file."""
        raise NotImplementedError

    def sample_id(self, index: int) -> str:
        """A stable identifier of item ``index``: the file path for file-backed sets, else e.g. "motion/val/17"."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(len={len(self)}, classes={len(self.classes)})"


class FileVideoDataset(VideoDataset):
    """A video dataset over files: clip sampling options, lazy probing with a per-file frame-count cache.

    Subclasses set ``samples`` (paths), ``targets`` and ``classes`` and call ``_init_sampling`` first.
    """

    name = "video"
    samples: list[str]

    def _init_sampling(
        self,
        split: str,
        num_frames: int,
        sampler: str,
        stride: int,
        train: bool | None,
        clip_index: int,
        num_clips: int,
        decoder: str = "auto",
        spacing: str = "mmaction2",
    ) -> None:
        if decoder not in DECODERS:
            raise DataError(f"{self.name}: decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        self.decoder = decoder
        if num_frames < 1:
            raise DataError(f"{self.name}: num_frames must be positive, got {num_frames}")
        if sampler not in SAMPLERS:
            raise DataError(f"{self.name}: sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if stride < 1:
            raise DataError(f"{self.name}: stride must be positive, got {stride}")
        if spacing not in DENSE_SPACINGS:
            raise DataError(f"{self.name}: spacing must be one of {', '.join(DENSE_SPACINGS)}, got {spacing!r}")
        if spacing != "mmaction2" and sampler != "dense":
            raise DataError(
                f"{self.name}: spacing={spacing!r} places the dense sampler's test clips, but sampler={sampler!r}; "
                "set sampler=dense or leave spacing out"
            )
        self.train = split == "train" if train is None else bool(train)
        if num_clips < 1 or not 0 <= clip_index < num_clips:
            raise DataError(
                f"{self.name}: need num_clips >= 1 and 0 <= clip_index < num_clips, got clip_index={clip_index} "
                f"num_clips={num_clips}"
            )
        if self.train and num_clips > 1:
            raise DataError(
                f"{self.name}: num_clips={num_clips} selects evenly spaced test views, but split {split!r} samples "
                f"randomly; set train=false or num_clips=1"
            )
        self.split = split
        self.num_frames = int(num_frames)
        self.sampler = sampler
        self.stride = int(stride)
        self.clip_index = int(clip_index)
        self.num_clips = int(num_clips)
        self.spacing = spacing
        self.frame_counts: dict[int, int] = {}  # item -> frames of its video, filled on first read

    def video_frames(self, index: int) -> int:
        """Frames in item ``index``'s video, probed on first use and cached."""
        count = self.frame_counts.get(index)
        if count is None:
            path = self.samples[index]
            try:
                info = probe(path, decoder=self.decoder)
            except MissingFileError as exc:  # vanished since listing: a bad sample, as for images
                raise CorruptVideoError(f"video file not found: {path} ({SKIP_HINT})") from exc
            if info.damaged:  # clips drawn from the frames that decode would silently cover part of the video
                raise CorruptVideoError(f"damaged video {path}: {info.error} ({SKIP_HINT})")
            count = info.num_frames
            if count < 1:
                raise CorruptVideoError(f"video {path} has no frames ({SKIP_HINT})")
            self.frame_counts[index] = count
        return count

    def frame_indices(self, index: int) -> np.ndarray:
        """The ``num_frames`` frame indices of item ``index``'s clip (random in training: global numpy generator)."""
        n = self.video_frames(index)
        if self.sampler == "segment":
            if self.num_clips == 1:
                return np.asarray(segment_indices(n, self.num_frames, train=self.train))
            # TSN test views: the same relative offset in every segment, spread over the views.
            seg = n / self.num_frames
            pos = seg * (np.arange(self.num_frames) + (self.clip_index + 0.5) / self.num_clips)  # (T,)
            return np.minimum(np.floor(pos).astype(np.int64), n - 1)
        clips = dense_indices(
            n, self.num_frames, self.stride, train=self.train, num_clips=self.num_clips, spacing=self.spacing
        )
        return np.asarray(clips)[self.clip_index]  # (T,)

    def load_clip(self, index: int) -> torch.Tensor:
        path = self.samples[index]
        indices = self.frame_indices(index)
        try:
            return read_frames(path, indices, decoder=self.decoder)  # (T, H, W, 3)
        except MissingFileError as exc:
            raise CorruptVideoError(f"video file not found: {path} ({SKIP_HINT})") from exc

    def sample_id(self, index: int) -> str:
        return self.samples[index]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(len={len(self)}, classes={len(self.classes)}, num_frames={self.num_frames}, "
            f"sampler={self.sampler!r}, train={self.train})"
        )


@DATASETS.register("videofolder")
class VideoFolder(FileVideoDataset):
    """A class-per-folder tree of videos: ``root/<split>/<class>/<video>`` when ``root/<split>`` exists, else
    ``root/<class>/<video>``. Classes are the sorted sub-folder names, videos are found recursively and sorted.

    Args:
        root: the tree's root folder.
        split: sub-folder to use when present; "train" also turns on random clip sampling (see ``train``).
        num_frames: frames per clip (T).
        sampler: "segment" (TSN: one frame from each of T equal segments) or "dense" (T frames ``stride`` apart).
        stride: frame interval of the dense sampler.
        train: random clips (True) or centred / evenly spaced ones (False); None means ``split == "train"``.
        clip_index: which of ``num_clips`` evenly spaced test views this dataset returns.
        num_clips: number of test views (build one dataset per ``clip_index`` and average their predictions).
        spacing: where the dense sampler's test clips start: "mmaction2" (1.x ``SampleFrames``, the default),
            "pyslowfast" (``get_start_end_idx`` with offset sampling) or "mmaction2_0x" (0.x, vitssl's spacing
            before the 1.x one); see :func:`vitssl.video.samplers.dense_indices`. Dense sampler only.
        extensions: accepted video file extensions (case-insensitive).
        decoder: the video reader: "auto" (the faster of torchcodec and PyAV on this machine, measured once and
            cached), "torchcodec", "pyav" or "decord" (``data.train.kwargs.decoder``).
    """

    name = "videofolder"

    def __init__(
        self,
        root: str | os.PathLike | None,
        split: str = "train",
        num_frames: int = 8,
        sampler: str = "segment",
        stride: int = 4,
        train: bool | None = None,
        clip_index: int = 0,
        num_clips: int = 1,
        extensions: tuple[str, ...] = VIDEO_EXTENSIONS,
        decoder: str = "auto",
        spacing: str = "mmaction2",
    ) -> None:
        self._init_sampling(split, num_frames, sampler, stride, train, clip_index, num_clips, decoder, spacing)
        self.root, self.classes, self.samples, self.targets = scan_class_tree(
            "videofolder", root, split, _FOLDER_LAYOUT, extensions, "videos"
        )


@DATASETS.register("video_csv")
class VideoCSV(FileVideoDataset):
    """Videos listed in a file: ``path label`` lines or a CSV with a header.

    The format is told from the first line: if it holds both ``path_column`` and ``label_column`` (split at
    ``delimiter``) the file is a CSV with a header, else every non-blank line not starting with ``#`` is
    ``path label`` (whitespace-separated; the label is the last field, so paths may hold spaces).

    Labels are all class ids (``classes`` are then "0".."max", or the given names) or all class names (``classes``
    are then the sorted names, or the given list, which fixes the ids across splits whose files miss a class).

    Args:
        root: the list file, or a folder holding ``<split>.csv``, ``<split>.txt`` or ``<split>.tsv``.
        split: names the file in a folder root; "train" also turns on random clip sampling (see ``train``).
        num_frames, sampler, stride, train, clip_index, num_clips, spacing: clip sampling, as for ``videofolder``.
        prefix: folder relative paths start from; default the list file's folder.
        path_column: header of the path column of a CSV.
        label_column: header of the label column of a CSV.
        delimiter: field separator of a CSV ("\\t" for a TSV).
        classes: the class names, in id order; default as above.
        decoder: the video reader, as for ``videofolder``.
    """

    name = "video_csv"

    def __init__(
        self,
        root: str | os.PathLike | None,
        split: str = "train",
        num_frames: int = 8,
        sampler: str = "segment",
        stride: int = 4,
        train: bool | None = None,
        clip_index: int = 0,
        num_clips: int = 1,
        prefix: str | os.PathLike | None = None,
        path_column: str = "path",
        label_column: str = "label",
        delimiter: str = ",",
        classes: list[str] | None = None,
        decoder: str = "auto",
        spacing: str = "mmaction2",
    ) -> None:
        self._init_sampling(split, num_frames, sampler, stride, train, clip_index, num_clips, decoder, spacing)
        path = require_root("video_csv", root, _LIST_LAYOUT)
        if path.is_dir():
            candidates = [path / f"{split}{ext}" for ext in (".csv", ".txt", ".tsv")]
            found = [c for c in candidates if c.is_file()]
            if not found:
                raise MissingFileError(
                    f"video_csv: folder {str(path)!r} has none of {', '.join(c.name for c in candidates)}; "
                    f"set data.train.root (data.val.root) to the list file or choose another split"
                )
            path = found[0]
        self.path = path
        folder = path.parent if prefix is None else Path(os.path.expandvars(str(prefix))).expanduser()
        if len(delimiter) != 1:
            raise DataError(f"video_csv: delimiter must be one character, got {delimiter!r}")
        rows = self._read(path, path_column, label_column, delimiter)  # (line, path, label text)
        if not rows:
            raise DataError(f"video_csv: {str(path)!r} lists no videos; expected {_LIST_LAYOUT}")
        self.samples = [str(folder / p) for _, p, _ in rows]  # an absolute p replaces the folder
        self.lines = [line for line, _, _ in rows]  # 1-based line of each item, for messages
        self.classes, self.targets = self._labels(path, rows, classes)

    @staticmethod
    def _read(path: Path, path_column: str, label_column: str, delimiter: str) -> list[tuple[int, str, str]]:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheet exports start with a BOM
            text = f.read()
        lines = text.splitlines()
        first = next((line for line in lines if line.strip()), "")
        header = [h.strip() for h in next(csv.reader([first], delimiter=delimiter), [])]
        rows = []
        if path_column in header and label_column in header:
            reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)  # quoted newlines too
            for row in reader:
                if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                    continue  # blank line
                rel = (row.get(path_column) or "").strip()
                label = (row.get(label_column) or "").strip()
                if not rel or not label:
                    empty = path_column if not rel else label_column
                    raise DataError(f"video_csv: {path}:{reader.line_num}: empty {empty!r}; fill it or drop the row")
                rows.append((reader.line_num, rel, label))
            return rows
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.rsplit(maxsplit=1)
            if len(fields) != 2:
                hint = (
                    f" (a CSV header? set path_column/label_column to two of {header})"
                    if number == 1 and len(header) > 1
                    else ""
                )
                raise DataError(f'video_csv: {path}:{number}: expected "path label", got {line!r}{hint}')
            rows.append((number, fields[0], fields[1]))
        return rows

    @staticmethod
    def _labels(path: Path, rows: list[tuple[int, str, str]], classes: list[str] | None) -> tuple[list[str], list[int]]:
        is_id = [bool(_INT.fullmatch(label)) for _, _, label in rows]
        if all(is_id):
            ids = [int(label) for _, _, label in rows]
            for (line, _, label), i in zip(rows, ids):
                if i < 0 or (classes is not None and i >= len(classes)):
                    bound = f" and below {len(classes)} (the number of classes given)" if classes is not None else ""
                    raise DataError(f"video_csv: {path}:{line}: label {label} must be >= 0{bound}")
            names = list(classes) if classes is not None else [str(i) for i in range(max(ids) + 1)]
            return names, ids
        if any(is_id):
            line, _, label = rows[is_id.index(not is_id[0])]  # the first row of the other kind
            raise DataError(
                f"video_csv: {path}:{line}: label {label!r} mixes class ids and class names in one file; use one kind"
            )
        names = sorted({label for _, _, label in rows}) if classes is None else list(classes)
        lookup = {name: i for i, name in enumerate(names)}
        targets = []
        for line, _, label in rows:
            if label not in lookup:
                raise DataError(
                    f"video_csv: {path}:{line}: class {label!r} is not in the given classes; add it to classes"
                )
            targets.append(lookup[label])
        return names, targets


# ---------------------------------------------------------------------------------------------------------
# motion: procedural clips whose class is a direction of motion
# ---------------------------------------------------------------------------------------------------------

MOTION_CLASSES: tuple[str, ...] = ("left", "right", "up", "down")
_DIRECTIONS = np.array([(-1.0, 0.0), (1.0, 0.0), (0.0, -1.0), (0.0, 1.0)])  # (dx, dy) per class, y pointing down
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_DEFAULT_MOTION_SAMPLES = {"train": 5_000, "val": 1_000, "test": 1_000}
_RADIUS = (0.12, 0.22)  # blob radius as a fraction of the side
_SPEED = (0.04, 0.08)  # pixels per frame as a fraction of the side
_LEVEL = (0.3, 0.7)  # background grey level
_CONTRAST = (0.2, 0.35)  # blob brightness minus background level, either sign
_FRAMES_STREAM = 1  # the extra seed word of motion_frames, so its frames are not the first frames of motion clips


@DATASETS.register("motion")
class Motion(VideoDataset):
    """A textured blob drifting left, right, up or down over a static textured background; the class is the direction.

    The canvas is a torus: the blob starts anywhere, uniformly, and wraps around the edges, so its position in
    every frame is uniform whatever the class. Its colour, size, stripe texture and speed, the background and
    the per-frame noise are drawn independently of the class, so a single frame holds no trace of it; two frames
    do. Clips are deterministic in ``(seed, split, index)``; labels cycle through the classes (``index % 4``).

    Args:
        split: "train", "val" or "test"; each uses its own random stream.
        img_size: frame side in pixels.
        num_frames: frames per clip (T).
        num_samples: items in the split (default 5000 for train, 1000 otherwise).
        seed: base seed of the generator.
    """

    def __init__(
        self,
        split: str = "train",
        img_size: int = 32,
        num_frames: int = 8,
        num_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        self.split, num_samples = check_procedural(
            "motion", split, _SPLIT_IDS, img_size, num_samples, _DEFAULT_MOTION_SAMPLES, seed
        )
        if num_frames < 2:
            raise DataError(f"motion: num_frames must be at least 2 (one frame shows no motion), got {num_frames}")
        self.img_size = img_size
        self.num_frames = num_frames
        self.seed = seed
        self.classes = list(MOTION_CLASSES)
        self.targets = [i % len(MOTION_CLASSES) for i in range(num_samples)]

    def load_clip(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index])
        clip = render_motion(rng, self.targets[index], self.img_size, self.num_frames)  # (T, S, S, 3)
        return torch.from_numpy(clip)

    def sample_id(self, index: int) -> str:
        return f"motion/{self.split}/{index}"


@DATASETS.register("motion_frames")
class MotionFrames(Dataset):
    """Single frames drawn like ``motion`` clips, each with its blob's centre: image data with a position target.

    The image pretraining stage of the action demo learns from it where the blob is (objective
    ``blob_position``); it holds no motion and no direction label. Items are ``(uint8 frame (S, S, 3),
    float32 centre (2,))`` with the centre ``(x, y)`` as a fraction of the side, in ``[0, 1)`` (the canvas is a
    torus). Frames are deterministic in ``(seed, split, index)`` and drawn apart from the clips of ``motion``.

    Args:
        split: "train", "val" or "test".
        img_size: frame side in pixels.
        num_samples: frames in the split (default 5000 for train, 1000 otherwise).
        seed: base seed of the generator.
    """

    def __init__(
        self,
        split: str = "train",
        img_size: int = 32,
        num_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        self.split, num_samples = check_procedural(
            "motion_frames", split, _SPLIT_IDS, img_size, num_samples, _DEFAULT_MOTION_SAMPLES, seed
        )
        self.img_size, self.num_samples, self.seed = img_size, num_samples, seed
        self.classes: list[str] = []  # no class labels: the targets are positions
        self._rendered: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # epochs after the first: no redraw

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for MotionFrames of length {len(self)}")
        index = index % len(self)
        item = self._rendered.get(index)
        if item is None:  # a few hundred bytes a frame: keeping them is cheaper than drawing them again
            rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index, _FRAMES_STREAM])
            clip, centres = render_motion(rng, index % len(MOTION_CLASSES), self.img_size, 1, return_centres=True)
            item = torch.from_numpy(clip[0]), torch.from_numpy(centres[0] / self.img_size).float()  # (S, S, 3), (2,)
            self._rendered[index] = item
        return item

    def sample_id(self, index: int) -> str:
        return f"motion_frames/{self.split}/{index}"


def render_motion(
    rng: np.random.Generator, label: int, size: int, num_frames: int, return_centres: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """One ``motion`` clip, uint8 ``(T, S, S, 3)``; every draw but the direction ignores ``label``.

    With ``return_centres`` also the blob centre of every frame, ``(T, 2)`` (x, y) in pixels within ``[0, S)``.
    """
    # Appearance and start, all independent of the label.
    level = rng.uniform(*_LEVEL)
    brightness = level + rng.choice([-1.0, 1.0]) * rng.uniform(*_CONTRAST)
    colour = np.clip(brightness + rng.uniform(-0.2, 0.2, 3), 0.02, 0.98)  # (3,)
    radius = rng.uniform(*_RADIUS) * size
    speed = rng.uniform(*_SPEED) * size
    angle = rng.uniform(0.0, math.pi)  # stripe orientation, fixed to the canvas
    period = rng.uniform(1.0, 2.0) * radius  # coarse enough that a frame-to-frame step does not alias
    phase = rng.uniform(0.0, 2.0 * math.pi)
    start = rng.uniform(0.0, size, 2)  # (x, y)
    background = _motion_background(rng, size, level)  # (S, S, 3)
    noise = rng.normal(0.0, 0.015, (num_frames, size, size, 3))  # (T, S, S, 3) sensor noise, fresh per frame

    centres = start + speed * np.arange(num_frames)[:, None] * _DIRECTIONS[label]  # (T, 2)
    coords = np.arange(size) + 0.5  # pixel centres
    # Offsets to the blob centre on the torus, in [-S/2, S/2).
    dx = (coords[None, None, :] - centres[:, 0, None, None] + size / 2) % size - size / 2  # (T, 1, S)
    dy = (coords[None, :, None] - centres[:, 1, None, None] + size / 2) % size - size / 2  # (T, S, 1)
    alpha = np.clip(radius - np.sqrt(dx**2 + dy**2) + 0.5, 0.0, 1.0)[..., None]  # (T, S, S, 1) anti-aliased disc
    # Stripes in the blob's own frame, so the texture moves with it.
    stripes = np.sin(2.0 * math.pi * (dx * math.cos(angle) + dy * math.sin(angle)) / period + phase)  # (T, S, S)
    fill = colour * (1.0 + 0.25 * stripes[..., None])  # (T, S, S, 3)
    frames = background * (1.0 - alpha) + fill * alpha + noise
    clip = np.round(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.uint8)
    return (clip, centres % size) if return_centres else clip


def _motion_background(rng: np.random.Generator, size: int, level: float) -> np.ndarray:
    """Static textured background, (S, S, 3) in about [0, 1]: a grey level, a tint, smooth blotches, fine grain."""
    grid = int(rng.integers(3, 7))
    coarse = rng.normal(0.0, 1.0, (grid, grid, 3))  # upsampled by nearest-cell lookup with a bilinear blend
    pos = (np.arange(size) + 0.5) * grid / size - 0.5
    lo = np.clip(np.floor(pos).astype(int), 0, grid - 1)
    hi = np.clip(lo + 1, 0, grid - 1)
    w = np.clip(pos - lo, 0.0, 1.0)
    rows = coarse[lo] * (1.0 - w)[:, None, None] + coarse[hi] * w[:, None, None]  # (S, g, 3)
    smooth = rows[:, lo] * (1.0 - w)[None, :, None] + rows[:, hi] * w[None, :, None]  # (S, S, 3)
    fine = rng.normal(0.0, 1.0, (size, size, 3))
    tint = rng.uniform(-0.04, 0.04, 3)
    return level + tint + rng.uniform(0.03, 0.07) * smooth + rng.uniform(0.01, 0.04) * fine
