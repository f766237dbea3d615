"""The index pipeline's room for the next thing (vitssl.index.pipeline): a corpus kind and an embedder defined here,
outside the package, each registered in one line, are built by the library function ``vitssl index build`` runs
(whole and in shards + merge) and queried; the spec in the manifest refuses a query of another embedding. A corpus
with the optional ``metadata`` hook has it stored per row, the same through shards and merge; one without (written
against the older protocol) keeps working unchanged."""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar

import numpy as np
import pytest

from vitssl.config import ConfigError
from vitssl.index import core
from vitssl.index.build import index_build, index_merge, index_rebuild, index_train
from vitssl.index.pipeline import (
    CORPORA,
    EMBEDDERS,
    Corpus,
    Embedder,
    Embedding,
    EmbedOptions,
    IndexSpec,
    IndexSpecError,
    MetadataError,
    StoreOptions,
    corpus_kind_of,
    corpus_metadata,
    embedding_rows,
)

DIM = 8


class Letters:
    """``letters:n=N``: the words "w0" .. "w{N-1}"."""

    kind: ClassVar[str] = "letters"
    spec_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, data: str, split: str, n: int) -> None:
        self.data, self.split, self.n = data, split, n

    @classmethod
    def open(cls, data: str, split: str) -> Letters:
        from vitssl.eval.spec import parse_data_spec

        options = parse_data_spec(data)[1]
        if not isinstance(options.get("n"), int):
            raise ConfigError(f"--data {data!r}: letters needs n=<count>")
        return cls(data, split, options["n"])

    def __len__(self) -> int:
        return self.n

    def sample_id(self, row: int) -> str:
        return f"letters/{row}"

    def item(self, row: int) -> str:
        return f"w{row}"

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "data": self.data, "split": self.split}

    def default_embedder(self, model: str) -> str:
        return "letter_hash"


class LetterHash:
    """A word's vector: ``DIM`` numbers drawn from a generator seeded by the word and the model's salt."""

    name: ClassVar[str] = "letter_hash"

    def __init__(self, salt: str) -> None:
        self.salt = salt
        self.checkpoint_hash = hashlib.sha256(salt.encode()).hexdigest()[:12]
        self.feature_key = json.dumps({"dim": DIM})

    @classmethod
    def open(cls, model: str, corpus: Any, options: EmbedOptions) -> LetterHash:
        return cls(model)

    def vector(self, word: str) -> np.ndarray:
        seed = int(hashlib.sha256(f"{self.salt}/{word}".encode()).hexdigest()[:8], 16)
        return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)

    def embed(self, corpus: Any, rows: Any = None, desc: str | None = None) -> Embedding:
        wanted = embedding_rows(len(corpus), rows)
        vectors = np.stack([self.vector(corpus.item(int(r))) for r in wanted])
        return Embedding(vectors, [corpus.sample_id(int(r)) for r in wanted], wanted)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.salt}

    def source(self, corpus: Any) -> dict[str, Any]:
        return {"checkpoint_path": self.salt, "data": corpus.data, "split": corpus.split}

    def manifest_entries(self, embedding: Embedding) -> dict[str, Any]:
        return {}


class TaggedLetters(Letters):
    """``tagged_letters:n=N``: the letters, with the optional metadata hook: every row but each third has some."""

    kind: ClassVar[str] = "tagged_letters"

    def metadata(self, row: int) -> dict[str, Any]:
        return {} if row % 3 == 2 else {"parity": "odd" if row % 2 else "even", "row": row, "tags": [row, None]}


class BadLetters(Letters):
    """``bad_letters:n=N``: metadata that cannot be stored from row 2 on (a set is no JSON)."""

    kind: ClassVar[str] = "bad_letters"

    def metadata(self, row: int) -> Any:
        return {"ok": row} if row < 2 else {"tags": {row}}


CORPORA.register("letters", Letters)  # one line each: that is all a new kind needs
CORPORA.register("tagged_letters", TaggedLetters)
CORPORA.register("bad_letters", BadLetters)
EMBEDDERS.register("letter_hash", LetterHash)


def test_the_outside_kinds_satisfy_the_protocols_and_are_found_by_name():
    assert isinstance(Letters("letters:n=3", "val", 3), Corpus) and isinstance(LetterHash("s"), Embedder)
    assert corpus_kind_of("letters:n=3") == "letters" and "letters" in CORPORA.list()
    assert corpus_kind_of("digits") == "images" and corpus_kind_of("videos:root=/v") == "videos"
    assert {"image", "video", "thumbnails", "tca", "letter_hash"} <= set(EMBEDDERS.list())


