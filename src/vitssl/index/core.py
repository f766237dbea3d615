"""The index core under one name: faiss index objects, index folders, sharded builds, search and evaluation.

The code lives in the modules by responsibility; this module gathers their public names for the callers that
import ``vitssl.index.core`` (scripts, benchmarks, tests):

- :mod:`vitssl.index.factory`: factory strings to empty indexes, training, adding, search parameters,
  :func:`build_index` (in memory);
- :mod:`vitssl.index.store`: index folders (layout, :func:`write_index_dir`, :func:`load_index_dir`,
  :class:`LoadedIndex`);
- :mod:`vitssl.index.build`: :func:`build_index_dir` (a whole index folder from embeddings) and the
  Corpus -> Embedder -> Store pipeline (:func:`vitssl.index.build.build_corpus_index`);
- :mod:`vitssl.index.shards`: the trained quantizer shared by shards, :func:`build_shard`, :func:`merge_shards`;
- :mod:`vitssl.index.search`: :func:`search`, :func:`exact_search`, :func:`recall_at_k`, :func:`evaluate_index`;
- :mod:`vitssl.index._gpu`: where faiss runs (CPU or GPU).
"""

from __future__ import annotations

from vitssl._faiss import faiss, gpu_available
from vitssl.index._gpu import decide_gpu as _decide_gpu
from vitssl.index.build import build_index_dir
from vitssl.index.factory import (
    DEFAULT_EF_SEARCH,
    Metric,
    _prepare,
    _suggest_factory,
    _train,
    build_index,
    default_search_params,
    new_index,
    set_search_params,
    train_index,
    training_sample_indices,
)
from vitssl.index.search import evaluate_index, exact_search, recall_at_k, search
from vitssl.index.shards import build_shard, merge_shards, read_trained_index, shard_range, write_trained_index
from vitssl.index.store import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IDS_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    VECTORS_FILE,
    IndexFormatError,
    LoadedIndex,
    _check_overwrite,
    _sha256,
    load_index_dir,
    write_index_dir,
)

__all__ = [
    "DEFAULT_EF_SEARCH",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IDS_FILE",
    "INDEX_FILE",
    "MANIFEST_FILE",
    "VECTORS_FILE",
    "IndexFormatError",
    "LoadedIndex",
    "Metric",
    "_check_overwrite",
    "_decide_gpu",
    "_prepare",
    "_sha256",
    "_suggest_factory",
    "_train",
    "build_index",
    "build_index_dir",
    "build_shard",
    "default_search_params",
    "evaluate_index",
    "exact_search",
    "faiss",
    "gpu_available",
    "load_index_dir",
    "merge_shards",
    "new_index",
    "read_trained_index",
    "recall_at_k",
    "search",
    "set_search_params",
    "shard_range",
    "train_index",
    "training_sample_indices",
    "write_index_dir",
    "write_trained_index",
]
