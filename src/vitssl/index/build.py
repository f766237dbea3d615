"""Building an index folder from embeddings in one process (:func:`build_index_dir`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vitssl.index.factory import Metric, _prepare, build_index, default_search_params, training_sample_indices
from vitssl.index.store import _check_overwrite, write_index_dir


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
    return write_index_dir(directory, index, list(samples), manifest, x if store_vectors else None, overwrite)


__all__ = ["build_index_dir"]
