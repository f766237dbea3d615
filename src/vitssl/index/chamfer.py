"""Chamfer similarity of frame sequences (ViSiL / TCA's frame-level similarity).

For a query with frames q_1..q_n and a video with frames d_1..d_m it is ``mean_i max_j <q_i, d_j>`` on
L2-normalised frame vectors; :func:`vitssl.index.video.rank` re-scores the top K of a video-level search with it,
which is TCA's strongest (TCA_f) variant at the cost of K small matrix products per query.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vitssl.errors import DataError


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


__all__ = ["chamfer_scores", "chamfer_similarity"]
