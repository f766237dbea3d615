"""The evaluation command line end to end on a checkpoint the engine wrote: eval features|knn|linear, index
build|merge|query|eval, sharding, multi-process extraction and the errors users meet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vitssl.cli import main
from vitssl.config import load_config
from vitssl.eval import features as F
from vitssl.index import core as retrieval

TRAIN = "shapes:num_samples=48"
VAL = "shapes:num_samples=24"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from vitssl.engine import train

    out = tmp_path_factory.mktemp("run")
    train(load_config("pretrain/test_tiny", [f"output_dir={out}", "train.epochs=1"]))
    return out / "checkpoint_last.pth"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """24 procedural shapes written as an imagefolder tree (file-backed: sample ids are image paths)."""
    from vitssl.data import build_dataset

    root = tmp_path_factory.mktemp("images")
    shapes = build_dataset("shapes", split="val", num_samples=24)
    for i in range(len(shapes)):
        img, label = shapes[i]
        folder = root / shapes.classes[label]
        folder.mkdir(exist_ok=True)
        img.save(folder / f"{i:03d}.png")
    return root


def _run(*argv: str) -> int:
    return main([str(a) for a in argv])


def _cached(ckpt: Path, spec: str, split: str, layer: str = "pooled") -> F.FeatureSet:
    fs = F.extract_cached(ckpt, spec, split, layer, device="cpu")
    assert fs.meta["cache_hit"]  # the command left them in the default cache next to the checkpoint
    return fs


def test_knn_command_reports_the_library_result(ckpt, tmp_path, capsys):
    from vitssl.eval.knn import knn_evaluate

    out = tmp_path / "knn.json"
    # the launch override after the --k list reaches the launcher (launch=local: this process)
    argv = ["eval", "knn", ckpt, "--train", TRAIN, "--val", VAL, "--num-workers", 0]
    assert _run(*argv, "--k", 5, 10, "launch=local", "--out", out) == 0
    printed = capsys.readouterr().out
    assert "k-NN (T=0.07, 48 train, 24 val, 8 classes" in printed and f"written to {out}" in printed
    result = json.loads(out.read_text())
    train, val = _cached(ckpt, TRAIN, "train"), _cached(ckpt, VAL, "val")
    expected = knn_evaluate(train.features, train.labels, val.features, val.labels, (5, 10), 0.07, 8)
    assert set(result["results"]) == {"5", "10"}
    for k in ("5", "10"):
        assert result["results"][k]["top1"] == pytest.approx(expected["results"][k]["top1"])
        assert result["results"][k]["top5"] == pytest.approx(expected["results"][k]["top5"])
    assert result["checkpoint_sha256"] == F.checkpoint_sha256(ckpt) and result["layer"] == "pooled"
    assert result["train_features"] == str(train.path)


def test_linear_command_writes_json_and_confusion_pngs(ckpt, tmp_path, capsys):
    from vitssl.eval.linear import train_linear_probe

    out = tmp_path / "linear.json"
    argv = ["eval", "linear", ckpt, "--train", TRAIN, "--val", VAL, "--method", "both", "--epochs", 3]
    assert _run(*argv, "--lrs", 0.1, 1.0, "--cs", 1.0, "--num-workers", 0, "--out", out, "launch=local") == 0
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"linear_sgd", "logistic_regression"}
    for name, png in result["confusion_png"].items():
        assert Path(png).read_bytes()[:8] == PNG_MAGIC and name in png
    sgd = result["results"]["linear_sgd"]
    assert len(sgd["confusion_matrix"]) == 8 and sum(map(sum, sgd["confusion_matrix"])) == 24
    train, val = _cached(ckpt, TRAIN, "train"), _cached(ckpt, VAL, "val")
    direct = train_linear_probe(
        train.features, train.labels, val.features, val.labels, 8, lrs=(0.1, 1.0), epochs=3, device="cpu"
    )
    assert sgd["top1"] == pytest.approx(direct["top1"]) and sgd["best_value"] == direct["best_value"]
    assert "logistic_regression: C sweep" in capsys.readouterr().out


def test_linear_through_the_frozen_backbone_with_augmentation(ckpt, tmp_path):
    out = tmp_path / "aug.json"
    argv = ["eval", "linear", ckpt, "--train", TRAIN, "--val", VAL, "--finetune-aug", "--epochs", 2]
    before = ckpt.read_bytes()
    assert _run(*argv, "--lrs", 0.1, 0.5, "--probe-batch-size", 16, "--num-workers", 0, "--out", out) == 0
    result = json.loads(out.read_text())["results"]["linear_sgd_aug"]
    assert result["epochs"] == 2 and result["num_fit"] + result["num_holdout"] == 48
    assert 0 <= result["top1"] <= 100 and "RandomResizedCrop" in result["augmentation"]
    assert ckpt.read_bytes() == before  # the backbone stays frozen


def test_augmented_probe_recomputes_features_of_new_crops_every_epoch(ckpt):
    from vitssl.eval.linear_aug import AugmentThenEval, augmented_linear_probe
    from vitssl.eval.spec import build_eval_dataset

    model = F.EvalModel(ckpt, "cpu")
    train = _cached(ckpt, TRAIN, "train")
    val = _cached(ckpt, VAL, "val")
    dataset, _, _ = build_eval_dataset(TRAIN, "train")
    seen: list[torch.Tensor] = []
    fn = model.feature_fn("pooled")

    def counting(images: torch.Tensor) -> torch.Tensor:
        seen.append(images.clone())
        return fn(images)

    augment = AugmentThenEval(32, model.sample_fn)
    result = augmented_linear_probe(
        counting, dataset, train.labels, train.features, val.features, val.labels, 8, augment, lrs=[0.1], epochs=2,
        batch_size=8, holdout_fraction=0.0,
    )  # fmt: skip
    assert len(seen) == 2 * (48 // 8)  # one backbone forward per step, every epoch
    assert all(x.shape == (8, 3, 32, 32) for x in seen)
    assert not torch.allclose(torch.cat(seen[:6]).sum(0), torch.cat(seen[6:]).sum(0))  # fresh crops per epoch
    assert result["method"] == "linear_sgd_aug" and result["num_holdout"] == 0


def test_index_build_query_and_eval(ckpt, image_folder, tmp_path, capsys):
    data = f"imagefolder:root={image_folder}"
    for factory in ("Flat", "HNSW32"):
        out = tmp_path / factory
        assert _run("index", "build", ckpt, "--data", data, "--out", out, "--factory", factory, "--num-workers", 0) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["count"] == 24 and manifest["factory"] == factory
        assert manifest["checkpoint"] == F.checkpoint_sha256(ckpt)
        assert manifest["source"]["checkpoint_path"] == str(ckpt) and manifest["source"]["layer"] == "pooled"
    corpus = F.extract_cached(ckpt, data, "val", "pooled", device="cpu", dtype="float32")  # index builds keep float32
    assert corpus.meta["cache_hit"] and corpus.sample_ids[0].startswith(str(image_folder))  # absolute paths

    queries = [corpus.sample_ids[3], corpus.sample_ids[17]]
    grid, answer = tmp_path / "grid.png", tmp_path / "q.json"
    argv = ["index", "query", tmp_path / "Flat", "--image", queries[0], "--image", queries[1], "-k", 5]
    assert _run(*argv, "--grid", grid, "--out", answer) == 0
    got = json.loads(answer.read_text())["queries"]
    normed = corpus.features / np.linalg.norm(corpus.features, axis=1, keepdims=True)
    for q, row in zip(queries, got):
        sims = normed @ normed[corpus.sample_ids.index(q)]
        exact = np.argsort(-sims, kind="stable")[:5]
        assert [h["id"] for h in row["neighbours"]] == exact.tolist()  # the same neighbours as exact search
        assert row["neighbours"][0]["sample"] == q and row["neighbours"][0]["score"] == pytest.approx(1, abs=1e-5)
        np.testing.assert_allclose([h["score"] for h in row["neighbours"]], sims[exact], rtol=1e-5, atol=1e-5)
    assert grid.read_bytes()[:8] == PNG_MAGIC
    argv[2] = tmp_path / "HNSW32"  # a graph over 24 vectors searched with efSearch 64 is exact
    assert _run(*argv, "--out", tmp_path / "hnsw.json") == 0
    hnsw = json.loads((tmp_path / "hnsw.json").read_text())["queries"]
    assert [[h["id"] for h in r["neighbours"]] for r in hnsw] == [[h["id"] for h in r["neighbours"]] for r in got]

    capsys.readouterr()
    assert _run("index", "eval", tmp_path / "HNSW32", "-k", 5, "--out", tmp_path / "eval.json") == 0
    assert "R@1 1.0000" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval.json").read_text())["recall"]["5"] == pytest.approx(1.0)
    truth = tmp_path / "truth.jsonl"
    same_class = [s for s in corpus.sample_ids if Path(s).parent == Path(queries[0]).parent]
    truth.write_text(json.dumps({"query": queries[0], "relevant": same_class}) + "\n")
    assert _run("index", "eval", tmp_path / "Flat", "--ground-truth", truth, "--out", tmp_path / "map.json") == 0
    result = json.loads((tmp_path / "map.json").read_text())
    assert result["num_queries"] == 1 and 0 < result["map"] <= 1 and result["map"] == result["map_exact"]


def _index(directory: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    loaded = retrieval.load_index_dir(directory)
    queries = np.asarray(loaded.vectors()[:6])
    return loaded.samples, np.asarray(loaded.vectors()), retrieval.search(loaded, queries, k=5)[1]


@pytest.mark.parametrize("factory", ["Flat", "IVF2,Flat"])
def test_sharded_build_and_merge_equal_a_single_build(ckpt, tmp_path, factory):
    common = ["--data", "shapes:num_samples=30", "--factory", factory, "--num-workers", 0]
    assert _run("index", "build", ckpt, *common, "--out", tmp_path / "single") == 0
    assert _run("index", "build", ckpt, *common, "--out", tmp_path / "sharded", "--shards", 3) == 0
    single = _index(tmp_path / "single")
    for got, want in zip(_index(tmp_path / "sharded"), single):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not (tmp_path / "sharded.build" / "shards").exists()  # merged shards are cleaned up
    manifest = json.loads((tmp_path / "sharded" / "manifest.json").read_text())
    assert manifest["merged_from"] == 3 and manifest["source"]["data"] == "shapes:num_samples=30"
    if factory == "Flat":  # by hand: --shard i/n twice, then `index merge`
        for i in range(2):
            assert _run("index", "build", ckpt, *common, "--shard", f"{i}/2", "--out", tmp_path / f"s{i}") == 0
        assert _run("index", "merge", tmp_path / "s0", tmp_path / "s1", "--out", tmp_path / "manual") == 0
        for got, want in zip(_index(tmp_path / "manual"), single):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    else:  # a factory that needs training cannot be sharded by hand without a shared quantizer
        assert _run("index", "build", ckpt, *common, "--shard", "0/2", "--out", tmp_path / "s0") == 2


def test_two_local_processes_extract_in_dataset_order(ckpt, tmp_path):
    spec = "shapes:num_samples=25"  # odd: the two ranks get shards of different sizes
    argv = ["eval", "features", ckpt, "--data", spec, "--split", "val", "--num-workers", 0, "--batch-size", 4]
    assert _run(*argv, "--cache-dir", tmp_path / "two", "launch.tasks_per_node=2") == 0
    assert _run(*argv, "--cache-dir", tmp_path / "one") == 0
    (two,), (one,) = (list((tmp_path / d).iterdir()) for d in ("two", "one"))
    two, one = F.FeatureSet.load(two), F.FeatureSet.load(one)
    assert two.meta["world_size"] == 2 and two.sample_ids == one.sample_ids == [f"shapes/val/{i}" for i in range(25)]
    np.testing.assert_allclose(two.features, one.features, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(two.labels, one.labels)


def test_sharded_build_on_slurm_dry_run_prints_the_array_script(ckpt, tmp_path, capsys):
    argv = ["index", "build", ckpt, "--data", VAL, "--out", tmp_path / "idx", "--shards", 4, "--dry-run"]
    assert _run(*argv, "launch=slurm", "launch.partition=gpu", "launch.gpus_per_node=1") == 0
    script = capsys.readouterr().out
    assert "#SBATCH --array=0-3" in script and "#SBATCH --partition=gpu" in script
    assert not (tmp_path / "idx").exists()


@pytest.mark.slurm
def test_sharded_build_on_slurm_is_a_train_job_an_array_and_a_merge(ckpt, tmp_path, slurm_cluster):
    from vitssl.launch import wait_for

    common = ["--data", "shapes:num_samples=30", "--factory", "IVF2,Flat", "--num-workers", 0, "--device", "cpu"]
    slurm = ["launch=slurm", "launch.cpus_per_task=1", "launch.timeout_min=5"]  # one thread per job
    assert _run("index", "build", ckpt, *common, "--out", tmp_path / "sharded", "--shards", 2, *slurm) == 0
    records = [json.loads(line) for line in (tmp_path / "sharded.build" / "jobs.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["eval", "index_shard", "index_shard", "index_merge"]
    merge = records[-1]
    assert wait_for(merge["job_id"], merge["folder"], timeout_s=240)["count"] == 30
    assert _run("index", "build", ckpt, *common, "--out", tmp_path / "single") == 0
    for got, want in zip(_index(tmp_path / "sharded"), _index(tmp_path / "single")):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_user_errors_exit_2_with_one_clear_line(ckpt, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    truncated = run / "checkpoint_last.pth"
    truncated.write_bytes(ckpt.read_bytes()[:5000])
    earlier = run / "checkpoint_000100.pth"
    earlier.write_bytes(b"")
    broken = tmp_path / "broken" / "cats"  # an imagefolder with an undecodable image
    broken.mkdir(parents=True)
    (broken / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    workers = ["--num-workers", 0]
    missing = "imagefolder:root=/nonexistent/data"
    cases = [
        # eval commands take another checkpoint, not resume=auto (a training setting)
        (
            ["eval", "knn", truncated, "--train", TRAIN, "--val", VAL, *workers],
            f"cut short: the file was not written to the end); pass another checkpoint, e.g. {earlier}",
        ),
        (["eval", "knn", tmp_path / "missing.pth", "--train", TRAIN, "--val", VAL], "does not exist"),
        (["eval", "features", ckpt, "--data", missing, *workers], f"--data {missing!r}: "),
        (["eval", "knn", ckpt, "--train", missing, "--val", VAL, *workers], f"--train {missing!r}: "),
        (["eval", "linear", ckpt, "--train", TRAIN, "--val", "sh apes", *workers], "--val: data spec 'sh apes'"),
        (["eval", "features", ckpt, "--data", VAL, "--layer", "last9", *workers], "--layer last9"),
        (["eval", "features", ckpt, "--data", VAL, "optim.lr=3"], "launch settings only"),
        (["eval", "features", ckpt, "--data", f"imagefolder:root={broken.parent}", *workers], "--skip-corrupt"),
        (["index", "build", ckpt, "--data", VAL, "--out", tmp_path / "i", "--factory", "IVF"], "--factory 'IVF'"),
        (["index", "query", tmp_path, "--image", "x.png"], "manifest.json is missing"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert _run(*argv) == 2, argv
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last.startswith("vitssl ") and ": error: " in last and message in last, (argv, err)
        assert "Traceback" not in err and "resume=auto" not in err and "data.skip_corrupt" not in err, (argv, err)
    assert _run("eval", "features", ckpt, "--data", f"imagefolder:root={broken.parent}", "--skip-corrupt") == 2
    assert "no readable image among the 1 items" in capsys.readouterr().err  # skipped, and nothing is left


def test_query_grid_draws_dataset_items_that_are_not_files(ckpt, tmp_path, capsys):
    from PIL import Image

    from vitssl.data import build_dataset
    from vitssl.index.grid import GREY, Neighbour, query_grid_tiles

    data = "digits:split=val"
    out = tmp_path / "digits-index"
    assert _run("index", "build", ckpt, "--data", data, "--out", out, "--num-workers", 0) == 0
    digits = build_dataset("digits", split="val")
    query = tmp_path / "query.png"
    digits[7][0].save(query)  # a corpus item as a query file: its nearest neighbour is itself
    grid, answer = tmp_path / "grid.png", tmp_path / "q.json"
    assert _run("index", "query", out, "--image", query, "-k", 3, "--grid", grid, "--out", answer) == 0
    assert grid.read_bytes()[:8] == PNG_MAGIC and f"query grid: {grid}" in capsys.readouterr().out
    hits = json.loads(answer.read_text())["queries"][0]["neighbours"]
    assert hits[0]["sample"] == "digits/val/7"  # not a file: drawn grey before
    source = json.loads((out / "manifest.json").read_text())["source"]
    neighbours = [Neighbour(h["id"], h["sample"], h["score"]) for h in hits]
    (row,) = query_grid_tiles([str(query)], [neighbours], source, tile_size=128)
    first = row[1].pixels
    assert first.shape == (128, 128, 3) and first.std() > 30  # the digit itself, not a grey tile
    grey = (first == GREY).all(axis=2)  # (128, 128)
    assert not grey.all(axis=0).any() and not grey.all(axis=1).any()  # enlarged: the 16 px digit fills the tile
    assert row[1].caption.startswith(f"#{hits[0]['id']} {digits.classes[digits.targets[7]]}\n")
    with Image.open(grid) as png:
        assert png.size[0] >= 4 * 128 * 0.9  # the query and three neighbours side by side


def test_unknown_trailing_arguments_are_still_rejected(ckpt):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "features", str(ckpt), "--data", VAL, "--bogus"])
    assert exc.value.code == 2


def test_default_outputs_name_their_inputs_and_results_of_other_inputs_are_not_overwritten(ckpt, tmp_path, capsys):
    base = ["eval", "knn", ckpt, "--train", TRAIN, "--num-workers", 0, "--k", 5]
    assert _run(*base, "--val", VAL) == 0
    assert _run(*base, "--val", "shapes:num_samples=16") == 0
    written = sorted((ckpt.parent / "eval").glob("knn-shapes-shapes-val-pooled-*.json"))
    assert len(written) == 2  # two evaluations, two files
    assert {json.loads(p.read_text())["val"] for p in written} == {VAL, "shapes:num_samples=16"}
    capsys.readouterr()
    assert _run(*base, "--val", VAL, "--out", written[0] if VAL in written[0].read_text() else written[1]) == 0
    other = written[1] if VAL in written[0].read_text() else written[0]
    assert _run(*base, "--val", VAL, "--out", other) == 2  # holds the result of other inputs
    err = capsys.readouterr().err.strip()
    assert "holds the result of other inputs" in err and "\n" not in err


def test_probes_reuse_existing_feature_stores(ckpt, tmp_path, capsys):
    cache = tmp_path / "cache"
    common = ["--num-workers", 0, "--cache-dir", cache]
    for spec, split in ((TRAIN, "train"), (VAL, "val")):
        assert _run("eval", "features", ckpt, "--data", spec, "--split", split, *common) == 0
    printed = capsys.readouterr().out
    assert "reuse it: vitssl eval knn|linear" in printed and "--train-features" in printed
    train_dir, val_dir = (F.extract_cached(ckpt, s, sp, cache_dir=cache, device="cpu").path for s, sp in
                          ((TRAIN, "train"), (VAL, "val")))  # fmt: skip
    by_spec, by_store = tmp_path / "spec.json", tmp_path / "store.json"
    assert _run("eval", "knn", ckpt, "--train", TRAIN, "--val", VAL, *common, "--k", 5, "--out", by_spec) == 0
    argv = ["eval", "knn", ckpt, "--train-features", train_dir, "--val-features", val_dir, "--k", 5]
    assert _run(*argv, "--out", by_store) == 0
    a, b = json.loads(by_spec.read_text()), json.loads(by_store.read_text())
    assert a["results"] == b["results"] and b["train_features"] == str(train_dir)
    capsys.readouterr()
    assert _run(*argv, "--layer", "mean", "--out", tmp_path / "x.json") == 2  # the stores hold layer pooled
    err = capsys.readouterr().err.strip()
    assert "layer 'pooled' (wanted 'mean')" in err and "\n" not in err
    assert _run("eval", "knn", ckpt, "--val", VAL, "--out", tmp_path / "y.json") == 2  # neither --train nor a store
    approx = tmp_path / "approx.json"
    assert _run(*argv, "--approx", "--out", approx) == 0
    assert json.loads(approx.read_text())["search"]["index"] == "IVF-Flat"
    sweep = tmp_path / "sweep.json"
    linear_argv = ["eval", "linear", ckpt, "--train-features", train_dir, "--val-features", val_dir, "--epochs", 2]
    assert _run(*linear_argv, "--method", "sweep", "--lrs", 0.1, 1.0, "--wds", 0, 0.001, "--out", sweep) == 0
    table = json.loads(sweep.read_text())["results"]["linear_sweep"]["table"]
    assert len(table) == 4 and "linear sweep: 4 heads" in capsys.readouterr().out
