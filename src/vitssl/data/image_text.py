"""Image–text pairs: a CSV/TSV of (image path, caption), and WebDataset tar shards read with the stdlib.

The map-style ``webdataset`` here indexes every shard when it is built (evaluation picks rows from it); training
on web-scale corpora streams them instead with ``webdataset_stream`` (:mod:`vitssl.data.shards`), which opens
nothing at start-up and resumes exactly.

Targets are the captions (str); ``classes`` is empty. Samples that cannot be used (empty caption, missing image)
are found while indexing and reported once as a warning; reading one raises ``CorruptImageError`` naming it,
which ``TransformedDataset(skip_corrupt=True)`` turns into a skipped sample, like an undecodable image.
"""

from __future__ import annotations

import csv
import glob
import io
import logging
import os
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vitssl.data.common import (
    DATASETS,
    IMG_EXTENSIONS,
    SKIP_HINT,
    CorruptImageError,
    ImageDataset,
    open_rgb,
    require_root,
)
from vitssl.errors import DataError, MissingFileError

_logger = logging.getLogger(__name__)

_CSV_LAYOUT = "a .csv/.tsv file with an image-path column and a caption column (or a folder with <split>.csv/.tsv)"


def _warn_bad(kind: str, bad: dict[int, str], total: int, describe: Callable[[int], str]) -> None:
    if bad:
        first = "; ".join(f"{describe(i)}: {why}" for i, why in list(bad.items())[:5])
        _logger.warning(
            "%s: %d of %d samples are unusable and will raise CorruptImageError when read (%s): %s%s",
            kind,
            len(bad),
            total,
            SKIP_HINT,
            first,
            " ..." if len(bad) > 5 else "",
        )


@DATASETS.register("image_text_csv")
class ImageTextCSV(ImageDataset):
    """Image–caption pairs listed in a CSV/TSV file; relative image paths are resolved against the file's folder.

    Args:
        root: the CSV/TSV file, or a folder holding ``<split>.csv`` or ``<split>.tsv``.
        split: which file to pick when ``root`` is a folder.
        image_column: header of the image-path column (open_clip's default name).
        caption_column: header of the caption column (open_clip's default name).
        delimiter: field separator; default: tab for .tsv files, comma otherwise.
    """

    def __init__(
        self,
        root: str | os.PathLike | None,
        split: str = "train",
        image_column: str = "filepath",
        caption_column: str = "title",
        delimiter: str | None = None,
    ) -> None:
        path = require_root("image_text_csv", root, _CSV_LAYOUT)
        if path.is_dir():
            candidates = [path / f"{split}.csv", path / f"{split}.tsv"]
            found = [c for c in candidates if c.is_file()]
            if not found:
                raise MissingFileError(
                    f"image_text_csv: folder {str(path)!r} has neither {split}.csv nor {split}.tsv; "
                    f"expected {_CSV_LAYOUT}"
                )
            path = found[0]
        if delimiter is None:
            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        self.path = path
        self.classes = []
        self.samples: list[str] = []
        self.targets: list[str] = []
        self._rows: list[int] = []  # 1-based line of each sample in the file, for messages
        bad: dict[int, str] = {}
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            header = reader.fieldnames or []
            for col, what in ((image_column, "image_column"), (caption_column, "caption_column")):
                if col not in header:
                    raise DataError(
                        f"image_text_csv: {str(path)!r} has no column {col!r} (set {what}); its columns are "
                        f"{header} (delimiter {delimiter!r}: set delimiter if the file uses another)"
                    )
            for row in reader:
                image = (row.get(image_column) or "").strip()
                caption = (row.get(caption_column) or "").strip()
                index = len(self.samples)
                if not image:
                    bad[index] = "empty image path"
                elif not caption:
                    bad[index] = "empty caption"
                self.samples.append(str(path.parent / image) if image else "")
                self.targets.append(caption)
                self._rows.append(reader.line_num)
        if not self.samples:
            raise DataError(f"image_text_csv: {str(path)!r} has a header but no rows; expected {_CSV_LAYOUT}")
        self._bad = bad
        _warn_bad(f"image_text_csv {path}", bad, len(self.samples), self._describe)

    def _describe(self, index: int) -> str:
        return f"{self.path} row {self._rows[index]}"

    def load_image(self, index: int) -> Image.Image:
        if index in self._bad:
            raise CorruptImageError(f"{self._describe(index)}: {self._bad[index]} ({SKIP_HINT})")
        return open_rgb(self.samples[index], name=f"{self.samples[index]} ({self._describe(index)})")

    def sample_id(self, index: int) -> str:
        return self.samples[index] or self._describe(index)


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..009}`` numeric ranges (zero padding kept) and ``{a,b,c}`` lists, as WebDataset does."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [expanded for opt in options for expanded in expand_braces(head + opt + tail)]