def test_a_registered_kind_builds_through_index_build_and_answers_queries(tmp_path):
    result = index_build("letters:n=12", "val", "salt-a", tmp_path / "idx")
    assert (result.corpus, result.embedder, result.count, result.dimension) == ("letters", "letter_hash", 12, DIM)
    loaded = core.load_index_dir(result.out)
    assert loaded.samples == [f"letters/{i}" for i in range(12)]
    emb = LetterHash("salt-a")
    queries = np.stack([emb.vector("w3"), emb.vector("w7")])
    scores, ids = core.search(loaded, queries, 2)
    assert ids[:, 0].tolist() == [3, 7] and np.allclose(scores[:, 0], 1.0, atol=1e-5)  # each word finds itself
    spec = IndexSpec.from_manifest(loaded.manifest)
    assert spec.corpus == {"kind": "letters", "data": "letters:n=12", "split": "val"}
    assert spec.embedder == {"name": "letter_hash", "model": "salt-a"} and spec.dimension == DIM and not spec.legacy
    assert loaded.manifest["source"]["checkpoint_path"] == "salt-a"


def test_shards_and_merge_of_a_registered_kind_equal_one_build(tmp_path):
    store = StoreOptions(factory="IVF2,Flat", train_size=10)
    whole = index_build("letters:n=40", "val", "salt-b", tmp_path / "whole", store=store)
    trained = index_train("letters:n=40", "val", "salt-b", tmp_path / "trained.faiss", store=store)
    assert trained.train_count == 10
    shards = [
        index_build(
            "letters:n=40", "val", "salt-b", tmp_path / f"s{i}", store=store, shard=(i, 3), trained=trained.trained
        )
        for i in range(3)
    ]
    assert [s.rows for s in shards] == [(0, 13), (13, 26), (26, 40)]
    assert index_merge([s.out for s in reversed(shards)], tmp_path / "merged") == 40
    q = np.stack([LetterHash("salt-b").vector(f"w{i}") for i in (0, 15, 39)])
    a, b = core.load_index_dir(whole.out), core.load_index_dir(tmp_path / "merged")
    assert a.samples == b.samples
    for x, y in zip(core.search(a, q, 5, nprobe=2), core.search(b, q, 5, nprobe=2)):
        np.testing.assert_array_equal(x, y)


def test_a_query_of_another_embedding_is_refused_in_one_line_naming_both(tmp_path):
    out = index_build("letters:n=5", "val", "salt-a", tmp_path / "idx").out
    spec = IndexSpec.from_manifest(core.load_index_dir(out).manifest)
    spec.check_query(out, embedder="letter_hash", checkpoint=LetterHash("salt-a").checkpoint_hash, dimension=DIM)
    other = LetterHash("salt-z").checkpoint_hash
    with pytest.raises(IndexSpecError) as err:
        spec.check_query(out, checkpoint=other)
    message = str(err.value)
    assert "\n" not in message and spec.checkpoint in message and other in message and "salt-a" in message
    for kwargs, needle in (({"embedder": "image"}, "embedder 'letter_hash'"), ({"dimension": 4}, "dimension 8")):
        with pytest.raises(IndexSpecError, match=needle):
            spec.check_query(out, **kwargs)
    with pytest.raises(IndexSpecError, match="normalize True, the query has normalize False"):
        spec.check_query(out, normalize=False)


def test_an_index_folder_without_a_spec_still_loads_and_is_checked_by_its_manifest(tmp_path):
    x = np.random.default_rng(0).standard_normal((6, DIM)).astype(np.float32)
    out = core.build_index_dir(tmp_path / "old", x, [str(i) for i in range(6)], checkpoint="ck", feature_key="fk")
    loaded = core.load_index_dir(out)
    assert "spec" not in loaded.manifest
    spec = IndexSpec.from_manifest(loaded.manifest)
    assert spec.legacy and spec.dimension == DIM and spec.corpus == {}
    spec.check_query(out, embedder="image", checkpoint="ck", feature_key="fk")  # no embedder recorded: not checked
    with pytest.raises(IndexSpecError, match="checkpoint 'ck', the query has checkpoint 'other'"):
        spec.check_query(out, checkpoint="other")


def test_an_unknown_embedder_names_the_registered_ones(tmp_path):
    from vitssl.registry import UnknownNameError

    with pytest.raises(UnknownNameError, match="letter_hash"):
        index_build("letters:n=3", "val", "salt", tmp_path / "idx", embedder="letter_hsh")


