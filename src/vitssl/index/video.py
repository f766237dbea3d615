"""Video retrieval on the faiss index folders of :mod:`vitssl.index.core`: one vector per video, frame vectors
beside it for chamfer re-ranking, search and evaluation against near-duplicate ground truth.

Corpora (``--data``): ``videos:root=DIR`` (every video file under DIR, searched recursively, sorted),
``videos:list=FILE`` (the paths listed in FILE, one a line, in that order, e.g. a benchmark's ``test.txt``), or the
video datasets ``videofolder:root=...`` and ``video_csv:root=...`` (their listed files). Every spec also takes
``fps`` (frames sampled per second, default 1, as TCA) or ``num_frames`` (a fixed count per video).

Embedders (:class:`VideoEmbedder`, chosen by the model given to ``index build``):

- ``mean``: an image checkpoint (any objective), an exported ``backbone.safetensors`` or ``thumbnails[:size=N]``
  (raw downscaled frames, no network): the frames' features, each L2-normalised, averaged, L2-normalised again
  (the mean-of-frames baseline); the frame vectors kept for chamfer are the normalised frame features.
- ``tca``: a ``video_tca`` checkpoint (:mod:`vitssl.video.tca`): its frame backbone and whitening give frame
  features, its encoder the video vector and the frame outputs.

An index folder of videos is a :mod:`vitssl.index.core` folder (vectors and ids as for images; sample ids are the
video paths) plus::

    frames/vectors.npy   (F, E) float32 frame vectors of every indexed video, row order of ids.jsonl
    frames/offsets.npy   (N + 1,) int64: video r owns rows offsets[r]:offsets[r + 1]
    manifest.json        gains "video": method, model, layer, fps / num_frames, frame width, skipped videos

Chamfer similarity (ViSiL / TCA's frame-level similarity) of a query with frames q_1..q_n and a video with
frames d_1..d_m is ``mean_i max_j <q_i, d_j>`` on L2-normalised frame vectors; :func:`rerank` re-scores the
top K of a video-level search with it, which is TCA's strongest (TCA_f) variant at the cost of K small matrix
products per query.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitssl.config import ConfigError
from vitssl.errors import DataError, MissingFileError, UserError
from vitssl.index import core
from vitssl.io import atomic_dir, write_json
from vitssl.video.files import VIDEO_EXTENSIONS, list_videos

_logger = logging.getLogger(__name__)

VIDEO_DATASETS: tuple[str, ...] = ("videos", "videofolder", "video_csv")
FRAMES_DIR = "frames"
FRAME_VECTORS = "vectors.npy"
FRAME_OFFSETS = "offsets.npy"
METHODS = ("mean", "tca")
RERANKS = ("chamfer",)
DEFAULT_RERANK_K = 100


# --------------------------------------------------------------------------------------------------------------
# Chamfer similarity
# --------------------------------------------------------------------------------------------------------------


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def chamfer_similarity(q: np.ndarray, d: np.ndarray) -> float:
    """Chamfer similarity of two frame sequences: the mean over query frames of the best match among ``d``'s frames.

    Args:
        q: (n, D) query frame vectors.
        d: (m, D) database video frame vectors (both are L2-normalised here).

    Returns:
        Similarity in [-1, 1] (not symmetric: a query matching a part of a longer video scores high).
    """
    if len(q) == 0 or len(d) == 0:
        raise DataError(f"chamfer similarity needs frames on both sides, got {len(q)} and {len(d)}")
    sim = _l2(q) @ _l2(d).T  # (n, m)
    return float(sim.max(axis=1).mean())


def chamfer_scores(q: np.ndarray, candidates: Sequence[np.ndarray]) -> np.ndarray:
    """Chamfer similarity of one query with each of K videos, in one matrix product.

    Args:
        q: (n, D) query frame vectors.
        candidates: K arrays (m_k, D) of frame vectors.

    Returns:
        (K,) float32 scores, ``scores[k] == chamfer_similarity(q, candidates[k])``.
    """
    if not len(candidates):
        return np.zeros(0, dtype=np.float32)
    lengths = np.asarray([len(c) for c in candidates])
    if (lengths == 0).any() or len(q) == 0:
        raise DataError("chamfer similarity needs at least one frame per video")
    sim = _l2(q) @ _l2(np.concatenate(candidates)).T  # (n, sum m_k)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    best = np.maximum.reduceat(sim, starts, axis=1)  # (n, K): best match of each query frame in each video
    return best.mean(axis=0).astype(np.float32)  # (K,)


# --------------------------------------------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoCorpus:
    """The videos a data spec names, and how frames are sampled from them."""

    spec: str
    paths: tuple[str, ...]
    fps: float = 1.0
    num_frames: int | None = None


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
    return VideoCorpus(spec, tuple(paths), float(fps), num_frames)


# --------------------------------------------------------------------------------------------------------------
# Embedders
# --------------------------------------------------------------------------------------------------------------


def checkpoint_objective(path: str | os.PathLike) -> str | None:
    """The objective a vitssl checkpoint was trained with (None for a ``.safetensors`` backbone or thumbnails)."""
    from vitssl.video.frames import THUMBNAILS

    text = str(path)
    if text == THUMBNAILS or text.startswith(THUMBNAILS + ":") or text.endswith(".safetensors"):
        return None
    from vitssl.engine import load_checkpoint

    cfg = load_checkpoint(text)["config"]
    objective = cfg.get("objective") if isinstance(cfg, dict) else getattr(cfg, "objective", None)
    name = objective.get("name") if isinstance(objective, dict) else getattr(objective, "name", None)
    return str(name) if name else None


@dataclass
class Embedded:
    """What :meth:`VideoEmbedder.embed` gives: vectors of the readable videos and what was skipped."""

    vectors: np.ndarray  # (M, E) float32 video vectors
    frames: list[np.ndarray]  # M arrays (n_i, E) of frame vectors (L2-normalised)
    rows: np.ndarray  # (M,) int64 positions of these videos in the input list
    skipped: list[str] = field(default_factory=list)  # paths of the unreadable videos left out


class VideoEmbedder:
    """Turns video files into a video vector and frame vectors (see the module doc for the two methods).

    Use :meth:`open`. Attributes: ``method`` ("mean" | "tca"), ``model`` (what was opened: a checkpoint path or
    ``thumbnails:size=N``), ``checkpoint_hash`` (weights digest), ``layer``, ``fps``, ``num_frames``.
    """

    def __init__(self) -> None:
        self.method = "mean"
        self.model = ""
        self.checkpoint_hash = ""
        self.layer = "pooled"
        self.fps = 1.0
        self.num_frames: int | None = None
        self.cache_dir: str | None = None
        self.batch_size = 64
        self._frame_model: Any = None
        self._tca: Any = None
        self.transform = ""

    @classmethod
    def open(
        cls,
        model: str | os.PathLike,
        *,
        fps: float = 1.0,
        num_frames: int | None = None,
        layer: str = "pooled",
        device: str = "cpu",
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 64,
        use_cache: bool = True,
    ) -> VideoEmbedder:
        """Open a frame model or TCA checkpoint.

        Args:
            model: a vitssl checkpoint (``video_tca``: TCA; any other objective: mean of frames), a
                ``backbone.safetensors`` or ``thumbnails[:size=N]``.
            fps: frames sampled per second.
            num_frames: a fixed count of frames per video instead.
            layer: feature layer of an image checkpoint.
            device: where the model runs.
            cache_dir: frame-feature cache; default ``<checkpoint folder>/features/video_frames`` (none for
                thumbnails).
            batch_size: frames per forward pass.
            use_cache: False: extract every time (no cache at all).
        """
        from vitssl.video.frames import load_frame_model

        self = cls()
        self.fps, self.num_frames, self.layer, self.batch_size = float(fps), num_frames, layer, int(batch_size)
        objective = checkpoint_objective(model)
        if objective == "video_tca":
            from vitssl.video import tca

            self.method = "tca"
            self._tca = tca.TCAEmbedder.from_checkpoint(model, device=device)
            from vitssl.eval.features import checkpoint_sha256

            self.model = str(Path(model).absolute())
            self.checkpoint_hash = checkpoint_sha256(model)
            self.transform = self._tca.transform
            # the checkpoint's own sampling wins over the corpus spec's: its encoder learnt on that frame rate
            self.fps, self.num_frames = float(self._tca.fps), self._tca.num_frames
        else:
            self._frame_model = load_frame_model(model, device)
            self.model = str(getattr(self._frame_model, "path", model))
            self.checkpoint_hash = self._frame_model.checkpoint_hash
            self.transform = self._frame_model.transform
        if cache_dir is None and use_cache and Path(str(model)).is_file():
            cache_dir = Path(str(model)).absolute().parent / "features" / "video_frames"
        self.cache_dir = str(cache_dir) if cache_dir is not None and use_cache else None
        return self

    @property
    def feature_key(self) -> str:
        """What the vectors depend on besides the weights: recorded in the index manifest and checked at query."""
        return json.dumps(
            {
                "method": self.method,
                "layer": self.layer,
                "transform": self.transform,
                "fps": None if self.num_frames else self.fps,
                "num_frames": self.num_frames,
            },
            sort_keys=True,
        )

    def describe(self) -> dict[str, Any]:
        """The manifest's ``video`` entry (without the skipped list)."""
        return {
            "method": self.method,
            "model": self.model,
            "layer": self.layer,
            "fps": self.fps,
            "num_frames": self.num_frames,
        }

    def raw_frames(
        self, paths: Sequence[str], skip_corrupt: bool = False, progress: Callable[[int], None] | None = None
    ) -> list[np.ndarray | None]:
        """Per-video frame features before any video model (cached); None for skipped corrupt videos."""
        from vitssl.video.frames import video_frame_features

        if self._tca is not None:  # its frame backbone with the transform it was trained with
            return self._tca.frame_features(
                list(paths), cache_dir=self.cache_dir, skip_corrupt=skip_corrupt, progress=progress
            )
        return video_frame_features(
            self._frame_model,
            list(paths),
            fps=self.fps,
            num_frames=self.num_frames,
            cache_dir=self.cache_dir,
            batch_size=self.batch_size,
            layer=self.layer,
            skip_corrupt=skip_corrupt,
            progress=progress,
        )

    def embed_frames(self, frames: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Video vectors (N, E) and L2-normalised frame vectors of raw frame features."""
        if not frames:
            return np.zeros((0, 0), dtype=np.float32), []
        if self._tca is not None:
            vectors, outs = self._tca.embed(list(frames))
            return np.asarray(vectors, dtype=np.float32), [_l2(o) for o in outs]
        normed = [_l2(f) for f in frames]
        return _l2(np.stack([f.mean(axis=0) for f in normed])), normed

    def embed(self, paths: Sequence[str], skip_corrupt: bool = False, desc: str = "videos") -> Embedded:
        """Embed video files; unreadable ones raise (naming the file), or with ``skip_corrupt`` are left out.

        Raises:
            CorruptVideoError / MissingFileError: an unreadable video without ``skip_corrupt``.
            DataError: no video could be read.
        """
        from vitssl.eval.features import Progress

        with Progress(len(paths), f"frame features of {desc}", unit="video") as progress:
            raw = self.raw_frames(paths, skip_corrupt, progress.update)
        rows = np.asarray([i for i, f in enumerate(raw) if f is not None], dtype=np.int64)
        skipped = [str(paths[i]) for i, f in enumerate(raw) if f is None]
        if len(rows) == 0 and len(paths):
            raise DataError(f"none of the {len(paths)} videos could be read (all skipped as corrupt)")
        vectors, frames = self.embed_frames([raw[i] for i in rows])  # type: ignore[misc]
        return Embedded(vectors, frames, rows, skipped)


def embed_shared(
    embedder: VideoEmbedder, paths: Sequence[str], skip_corrupt: bool = False, desc: str = "videos"
) -> Embedded:
    """:meth:`VideoEmbedder.embed` with every process of a distributed job embedding ``paths[rank::world]``; the
    parts are gathered in path order on every rank (one process: the plain call).

    An unreadable video on any rank (without ``skip_corrupt``) raises the same error on every rank, so no rank is
    left waiting in the gather.
    """
    from vitssl import distributed as dist

    world = dist.get_world_size()
    if world == 1:
        return embedder.embed(paths, skip_corrupt, desc)
    rank = dist.get_rank()
    mine = np.arange(rank, len(paths), world, dtype=np.int64)
    try:
        part: Any = embedder.embed([paths[i] for i in mine], skip_corrupt, f"{desc} [rank {rank} of {world}]")
        part.rows = mine[part.rows]  # positions in ``paths``
    except (UserError, DataError) as err:
        part = err
    parts = dist.all_gather_object(part)
    failed = [p for p in parts if isinstance(p, BaseException)]
    if failed:
        raise failed[0]
    rows = np.concatenate([p.rows for p in parts])
    order = np.argsort(rows, kind="stable")
    vectors = np.concatenate([p.vectors for p in parts if len(p.rows)])[order]
    frames = [f for p in parts for f in p.frames]
    skipped = sorted((s for p in parts for s in p.skipped), key=list(map(str, paths)).index)
    if not len(rows):
        raise DataError(f"none of the {len(paths)} videos could be read (all skipped as corrupt)")
    return Embedded(np.ascontiguousarray(vectors), [frames[i] for i in order], rows[order], skipped)


# --------------------------------------------------------------------------------------------------------------
# Frame vectors beside an index
# --------------------------------------------------------------------------------------------------------------


def write_frames(directory: str | os.PathLike, frames: Sequence[np.ndarray]) -> Path:
    """Write the frame vectors of an index's videos (row order) into ``<directory>/frames`` atomically."""
    offsets = np.zeros(len(frames) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(f) for f in frames])
    width = frames[0].shape[1] if frames else 0
    target = Path(directory) / FRAMES_DIR
    with atomic_dir(target, overwrite=True) as tmp:
        out = np.lib.format.open_memmap(
            tmp / FRAME_VECTORS, mode="w+", dtype=np.float32, shape=(int(offsets[-1]), width)
        )
        for f, start in zip(frames, offsets[:-1]):
            out[start : start + len(f)] = f
        out.flush()
        del out
        np.save(tmp / FRAME_OFFSETS, offsets)
    return target


