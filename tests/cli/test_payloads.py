"""The typed payloads of the evaluation and index jobs (vitssl.cli.eval, vitssl.cli.index): what a command builds,
that they travel (pickle) and that run_eval_job dispatches on their type; and that the parser needs no torch."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from vitssl.cli import eval as cli_eval
from vitssl.cli import index as cli_index
from vitssl.cli import main
from vitssl.config import LaunchConfig

BASE = {"checkpoint": "/runs/x/checkpoint_last.pth", "device": "cpu", "layer": "last4", "num_workers": 2}
PROBE = {"train": "digits:split=train", "val": "digits:split=val", "train_split": "train", "val_split": "val"}
INDEX = {"data": "digits:split=val", "split": "val", "out": "/idx", "factory": "IVF2,Flat"}
PAYLOADS = [
    cli_eval.FeaturesJob(**BASE, data="shapes:num_samples=8", split="val"),
    cli_eval.KnnJob(**BASE, **PROBE, out="/r/knn.json", ks=(10, 20), temperature=0.1),
    cli_eval.LinearJob(**BASE, **PROBE, out="/r/lin.json", lrs=(0.1, 1.0), method="both", finetune_aug=True),
    cli_index.IndexBuildJob(**BASE, **INDEX, train_size=100),
    cli_index.IndexTrainJob(**BASE, **INDEX),
    cli_index.IndexShardJob(**BASE, **INDEX, shard=(1, 3), trained="/idx.build/trained.faiss"),
    cli_index.IndexMergeJob(shard_dirs=("/a", "/b"), out="/idx", keep_shards=True),
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: type(p).__name__)
def test_payloads_round_trip_through_pickle_and_are_frozen(payload):
    again = pickle.loads(pickle.dumps(payload))
    assert again == payload and type(again) is type(payload)
    with pytest.raises(dataclasses.FrozenInstanceError):
        payload.out = "/elsewhere"  # type: ignore[misc]
    assert type(payload) in cli_eval._JOBS  # run_eval_job has a job for it


def test_run_eval_job_refuses_other_payloads():
    with pytest.raises(TypeError, match=r"got a dict; evaluation payloads are .*KnnJob.*IndexMergeJob"):
        cli_eval.run_eval_job({"command": "knn"})


@pytest.fixture
def launched(monkeypatch):
    """What commands hand to the launcher, instead of running it."""
    calls: list[tuple] = []
    monkeypatch.setattr(cli_eval, "launch_job", lambda cfg, payload, out: calls.append((cfg, payload, Path(out))))
    monkeypatch.setattr(cli_index, "launch_job", lambda cfg, payload, out: calls.append((cfg, payload, Path(out))))
    return calls


def test_knn_command_builds_its_payload_and_launch_settings(tmp_path, launched):
    ckpt = tmp_path / "run" / "checkpoint_last.pth"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"not loaded by the command itself")
    argv = ["eval", "knn", ckpt, "--train", "digits:split=train", "--val", "digits:split=val", "--k", 10, 20, 100]
    assert main([str(a) for a in [*argv, "launch=local", 200, "launch.tasks_per_node=2", "--device", "cpu"]]) == 0
    ((launch_cfg, payload, output_dir),) = launched
    assert isinstance(launch_cfg, LaunchConfig) and launch_cfg.backend == "local" and launch_cfg.tasks_per_node == 2
    (out,) = [Path(payload.out)]  # the default name says what was evaluated, with a digest of every input
    assert out.parent == ckpt.parent / "eval" and out.name.startswith("knn-digits-digits-val-pooled-")
    assert payload == cli_eval.KnnJob(
        checkpoint=str(ckpt), device="cpu", **PROBE, out=str(out), ks=(10, 20, 100, 200), num_workers=None
    )
    assert output_dir == out.parent and pickle.loads(pickle.dumps(payload)) == payload


def test_index_build_command_builds_its_payload(tmp_path, launched):
    ckpt = tmp_path / "ckpt.pth"
    ckpt.write_bytes(b"x")
    argv = ["index", "build", ckpt, "--data", "digits", "--split", "train", "--out", tmp_path / "idx"]
    assert main([str(a) for a in [*argv, "--factory", "HNSW32", "--no-vectors", "--layer", "mean", "device=cpu"]]) == 0
    ((_, payload, output_dir),) = launched
    assert isinstance(payload, cli_index.IndexBuildJob) and payload.device == "cpu" and payload.layer == "mean"
    assert (payload.data, payload.split, payload.factory, payload.store_vectors) == ("digits", "train", "HNSW32", False)
    assert payload.out == str(tmp_path / "idx") and output_dir == tmp_path / "idx.build"


def test_slurm_dry_run_of_an_eval_command_prints_the_script(tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pth"
    ckpt.write_bytes(b"x")
    argv = ["eval", "features", ckpt, "--data", "digits", "launch=slurm", "launch.partition=gpu", "--dry-run"]
    assert main([str(a) for a in argv]) == 0
    assert "#SBATCH --partition=gpu" in capsys.readouterr().out


def test_building_the_eval_and_index_parsers_imports_no_torch():
    code = (
        "import argparse, sys\n"
        "from vitssl.cli import eval, index\n"
        "parser = argparse.ArgumentParser()\n"
        "sub = parser.add_subparsers()\n"
        "groups = {name: sub.add_parser(name).add_subparsers() for name in ('eval', 'index')}\n"
        "eval.register_commands(sub, groups)\n"
        "index.register_commands(sub, groups)\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'faiss') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["knn", "--temperature", "0"], "--temperature 0.0: temperature must be"),
        (["knn", "--batch-size", "0"], "--batch-size 0 must be at least 1"),
        (["linear", "--probe-batch-size", "1"], "--probe-batch-size 1 must be at least 2"),
        (["linear", "--holdout-fraction", "1"], "--holdout-fraction 1.0 must lie in [0, 1)"),
        (["linear", "--lrs", "0.1", "-1"], "--lrs 0.1 -1.0: every value must be positive"),
        (["linear", "--holdout-fraction", "0"], "nothing to choose among the values of --lrs;"),
        (["linear", "--method", "both", "--lrs", "0.1", "--holdout-fraction", "0"], "values of --cs;"),
        (["linear", "--method", "logreg", "--finetune-aug"], "--finetune-aug trains the SGD probe"),
    ],
)
def test_probe_options_fail_before_anything_is_launched(tmp_path, capsys, launched, options, message):
    ckpt = tmp_path / "ckpt.pth"
    ckpt.write_bytes(b"x")
    command, *rest = options
    argv = ["eval", command, str(ckpt), "--train", "digits:split=train", "--val", "digits:split=val", *rest]
    assert main(argv) == 2 and not launched
    assert message in capsys.readouterr().err
