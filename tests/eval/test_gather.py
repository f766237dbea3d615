"""The one gather (vitssl.eval.gather): parts of every rank in row order, and one rank's error on every rank."""

from __future__ import annotations

import numpy as np
import pytest

from tests._dist import run_distributed
from vitssl.errors import DataError
from vitssl.eval.gather import RankPart, gather_parts, gather_rows


def test_one_process_sorts_rows_and_carries_extras_and_info():
    rows = np.array([3, 0, 2], dtype=np.int64)
    part = RankPart(rows, np.array([[3.0], [0.0], [2.0]], dtype=np.float32), ["c", "a", "b"], info=5)
    g = gather_rows(lambda: part)
    assert g.rows.tolist() == [0, 2, 3]
    assert g.vectors[:, 0].tolist() == [0.0, 2.0, 3.0]
    assert g.extras == ["a", "b", "c"] and g.infos == [5]


def test_two_column_keys_sort_by_the_first_column_then_the_second():
    keys = np.array([[1, 0], [0, 1], [0, 0]], dtype=np.int64)
    g = gather_rows(lambda: RankPart(keys, np.arange(3, dtype=np.float32)[:, None]))
    assert g.rows.tolist() == [[0, 0], [0, 1], [1, 0]] and g.vectors[:, 0].tolist() == [2.0, 1.0, 0.0]


def test_no_rows_anywhere_gives_no_vectors():
    g = gather_rows(lambda: RankPart(np.zeros(0, dtype=np.int64), None, info=2))
    assert g.vectors is None and g.rows.shape == (0,) and g.infos == [2]


def test_extras_must_be_one_per_row():
    with pytest.raises(ValueError, match="2 extras for 3 rows"):
        gather_rows(lambda: RankPart(np.arange(3), np.zeros((3, 1)), ["a", "b"]))


class _Unpicklable(Exception):
    def __init__(self, message: str, handle: object) -> None:
        super().__init__(message)
        self.handle = handle


def _two_ranks() -> dict:
    from vitssl import distributed as dist

    rank = dist.get_rank()
    out: dict = {}
    # rank r holds rows r, r + 2, r + 4 (strided, as the embedders share work)
    mine = np.arange(rank, 6, 2, dtype=np.int64)
    g = gather_rows(lambda: RankPart(mine, mine[:, None].astype(np.float32), [f"s{i}" for i in mine], info=rank))
    out["rows"], out["extras"], out["infos"] = g.rows.tolist(), g.extras, g.infos

    def fails_on_rank_1() -> int:
        if rank == 1:
            raise DataError("video b.mp4 cannot be read")
        return rank

    try:
        gather_parts(fails_on_rank_1)
    except DataError as err:  # every rank, not only rank 1, and nobody hangs
        out["error"] = str(err)

    def unpicklable() -> int:
        if rank == 0:
            raise _Unpicklable("bad", lambda: None)
        return rank

    try:
        gather_parts(unpicklable)
    except Exception as err:
        out["unpicklable"] = (type(err).__name__, str(err))
    return out


def test_two_ranks_gather_in_row_order_and_share_one_rank_s_error():
    results = run_distributed(_two_ranks, 2)
    for r in results:
        assert r["rows"] == list(range(6)) and r["extras"] == [f"s{i}" for i in range(6)] and r["infos"] == [0, 1]
        assert r["error"] == "video b.mp4 cannot be read"
    assert results[0]["unpicklable"] == ("_Unpicklable", "bad")  # the failing rank raises its own error
    assert results[1]["unpicklable"] == ("RuntimeError", "rank 0: _Unpicklable: bad")