@dataclass
class FrameStore:
    """The frame vectors of an index folder, memory-mapped."""

    vectors: np.ndarray  # (F, E)
    offsets: np.ndarray  # (N + 1,)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> FrameStore:
        folder = Path(directory) / FRAMES_DIR
        try:
            vectors = np.load(folder / FRAME_VECTORS, mmap_mode="r")
            offsets = np.load(folder / FRAME_OFFSETS)
        except (OSError, ValueError) as err:
            raise core.IndexFormatError(
                f"{directory} has no readable frame vectors ({err}); rebuild it with `vitssl index build` for chamfer"
            ) from None
        if offsets.ndim != 1 or offsets[-1] != len(vectors):
            raise core.IndexFormatError(f"{folder}: offsets and vectors disagree; rebuild the index")
        return cls(vectors, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, row: int) -> np.ndarray:
        return np.asarray(self.vectors[self.offsets[row] : self.offsets[row + 1]])


def record_manifest(directory: str | os.PathLike, **entries: Any) -> None:
    """Add entries (``video``, ``source``) to an index folder's manifest (atomically; it carries no checksum)."""
    path = Path(directory) / core.MANIFEST_FILE
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest.update(entries)
    write_json(manifest, path, sort_keys=True)


def build_video_index(
    directory: str | os.PathLike,
    embedded: Embedded,
    paths: Sequence[str],
    embedder: VideoEmbedder,
    *,
    shard: tuple[int, int] | None = None,
    first_id: int = 0,
    trained: str | os.PathLike | None = None,
    source: dict[str, Any] | None = None,
    **options: Any,
) -> Path:
    """Write a video index folder (or shard) from embedded videos, atomically: the core index, the frame vectors,
    the manifest.

    Args:
        directory: output folder.
        embedded: :meth:`VideoEmbedder.embed` of ``paths``.
        paths: the videos embedded (their positions match ``embedded.rows``).
        embedder: the embedder (recorded in the manifest).
        shard: ``(i, n)`` to write shard i of n (faiss ids from ``first_id``); None: a whole index.
        first_id: corpus row of the shard's first video.
        trained: a trained quantizer shared by shards (factories that need training).
        source: the manifest's ``source`` entry (what ``index query`` embeds queries with), if any.
        **options: :func:`vitssl.index.core.build_index_dir` / ``build_shard`` options (factory, metric, ...).
    """
    directory = Path(directory)
    overwrite = bool(options.pop("overwrite", False))
    core._check_overwrite(directory, overwrite)
    samples = [str(paths[i]) for i in embedded.rows]
    common = dict(checkpoint=embedder.checkpoint_hash, feature_key=embedder.feature_key, overwrite=True, **options)
    # index, frame vectors and manifest entries are written into one temporary folder renamed into place at the
    # end: a build that fails half-way leaves neither a half index nor a damaged one it was to replace
    with atomic_dir(directory, overwrite=overwrite) as tmp:
        if shard is None:
            core.build_index_dir(tmp, embedded.vectors, samples, **common)
        else:
            core.build_shard(tmp, embedded.vectors, samples, shard=shard, first_id=first_id, trained=trained, **common)
        write_frames(tmp, embedded.frames)
        info = {**embedder.describe(), "frame_dim": int(embedded.frames[0].shape[1]), "skipped": embedded.skipped}
        record_manifest(tmp, video=info, **({"source": source} if source else {}))
    return directory


