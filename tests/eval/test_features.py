"""Feature extraction and its cache (vitssl.eval.features): layers, cache reuse and invalidation, checkpoint hashes."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from vitssl.config import ConfigError, load_config
from vitssl.data.common import SKIP_HINT
from vitssl.errors import UserError
from vitssl.eval import features as F
from vitssl.eval import model as M
from vitssl.eval.spec import build_eval_dataset, canonical_options, parse_data_spec

DATA = "shapes:num_samples=20"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint written by the real engine: the tiny supervised ViT recipe, one epoch."""
    from vitssl.engine import train

    out = tmp_path_factory.mktemp("run")
    result = train(load_config("pretrain/test_tiny", [f"output_dir={out}", "train.epochs=1"]))
    return out / "checkpoint_last.pth", result


@pytest.fixture(scope="module")
def model(checkpoint):
    return F.EvalModel(checkpoint[0], "cpu")


def _images(model: F.EvalModel, n: int = 4) -> torch.Tensor:
    dataset, _, _ = build_eval_dataset(DATA)
    return torch.stack([model.sample_fn(dataset[i][0], 0)[0] for i in range(n)])  # (n, 3, 32, 32)


def test_load_for_eval_rebuilds_the_trained_objective(checkpoint):
    path, _ = checkpoint
    objective, cfg, digest = F.load_for_eval(path)
    assert cfg.objective.name == "supervised" and not objective.training
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    state = torch.load(path, weights_only=True)["model"]
    for name, tensor in objective.state_dict().items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0)
    assert not any(p.requires_grad for p in objective.parameters())


def test_layers_give_dino_options_with_their_widths(model):
    images = _images(model)
    bb = model.objective.backbone
    with torch.no_grad():
        out = {layer: F.layer_features(model.objective, images, layer) for layer in ("pooled", "cls", "mean", "last2")}
        tokens = bb.forward_tokens(images)  # (4, 1 + 64, 32)
        blocks = bb.forward_intermediate(images, 2)
    width = bb.num_features
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "pooled": (4, width),
        "cls": (4, width),
        "mean": (4, width),
        "last2": (4, 2 * width),
    }
    torch.testing.assert_close(out["pooled"], out["cls"])  # the ViT's pooled embedding is its normed class token
    torch.testing.assert_close(out["mean"], tokens[:, 1:].mean(1))
    torch.testing.assert_close(out["last2"][:, :width], blocks[0][:, 0])  # oldest block first (DINO's order)
    torch.testing.assert_close(out["last2"][:, width:], out["cls"])  # the last block's normed class token
    with torch.no_grad():
        dinov2 = F.layer_features(model.objective, images, "last2avg")
    assert dinov2.shape == (4, 3 * width)  # DINOv2's linear input: class tokens, then the mean patch token
    torch.testing.assert_close(dinov2[:, : 2 * width], out["last2"])
    torch.testing.assert_close(dinov2[:, 2 * width :], out["mean"])
    assert F.parse_layer("last4avg") == "last4avg"


def test_layer_names_and_backbones_without_class_token_fail_clearly():
    from vitssl.engine import build_objective

    for bad in ("last0", "cls2", "avg", ""):
        with pytest.raises(ConfigError, match="--layer"):
            F.parse_layer(bad)
    swin = build_objective(load_config("pretrain/test_tiny", ["model.backbone=test_swin"])).eval()
    for layer in ("cls", "last2"):
        with pytest.raises(ConfigError, match=r"needs a class token.*test_swin.*--layer mean"):
            F.check_layer(swin, layer, 3)
    F.check_layer(swin, "mean", 3)
    with torch.no_grad():
        assert F.layer_features(swin, torch.randn(2, 3, 32, 32), "mean").shape == (2, swin.backbone.num_features)
    igpt = build_objective(load_config("pretrain/igpt_test_tiny")).eval()  # its backbone reads token embeddings
    with pytest.raises(ConfigError, match=r"feeds it \d+-channel inputs of its own.*--layer pooled"):
        F.check_layer(igpt, "mean", 3)


