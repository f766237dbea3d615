"""Feature stores (vitssl.eval.store): per-rank shards without a gather, one memory-mapped view, resumption,
manifest checks."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from tests._dist import run_distributed
from vitssl.eval.store import (
    FeatureStore,
    FeatureStoreError,
    ShardedRows,
    extract_to_store,
    plan_shards,
    row_blocks,
)

N, D = 50, 24
KEY = {"checkpoint_sha256": "abc", "dataset": "toy", "layer": "pooled", "split": "val"}


class _Toy(Dataset):
    """Items (tensor (4,), label) whose features are known: a fixed projection of the item."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.arange(4, dtype=torch.float32) + i, i % 3


_PROJ = torch.linspace(-1, 1, 4 * D).reshape(4, D)


def _features(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ _PROJ / 10)  # (B, D)


def _expected() -> np.ndarray:
    return _features(torch.stack([_Toy()[i][0] for i in range(N)])).numpy()


def _extract(folder: Path, feature_fn=_features, dtype: str = "float32", shard_rows: int = 7, key=KEY) -> Path:
    labels = np.arange(N, dtype=np.int64) % 3
    return extract_to_store(
        folder, key, feature_fn, _Toy(), None, (0, N), labels, lambda r: f"toy/{r}", {"note": "x"},
        dtype=dtype, batch_size=4, shard_rows=shard_rows,
    )  # fmt: skip


class _Interrupt(RuntimeError):
    pass


def _stops_after(batches: int):
    seen = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        if len(seen) == batches:
            raise _Interrupt("preempted")
        seen.append(len(x))
        return _features(x)

    return fn


def _two_ranks(folder: str) -> list[int]:
    """Runs on each of 2 gloo ranks: finish the store; return the rows this rank embedded."""
    embedded: list[int] = []

    def counting(x: torch.Tensor) -> torch.Tensor:
        embedded.extend(x[:, 0].long().tolist())  # item i starts with i
        return _features(x)

    _extract(Path(folder), counting)
    return embedded


def test_two_ranks_write_their_own_shards_and_read_back_as_one_extraction(tmp_path):
    folder = tmp_path / "store"
    partial = tmp_path / "store.partial"
    # an extraction in one process, preempted after 3 batches of 4: its first shard (7 rows) is finished
    with pytest.raises(_Interrupt):
        _extract(folder, _stops_after(3))
    assert (partial / "shard-00000" / "shard.json").is_file() and not (partial / "shard-00001").exists()
    assert not folder.exists()
    with pytest.raises(FeatureStoreError, match=r"unfinished extraction is in .*store\.partial"):
        FeatureStore(folder)

    embedded = run_distributed(_two_ranks, 2, str(folder))  # two ranks finish it (another world size)
    plan = json.loads((folder / "manifest.json").read_text())["shards"]
    assert plan == plan_shards(0, N, 1, 7) and len(plan) == 8  # the plan of the first run is kept
    kept = set(range(*plan[0]))
    for rank, rows in enumerate(embedded):
        wanted = [r for i, b in enumerate(plan) if i % 2 == rank and i != 0 for r in range(*b)]
        assert rows == wanted  # each rank embedded its own shards only; the finished one was kept
        for i in range(len(plan)):
            info = json.loads((folder / f"shard-{i:05d}" / "shard.json").read_text())
            assert info["rank"] == (0 if i == 0 else i % 2)
    assert kept.isdisjoint(embedded[0] + embedded[1])

    store = FeatureStore(folder)
    assert isinstance(store.features, ShardedRows) and store.features.shape == (N, D)
    single = FeatureStore(_extract(tmp_path / "single"))  # one process, from scratch
    np.testing.assert_array_equal(np.asarray(store.features), np.asarray(single.features))
    np.testing.assert_allclose(np.asarray(store.features), _expected(), rtol=1e-5, atol=1e-6)
    assert store.rows.tolist() == list(range(N)) and store.labels.tolist() == [i % 3 for i in range(N)]
    assert store.sample_ids() == [f"toy/{i}" for i in range(N)] and store.manifest["note"] == "x"
    assert not partial.exists()


def test_float16_is_the_default_and_the_view_indexes_like_an_array(tmp_path):
    store = FeatureStore(_extract(tmp_path / "s", dtype="float16", shard_rows=9))
    view, expected = store.features, _expected().astype(np.float16)
    assert view.dtype == np.float16 and len(view) == N and store.manifest["dtype"] == "float16"
    np.testing.assert_allclose(np.asarray(view, dtype=np.float32), _expected(), rtol=1e-3, atol=1e-3)
    expected = np.asarray(view)
    np.testing.assert_array_equal(view[5:23], expected[5:23])  # across shard boundaries
    np.testing.assert_array_equal(view[[40, 2, 2, -1]], expected[[40, 2, 2, -1]])
    mask = np.arange(N) % 4 == 1
    np.testing.assert_array_equal(view[mask], expected[mask])
    np.testing.assert_array_equal(view[7], expected[7])
    blocks = list(row_blocks(view, 11))
    assert [b[0] for b in blocks] == [0, 11, 22, 33, 44]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), expected)
    with pytest.raises(IndexError):
        view[N]


def test_a_store_of_other_features_is_refused_naming_what_differs(tmp_path):
    folder = tmp_path / "s"
    with pytest.raises(_Interrupt):
        _extract(folder, _stops_after(2))
    with pytest.raises(FeatureStoreError) as caught:  # resuming with another layer
        _extract(folder, key={**KEY, "layer": "cls"})
    message = str(caught.value)
    assert "\n" not in message and "layer 'pooled' (wanted 'cls')" in message and "delete it" in message
    with pytest.raises(FeatureStoreError, match="dtype 'float32' \\(wanted 'float16'\\)"):
        _extract(folder, dtype="float16")
    store = FeatureStore(_extract(folder))
    store.check({"layer": "pooled", "checkpoint_sha256": "abc"})
    with pytest.raises(FeatureStoreError, match="checkpoint_sha256 'abc' \\(wanted 'def'\\)"):
        store.check({"layer": "pooled", "checkpoint_sha256": "def"}, "--train-features")


def test_damaged_stores_fail_with_one_line(tmp_path):
    folder = _extract(tmp_path / "s")
    (folder / "shard-00003" / "rows.npy").unlink()
    with pytest.raises(FeatureStoreError, match="shard 3 is unreadable"):
        FeatureStore(folder)
    (folder / "manifest.json").write_text("{}")
    with pytest.raises(FeatureStoreError, match="not a vitssl feature-store manifest"):
        FeatureStore(folder)


def test_non_finite_features_are_refused_before_they_are_stored(tmp_path):
    def broken(x: torch.Tensor) -> torch.Tensor:
        out = _features(x)
        out[x[:, 0] == 9] = float("nan")
        return out

    with pytest.raises(FeatureStoreError, match="dataset row 9 are not finite"):
        _extract(tmp_path / "s", broken)


def test_shard_plan_gives_every_rank_the_same_number_of_contiguous_shards():
    plan = plan_shards(10, 110, 4, 30)
    assert len(plan) == 4 and plan[0][0] == 10 and plan[-1][1] == 110
    assert all(a[1] == b[0] for a, b in itertools.pairwise(plan))
    assert plan_shards(0, 3, 4, 30) == [[0, 0], [0, 1], [1, 2], [2, 3]]  # more ranks than rows: empty shards
    assert len(plan_shards(0, 1000, 2, 100)) == 10
