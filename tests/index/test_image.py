"""Image indexes from an exported ``backbone.safetensors`` (vitssl.index.image): build, query, the checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitssl.cli import main
from vitssl.index import core


def _run(*argv: object) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    """A tiny ViT written by the export every training run does (``save_backbone``)."""
    from vitssl.backbones import create_backbone, save_backbone

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("run") / "backbone.safetensors"
    return save_backbone(create_backbone("test_vit", img_size=32), path)  # as a run records it


def test_index_from_an_exported_backbone_builds_and_answers_queries(backbone_file, tmp_path):
    from vitssl.data.digits import Digits
    from vitssl.video.frames import BackboneFrameModel

    idx = tmp_path / "idx"
    assert _run("index", "build", backbone_file, "--data", "digits", "--out", idx, "--device", "cpu") == 0
    loaded = core.load_index_dir(idx)
    manifest = loaded.manifest
    assert manifest["source"]["checkpoint_path"] == str(backbone_file) and manifest["count"] == len(Digits(split="val"))
    # the stored vectors are the backbone's pooled embeddings of the evaluation transform, L2-normalised
    frames = BackboneFrameModel(backbone_file)
    digits = Digits(split="val")
    with torch.no_grad():
        direct = frames.feature_fn("pooled")(
            torch.stack([frames.sample_fn(digits.load_image(i), -1)[0] for i in (0, 5)])
        )
    direct = direct.numpy() / np.linalg.norm(direct.numpy(), axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(loaded.vectors()[[0, 5]]), direct, rtol=1e-4, atol=1e-5)

    query = tmp_path / "q.png"
    digits.load_image(5).save(query)
    answer = tmp_path / "q.json"
    assert _run("index", "query", idx, "--image", query, "-k", 3, "--out", answer) == 0
    best = json.loads(answer.read_text())["queries"][0]["neighbours"][0]
    assert best["sample"] == "digits/val/5" and best["score"] == pytest.approx(1.0, abs=1e-4)


def test_a_backbone_file_has_only_the_pooled_layer(backbone_file, tmp_path, capsys):
    capsys.readouterr()
    argv = ["index", "build", backbone_file, "--data", "digits", "--out", tmp_path / "i", "--layer", "cls"]
    assert _run(*argv, "--device", "cpu") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pooled" in err[0]
    assert not (tmp_path / "i").exists()


def test_the_manifest_spec_rebuilds_an_image_index_and_refuses_another_backbone(backbone_file, tmp_path, capsys):
    from vitssl.backbones import create_backbone, save_backbone
    from vitssl.index.build import index_rebuild

    idx = tmp_path / "idx"
    assert _run("index", "build", backbone_file, "--data", "digits", "--out", idx, "--device", "cpu") == 0
    spec = core.load_index_dir(idx).manifest["spec"]
    assert spec["corpus"] == {"kind": "images", "data": "digits", "split": "val"}
    assert spec["embedder"]["name"] == "image" and spec["embedder"]["model"] == str(backbone_file)
    again = index_rebuild(idx, tmp_path / "again")
    a, b = core.load_index_dir(idx), core.load_index_dir(again.out)
    assert a.samples == b.samples
    np.testing.assert_array_equal(a.vectors(), b.vectors())
    torch.manual_seed(1)
    other = save_backbone(create_backbone("test_vit", img_size=32), tmp_path / "other" / "backbone.safetensors")
    image = tmp_path / "q.png"
    from vitssl.data.digits import Digits

    Digits(split="val")[0][0].save(image)
    capsys.readouterr()
    assert _run("index", "query", idx, "--image", image, "--checkpoint", other, "--device", "cpu") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was built with checkpoint" in err[0] and str(backbone_file) in err[0]