def test_features_are_cached_and_reused_without_a_forward(model, tmp_path, monkeypatch):
    first = F.extract_cached(model, DATA, "val", "pooled", tmp_path)
    assert not first.meta["cache_hit"] and len(first) == 20 and first.features.dtype == np.float16  # the default
    assert sorted(p.name for p in first.path.iterdir()) == ["manifest.json", "shard-00000"]  # a feature store
    assert first.labels.tolist() == [i % 8 for i in range(20)] and first.sample_ids[3] == "shapes/val/3"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    with torch.no_grad():  # the cached features are the model's features of the evaluation images
        direct = model.objective.eval_features(_images(model)).numpy()
    np.testing.assert_allclose(first.features[:4], direct, rtol=1e-3, atol=1e-3)
    full = F.extract_cached(model, DATA, "val", "pooled", tmp_path, dtype="float32")  # the float32 option
    assert not full.meta["cache_hit"] and full.features.dtype == np.float32 and full.path != first.path
    np.testing.assert_allclose(full.features[:4], direct, rtol=1e-5, atol=1e-6)

    def no_forward(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(F, "extract_to_store", no_forward)
    again = F.extract_cached(model, DATA, "val", "pooled", tmp_path)
    assert again.meta["cache_hit"] and again.path == first.path
    np.testing.assert_array_equal(again.features, first.features)
    assert again.sample_ids == first.sample_ids
    # the same data named differently (option order, explicit split) is the same key
    assert F.extract_cached(model, "shapes:split=val,num_samples=20", None, "pooled", tmp_path).meta["cache_hit"]


def test_any_key_part_changing_extracts_again(model, checkpoint, tmp_path):
    base = F.extract_cached(model, DATA, "val", "pooled", tmp_path)
    variants = {
        "split": F.extract_cached(model, DATA, "train", "pooled", tmp_path),
        "layer": F.extract_cached(model, DATA, "val", "mean", tmp_path),
        "options": F.extract_cached(model, "shapes:num_samples=20,seed=1", "val", "pooled", tmp_path),
        "corrupt handling": F.extract_cached(model, DATA, "val", "pooled", tmp_path, skip_corrupt=True),
    }
    model.transform, saved = model.transform + " (changed)", model.transform
    try:
        variants["transform"] = F.extract_cached(model, DATA, "val", "pooled", tmp_path)
    finally:
        model.transform = saved
    for what, fs in variants.items():
        assert not fs.meta["cache_hit"], what
    assert len({base.path, *(fs.path for fs in variants.values())}) == 1 + len(variants)
    assert not np.allclose(variants["split"].features, base.features)

    # a byte-identical copy of the checkpoint elsewhere shares the content-addressed cache ...
    copy = tmp_path / "copy" / "checkpoint.pth"
    copy.parent.mkdir()
    copy.write_bytes(checkpoint[0].read_bytes())
    assert F.extract_cached(copy, DATA, "val", "pooled", tmp_path, device="cpu").meta["cache_hit"]
    # ... and changing its content (rewritten in place) invalidates it
    state = torch.load(copy, weights_only=True)
    state["model"]["backbone.model.norm.weight"] += 1.0
    tmp = copy.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, copy)
    changed = F.extract_cached(copy, DATA, "val", "pooled", tmp_path, device="cpu")
    assert not changed.meta["cache_hit"]
    assert changed.meta["key"]["checkpoint_sha256"] == hashlib.sha256(copy.read_bytes()).hexdigest()
    assert not np.allclose(changed.features, base.features)


_OBJECTIVE_RUNS = {
    "moco_v3": (
        "pretrain/mocov3_demo",
        [
            "model.backbone_kwargs.embed_dim=32",
            "model.backbone_kwargs.depth=2",
            "objective.dim=32",
            "objective.mlp_dim=64",
        ],
    ),
    "igpt": ("pretrain/igpt_test_tiny", []),
    "clip": ("pretrain/clip_demo", ["data.train.kwargs.num_samples=32", "train.batch_size=16", "data.num_workers=0"]),
}


