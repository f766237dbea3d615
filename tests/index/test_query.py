"""Index queries (vitssl.index.query, ``vitssl index query``): a neighbour whose row has metadata comes back with
it (``"meta"`` in the JSON, ``key=value`` on the printed line); one without has neither."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitssl.cli import main
from vitssl.index import core
from vitssl.index.query import format_meta, neighbour


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    """A tiny ViT as every training run exports it (``save_backbone``)."""
    from vitssl.backbones import create_backbone, save_backbone

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("run") / "backbone.safetensors"
    return save_backbone(create_backbone("test_vit", img_size=32), path)


def test_a_digits_index_carries_labels_and_its_query_returns_the_neighbours_meta(backbone_file, tmp_path, capsys):
    from vitssl.data.digits import Digits

    idx = tmp_path / "idx"
    assert main(["index", "build", str(backbone_file), "--data", "digits", "--out", str(idx), "--device", "cpu"]) == 0
    digits = Digits(split="val")
    loaded = core.load_index_dir(idx)
    assert loaded.metadata == [{"label": digits.classes[t]} for t in digits.targets]
    query, answer = tmp_path / "q.png", tmp_path / "q.json"
    digits.load_image(5).save(query)
    capsys.readouterr()
    assert main(["index", "query", str(idx), "--image", str(query), "-k", "3", "--out", str(answer)]) == 0
    printed = capsys.readouterr().out.splitlines()
    hits = json.loads(answer.read_text())["queries"][0]["neighbours"]
    assert hits[0]["sample"] == "digits/val/5" and hits[0]["meta"] == {"label": str(digits.targets[5])}
    for h, line in zip(hits, printed[1:4]):
        assert h["meta"] == loaded.meta_of(h["id"]) and line.endswith(f"{h['sample']}  label={h['meta']['label']}")


def test_a_neighbour_without_metadata_has_no_meta_key(tmp_path):
    x = np.eye(3, dtype=np.float32)
    loaded = core.load_index_dir(core.build_index_dir(tmp_path / "i", x, ["a", "b", "c"], metadata=[{}, {"n": 1}, {}]))
    assert neighbour(loaded, 1, "a", 0, 0.5) == {"rank": 1, "sample": "a", "id": 0, "score": 0.5}
    assert neighbour(loaded, 2, "b", 1, 0.25)["meta"] == {"n": 1}
    plain = core.load_index_dir(core.build_index_dir(tmp_path / "p", x, ["a", "b", "c"]))
    assert "meta" not in neighbour(plain, 1, "b", 1, 0.5)


def test_printed_metadata_is_short_key_value_pairs():
    assert format_meta(None) == "" and format_meta({}) == ""
    assert format_meta({"label": "cat", "bytes": 12, "tags": ["a", None]}) == '  label=cat bytes=12 tags=["a", null]'
    assert format_meta({"label": "tabby cat", "note": "", "eq": "a=b"}) == '  label="tabby cat" note="" eq="a=b"'
