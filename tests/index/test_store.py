"""Index folders (vitssl.index.store): per-row metadata in ids.jsonl - written only on rows that have it, read
back into LoadedIndex, refused when malformed - and folders without it written and read as before."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vitssl.index import core

D = 8


def _vectors(n: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, D)).astype(np.float32)


def _lines(directory) -> list[dict]:
    return [json.loads(line) for line in (directory / core.IDS_FILE).read_text(encoding="utf-8").splitlines()]


def test_metadata_round_trips_and_only_rows_with_metadata_get_the_key(tmp_path):
    meta = [{"label": "cat"}, {}, {"label": "dog", "bytes": 12, "tags": ["a", None], "ok": True}, {}]
    out = core.build_index_dir(tmp_path / "idx", _vectors(4), ["a", "b", "c", "d"], metadata=meta)
    assert _lines(out) == [
        {"id": 0, "sample": "a", "meta": {"label": "cat"}},
        {"id": 1, "sample": "b"},
        {"id": 2, "sample": "c", "meta": meta[2]},
        {"id": 3, "sample": "d"},
    ]
    loaded = core.load_index_dir(out)
    assert loaded.metadata == meta and loaded.samples == ["a", "b", "c", "d"]
    assert loaded.meta_of(2) == meta[2] and loaded.meta_of(1) == {}
    with pytest.raises(KeyError):
        loaded.meta_of(99)


def test_an_index_without_metadata_writes_ids_exactly_as_before(tmp_path):
    samples = ["digits/val/0", "x/ü.png", 'q"uote']
    plain = core.build_index_dir(tmp_path / "plain", _vectors(3), samples)
    empty = core.build_index_dir(tmp_path / "empty", _vectors(3), samples, metadata=[{}, {}, {}])
    before = "".join(json.dumps({"id": i, "sample": s}) + "\n" for i, s in enumerate(samples))
    for out in (plain, empty):
        assert (out / core.IDS_FILE).read_text(encoding="utf-8") == before
        loaded = core.load_index_dir(out)
        assert loaded.metadata is None and loaded.meta_of(0) == {}
    assert core._sha256(plain / core.IDS_FILE) == core._sha256(empty / core.IDS_FILE)


def test_metadata_of_another_length_than_the_vectors_is_refused(tmp_path):
    with pytest.raises(core.IndexFormatError, match="the metadata has 2 entries but the index holds 3 vectors"):
        core.build_index_dir(tmp_path / "idx", _vectors(3), ["a", "b", "c"], metadata=[{"x": 1}, {}])
    assert not (tmp_path / "idx").exists()


def test_a_meta_that_is_not_an_object_fails_the_load_in_one_line(tmp_path):
    out = core.build_index_dir(tmp_path / "idx", _vectors(2), ["a", "b"], metadata=[{"x": 1}, {}])
    ids = out / core.IDS_FILE
    ids.write_text('{"id": 0, "sample": "a", "meta": [1]}\n{"id": 1, "sample": "b"}\n', encoding="utf-8")
    manifest = json.loads((out / core.MANIFEST_FILE).read_text())
    manifest["files"][core.IDS_FILE] = {"bytes": ids.stat().st_size, "sha256": core._sha256(ids)}
    (out / core.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(core.IndexFormatError, match=r"ids\.jsonl line 1 has a 'meta' that is not a JSON object") as err:
        core.load_index_dir(out)
    assert "\n" not in str(err.value)


def test_shards_with_and_without_metadata_merge_in_row_order(tmp_path):
    x = _vectors(5)
    a = core.build_shard(tmp_path / "s0", x[:2], ["a", "b"], (0, 3), 0, metadata=[{"k": 0}, {}])
    b = core.build_shard(tmp_path / "s1", x[2:4], ["c", "d"], (1, 3), 2)  # no metadata at all
    c = core.build_shard(tmp_path / "s2", x[4:], ["e"], (2, 3), 4, metadata=[{"k": 4}])
    merged = core.load_index_dir(core.merge_shards([c, a, b], tmp_path / "merged"))
    assert merged.samples == ["a", "b", "c", "d", "e"]
    assert merged.metadata == [{"k": 0}, {}, {}, {}, {"k": 4}]
    plain = [core.build_shard(tmp_path / f"p{i}", x[2 * i : 2 * i + 2], ["a", "b"], (i, 2), 2 * i) for i in (0, 1)]
    assert core.load_index_dir(core.merge_shards(plain, tmp_path / "plain")).metadata is None
    assert all("meta" not in line for line in _lines(tmp_path / "plain"))