def merge_video_frames(shard_dirs: Sequence[str | os.PathLike], out: str | os.PathLike) -> None:
    """After :func:`vitssl.index.core.merge_shards`: merge the shards' frame vectors (shard order, as the index
    rows) and their ``video`` manifest entries into ``out``."""
    shards = []
    for d in shard_dirs:
        manifest = json.loads((Path(d) / core.MANIFEST_FILE).read_text(encoding="utf-8"))
        shards.append((manifest["shard"]["index"], Path(d), manifest))
    shards.sort(key=lambda s: s[0])
    frames: list[np.ndarray] = []
    for _, d, _ in shards:
        store = FrameStore.load(d)
        frames.extend(store.get(r) for r in range(len(store)))
    write_frames(out, frames)
    info = dict(shards[0][2]["video"])
    info["skipped"] = [p for _, _, m in shards for p in m["video"].get("skipped", [])]
    record_manifest(out, video=info)


def is_video_index(directory: str | os.PathLike) -> bool:
    """Whether an index folder holds videos (its manifest has a ``video`` entry)."""
    path = Path(directory) / core.MANIFEST_FILE
    try:
        return "video" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------------------
# Search and evaluation
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _one_faiss_thread() -> Iterator[None]:
    """Search with one OpenMP thread while one query is searched: handing a single query's work to other
    threads costs more than it saves (a top-10 search of 166 videos took 21 ms with 2 threads, 1.4 ms with 1, on
    the busy 2-core development machine)."""
    from vitssl._faiss import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


