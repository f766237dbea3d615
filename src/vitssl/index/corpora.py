"""The built-in corpus kinds (:data:`vitssl.index.pipeline.CORPORA`): ``images`` and ``videos``.

``images``: the rows of an image dataset spec (``digits``, ``imagefolder:root=...``, image-text pairs
``image_text_csv:...`` and the streamed shards ``webdataset_stream:...``, whose images are indexed); sample ids are
``dataset.sample_id(row)`` (file paths, or ``digits/val/17``); metadata ``{"label": <class name>}`` when the
dataset has classes (read from its ``targets`` list, never by decoding an image).

``videos`` (``--data``): ``videos:root=DIR`` (every video file under DIR, searched recursively, sorted),
``videos:list=FILE`` (the paths listed in FILE, one a line, in that order, e.g. a benchmark's ``test.txt``), or the
video datasets ``videofolder:root=...`` and ``video_csv:root=...`` (their listed files). Every spec also takes
``fps`` (frames sampled per second, default 1, as TCA) or ``num_frames`` (a fixed count per video). What an
embedder makes of a video - the mean of its frame features, raw thumbnails, a TCA frame set - is the embedder's
business (:mod:`vitssl.index.embedders`), not another corpus. Metadata: ``{"bytes": <file size>}`` (a stat; the
sampled frame count is left out, as it takes opening the video).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from vitssl.config import ConfigError
from vitssl.errors import MissingFileError
from vitssl.index.pipeline import CORPORA
from vitssl.video.files import VIDEO_EXTENSIONS, list_videos

VIDEO_DATASETS: tuple[str, ...] = ("videos", "videofolder", "video_csv")


@CORPORA.register("images")
class ImageCorpus:
    """The rows of an image dataset spec (the dataset is built on first use: a cached build never needs it)."""

    kind: ClassVar[str] = "images"
    spec_names: ClassVar[tuple[str, ...]] = ()  # the default kind: every spec no other kind claims

    def __init__(self, data: str, split: str) -> None:
        self.data, self.split = data, split
        self._dataset: Any = None

    @classmethod
    def open(cls, data: str, split: str) -> ImageCorpus:
        return cls(data, split)

    @property
    def dataset(self) -> Any:
        """The untransformed dataset (items ``(PIL image, target)``)."""
        if self._dataset is None:
            from vitssl.eval.spec import build_eval_dataset

            self._dataset, _, _ = build_eval_dataset(self.data, self.split, absolute_root=True)
        return self._dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def sample_id(self, row: int) -> str:
        return str(self.dataset.sample_id(row))

    def item(self, row: int) -> Any:
        return self.dataset[row]

    def metadata(self, row: int) -> dict[str, Any]:
        """``{"label": <class name>}`` of a row whose dataset has classes and int targets; ``{}`` otherwise.

        Only the dataset's in-memory ``targets`` are read: ``dataset[row]`` would decode the image a second time,
        so a dataset without them (a streamed one) gets no label rather than a build twice as slow.
        """
        dataset = self.dataset
        classes, targets = getattr(dataset, "classes", None), getattr(dataset, "targets", None)
        if not classes or targets is None:
            return {}
        target = targets[row]
        if hasattr(target, "item"):  # a numpy / torch scalar
            target = target.item()
        if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < len(classes):
            return {}  # a caption, a multi-label target, ...: no class name to give
        return {"label": str(classes[target])}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "data": self.data, "split": self.split}

    def default_embedder(self, model: str) -> str:
        return "image"


@CORPORA.register("videos")
@dataclass(frozen=True)
class VideoCorpus:
    """The videos a data spec names, and how frames are sampled from them (the ``videos`` corpus kind; items are
    video paths, sample ids the same paths)."""

    kind: ClassVar[str] = "videos"
    spec_names: ClassVar[tuple[str, ...]] = VIDEO_DATASETS

    spec: str
    paths: tuple[str, ...]
    fps: float = 1.0
    num_frames: int | None = None
    split: str = "val"

    @classmethod
    def open(cls, data: str, split: str) -> VideoCorpus:
        return video_corpus(data, split)

    @property
    def data(self) -> str:
        return self.spec

    def __len__(self) -> int:
        return len(self.paths)

    def sample_id(self, row: int) -> str:
        return self.paths[row]

    def item(self, row: int) -> str:
        return self.paths[row]

    def metadata(self, row: int) -> dict[str, Any]:
        """``{"bytes": <file size>}`` of a row's video (``{}`` when it cannot be stat'ed: a skipped, missing file)."""
        try:
            return {"bytes": os.path.getsize(self.paths[row])}
        except OSError:
            return {}

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "data": self.spec,
            "split": self.split,
            "fps": self.fps,
            "num_frames": self.num_frames,
        }

    def default_embedder(self, model: str) -> str:
        """``thumbnails`` for ``thumbnails[:size=N]``, ``tca`` for a ``video_tca`` checkpoint, else ``video``."""
        from vitssl.index.video_embed import checkpoint_objective, is_thumbnails

        if is_thumbnails(model):
            return "thumbnails"
        return "tca" if checkpoint_objective(model) == "video_tca" else "video"


def is_video_spec(spec: str) -> bool:
    """Whether a data spec names a video corpus (``videos``, ``videofolder``, ``video_csv``)."""
    from vitssl.eval.spec import parse_data_spec

    try:
        return parse_data_spec(spec)[0] in VIDEO_DATASETS
    except ConfigError:
        return False


def read_video_list(path: str | os.PathLike) -> list[str]:
    """Video paths listed one a line (``#`` comments and blank lines skipped; relative to the list's folder).

    Raises:
        MissingFileError: the list does not exist.
    """
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise MissingFileError(f"video list {path} does not exist; pass list=<a file of video paths, one a line>")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [str(path.parent / p) if not os.path.isabs(p) else p for p in lines if p and not p.startswith("#")]


def video_corpus(spec: str, split: str | None = None, option: str = "--data") -> VideoCorpus:
    """Resolve a video data spec (see the module doc) to its files and sampling.

    Raises:
        ConfigError: a malformed spec, a bad option, a missing root or a corpus without videos.
    """
    from vitssl.eval.spec import build_eval_dataset, parse_data_spec

    name, options = parse_data_spec(spec)
    if name not in VIDEO_DATASETS:
        raise ConfigError(f"{option} {spec!r} is not a video corpus; use one of {', '.join(VIDEO_DATASETS)}")
    fps = options.pop("fps", 1.0)
    num_frames = options.pop("num_frames", None)
    if not isinstance(fps, (int, float)) or fps <= 0:
        raise ConfigError(f"{option} {spec!r}: fps={fps!r} must be a positive number of frames per second")
    if num_frames is not None and (not isinstance(num_frames, int) or num_frames < 1):
        raise ConfigError(f"{option} {spec!r}: num_frames={num_frames!r} must be a positive integer")
    if name == "videos":
        unknown = sorted(set(options) - {"root", "list", "split", "extensions"})
        if unknown:
            raise ConfigError(
                f"{option} {spec!r}: videos takes root or list, fps, num_frames, extensions; not {unknown}"
            )
        if bool(options.get("root")) == bool(options.get("list")):
            raise ConfigError(
                f"{option} {spec!r}: name a folder or a list file, e.g. videos:root=/data/videos or "
                "videos:list=/data/test.txt"
            )
        exts = options.get("extensions") or VIDEO_EXTENSIONS
        try:
            if options.get("list"):
                paths = read_video_list(options["list"])
            else:
                paths = list_videos(options["root"], [exts] if isinstance(exts, str) else exts)
        except MissingFileError as err:
            raise ConfigError(f"{option} {spec!r}: {err}") from None
    else:
        rest = ",".join(f"{k}={v}" for k, v in options.items() if k != "split")
        dataset, _, _ = build_eval_dataset(f"{name}:{rest}" if rest else name, split, absolute_root=True, option=option)
        paths = [os.path.abspath(p) for p in dataset.samples]  # type: ignore[attr-defined]
    if not paths:
        raise ConfigError(f"{option} {spec!r}: no video files found ({', '.join(VIDEO_EXTENSIONS)})")
    return VideoCorpus(spec, tuple(paths), float(fps), num_frames, split or options.get("split") or "val")


__all__ = ["VIDEO_DATASETS", "ImageCorpus", "VideoCorpus", "is_video_spec", "read_video_list", "video_corpus"]
