"""The typed payloads of the evaluation and index jobs (vitssl.eval.jobs, vitssl.index.jobs) as the commands build
them (vitssl.cli.eval, vitssl.cli.index): that they travel (pickle), that run_eval_job dispatches on their type
through the job registry, also in a fresh interpreter and from the launch-target names older submissions pickled;
and that the parser needs no torch."""

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
from vitssl.eval import jobs as eval_jobs
from vitssl.index import jobs as index_jobs
from vitssl.launch import resolve_target

BASE = {"checkpoint": "/runs/x/checkpoint_last.pth", "device": "cpu", "layer": "last4", "num_workers": 2}
PROBE = {"train": "digits:split=train", "val": "digits:split=val", "train_split": "train", "val_split": "val"}
INDEX = {"data": "digits:split=val", "split": "val", "out": "/idx", "factory": "IVF2,Flat"}
PAYLOADS = [
    eval_jobs.FeaturesJob(**BASE, data="shapes:num_samples=8", split="val"),
    eval_jobs.KnnJob(**BASE, **PROBE, out="/r/knn.json", ks=(10, 20), temperature=0.1),
    eval_jobs.LinearJob(**BASE, **PROBE, out="/r/lin.json", lrs=(0.1, 1.0), method="both", finetune_aug=True),
    index_jobs.IndexBuildJob(**BASE, **INDEX, train_size=100),
    index_jobs.IndexTrainJob(**BASE, **INDEX),
    index_jobs.IndexShardJob(**BASE, **INDEX, shard=(1, 3), trained="/idx.build/trained.faiss"),
    index_jobs.IndexMergeJob(shard_dirs=("/a", "/b"), out="/idx", keep_shards=True),
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: type(p).__name__)
def test_payloads_round_trip_through_pickle_and_are_frozen(payload):
    again = pickle.loads(pickle.dumps(payload))
    assert again == payload and type(again) is type(payload)
    with pytest.raises(dataclasses.FrozenInstanceError):
        payload.out = "/elsewhere"  # type: ignore[misc]
    assert callable(eval_jobs.job_for(payload))  # run_eval_job has a job for it


def test_run_eval_job_refuses_other_payloads():
    with pytest.raises(TypeError, match=r"got a dict; evaluation payloads are .*KnnJob.*IndexMergeJob"):
        eval_jobs.run_eval_job({"command": "knn"})
    with pytest.raises(TypeError, match="got a dict"):  # before anything is launched
        eval_jobs.launch_job({"command": "knn"}, LaunchConfig(), "/nowhere")


def test_a_fresh_interpreter_finds_the_job_of_an_unpickled_payload():
    """What a spawned process or SLURM job does: resolve the target by name, unpickle the payload, dispatch; the
    targets older submissions pickled (vitssl.cli.eval:run_eval_job / run_eval_call) still resolve, to the same."""
    blobs = [pickle.dumps(p) for p in (PAYLOADS[1], PAYLOADS[3])]
    code = (
        "import pickle, sys\n"
        "from vitssl.launch import resolve_target\n"
        "from vitssl.eval.jobs import JOB_TARGET, job_for\n"
        "assert resolve_target(JOB_TARGET) is resolve_target('vitssl.cli.eval:run_eval_job')\n"
        "assert resolve_target('vitssl.cli.eval:run_eval_call').__module__ == 'vitssl.eval.jobs'\n"
        f"for blob in {blobs!r}:\n"
        "    payload = pickle.loads(blob)\n"
        "    print(type(payload).__name__, job_for(payload).__module__, job_for(payload).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["KnnJob vitssl.eval.probe_jobs run_knn", "IndexBuildJob vitssl.index.jobs run_index_build"]


def test_the_payloads_older_submissions_pickled_still_load():
    assert cli_eval.KnnJob is eval_jobs.KnnJob and cli_index.IndexBuildJob is index_jobs.IndexBuildJob
    assert resolve_target(eval_jobs.CALL_TARGET) is resolve_target("vitssl.cli.eval:run_eval_call")


@pytest.fixture
def launched(monkeypatch):
    """What commands hand to the launcher, instead of running it."""
    calls: list[tuple] = []
    monkeypatch.setattr(cli_eval, "launch_job", lambda payload, cfg, out: calls.append((cfg, payload, Path(out))))
    monkeypatch.setattr(cli_index, "launch_job", lambda payload, cfg, out: calls.append((cfg, payload, Path(out))))
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
    assert payload == eval_jobs.KnnJob(
        checkpoint=str(ckpt), device="cpu", **PROBE, out=str(out), ks=(10, 20, 100, 200), num_workers=None
    )
    assert output_dir == out.parent and pickle.loads(pickle.dumps(payload)) == payload


def test_default_result_files_differ_by_the_probe_options(tmp_path, launched):
    ckpt = tmp_path / "run" / "checkpoint_last.pth"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    base = ["eval", "knn", str(ckpt), "--train", "digits", "--val", "digits", "--device", "cpu"]
    for extra in (["-k", "10"], ["-k", "20"], ["-k", "20", "--temperature", "0.1"], ["-k", "20"]):
        assert main([*base, *extra]) == 0
    outs = [payload.out for _, payload, _ in launched]
    assert len(set(outs[:3])) == 3 and outs[3] == outs[1]  # other options, other files; the same, the same file
    linear = ["eval", "linear", str(ckpt), "--train", "digits", "--val", "digits", "--device", "cpu"]
    for lr in ("0.1", "0.3"):
        assert main([*linear, "--lrs", lr]) == 0
    assert launched[-1][1].out != launched[-2][1].out


def test_index_build_command_builds_its_payload(tmp_path, launched):
    ckpt = tmp_path / "ckpt.pth"
    ckpt.write_bytes(b"x")
    argv = ["index", "build", ckpt, "--data", "digits", "--split", "train", "--out", tmp_path / "idx"]
    assert main([str(a) for a in [*argv, "--factory", "HNSW32", "--no-vectors", "--layer", "mean", "device=cpu"]]) == 0
    ((_, payload, output_dir),) = launched
    assert isinstance(payload, index_jobs.IndexBuildJob) and payload.device == "cpu" and payload.layer == "mean"
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
