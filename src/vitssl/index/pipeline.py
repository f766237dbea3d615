"""One pipeline for every index: Corpus -> Embedder -> Store.

A **corpus** is what is indexed: rows with a sample id each (image dataset rows, video files, ...) and, when the
corpus defines :meth:`Corpus.metadata`, a small JSON object per row (a class label, a file size) that the store keeps
in ``ids.jsonl`` and queries return beside each neighbour. An
**embedder** turns rows of a corpus into vectors (:class:`Embedding`): every process of a distributed job embeds a
share and all get the whole back. The **store** is the faiss index folder (:mod:`vitssl.index.store`), written by
:func:`vitssl.index.build.write_index` with an :class:`IndexSpec` in its manifest: what was indexed, with which
embedder and checkpoint, and how (factory, metric, normalisation), so the index can be rebuilt and a query checked
against it.

Corpus kinds and embedders register by name in one line each::

    @CORPORA.register("letters")
    class Letters: ...

    @EMBEDDERS.register("letter_hash")
    class LetterHash: ...

and are then built by ``vitssl index build`` (``--data letters:...``; ``--embedder letter_hash`` or the corpus's
:meth:`Corpus.default_embedder`) and :func:`vitssl.index.build.index_build` like the built-in ones
(:mod:`vitssl.index.corpora`: ``images``, ``videos``; :mod:`vitssl.index.embedders`: ``image``, ``video``,
``thumbnails``, ``tca``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from vitssl.errors import UserError
from vitssl.registry import Registry

SPEC_VERSION = 1
DEFAULT_CORPUS = "images"  # the kind of a data spec no other kind claims: a dataset registry spec

# The modules whose import registers the built-in kinds (imported on the first lookup, see vitssl.registry).
CORPORA: Registry[Any] = Registry("corpus kind", providers=("vitssl.index.corpora",))
EMBEDDERS: Registry[Any] = Registry("embedder", providers=("vitssl.index.embedders",))


class IndexSpecError(UserError, ValueError):
    """A query does not fit the index: another embedder, checkpoint, feature layer, dimension or normalisation."""


class MetadataError(UserError, ValueError):
    """A corpus's :meth:`Corpus.metadata` returned something other than a JSON object for a row."""


@dataclass(frozen=True)
class EmbedOptions:
    """How an embedder runs: the same for every kind (an embedder ignores what it has no use for)."""

    layer: str = "pooled"  # feature layer of an image backbone: pooled | cls | mean | lastN[avg]
    device: str = "auto"  # auto | cpu | cuda
    cache_dir: str | None = None  # feature cache folder; None: the embedder's default (next to the checkpoint)
    batch_size: int = 256  # items per forward pass and process
    num_workers: int = 0  # data-loading processes per process
    skip_corrupt: bool = False  # leave unreadable items out (named or counted) instead of failing


@dataclass(frozen=True)
class StoreOptions:
    """How the faiss index is built and stored."""

    factory: str = "Flat"  # faiss index factory string: Flat, IVF4096,PQ64, HNSW32, ...
    metric: str = "ip"  # ip (cosine on normalised vectors) | l2
    normalize: bool = True  # L2-normalise vectors (and later the queries)
    train_size: int | None = None  # training sample for IVF / PQ; None: every vector
    seed: int = 0  # training sample seed
    store_vectors: bool = True  # also write vectors.npy (exact recall, HNSW merges)
    overwrite: bool = False  # replace an existing output


@dataclass
class Embedding:
    """Vectors of corpus rows, as every embedder returns them (the same on every rank)."""

    vectors: np.ndarray  # (M, D) float32
    ids: list[str]  # M sample ids, row order
    rows: np.ndarray  # (M,) int64 corpus rows; M < rows asked for only when unreadable items were skipped
    skipped: list[str] | None = None  # sample ids of the items left out as unreadable; None: only counted
    num_skipped: int = 0  # how many were left out
    frames: list[np.ndarray] | None = None  # per row (n_i, E) frame vectors, stored beside the index (videos)


