"""Building index folders: from embeddings in one process (:func:`build_index_dir`), and the Corpus -> Embedder ->
Store pipeline (:mod:`vitssl.index.pipeline`) that ``vitssl index build`` runs: :func:`index_build` (a whole index
or one shard), :func:`index_train` (the quantizer shards share) and :func:`index_merge` (the shards into one).

In a job of several processes every process embeds a share of the corpus (the embedder gathers it on every
rank); rank 0 writes, the others return None.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitssl.index.factory import (
    Metric,
    _prepare,
    build_index,
    default_search_params,
    train_index,
    training_sample_indices,
)
from vitssl.index.pipeline import (
    Corpus,
    Embedder,
    Embedding,
    EmbedOptions,
    IndexSpec,
    StoreOptions,
    corpus_metadata,
    open_corpus,
    open_embedder,
)
from vitssl.index.shards import build_shard, merge_shards, shard_range, write_trained_index
from vitssl.index.store import MANIFEST_FILE, _check_overwrite, record_manifest, write_index_dir
from vitssl.io import atomic_dir


def build_index_dir(
    directory: str | Path,
    embeddings: np.ndarray | torch.Tensor,
    samples: Sequence[str],
    factory: str = "Flat",
    metric: Metric = "ip",
    normalize: bool = True,
    train_size: int | None = None,
    seed: int = 0,
    checkpoint: str | None = None,
    feature_key: str | None = None,
    store_vectors: bool = True,
    overwrite: bool = False,
    use_gpu: bool | None = None,
    metadata: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Build an index over ``embeddings`` and write it as an index directory (single-process build).

    Args:
        directory: output directory.
        embeddings: (N, D) vectors.
        samples: N sample ids (paths), row order; faiss ids are 0..N-1.
        factory: faiss index factory string.
        metric: "ip" or "l2".
        normalize: L2-normalise vectors (and later queries).
        train_size: training sample size for IVF / PQ; None = all vectors.
        seed: training sample seed.
        checkpoint: checkpoint content hash recorded in the manifest (checked at query time).
        feature_key: feature layer / transform key recorded in the manifest.
        store_vectors: also write vectors.npy (exact re-search, evaluation, merging).
        overwrite: replace an existing directory.
        use_gpu: build IVF-Flat indexes on a GPU; None = when faiss has one, False = never (see :func:`build_index`).
        metadata: optional JSON object per vector (``{}`` for none), row order; stored in ids.jsonl.

    Returns:
        The directory.
    """
    t0 = time.perf_counter()
    _check_overwrite(Path(directory), overwrite)
    x = _prepare(embeddings, normalize)
    index = build_index(x, factory, metric, normalize=False, train_size=train_size, seed=seed, use_gpu=use_gpu)
    manifest = {
        "factory": factory,
        "metric": metric,
        "normalize": normalize,
        "checkpoint": checkpoint,
        "feature_key": feature_key,
        "train_size": len(training_sample_indices(x.shape[0], train_size, seed)),
        "seed": seed,
        "search_params": default_search_params(index),
        "build_seconds": time.perf_counter() - t0,
    }
    return write_index_dir(directory, index, list(samples), manifest, x if store_vectors else None, overwrite, metadata)


