"""vitssl.index.jobs from Python, without the command line: a payload run in this process through the job registry,
launched locally, built as shards and merged; the result equals what ``vitssl index build`` writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vitssl.config import ConfigError, LaunchConfig, load_config
from vitssl.eval.jobs import launch_job, run_eval_job
from vitssl.index import core as retrieval
from vitssl.index.jobs import IndexBuildJob, launch_sharded_build, needs_training

DATA = "shapes:num_samples=20"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from vitssl.engine import train

    out = tmp_path_factory.mktemp("run")
    train(load_config("pretrain/test_tiny", [f"output_dir={out}", "train.epochs=1"]))
    return out / "checkpoint_last.pth"


def _job(ckpt: Path, out: Path, **kwargs) -> IndexBuildJob:
    return IndexBuildJob(
        checkpoint=str(ckpt), device="cpu", num_workers=0, data=DATA, split="val", out=str(out), **kwargs
    )


def _vectors(folder: Path) -> tuple[list[str], np.ndarray]:
    loaded = retrieval.load_index_dir(folder)
    return loaded.samples, np.asarray(loaded.vectors())


def test_a_payload_runs_here_launches_and_shards_without_the_cli(ckpt, tmp_path, capsys):
    summary = run_eval_job(_job(ckpt, tmp_path / "here", json=str(tmp_path / "here.json")))
    assert summary["count"] == 20 and json.loads((tmp_path / "here.json").read_text())["count"] == 20
    assert "index 'Flat'" in capsys.readouterr().out  # rank 0 prints what the command prints

    assert launch_job(_job(ckpt, tmp_path / "launched"), LaunchConfig(), tmp_path / "launched.build")["count"] == 20
    launch_sharded_build(_job(ckpt, tmp_path / "sharded", factory="IVF2,Flat"), 2, LaunchConfig())
    samples, vectors = _vectors(tmp_path / "here")
    for folder in ("launched", "sharded"):
        got_samples, got = _vectors(tmp_path / folder)
        assert got_samples == samples
        np.testing.assert_allclose(got, vectors, rtol=1e-6)
    assert not (tmp_path / "sharded.build").exists()  # shards, quantizer and work folder removed after the merge


def test_sharded_builds_check_their_settings_first(ckpt, tmp_path, capsys):
    with pytest.raises(ConfigError, match="--shards 0 must be at least 1"):
        launch_sharded_build(_job(ckpt, tmp_path / "x"), 0, LaunchConfig())
    with pytest.raises(ConfigError, match="--factory 'IVF2,Nonsense'"):
        needs_training("IVF2,Nonsense")
    assert needs_training("IVF2,Flat") and not needs_training("Flat")
    launch_sharded_build(_job(ckpt, tmp_path / "dry"), 3, LaunchConfig(dry_run=True))
    assert "would build 3 shards" in capsys.readouterr().out and not (tmp_path / "dry.build").exists()
