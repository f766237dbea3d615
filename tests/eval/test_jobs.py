"""vitssl.eval.jobs / probe_jobs: the Python API runs what ``vitssl eval features|knn|linear`` runs, with the same
payloads and results, and checks its own settings without a command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vitssl.config import ConfigError, load_config
from vitssl.eval.jobs import FeaturesJob, JobResult, KnnJob, LinearJob, default_result_path, run_features
from vitssl.eval.probe_jobs import run_knn, run_linear

TRAIN, VAL = "shapes:num_samples=32", "shapes:num_samples=16"
PROBE = {"train": TRAIN, "val": VAL, "train_split": "train", "val_split": "val", "device": "cpu", "num_workers": 0}
VOLATILE = ("seconds", "search_seconds", "output")  # wall times, and where the JSON went


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from vitssl.engine import train

    out = tmp_path_factory.mktemp("run")
    train(load_config("pretrain/test_tiny", [f"output_dir={out}", "train.epochs=1"]))
    return out / "checkpoint_last.pth"


def _stable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in VOLATILE}


def test_knn_from_python_equals_the_command(ckpt, tmp_path, capsys):
    from vitssl.cli import main

    cli_out = tmp_path / "cli.json"
    argv = ["eval", "knn", str(ckpt), "--train", TRAIN, "--val", VAL, "-k", "3", "5", "--device", "cpu"]
    assert main([*argv, "--num-workers", "0", "--out", str(cli_out)]) == 0
    printed = capsys.readouterr().out
    result = run_knn(KnnJob(checkpoint=str(ckpt), **PROBE, ks=(3, 5), out=str(tmp_path / "api.json")))
    assert isinstance(result, JobResult) and result.task == "knn" and result.path == tmp_path / "api.json"
    assert _stable(result.record) == _stable(json.loads(cli_out.read_text()))
    assert json.loads(result.path.read_text()) == json.loads(json.dumps(result.record, default=str))
    assert result.report.splitlines()[:-1] == printed.splitlines()[:-1]  # the same table; only the path differs
    assert result.report.endswith(f"written to {tmp_path / 'api.json'}")
    # the exact-search backends agree, from the command (--knn-backend) and from Python
    assert main([*argv, "--num-workers", "0", "--out", str(tmp_path / "faiss.json"), "--knn-backend", "faiss"]) == 0
    torch_run = run_knn(KnnJob(checkpoint=str(ckpt), **PROBE, ks=(3, 5), out=str(tmp_path / "t.json"), backend="torch"))
    faiss_run = json.loads((tmp_path / "faiss.json").read_text())
    for k in ("3", "5"):
        assert (
            torch_run.record["results"][k]["top1"]
            == faiss_run["results"][k]["top1"]
            == result.record["results"][k]["top1"]
        )


def test_linear_and_features_from_python(ckpt, tmp_path):
    job = LinearJob(checkpoint=str(ckpt), **PROBE, out=str(tmp_path / "lin.json"), method="both", epochs=2,
                    lrs=(0.1,), cs=(1.0,))  # fmt: skip
    result = run_linear(job)
    assert set(result.record["results"]) == {"linear_sgd", "logistic_regression"}
    for png in result.record["confusion_png"].values():
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.report.startswith("linear_sgd: lr sweep") and "\nlogistic_regression: C sweep" in result.report
    assert result.report.splitlines()[-1].startswith(f"written to {tmp_path / 'lin.json'} (confusion matrices: ")
    features = run_features(FeaturesJob(checkpoint=str(ckpt), data=VAL, split="val", device="cpu", num_workers=0))
    assert features.record["cache_hit"] and features.record["count"] == 16  # the probes cached it
    assert features.path is None and Path(features.record["folder"]).is_dir()


@pytest.mark.parametrize(
    ("job", "message"),
    [
        (KnnJob(checkpoint="/x", **PROBE, out="/o.json", ks=(0,)), "--k 0: neighbour counts must be positive"),
        (KnnJob(checkpoint="/x", **PROBE, out="/o.json", temperature=0.0), "--temperature 0.0"),
        (KnnJob(checkpoint="/x", **PROBE, out="/o.json", backend="blas"), "--knn-backend blas: choose one of"),
        (LinearJob(checkpoint="/x", **PROBE, out="/o.json", probe_batch_size=1), "--probe-batch-size 1"),
        (LinearJob(checkpoint="/x", **PROBE, out="/o.json", method="logreg", finetune_aug=True), "--finetune-aug"),
    ],
)
def test_payloads_refuse_settings_before_reading_the_checkpoint(job, message):
    runner = run_knn if isinstance(job, KnnJob) else run_linear
    with pytest.raises(ConfigError, match=message):
        runner(job)  # /x does not exist: the settings are checked first


def test_default_result_path_names_what_was_evaluated():
    what = {"train": TRAIN, "val": VAL, "train_split": "train", "val_split": "val", "train_features": None,
            "val_features": None, "layer": "pooled"}  # fmt: skip
    path = default_result_path("/runs/a/checkpoint_last.pth", "knn", what)
    assert path.parent == Path("/runs/a/eval") and path.name.startswith("knn-shapes-shapes-val-pooled-")
    assert path != default_result_path("/runs/a/checkpoint_last.pth", "knn", {**what, "layer": "cls"})