def write_index(
    directory: str | Path,
    embedding: Embedding,
    corpus: Corpus,
    embedder: Embedder,
    store: StoreOptions,
    *,
    shard: tuple[int, int] | None = None,
    first_id: int = 0,
    trained: str | Path | None = None,
    source: dict[str, Any] | None = None,
    metadata: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write the index folder (or shard) of an embedding, atomically: the faiss index and ids, the frame vectors
    when the embedding has them, and a manifest with the :class:`~vitssl.index.pipeline.IndexSpec`, the ``source``
    and the embedder's own entries. A build that fails half-way leaves neither a half index nor a damaged one it
    was to replace.

    Args:
        directory: output folder.
        embedding: the embedder's output for the rows to index.
        corpus: the corpus it came from.
        embedder: the embedder.
        store: factory, metric, normalisation, training sample, vectors, overwrite.
        shard: ``(i, n)`` to write shard i of n (faiss ids from ``first_id``); None: a whole index.
        first_id: corpus row of the shard's first item.
        trained: the trained quantizer the shards share (factories that need training).
        source: the manifest's ``source`` (default: the embedder's).
        metadata: one JSON object per embedded row (default: the corpus's
            :func:`~vitssl.index.pipeline.corpus_metadata` of ``embedding.rows``).

    Raises:
        MetadataError: the corpus's metadata of a row is not a dict of JSON values.
    """
    from vitssl.index.frames import write_frames

    directory = Path(directory)
    _check_overwrite(directory, store.overwrite)
    spec = IndexSpec.of(corpus, embedder, store, embedding.vectors.shape[1])
    # Read before the folder is started: a corpus with bad metadata fails with nothing written.
    if metadata is None:
        metadata = corpus_metadata(corpus, embedding.rows)
    common: dict[str, Any] = dict(
        factory=store.factory,
        metric=store.metric,
        normalize=store.normalize,
        checkpoint=embedder.checkpoint_hash,
        feature_key=embedder.feature_key,
        store_vectors=store.store_vectors,
        overwrite=True,
        metadata=metadata,
    )
    with atomic_dir(directory, overwrite=store.overwrite) as tmp:
        if shard is None:
            build_index_dir(
                tmp, embedding.vectors, embedding.ids, train_size=store.train_size, seed=store.seed, **common
            )
        else:
            build_shard(
                tmp, embedding.vectors, embedding.ids, shard=shard, first_id=first_id, trained=trained, **common
            )
        if embedding.frames is not None:
            write_frames(tmp, embedding.frames)
        entries = embedder.manifest_entries(embedding)
        record_manifest(tmp, spec=spec.to_json(), source=source or embedder.source(corpus), **entries)
    return directory


@dataclass
class BuildResult:
    """What :func:`index_build` wrote."""

    out: Path  # the index (or shard) folder
    corpus: str  # corpus kind
    embedder: str  # embedder name
    count: int  # vectors indexed
    dimension: int  # their width
    rows: tuple[int, int]  # corpus rows [start, stop) this build covered
    num_skipped: int = 0  # unreadable items left out
    skipped: list[str] | None = None  # their sample ids, when the embedder names them
    shard: tuple[int, int] | None = None  # (i, n) of a shard build

    def summary(self) -> dict[str, Any]:
        """The JSON summary of ``--json``."""
        out: dict[str, Any] = {"out": str(self.out), "count": self.count}
        if self.shard is None:
            out = {"task": "index_build", **out, "dimension": self.dimension}
        else:
            out = {"task": "index_shard", "out": str(self.out), "shard": list(self.shard), "count": self.count}
        if self.skipped is not None:
            out["skipped"] = list(self.skipped)
        return {**out, "num_skipped": self.num_skipped}


@dataclass
class TrainResult:
    """What :func:`index_train` wrote."""

    trained: Path  # the trained quantizer
    train_count: int  # training vectors
    embedder: str = ""  # the embedder's name

    def summary(self) -> dict[str, Any]:
        return {"task": "index_train", "trained": str(self.trained), "train_count": self.train_count}


def _open(
    data: str, split: str, model: str, embed: EmbedOptions, corpus_kind: str | None, embedder: str | None
) -> tuple[Corpus, Embedder]:
    corpus = open_corpus(data, split, corpus_kind)
    return corpus, open_embedder(model, corpus, embed, embedder)


def index_build(
    data: str,
    split: str,
    model: str,
    out: str | Path,
    embed: EmbedOptions | None = None,
    store: StoreOptions | None = None,
    *,
    shard: tuple[int, int] | None = None,
    trained: str | Path | None = None,
    corpus_kind: str | None = None,
    embedder: str | None = None,
) -> BuildResult | None:
    """Embed a corpus and write its index folder (what ``vitssl index build`` runs in each job).

    Args:
        data: the corpus's data spec (``digits``, ``videos:root=DIR``, a registered kind's ``NAME:...``).
        split: its split.
        model: what the embedder opens (a checkpoint, ``backbone.safetensors``, ``thumbnails``, ...).
        out: the index folder (or shard folder) to write.
        embed: how the embedder runs (default :class:`~vitssl.index.pipeline.EmbedOptions`).
        store: how the index is built (default :class:`~vitssl.index.pipeline.StoreOptions`).
        shard: ``(i, n)``: only rows ``shard_range(N, i, n)``, written as shard i of n.
        trained: the quantizer the shards share (:func:`index_train`), for factories that need training.
        corpus_kind: the registered corpus kind (default: from the spec's name).
        embedder: the registered embedder (default: the corpus's choice for ``model``).

    Returns:
        The :class:`BuildResult` on rank 0; None on other ranks.
    """
    from vitssl.distributed import is_main_process

    embed, store = embed or EmbedOptions(), store or StoreOptions()
    corpus, emb = _open(data, split, model, embed, corpus_kind, embedder)
    if shard is None:
        rows, desc = None, data
        start, stop = 0, len(corpus)
    else:
        start, stop = shard_range(len(corpus), *shard)
        rows, desc = (start, stop), f"{data} shard {shard[0]}/{shard[1]}"
    embedding = emb.embed(corpus, rows, desc)
    if not is_main_process():
        return None
    folder = write_index(out, embedding, corpus, emb, store, shard=shard, first_id=start, trained=trained)
    return BuildResult(
        out=folder,
        corpus=corpus.kind,
        embedder=emb.name,
        count=len(embedding.vectors),
        dimension=int(embedding.vectors.shape[1]),
        rows=(start, stop),
        num_skipped=embedding.num_skipped,
        skipped=embedding.skipped,
        shard=shard,
    )


def index_train(
    data: str,
    split: str,
    model: str,
    out: str | Path,
    embed: EmbedOptions | None = None,
    store: StoreOptions | None = None,
    *,
    corpus_kind: str | None = None,
    embedder: str | None = None,
) -> TrainResult | None:
    """Train the quantizer of ``store.factory`` on ``training_sample_indices(N, train_size, seed)`` of a corpus and
    write it to ``out`` (``trained.faiss``), for the shards of :func:`index_build` to share.

    Returns:
        The :class:`TrainResult` on rank 0; None on other ranks.
    """
    from vitssl.distributed import is_main_process

    embed, store = embed or EmbedOptions(), store or StoreOptions()
    corpus, emb = _open(data, split, model, embed, corpus_kind, embedder)
    rows = training_sample_indices(len(corpus), store.train_size, store.seed)
    embedding = emb.embed(corpus, rows, f"training sample of {data}")
    if not is_main_process():
        return None
    x = embedding.vectors
    index = train_index(x, store.factory, store.metric, store.normalize)
    path = write_trained_index(out, index, store.factory, store.metric, store.normalize, len(x), store.seed)
    return TrainResult(path, len(x), emb.name)


def index_rebuild(
    directory: str | Path, out: str | Path, embed: EmbedOptions | None = None, overwrite: bool = False
) -> BuildResult | None:
    """Build again what an index folder's :class:`~vitssl.index.pipeline.IndexSpec` describes (its corpus, embedder
    and store options) into ``out``: the same ids and vectors when the corpus and the model file are unchanged.

    Args:
        directory: the index folder whose spec is followed.
        out: where the new index goes.
        embed: how the embedder runs (default: the spec's layer, everything else the defaults).
        overwrite: replace an existing ``out``.

    Raises:
        IndexSpecError: the folder was written before specs existed (its manifest names no corpus or embedder).
    """
    from vitssl.index.pipeline import IndexSpecError

    manifest = json.loads((Path(directory) / MANIFEST_FILE).read_text(encoding="utf-8"))
    spec = IndexSpec.from_manifest(manifest)
    if spec.legacy or not spec.corpus or not spec.embedder:
        raise IndexSpecError(
            f"index {directory} records no corpus and embedder (written before index specs); rebuild it with "
            "`vitssl index build`"
        )
    store = StoreOptions(
        **{k: spec.store[k] for k in ("factory", "metric", "normalize", "train_size", "seed") if k in spec.store},
        store_vectors=bool(manifest.get("has_vectors", True)),
        overwrite=overwrite,
    )
    return index_build(
        spec.corpus["data"],
        spec.corpus["split"],
        spec.embedder["model"],
        out,
        embed or EmbedOptions(layer=spec.embedder.get("layer", "pooled")),
        store,
        corpus_kind=spec.corpus["kind"],
        embedder=spec.embedder["name"],
    )


def index_merge(shard_dirs: Sequence[str | Path], out: str | Path, overwrite: bool = False) -> int:
    """Merge shard folders into one index folder (their frame vectors too, for video shards); returns the count."""
    from vitssl.index.frames import FRAMES_DIR, merge_video_frames

    dirs = [Path(d) for d in shard_dirs]
    merge_shards(dirs, out, overwrite=overwrite)
    if dirs and all((d / FRAMES_DIR).is_dir() for d in dirs):
        merge_video_frames(dirs, out)
    return int(json.loads((Path(out) / MANIFEST_FILE).read_text(encoding="utf-8"))["count"])


__all__ = [
    "BuildResult",
    "TrainResult",
    "build_index_dir",
    "index_build",
    "index_merge",
    "index_rebuild",
    "index_train",
    "write_index",
]