@pytest.mark.parametrize("objective", sorted(_OBJECTIVE_RUNS))
def test_checkpoints_of_every_objective_give_their_evaluation_features(objective, tmp_path):
    from vitssl.engine import train

    recipe, overrides = _OBJECTIVE_RUNS[objective]
    train(load_config(recipe, [f"output_dir={tmp_path}", "train.stop_after_steps=1", *overrides]))
    model = F.EvalModel(tmp_path / "checkpoint_last.pth", "cpu")
    assert model.objective_name == objective
    fs = F.extract_cached(
        model, "shapes:num_samples=12", "val", "pooled", tmp_path / "cache", batch_size=5, dtype="float32"
    )
    dataset, _, _ = build_eval_dataset("shapes:num_samples=12")
    images = torch.stack([model.sample_fn(dataset[i][0], 0)[0] for i in range(12)])
    with torch.no_grad():  # pooled = the objective's own evaluation features (iGPT: its probe layer)
        expected = model.objective.eval_features(images).numpy()
    np.testing.assert_allclose(fs.features, expected, rtol=1e-5, atol=1e-5)
    if objective == "igpt":
        with pytest.raises(ConfigError, match="use --layer pooled"):
            model.feature_fn("cls")
    else:
        last = F.extract_cached(model, "shapes:num_samples=12", "val", "last1", tmp_path / "cache")
        assert last.dim == model.objective.backbone.num_features and np.isfinite(last.features).all()