@runtime_checkable
class Corpus(Protocol):
    """What is indexed: ``len(corpus)`` rows, each with a sample id and an item an embedder reads.

    A corpus may also define ``metadata(row) -> dict[str, Any]``: a JSON object of the row (string keys; strings,
    numbers, booleans, None, lists and objects of them), stored in ``ids.jsonl`` as the row's ``"meta"`` and
    returned with the row by queries; ``{}`` for a row without any. It is optional and not part of the protocol's
    checked methods, so corpora written before it existed still satisfy it: the pipeline looks it up with
    ``getattr`` (:func:`corpus_metadata`). It should be cheap (read what the dataset keeps in memory, stat a file),
    never decode the item a second time.

    Attributes:
        kind: the registered corpus kind.
        spec_names: data-spec names (``NAME:key=value,...``) this kind claims besides its own name.
        data: the data spec it was opened from; split: its split.
    """

    kind: ClassVar[str]
    spec_names: ClassVar[tuple[str, ...]]
    data: str
    split: str

    @classmethod
    def open(cls, data: str, split: str) -> Corpus:
        """Open the corpus a data spec names (``ConfigError`` for a bad spec)."""
        ...

    def __len__(self) -> int: ...

    def sample_id(self, row: int) -> str:
        """The id of a row, as ``ids.jsonl`` stores it."""
        ...

    def item(self, row: int) -> Any:
        """What an embedder reads for a row (an image and its target, a video path, ...)."""
        ...

    def describe(self) -> dict[str, Any]:
        """The options that open the corpus again (the spec's ``corpus`` entry, with ``kind``)."""
        ...

    def default_embedder(self, model: str) -> str:
        """The registered embedder for ``model`` over this corpus when none is named."""
        ...


@runtime_checkable
class Embedder(Protocol):
    """Turns corpus rows (and queries) into vectors.

    Attributes:
        name: the registered embedder name.
        checkpoint_hash: digest of the weights (None when there are none); recorded and checked at query time.
        feature_key: what else the vectors depend on (layer, transform, sampling); recorded and checked.
    """

    name: ClassVar[str]
    checkpoint_hash: str | None
    feature_key: str | None

    @classmethod
    def open(cls, model: str, corpus: Corpus | None, options: EmbedOptions) -> Embedder:
        """Open ``model`` for ``corpus`` (None: for queries of an index); ``ConfigError`` when it does not fit."""
        ...

    def embed(self, corpus: Corpus, rows: Any = None, desc: str | None = None) -> Embedding:
        """Embed rows of ``corpus``: None (all), ``(start, stop)`` or an ascending array of rows."""
        ...

    def describe(self) -> dict[str, Any]:
        """The options that open the embedder again (the spec's ``embedder`` entry, with ``name`` and ``model``)."""
        ...

    def source(self, corpus: Corpus) -> dict[str, Any]:
        """The manifest's ``source``: what ``index query`` embeds queries with, and the corpus."""
        ...

    def manifest_entries(self, embedding: Embedding) -> dict[str, Any]:
        """Further manifest entries of an index of this embedder (e.g. ``video``); ``{}`` for none."""
        ...


def corpus_kind_of(data: str) -> str:
    """The corpus kind of a data spec: the registered kind named by, or claiming, its name; else ``images``."""
    from vitssl.eval.spec import parse_data_spec

    name = parse_data_spec(data)[0]
    for kind in CORPORA:
        if kind != DEFAULT_CORPUS and (name == kind or name in getattr(CORPORA.get(kind), "spec_names", ())):
            return kind
    return DEFAULT_CORPUS


def open_corpus(data: str, split: str, kind: str | None = None) -> Corpus:
    """Open the corpus of ``data`` (its kind from :func:`corpus_kind_of` unless named)."""
    return CORPORA.get(kind or corpus_kind_of(data)).open(data, split)