@dataclass
class VideoIndex:
    """A loaded video index folder: the core index, its frame vectors (when chamfer needs them), its embedder."""

    loaded: core.LoadedIndex
    info: dict[str, Any]
    _frames: FrameStore | None = None
    _row_of_sample: dict[str, int] = field(default_factory=dict)

    @property
    def frames(self) -> FrameStore:
        if self._frames is None:
            self._frames = FrameStore.load(self.loaded.directory)
        return self._frames

    def row_of_sample(self, sample: str) -> int | None:
        if not self._row_of_sample:
            self._row_of_sample = {s: r for r, s in enumerate(self.loaded.samples)}
        return self._row_of_sample.get(sample)


def load_video_index(
    directory: str | os.PathLike, checkpoint: str | os.PathLike | None = None, device: str = "cpu"
) -> tuple[VideoIndex, VideoEmbedder]:
    """Load a video index folder and the embedder its queries need (``checkpoint`` overrides the recorded model).

    Raises:
        IndexFormatError: not a video index, or the model is not the one it was built with.
    """
    directory = Path(directory)
    if not is_video_index(directory):
        core.load_index_dir(directory)  # its own clear error when the folder is no index at all
        raise core.IndexFormatError(f"{directory} is an image index; query it with --image, not --video")
    manifest = json.loads((directory / core.MANIFEST_FILE).read_text(encoding="utf-8"))
    info = manifest["video"]
    embedder = VideoEmbedder.open(
        checkpoint or info["model"],
        fps=info.get("fps") or 1.0,
        num_frames=info.get("num_frames"),
        layer=info.get("layer", "pooled"),
        device=device,
    )
    loaded = core.load_index_dir(
        directory, expect_checkpoint=embedder.checkpoint_hash, expect_feature_key=embedder.feature_key
    )
    return VideoIndex(loaded, info), embedder