def test_checkpoint_hash_is_remembered_next_to_the_file(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(b"a" * 1000)
    digest = F.checkpoint_sha256(path)
    assert digest == hashlib.sha256(b"a" * 1000).hexdigest()
    sidecar = json.loads((tmp_path / ".weights.pth.sha256.json").read_text())
    assert sidecar["sha256"] == digest and sidecar["size"] == 1000
    M._HASHES.clear()
    assert F.checkpoint_sha256(path) == digest  # from the sidecar
    path.write_bytes(b"b" * 1000)  # same size, new mtime
    os.utime(path, ns=(1, 1))
    assert F.checkpoint_sha256(path) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_row_ranges_are_sliced_from_the_cached_whole_set(model, tmp_path, monkeypatch):
    whole = F.extract_cached(model, DATA, "val", "pooled", tmp_path)
    monkeypatch.setattr(F, "extract_to_store", lambda *a, **k: pytest.fail("the whole set's features were cached"))
    part = F.extract_cached(model, DATA, "val", "pooled", tmp_path, rows=(5, 12))
    assert part.meta["cache_hit"] and part.path != whole.path
    np.testing.assert_array_equal(part.features, whole.features[5:12])
    assert part.sample_ids == whole.sample_ids[5:12] and part.labels.tolist() == whole.labels[5:12].tolist()
    assert F.dataset_rows(part.meta).tolist() == list(range(5, 12))
    with pytest.raises(ConfigError, match="outside the 20 items"):
        F.extract_cached(model, DATA, "val", "pooled", tmp_path, rows=(5, 21))


def test_extract_rows_skips_corrupt_items_only_when_asked(model):
    from vitssl.data import CorruptImageError

    dataset, _, _ = build_eval_dataset(DATA)

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return len(dataset)

        def __getitem__(self, i):
            if i == 3:  # the data layer's message names the training fix, a config key
                raise CorruptImageError(f"cannot decode image shapes/val/3 ({SKIP_HINT})")
            return dataset[i]

    fn = model.feature_fn("pooled")
    for workers in (0, 1):  # a loader worker re-raises the error with its traceback as the message
        with pytest.raises(F.CorruptSampleError) as caught:
            F.extract_rows(fn, Broken(), model.sample_fn, batch_size=8, num_workers=workers)
        message = str(caught.value)
        assert message == f"cannot decode image shapes/val/3; {F.SKIP_CORRUPT_HINT}", workers
        assert isinstance(caught.value, UserError) and "data.skip_corrupt" not in message
    feats, rows = F.extract_rows(fn, Broken(), model.sample_fn, batch_size=8, skip_corrupt=True)
    assert rows.tolist() == [r for r in range(20) if r != 3] and feats.shape == (19, 32)


def test_progress_logs_every_tenth_without_a_terminal(monkeypatch, caplog):
    from vitssl.eval import progress as P

    monkeypatch.setattr(F.Progress, "QUIET_S", 0.0)  # log from the start (short loops stay quiet otherwise)
    monkeypatch.setattr(F.Progress, "LOG_EVERY_S", 1e9)  # only the 10 % steps, however slow the machine
    monkeypatch.setattr(P.sys.stderr, "isatty", lambda: False)
    with caplog.at_level("INFO", logger="vitssl.eval.progress"), F.Progress(50, "features of x", "img") as progress:
        for _ in range(50):
            progress.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10 and lines[0].startswith("features of x: 5/50 img (10%)")
    assert lines[-1].startswith("features of x: 50/50 img (100%)")
    caplog.clear()
    with caplog.at_level("INFO", logger="vitssl.eval.progress"), F.Progress(50, "quiet", enabled=False) as progress:
        progress.update(50)  # other ranks say nothing
    assert not caplog.records


def test_one_extraction_loop_serves_transformed_datasets(model, monkeypatch):
    from vitssl.data import TransformedDataset

    dataset, _, _ = build_eval_dataset(DATA)
    from vitssl.eval import extract as E

    calls = []
    real = E._embed
    monkeypatch.setattr(E, "_embed", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    F.extract_features(model.objective.eval_features, TransformedDataset(dataset, model.sample_fn, seed=0), 8)
    F.extract_rows(model.feature_fn("pooled"), dataset, model.sample_fn, [2, 5], batch_size=8)
    assert calls == [None, [2, 5]]  # both entry points run the same loop


def test_feature_set_folder_round_trip_and_damage(tmp_path):
    fs = F.FeatureSet(np.ones((3, 2), np.float32), np.array([0, 1, -1]), ["a", "b", "c"], {"classes": ["x", "y"]})
    loaded = F.FeatureSet.load(fs.save(tmp_path / "set"))
    np.testing.assert_array_equal(loaded.features, fs.features)
    assert loaded.sample_ids == ["a", "b", "c"] and loaded.classes == ["x", "y"] and not loaded.labelled
    (tmp_path / "set" / "labels.npy").unlink()
    with pytest.raises(F.FeatureCacheError, match="incomplete or unreadable"):
        F.FeatureSet.load(tmp_path / "set")
    with pytest.raises(F.FeatureCacheError, match="do not describe the same N items"):
        F.FeatureSet(np.ones((3, 2), np.float32), np.zeros(2, np.int64), ["a", "b", "c"])


def test_legacy_extract_features_still_serves_the_knn_monitor(model):
    from vitssl.data import TransformedDataset

    dataset, _, _ = build_eval_dataset(DATA)
    feats, labels = F.extract_features(
        model.objective.eval_features, TransformedDataset(dataset, model.sample_fn, seed=0), batch_size=8
    )
    assert feats.shape == (20, 32) and labels.tolist() == [i % 8 for i in range(20)]


def test_data_specs():
    assert parse_data_spec("imagefolder:root=/data/a,b/c,split=val") == (
        "imagefolder",
        {"root": "/data/a,b/c", "split": "val"},
    )
    assert parse_data_spec("shapes:num_samples=500,flag=true,x=null") == (
        "shapes",
        {"num_samples": 500, "flag": True, "x": None},
    )
    assert canonical_options({"root": "x", "split": "val"})["root"] == os.path.abspath("x")
    bad_specs = (("sh apes", "not a dataset name"), ("shapes:num_samples", "not key=value"), ("d:a=1,a=2", "twice"))
    for bad, why in bad_specs:
        with pytest.raises(ConfigError, match=why):
            parse_data_spec(bad)
    with pytest.raises(ConfigError, match="names split 'val' but split 'train'"):
        build_eval_dataset("shapes:split=val", "train")
    with pytest.raises(ConfigError, match=r"no option 'num_sample'.*num_samples"):
        build_eval_dataset("shapes:num_sample=3")
    with pytest.raises(ConfigError, match="does not exist"):
        build_eval_dataset("imagefolder:root=/nonexistent/data")
    with pytest.raises(ConfigError, match=r"^--train 'imagefolder:root=/nonexistent/data': "):
        build_eval_dataset("imagefolder:root=/nonexistent/data", option="--train")  # named as the user typed it
    with pytest.raises(ConfigError, match=r"^--val: data spec 'sh apes'"):
        build_eval_dataset("sh apes", option="--val")