def test_the_command_line_builds_a_registered_kind(tmp_path, capsys):
    from vitssl.cli import main

    out = tmp_path / "cli_idx"
    assert main(["index", "build", "salt-c", "--data", "letters:n=6", "--out", str(out), "--device", "cpu"]) == 0
    assert "(letter_hash embedder): 6 vectors x 8" in capsys.readouterr().out
    assert core.load_index_dir(out).samples == [f"letters/{i}" for i in range(6)]
    assert main(["index", "eval", str(out), "--k", "3", "--num-queries", "6"]) == 0
    assert "R@1 1.0000" in capsys.readouterr().out


def test_the_spec_rebuilds_the_index_it_describes(tmp_path):
    first = index_build("letters:n=9", "val", "salt-d", tmp_path / "a", store=StoreOptions(metric="l2"))
    again = index_rebuild(first.out, tmp_path / "b")
    a, b = core.load_index_dir(first.out), core.load_index_dir(again.out)
    assert a.samples == b.samples and b.manifest["metric"] == "l2" and b.manifest["spec"] == a.manifest["spec"]
    np.testing.assert_array_equal(a.vectors(), b.vectors())
    old = core.build_index_dir(tmp_path / "old", np.ones((2, DIM), dtype=np.float32), ["x", "y"])
    with pytest.raises(IndexSpecError, match="written before index specs"):
        index_rebuild(old, tmp_path / "c")


def test_a_corpus_without_metadata_writes_ids_as_before_and_loads_none(tmp_path):
    out = index_build("letters:n=4", "val", "salt-a", tmp_path / "idx").out
    expected = "".join(json.dumps({"id": i, "sample": f"letters/{i}"}) + "\n" for i in range(4))
    assert (out / core.IDS_FILE).read_text(encoding="utf-8") == expected
    assert core.load_index_dir(out).metadata is None and corpus_metadata(Letters("letters:n=4", "val", 4), [0]) is None


def test_a_corpus_with_metadata_carries_it_through_one_build_and_through_shards_and_merge(tmp_path):
    corpus = TaggedLetters("tagged_letters:n=7", "val", 7)
    assert isinstance(corpus, Corpus)
    expected = [corpus.metadata(r) for r in range(7)]
    whole = index_build("tagged_letters:n=7", "val", "salt-m", tmp_path / "whole")
    loaded = core.load_index_dir(whole.out)
    assert loaded.metadata == expected and loaded.metadata[2] == {} and loaded.meta_of(4) == expected[4]
    lines = [json.loads(line) for line in (whole.out / core.IDS_FILE).read_text().splitlines()]
    assert [line.get("meta") for line in lines] == [m or None for m in expected]  # no key on rows without
    shards = [index_build("tagged_letters:n=7", "val", "salt-m", tmp_path / f"s{i}", shard=(i, 2)) for i in (0, 1)]
    assert [s.rows for s in shards] == [(0, 3), (3, 7)]
    assert core.load_index_dir(shards[1].out).metadata == expected[3:]
    index_merge([s.out for s in reversed(shards)], tmp_path / "merged")
    merged_ids = (tmp_path / "merged" / core.IDS_FILE).read_bytes()
    assert merged_ids == (whole.out / core.IDS_FILE).read_bytes()  # same ids, samples, metadata, order
    again = index_rebuild(whole.out, tmp_path / "again")
    assert core.load_index_dir(again.out).metadata == expected


def test_metadata_that_is_no_json_object_fails_in_one_line_naming_the_kind_and_row(tmp_path, capsys):
    from vitssl.cli import main
    from vitssl.errors import UserError

    with pytest.raises(MetadataError) as err:
        index_build("bad_letters:n=4", "val", "salt", tmp_path / "idx")
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    assert "corpus kind 'bad_letters' row 2: metadata is not JSON-able" in str(err.value)
    assert not (tmp_path / "idx").exists()
    for bad, needle in (([1], "must be a dict of JSON values, got list"), ({1: "x"}, "keys must be strings, got 1")):
        corpus = Letters("letters:n=2", "val", 2)
        corpus.metadata = lambda row, bad=bad: bad  # type: ignore[attr-defined]
        with pytest.raises(MetadataError, match=f"corpus kind 'letters' row 0: metadata {needle}"):
            corpus_metadata(corpus, [0, 1])
    nan = Letters("letters:n=1", "val", 1)
    nan.metadata = lambda row: {"score": float("nan")}  # type: ignore[attr-defined]
    with pytest.raises(MetadataError, match="row 0: metadata is not JSON-able"):
        corpus_metadata(nan, [0])
    capsys.readouterr()
    argv = ["index", "build", "salt", "--data", "bad_letters:n=4", "--out", str(tmp_path / "cli"), "--device", "cpu"]
    assert main(argv) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "corpus kind 'bad_letters' row 2" in err_lines[0]
