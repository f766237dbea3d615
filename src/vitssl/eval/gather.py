"""The one gather: each rank computes a part (rows, their vectors, per-row extras), every rank gets all of them
back in row order.

Used where the result must exist in memory on every rank (:func:`vitssl.eval.extract.extract_rows`, the streamed
shard corpora of :mod:`vitssl.eval.shard_features`, the video index embedder). It sends every rank's part to every
rank through ``all_gather_object`` (pickled), so memory grows with the whole result on every rank; the feature
stores of :mod:`vitssl.eval.store` write per-rank shards instead and need no gather.

A part that fails on one rank fails on all: :func:`gather_parts` catches the exception, gathers it in place of
the part and raises it on every rank, so no rank is left waiting in the collective for one that died.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from vitssl import distributed as dist

T = TypeVar("T")


@dataclass
class RankPart:
    """What one rank contributes to :func:`gather_rows`."""

    rows: np.ndarray  # (m,) int64 row numbers, or (m, k) sort keys (column 0 most significant)
    vectors: np.ndarray | None  # (m, C) vectors of those rows; None (or m == 0) when the rank has none
    extras: list[Any] = field(default_factory=list)  # [] or m per-row objects (targets, sample ids, frame arrays)
    info: Any = None  # anything else of the rank, not per row (e.g. how many items it skipped)


@dataclass
class Gathered:
    """The parts of every rank, put together in row order."""

    rows: np.ndarray  # (M,) or (M, k), ascending
    vectors: np.ndarray | None  # (M, C); None when no rank had a row
    extras: list[Any]  # M per-row objects in row order ([] when the parts had none)
    infos: list[Any]  # every rank's ``info``, in rank order


@dataclass
class _Failed:
    """An exception of one rank, sent in place of its part."""

    rank: int
    error: BaseException


def _sendable(error: BaseException, rank: int) -> BaseException:
    """``error`` itself when it pickles (and unpickles) intact, else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # an exception type holding unpicklable state, or with a non-standard constructor
        return RuntimeError(f"rank {rank}: {type(error).__name__}: {error}")


def gather_parts(compute: Callable[[], T]) -> list[T]:
    """Run ``compute`` on this rank and collect every rank's result, in rank order, on every rank.

    Args:
        compute: makes this rank's part (any picklable object).

    Returns:
        One part per rank; ``[compute()]`` in a single process.

    Raises:
        Exception: what ``compute`` raised on the lowest failing rank, raised on every rank (the failing rank
            raises its own exception object).
    """
    if dist.get_world_size() == 1:
        return [compute()]
    rank = dist.get_rank()
    own: BaseException | None = None
    try:
        local: Any = compute()
    except Exception as err:
        own = err
        local = _Failed(rank, _sendable(err, rank))
    parts = dist.all_gather_object(local)
    failed = [p for p in parts if isinstance(p, _Failed)]
    if failed:
        first = failed[0]
        if first.rank == rank and own is not None:
            raise own
        raise first.error
    return parts


def gather_rows(compute: Callable[[], RankPart]) -> Gathered:
    """:func:`gather_parts` of :class:`RankPart` s, concatenated and sorted by row (stable: equal keys keep rank
    order).

    Args:
        compute: makes this rank's :class:`RankPart`.

    Returns:
        The :class:`Gathered` rows, vectors and extras in ascending row order, and every rank's info.
    """
    parts = gather_parts(compute)
    infos = [p.info for p in parts]
    present = [p for p in parts if p.vectors is not None and len(p.rows)]
    if not present:
        return Gathered(np.zeros(0, dtype=np.int64), None, [], infos)
    for p in present:
        if p.extras and len(p.extras) != len(p.rows):
            raise ValueError(f"a rank part has {len(p.extras)} extras for {len(p.rows)} rows; give one per row")
    rows = np.concatenate([np.asarray(p.rows) for p in present])
    vectors = np.concatenate([p.vectors for p in present])  # type: ignore[misc]
    if rows.ndim == 1:
        order = np.argsort(rows, kind="stable")
    else:  # lexsort sorts by its last key first
        order = np.lexsort(tuple(rows[:, c] for c in reversed(range(rows.shape[1]))))
    extras = [e for p in present for e in p.extras]
    return Gathered(rows[order], vectors[order], [extras[i] for i in order] if extras else [], infos)


__all__ = ["Gathered", "RankPart", "gather_parts", "gather_rows"]