def open_embedder(model: str, corpus: Corpus, options: EmbedOptions, name: str | None = None) -> Embedder:
    """Open the embedder ``name`` (default: the corpus's :meth:`Corpus.default_embedder` of ``model``)."""
    return EMBEDDERS.get(name or corpus.default_embedder(model)).open(model, corpus, options)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."  # a sha256 (64 hex digits) shows whole


@dataclass(frozen=True)
class IndexSpec:
    """How an index was built (saved as the manifest's ``spec``): enough to rebuild it and to check a query.

    An index folder written before specs existed reads as a *legacy* spec made of its manifest's ``checkpoint``,
    ``feature_key``, ``dimension``, ``normalize`` and ``factory``; its corpus and embedder are unknown (``{}``) and
    are not checked.
    """

    corpus: dict[str, Any]  # {"kind": ..., "data": ..., "split": ...}: Corpus.describe()
    embedder: dict[str, Any]  # {"name": ..., "model": ..., ...}: Embedder.describe()
    checkpoint: str | None  # weights digest of the embedder
    feature_key: str | None  # the embedder's feature key
    dimension: int  # vector width
    store: dict[str, Any] = field(default_factory=dict)  # factory, metric, normalize, train_size, seed
    legacy: bool = False  # read from a manifest without a spec

    @classmethod
    def of(cls, corpus: Corpus, embedder: Embedder, store: StoreOptions, dimension: int) -> IndexSpec:
        """The spec of an index of ``corpus`` embedded by ``embedder`` and stored with ``store``."""
        return cls(
            corpus=dict(corpus.describe()),
            embedder=dict(embedder.describe()),
            checkpoint=embedder.checkpoint_hash,
            feature_key=embedder.feature_key,
            dimension=int(dimension),
            store={
                "factory": store.factory,
                "metric": store.metric,
                "normalize": store.normalize,
                "train_size": store.train_size,
                "seed": store.seed,
            },
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "version": SPEC_VERSION,
            "corpus": self.corpus,
            "embedder": self.embedder,
            "checkpoint": self.checkpoint,
            "feature_key": self.feature_key,
            "dimension": self.dimension,
            "store": self.store,
        }

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> IndexSpec:
        """The spec of a loaded manifest (a legacy one when it has none)."""
        saved = manifest.get("spec")
        if isinstance(saved, Mapping):
            return cls(
                corpus=dict(saved.get("corpus") or {}),
                embedder=dict(saved.get("embedder") or {}),
                checkpoint=saved.get("checkpoint"),
                feature_key=saved.get("feature_key"),
                dimension=int(saved.get("dimension", manifest.get("dimension", 0))),
                store=dict(saved.get("store") or {}),
            )
        return cls(
            corpus={},
            embedder={},
            checkpoint=manifest.get("checkpoint"),
            feature_key=manifest.get("feature_key"),
            dimension=int(manifest.get("dimension", 0)),
            store={k: manifest.get(k) for k in ("factory", "metric", "normalize", "train_size", "seed")},
            legacy=True,
        )

    @property
    def normalize(self) -> bool:
        return bool(self.store.get("normalize", True))

    def check_query(
        self,
        directory: str | Path,
        *,
        embedder: str | None = None,
        checkpoint: str | None = None,
        feature_key: str | None = None,
        dimension: int | None = None,
        normalize: bool | None = None,
    ) -> None:
        """Refuse a query embedded otherwise than the index's vectors (None: that property is not checked).

        Raises:
            IndexSpecError: one line naming what the index was built with, what the query has, and the fix.
        """
        built_with = self.embedder.get("model")
        fix = (
            f"query with the model the index was built with ({built_with}) or rebuild the index"
            if built_with
            else "query with the model the index was built with or rebuild the index"
        )
        checks = [
            ("embedder", self.embedder.get("name"), embedder, f"embed queries with {self.embedder.get('name')!r}"),
            ("checkpoint", self.checkpoint, checkpoint, fix),
            ("features", self.feature_key, feature_key, "use the same layer, transform and sampling, or rebuild"),
            ("dimension", self.dimension, dimension, fix),
            ("normalize", self.normalize, normalize, "normalise queries as the index's vectors, or rebuild"),
        ]
        for what, built, query, how in checks:
            if query is None or (built is None and what == "embedder") or built == query:
                continue
            if what == "embedder" and self.legacy:
                continue
            raise IndexSpecError(
                f"index {directory} was built with {what} {_show(built)}, the query has {what} {_show(query)}; {how}"
            )