def rank(
    index: VideoIndex,
    query_vector: np.ndarray,
    query_frames: np.ndarray | None,
    k: int,
    *,
    rerank: str | None = None,
    rerank_k: int = DEFAULT_RERANK_K,
    exclude: set[str] | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> list[tuple[str, float]]:
    """The top ``k`` videos for one query: ``(sample path, score)`` best first.

    Args:
        index: the loaded video index.
        query_vector: (E,) video vector of the query.
        query_frames: (n, E) its frame vectors (needed for ``rerank="chamfer"``).
        k: results to return (``k >= index size`` ranks the whole database).
        rerank: None, or "chamfer": the top ``max(k, rerank_k)`` of the video-level search re-scored by chamfer
            similarity (the rest keep their video-level order behind them).
        rerank_k: how many to re-score.
        exclude: sample paths to leave out (e.g. the query itself).
        nprobe: IVF lists to visit; ef_search: HNSW breadth (None: the index's).
    """
    if rerank is not None and rerank not in RERANKS:
        raise ConfigError(f"--rerank {rerank!r}: choose {', '.join(RERANKS)}")
    exclude = exclude or set()
    n = int(index.loaded.index.ntotal)
    depth = min(n, max(k, rerank_k if rerank else 0) + len(exclude))
    with _one_faiss_thread():
        scores, ids = core.search(index.loaded, query_vector[None, :], depth, nprobe=nprobe, ef_search=ef_search)
    found = [(s, float(sc)) for s, i, sc in zip(index.loaded.lookup(ids)[0], ids[0], scores[0]) if i >= 0]
    found = [(s, sc) for s, sc in found if s not in exclude]
    if rerank == "chamfer":
        if query_frames is None:
            raise ConfigError("--rerank chamfer needs the query's frame vectors")
        head = found[: max(k, rerank_k)]
        rows = [index.row_of_sample(s) for s, _ in head]
        chamfer = chamfer_scores(query_frames, [index.frames.get(r) for r in rows])
        order = np.argsort(-chamfer, kind="stable")
        found = [(head[i][0], float(chamfer[i])) for i in order] + found[len(head) :]
    return found[:k]


def _query_inputs(
    index: VideoIndex, embedder: VideoEmbedder, queries: Sequence[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Video vector and frame vectors of each query: read from the index when it holds the video, else embedded."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    outside = []
    vectors = index.loaded.vectors() if index.loaded.manifest.get("has_vectors") else None
    for q in queries:
        row = index.row_of_sample(q)
        if row is not None and vectors is not None:
            out[q] = (np.asarray(vectors[row]), index.frames.get(row))
        else:
            outside.append(q)
    if outside:
        embedded = embedder.embed(outside, skip_corrupt=False, desc="queries")
        for j, i in enumerate(embedded.rows):
            out[outside[i]] = (embedded.vectors[j], embedded.frames[j])
    return out


def evaluate_video_index(
    index: VideoIndex,
    embedder: VideoEmbedder,
    ground_truth: Any,
    *,
    rerank: str | None = None,
    rerank_k: int = DEFAULT_RERANK_K,
    ks: Sequence[int] = (1, 5, 10),
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> dict[str, Any]:
    """mAP (AP over the ranked database, the query itself left out) and recall@k of a video index.

    Ground-truth ids are matched to the index's videos by path, else by file name (dataset ids), integers by faiss
    id (:func:`vitssl.eval.retrieval_metrics.match_ids`); queries the index
    holds are taken from it, others are embedded from their files when those exist; queries without any positive
    in the index are skipped (counted). Positives outside the index cannot be found and are dropped, as FIVR's
    protocol drops positives outside its database.

    Args:
        index: the loaded video index.
        embedder: the embedder of its queries.
        ground_truth: a :class:`vitssl.eval.retrieval_metrics.GroundTruth`.
        rerank: None or "chamfer".
        rerank_k: videos re-scored by chamfer per query.
        ks: recall cut-offs.
        nprobe, ef_search: search parameters.

    Returns:
        ``{"mAP", "recall@k"..., "num_queries", "skipped_queries", "rerank", "database", "seconds_per_query"}``.
    """
    from vitssl.eval.retrieval_metrics import evaluate_ranking, match_ids

    samples = index.loaded.samples
    ids = set(ground_truth.queries) | {p for ps in ground_truth.positives.values() for p in ps}
    ids |= {p for ps in ground_truth.excluded.values() for p in ps}
    faiss_ids = index.loaded.faiss_ids.tolist()
    matched = match_ids(ids, samples, faiss_ids=faiss_ids, as_written=ground_truth.as_written)
    query_paths = {}
    for q in ground_truth.queries:
        if q in matched:
            query_paths[q] = matched[q]
        elif isinstance(q, str) and os.path.isfile(q):
            query_paths[q] = os.path.abspath(q)
    positives = {
        q: {matched[p] for p in ground_truth.positives.get(q, ()) if p in matched} for q in ground_truth.queries
    }
    wanted = [q for q in ground_truth.queries if q in query_paths and positives[q]]
    inputs = _query_inputs(index, embedder, sorted({query_paths[q] for q in wanted}))
    n = int(index.loaded.index.ntotal)
    results = {}
    t0 = time.perf_counter()
    for q in wanted:
        vector, frames = inputs[query_paths[q]]
        exclude = {query_paths[q]} | {matched[p] for p in ground_truth.excluded.get(q, ()) if p in matched}
        ranked = rank(
            index, vector, frames, n, rerank=rerank, rerank_k=rerank_k, exclude=exclude, nprobe=nprobe,
            ef_search=ef_search,
        )  # fmt: skip
        results[q] = [s for s, _ in ranked]
    seconds = time.perf_counter() - t0
    metrics = evaluate_ranking(results, {q: positives[q] for q in ground_truth.queries}, ks)
    metrics.update(
        rerank=rerank,
        rerank_k=rerank_k if rerank else None,
        database=n,
        seconds_per_query=seconds / max(1, len(results)),
        ground_truth=ground_truth.name,
    )
    return metrics


def save_video_grid(
    query: str,
    hits: Sequence[tuple[str, float]],
    path: str | os.PathLike,
    *,
    fps: float = 1.0,
    num_frames: int | None = None,
    columns: int = 6,
    tile_size: int = 96,
) -> Path:
    """A contact sheet: the query video's frames in the first row, then one row per neighbour (best first).

    Each row shows up to ``columns`` frames spread evenly over the frames sampled at ``fps`` (or ``num_frames``);
    the first tile of a row is captioned with the file name and score. Unreadable videos draw grey rows.
    """
    from vitssl.data.common import CorruptImageError
    from vitssl.index.grid import Tile, fit_tile, save_tiles
    from vitssl.video.frames import sample_frames

    def row(video: str, caption: str) -> list[Tile]:
        try:
            frames, stamps = sample_frames(video, fps=fps, num_frames=num_frames)
        except (CorruptImageError, MissingFileError) as err:
            _logger.warning("contact sheet: cannot draw %s (%s)", video, err)
            return [Tile(fit_tile(None, tile_size), caption)]
        pick = np.unique(np.linspace(0, len(frames) - 1, min(columns, len(frames))).round().astype(int))
        from PIL import Image

        return [
            Tile(fit_tile(Image.fromarray(frames[i].numpy()), tile_size), caption if j == 0 else f"{stamps[i]:.1f} s")
            for j, i in enumerate(pick)
        ]

    rows = [row(query, f"query\n{Path(query).name[:18]}")]
    rows += [row(p, f"#{r} {Path(p).name[:14]}\n{score:.3f}") for r, (p, score) in enumerate(hits, 1)]
    return save_tiles(rows, path, tile_size)


__all__ = [
    "DEFAULT_RERANK_K",
    "FRAMES_DIR",
    "METHODS",
    "RERANKS",
    "VIDEO_DATASETS",
    "Embedded",
    "FrameStore",
    "VideoCorpus",
    "VideoEmbedder",
    "VideoIndex",
    "build_video_index",
    "chamfer_scores",
    "chamfer_similarity",
    "checkpoint_objective",
    "embed_shared",
    "evaluate_video_index",
    "is_video_index",
    "is_video_spec",
    "list_videos",
    "load_video_index",
    "merge_video_frames",
    "rank",
    "read_video_list",
    "record_manifest",
    "save_video_grid",
    "video_corpus",
    "write_frames",
]