def resolve_shards(pattern: str | os.PathLike, split: str) -> list[Path]:
    """Shard paths from a brace pattern, a glob, a single tar, or a folder (``folder/<split>/*.tar`` or ``*.tar``)."""
    text = os.path.expandvars(os.path.expanduser(str(pattern)))
    path = Path(text)
    if path.is_dir():
        folder = path / split if (path / split).is_dir() else path
        shards = sorted(folder.glob("*.tar"))
        if not shards:
            raise MissingFileError(f"webdataset: folder {str(folder)!r} holds no .tar shards")
        return shards
    shards: list[Path] = []
    for expanded in expand_braces(text):
        if glob.has_magic(expanded):
            hits = sorted(glob.glob(expanded))
            if not hits:
                raise MissingFileError(f"webdataset: no shard matches {expanded!r} (from {str(pattern)!r})")
            shards += [Path(h) for h in hits]
        elif Path(expanded).is_file():
            shards.append(Path(expanded))
        else:
            raise MissingFileError(f"webdataset: shard {expanded!r} (from pattern {str(pattern)!r}) does not exist")
    return shards


@dataclass
class _Member:
    shard: int
    offset: int
    size: int
    name: str


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the file name, the rest its extension."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


@DATASETS.register("webdataset")
class WebDataset(ImageDataset):
    """WebDataset-format shards: uncompressed tars whose members ``<key>.jpg`` (or .png, ...) and ``<key>.txt``
    form one sample. Shards are indexed once (headers and captions); images are read by seeking into the tar.

    Args:
        root: shard pattern (``data/shard-{000..009}.tar``, a glob, one tar) or a folder of shards.
        split: sub-folder used when ``root`` is a folder that has one.
        image_exts: member extensions accepted as the image, in order of preference.
        caption_ext: member extension of the caption.
    """

    def __init__(
        self,
        root: str | os.PathLike | None,
        split: str = "train",
        image_exts: tuple[str, ...] = tuple(e.lstrip(".") for e in IMG_EXTENSIONS),
        caption_ext: str = "txt",
    ) -> None:
        if root is None or str(root) == "":
            raise DataError(
                "dataset 'webdataset' needs a root: set data.train.root (data.val.root) to a shard pattern such as "
                "/data/shard-{000..009}.tar, a glob, or a folder of .tar shards"
            )
        self.shards = resolve_shards(root, split)
        self.classes = []
        self.targets: list[str] = []
        self.keys: list[str] = []
        self._images: list[_Member | None] = []
        self._shard_of: list[int] = []
        bad: dict[int, str] = {}
        exts = tuple(e.lower().lstrip(".") for e in image_exts)
        caption_ext = caption_ext.lower().lstrip(".")
        for shard_id, shard in enumerate(self.shards):
            members_by_key, captions = self._index_shard(shard_id, shard, caption_ext)
            for key, members in members_by_key.items():
                index = len(self.keys)
                image = next((members[e] for e in exts if e in members), None)
                caption = captions.get(key, "")
                if image is None:
                    bad[index] = f"no image member (.{', .'.join(exts)}); members: {', '.join(sorted(members))}"
                elif caption_ext not in members:
                    bad[index] = f"no .{caption_ext} caption member"
                elif not caption:
                    bad[index] = "empty caption"
                self.keys.append(key)
                self._shard_of.append(shard_id)
                self._images.append(image)
                self.targets.append(caption)
        if not self.keys:
            raise DataError(f"webdataset: shards {[str(s) for s in self.shards]} contain no samples")
        self._bad = bad
        _warn_bad("webdataset", bad, len(self.keys), self.sample_id)

    @staticmethod
    def _index_shard(
        shard_id: int, shard: Path, caption_ext: str
    ) -> tuple[dict[str, dict[str, _Member]], dict[str, str]]:
        """Members of each key in one shard, and the captions (read now: targets must not need a second pass)."""
        samples: dict[str, dict[str, _Member]] = {}
        captions: dict[str, str] = {}
        try:
            # "r:" refuses compressed tars: seeking into them would mean decompressing from the start each time.
            with tarfile.open(shard, "r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, ext = _split_key(info.name)
                    if not ext:
                        continue
                    samples.setdefault(key, {})[ext] = _Member(shard_id, info.offset_data, info.size, info.name)
                    if ext == caption_ext:
                        raw = tar.extractfile(info).read()  # type: ignore[union-attr]  # regular file: never None
                        captions[key] = raw.decode("utf-8", errors="replace").strip()
        except tarfile.TarError as exc:
            raise DataError(
                f"webdataset: cannot read shard {str(shard)!r} ({exc}); shards must be uncompressed .tar files"
            ) from exc
        return samples, captions

    def load_image(self, index: int) -> Image.Image:
        if index in self._bad:
            raise CorruptImageError(f"webdataset sample {self.sample_id(index)}: {self._bad[index]} ({SKIP_HINT})")
        member = self._images[index]
        assert member is not None  # samples without an image are in self._bad
        with open(self.shards[member.shard], "rb") as f:
            f.seek(member.offset)
            data = f.read(member.size)
        if len(data) != member.size:
            raise CorruptImageError(f"webdataset sample {self.sample_id(index)}: shard is truncated ({SKIP_HINT})")
        return open_rgb(io.BytesIO(data), name=f"{self.sample_id(index)} (member {member.name})")

    def sample_id(self, index: int) -> str:
        return f"{self.shards[self._shard_of[index]]}:{self.keys[index]}"