def embedding_rows(count: int, rows: Any) -> np.ndarray:
    """The corpus rows that ``rows`` (None, ``(start, stop)`` or an array) stands for, as an int64 array."""
    if rows is None:
        return np.arange(count, dtype=np.int64)
    if isinstance(rows, tuple):
        return np.arange(rows[0], rows[1], dtype=np.int64)
    return np.asarray(rows, dtype=np.int64)


def _check_metadata(kind: str, row: int, meta: Any) -> dict[str, Any]:
    """One row's metadata as the store writes it, or a one-line :class:`MetadataError` naming the kind and row."""
    where = f"corpus kind {kind!r} row {row}: metadata"
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise MetadataError(f"{where} must be a dict of JSON values, got {type(meta).__name__}; return {{}} for none")
    bad_keys = [k for k in meta if not isinstance(k, str)]
    if bad_keys:
        # json.dumps would turn 1 into "1" silently, and the row would read back with other keys than it was written
        raise MetadataError(f"{where} keys must be strings, got {bad_keys[0]!r}")
    try:
        json.dumps(dict(meta), allow_nan=False)  # NaN / Infinity are not JSON: other readers of ids.jsonl refuse them
    except (TypeError, ValueError) as err:
        raise MetadataError(f"{where} is not JSON-able ({err})") from None
    return dict(meta)


def corpus_metadata(corpus: Corpus, rows: Any) -> list[dict[str, Any]] | None:
    """The metadata of corpus ``rows`` (an array or sequence of row numbers), one dict per row, checked.

    Args:
        corpus: the corpus; one without a ``metadata`` method has none.
        rows: the corpus rows, in the order they are stored.

    Returns:
        One dict per row (``{}`` for a row without metadata), or None when no row has any.

    Raises:
        MetadataError: a row's metadata is not a dict of JSON values.
    """
    metadata = getattr(corpus, "metadata", None)
    if metadata is None:
        return None
    kind = str(getattr(corpus, "kind", type(corpus).__name__))
    found = [_check_metadata(kind, int(r), metadata(int(r))) for r in np.asarray(rows, dtype=np.int64).tolist()]
    return found if any(found) else None


def check_embedding(embedding: Embedding, what: str) -> Embedding:
    """An embedder's output, checked: one id and row per vector, frames one per row (``ValueError`` otherwise)."""
    n = len(embedding.vectors)
    sizes: Sequence[tuple[str, int]] = [("ids", len(embedding.ids)), ("rows", len(embedding.rows))]
    if embedding.frames is not None:
        sizes = [*sizes, ("frames", len(embedding.frames))]
    wrong = [f"{len_} {name}" for name, len_ in sizes if len_ != n]
    if embedding.vectors.ndim != 2 or wrong:
        raise ValueError(f"embedder {what!r} returned {embedding.vectors.shape} vectors with {', '.join(wrong)}")
    return embedding


__all__ = [
    "CORPORA",
    "DEFAULT_CORPUS",
    "EMBEDDERS",
    "Corpus",
    "EmbedOptions",
    "Embedder",
    "Embedding",
    "IndexSpec",
    "IndexSpecError",
    "MetadataError",
    "StoreOptions",
    "check_embedding",
    "corpus_kind_of",
    "corpus_metadata",
    "embedding_rows",
    "open_corpus",
    "open_embedder",
]
