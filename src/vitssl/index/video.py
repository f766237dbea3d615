"""Video retrieval on index folders: one vector per video, frame vectors beside it for chamfer re-ranking, search
and evaluation against near-duplicate ground truth.

A video index is built by the index pipeline (:func:`vitssl.index.build.index_build` with a ``videos`` corpus of
:mod:`vitssl.index.corpora` and a video embedder of :mod:`vitssl.index.embedders`), or from embedded videos with
:func:`build_video_index`. Its folder is a :mod:`vitssl.index.store` folder (sample ids are the video paths) plus
the frame vectors of :mod:`vitssl.index.frames`; its manifest gains ``video``: method, model, layer, fps /
num_frames, frame width, skipped videos.

The pieces live by responsibility and are re-exported here: corpora (:mod:`vitssl.index.corpora`), the embedder
(:mod:`vitssl.index.video_embed`), chamfer similarity (:mod:`vitssl.index.chamfer`), frame vectors
(:mod:`vitssl.index.frames`), contact sheets (:mod:`vitssl.index.video_grid`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitssl.config import ConfigError
from vitssl.index import core
from vitssl.index.chamfer import chamfer_scores, chamfer_similarity
from vitssl.index.corpora import VIDEO_DATASETS, VideoCorpus, is_video_spec, read_video_list, video_corpus
from vitssl.index.frames import FRAMES_DIR, FrameStore, merge_video_frames, write_frames
from vitssl.index.pipeline import Embedding, IndexSpec, StoreOptions, corpus_metadata
from vitssl.index.store import record_manifest
from vitssl.index.video_embed import METHODS, Embedded, VideoEmbedder, checkpoint_objective, embed_shared
from vitssl.index.video_grid import save_video_grid
from vitssl.video.files import list_videos

RERANKS = ("chamfer",)
DEFAULT_RERANK_K = 100


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
    """Write a video index folder (or shard) from embedded videos, atomically (:func:`vitssl.index.build.write_index`:
    the index, the frame vectors, the manifest with its spec).

    Args:
        directory: output folder.
        embedded: :meth:`VideoEmbedder.embed` of ``paths``.
        paths: the videos embedded (their positions match ``embedded.rows``).
        embedder: the embedder (recorded in the manifest).
        shard: ``(i, n)`` to write shard i of n (faiss ids from ``first_id``); None: a whole index.
        first_id: corpus row of the shard's first video.
        trained: a trained quantizer shared by shards (factories that need training).
        source: the manifest's ``source`` entry (what ``index query`` embeds queries with), if any.
        **options: :class:`vitssl.index.pipeline.StoreOptions` fields (factory, metric, normalize, train_size, seed,
            store_vectors, overwrite).
    """
    from vitssl.index.build import write_index
    from vitssl.index.embedders import for_video_embedder

    source = dict(source or {})
    corpus = VideoCorpus(
        source.get("data", ""), tuple(map(str, paths)), embedder.fps, embedder.num_frames, source.get("split") or "val"
    )
    rows = np.asarray(embedded.rows, dtype=np.int64)
    embedding = Embedding(
        embedded.vectors,
        [str(paths[i]) for i in rows],
        rows + first_id,
        skipped=list(embedded.skipped),
        num_skipped=len(embedded.skipped),
        frames=list(embedded.frames),
    )
    return write_index(
        directory,
        embedding,
        corpus,
        for_video_embedder(embedder),
        StoreOptions(**options),
        shard=shard,
        first_id=first_id,
        trained=trained,
        source=source or None,
        # corpus holds only ``paths``, so its rows are the local ones (the embedding's are offset by first_id)
        metadata=corpus_metadata(corpus, rows),
    )


def is_video_index(directory: str | os.PathLike) -> bool:
    """Whether an index folder holds videos (its manifest has a ``video`` entry)."""
    path = Path(directory) / core.MANIFEST_FILE
    try:
        return "video" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


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

    def meta_of_sample(self, sample: str) -> dict[str, Any]:
        """The stored metadata of a video (``{}`` when its row has none or it is not in the index)."""
        row = self.row_of_sample(sample)
        metadata = self.loaded.metadata
        return dict(metadata[row]) if metadata is not None and row is not None else {}


def load_video_index(
    directory: str | os.PathLike, checkpoint: str | os.PathLike | None = None, device: str = "cpu"
) -> tuple[VideoIndex, VideoEmbedder]:
    """Load a video index folder and the embedder its queries need (``checkpoint`` overrides the recorded model).

    Raises:
        IndexFormatError: not a video index.
        IndexSpecError: the model is not the one it was built with (another checkpoint, embedder or sampling).
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
    from vitssl.index.embedders import for_video_embedder

    loaded = core.load_index_dir(directory)
    IndexSpec.from_manifest(loaded.manifest).check_query(
        directory,
        embedder=for_video_embedder(embedder).name,
        checkpoint=embedder.checkpoint_hash,
        feature_key=embedder.feature_key,
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
