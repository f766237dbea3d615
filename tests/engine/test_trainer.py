"""The engine: one loop, exact resume (stop and SIGKILL), checkpoint safety, non-finite loss, DDP."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests._dist import run_distributed
from vitssl.config import ConfigError, load_config
from vitssl.engine import CheckpointError, NonFiniteLossError, load_checkpoint, train
from vitssl.engine.checkpoint import LAST_NAME, find_resume_checkpoint, list_step_checkpoints
from vitssl.engine.optim import cosine_schedule
from vitssl.ssl import OBJECTIVES, register_objective
from vitssl.ssl.supervised import Supervised, SupervisedConfig

RECIPE = "configs/pretrain/test_tiny.yaml"


def make_cfg(out: Path, *overrides: str):
    return load_config(RECIPE, [f"output_dir={out}", *overrides])


def losses(out: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / LAST_NAME)["model"]


@dataclass
class _NanConfig(SupervisedConfig):
    name: str = "nan_after"
    nan_at_step: int = 3  # forward call (1-based) from which the loss is NaN


if "nan_after" not in OBJECTIVES:

    @register_objective("nan_after")
    class _NanAfter(Supervised):
        """Supervised, but the loss turns NaN at a chosen step: the engine must stop cleanly."""

        Config = _NanConfig

        def __init__(self, cfg, backbone_factory):
            super().__init__(cfg, backbone_factory)
            self.calls = 0

        def forward(self, batch):
            out = super().forward(batch)
            self.calls += 1
            if self.calls >= self.cfg.nan_at_step:
                out["loss"] = out["loss"] * float("nan")
            return out


def test_run_folder_contents(tmp_path):
    result = train(make_cfg(tmp_path))
    assert result.status == "finished" and result.step == 8  # 64 samples / 16 per step × 2 epochs
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all({"step", "epoch", "loss", "lr"} <= r.keys() for r in records)
    cfg_text = (tmp_path / "config.yaml").read_text()
    assert "git_sha" in cfg_text and "vitssl_version" in cfg_text
    state = torch.load(tmp_path / LAST_NAME, weights_only=True)
    assert {"model", "optimizer", "step", "epoch", "config", "rng", "scaler"} <= state.keys()
    assert state["config"]["model"]["backbone"] == "test_vit"
    assert len(list_step_checkpoints(tmp_path)) == 2  # keep_last
    assert (tmp_path / "backbone.safetensors").is_file()


def test_lr_schedule_warmup_then_cosine():
    s = cosine_schedule(1.0, 0.1, total_steps=10, warmup_steps=4)
    assert s[0] == 0.0 and s[3] == pytest.approx(0.75) and s[4] == pytest.approx(1.0)
    assert s[-1] > 0.1 and all(a >= b for a, b in itertools.pairwise(s[4:]))


def test_loss_decreases(tmp_path):
    train(make_cfg(tmp_path, "train.epochs=6", "train.checkpoint_every_steps=100"))
    values = list(losses(tmp_path).values())
    assert sum(values[-4:]) / 4 < sum(values[:4]) / 4


def test_exact_resume_after_stop(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(make_cfg(full))
    stopped = train(make_cfg(part, "train.stop_after_steps=3"))  # mid-epoch: 4 steps per epoch
    assert stopped.status == "stopped" and stopped.step == 3
    resumed = train(make_cfg(part))
    assert resumed.status == "finished" and resumed.step == 8
    assert losses(part) == losses(full)
    for key, value in weights(full).items():
        assert torch.equal(value, weights(part)[key]), key


def test_exact_resume_after_sigkill(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = ["train.epochs=12", "train.checkpoint_every_steps=5"]
    train(make_cfg(full, *args))
    # the same thread count as this process: float reductions (and so the losses) depend on it
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [sys.executable, "-m", "vitssl", "pretrain", RECIPE, f"output_dir={killed}", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (killed / "checkpoint_00000010.pth").exists():
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    train(make_cfg(killed, *args))
    assert losses(killed) == losses(full)
    for key, value in weights(full).items():
        assert torch.equal(value, weights(killed)[key]), key


def test_truncated_checkpoint_falls_back(tmp_path):
    train(make_cfg(tmp_path))
    newest = max(list_step_checkpoints(tmp_path))[1]
    data = newest.read_bytes()
    (tmp_path / LAST_NAME).unlink()
    newest.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=newest.name):
        load_checkpoint(newest)
    path, state = find_resume_checkpoint(tmp_path)
    assert path != newest and state["step"] == 6


def test_garbage_and_foreign_checkpoints(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="lacks"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "the file is empty"),
        (b"<html>502 Bad Gateway</html>", "not a PyTorch file"),
        ("half", "zip archive is cut short"),
        ("object", "Python objects other than tensors"),
    ],
)
def test_an_unloadable_checkpoint_says_why_in_one_line(tmp_path, content, reason):
    path = tmp_path / "ckpt.pth"
    if content == "half":
        torch.save({"w": torch.zeros(4096)}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content == "object":
        torch.save({"step": 1, "sampler": range(3)}, path)  # a pickle weights_only refuses
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=reason) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)


def test_evaluation_keeps_the_loaders_reason_for_files_and_sharded_folders(tmp_path):
    from vitssl.eval.model import eval_checkpoint_error

    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    sharded = tmp_path / "checkpoint_00000004.dcp"
    sharded.mkdir()
    for name in ("trainer.pt", ".metadata"):  # looks complete, holds junk
        (sharded / name).write_bytes(b"junk")
    for path, reason in ((empty, "the file is empty"), (sharded, "")):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert info.value.reason and reason in info.value.reason
        message = str(eval_checkpoint_error(info.value, path))
        assert f"({info.value.reason}); pass another checkpoint" in message and "resume=auto" not in message


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path):
    cfg = make_cfg(tmp_path, "objective.name=nan_after", "objective.nan_at_step=4")
    with pytest.raises(NonFiniteLossError, match="step 4"):
        train(cfg)
    assert load_checkpoint(tmp_path / LAST_NAME)["step"] == 2  # the good one from before the NaN
    last = (tmp_path / "train.log").read_text().splitlines()[-1]
    assert " ERROR " in last and "run ended with NonFiniteLossError: loss is nan (non-finite) at step 4" in last


def test_resume_none_refuses_to_overwrite(tmp_path):
    train(make_cfg(tmp_path, "train.stop_after_steps=2"))
    with pytest.raises(ConfigError, match="resume=auto"):
        train(make_cfg(tmp_path, "resume=none"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batchsize=8", "did you mean 'train.batch_size'"),
        ("optim.lr=fast", "optim.lr"),
        ("objective.num_clases=3", "did you mean 'objective.num_classes'"),
        ("objective.name=mocov4", "objective.name"),
        ("precision=fp8", "precision"),
        ("nonsense", "key=value"),
    ],
)
def test_config_errors_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        make_cfg(tmp_path, override)


def test_accumulation_matches_big_batch(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    # SGD: Adam's normalisation would amplify float rounding in near-zero gradients
    train(make_cfg(a, "train.epochs=1", "optim.name=sgd"))
    train(make_cfg(b, "train.epochs=1", "optim.name=sgd", "train.accum_steps=2"))
    for key, value in weights(a).items():
        if value.is_floating_point():
            torch.testing.assert_close(value, weights(b)[key], rtol=1e-4, atol=1e-5)


def _ddp_run(out: str) -> list[int]:
    """Two runs in one process group: no accumulation, and 2 micro-steps per optimizer step (DDP no_sync)."""
    steps = []
    for accum in (1, 2):
        cfg = make_cfg(Path(out) / f"accum{accum}", "train.epochs=1", "optim.name=sgd", f"train.accum_steps={accum}")
        steps.append(train(cfg).step)
    return steps


def test_ddp_two_processes_match_one_with_and_without_accumulation(tmp_path):
    """2 ranks = 1 rank, for accum_steps 1 and 2 (gradient accumulation × several processes)."""
    steps = run_distributed(_ddp_run, 2, str(tmp_path / "two"))
    assert steps == [[4, 4], [4, 4]]
    for accum in (1, 2):
        one = tmp_path / f"one{accum}"
        train(make_cfg(one, "train.epochs=1", "optim.name=sgd", f"train.accum_steps={accum}"))
        two = weights(tmp_path / "two" / f"accum{accum}")
        for key, value in weights(one).items():
            if value.is_floating_point():
                torch.testing.assert_close(value, two[key], rtol=1e-4, atol=1e-5)


def test_resume_auto_refuses_a_run_with_other_settings(tmp_path):
    """resume=auto never continues another configuration's weights; extending or placing a run is allowed."""
    train(make_cfg(tmp_path, "train.stop_after_steps=2"))
    with pytest.raises(ConfigError, match=r"other settings \(model.backbone: 'test_vit' -> 'test_pvt'\)"):
        train(make_cfg(tmp_path, "model.backbone=test_pvt"))
    with pytest.raises(ConfigError, match=r"seed: 0 -> 1.*another output_dir.*resume=none"):
        train(make_cfg(tmp_path, "seed=1"))
    result = train(make_cfg(tmp_path, "train.epochs=3", "train.stop_after_steps=5", "train.log_every_steps=2"))
    assert (result.status, result.step) == ("stopped", 5)  # more epochs, another stop: the same run continues


def test_explicit_checkpoint_of_another_model_fails_clearly(tmp_path):
    train(make_cfg(tmp_path / "a", "train.stop_after_steps=2"))
    with pytest.raises(CheckpointError, match="does not fit the configured model"):
        train(make_cfg(tmp_path / "b", "model.backbone=test_pvt", f"resume={tmp_path / 'a' / LAST_NAME}"))


def test_contrastive_objectives_refuse_accumulation(tmp_path):
    with pytest.raises(ConfigError, match=r"train.accum_steps=2: objective moco_v3 .* negatives"):
        train(load_config("pretrain/mocov3_demo", [f"output_dir={tmp_path}", "train.accum_steps=2"]))


def test_weight_decay_filter_switch(tmp_path):
    """weight_decay_filter=false decays every trainable parameter (the official MoCo v3 AdamW)."""
    from vitssl.engine.trainer import _Trainer

    filtered = _Trainer(make_cfg(tmp_path / "a"))
    assert [g["weight_decay"] for g in filtered.optimizer.param_groups] == [0.05, 0.0]
    every = _Trainer(make_cfg(tmp_path / "b", "optim.weight_decay_filter=false"))
    (group,) = every.optimizer.param_groups
    assert group["weight_decay"] == 0.05 and len(group["params"]) == len(
        [p for p in every.objective.parameters() if p.requires_grad]
    )


def test_list_backbone_options_reach_the_backbone_as_plain_lists() -> None:
    """``model.backbone_kwargs`` lists (PVT v2 embed_dims) are OmegaConf lists in the config; timm needs lists."""
    from vitssl.engine.trainer import build_objective

    cfg = load_config(
        "pretrain/test_tiny",
        ["model.backbone=test_pvt_v2", "model.backbone_kwargs={embed_dims: [8, 16, 24, 40]}"],
    )
    objective = build_objective(cfg)
    assert objective.backbone.num_features == 40


# --------------------------------------------------------------------------------- online k-NN monitor


def _class_tree(root: Path, classes: tuple[str, ...], per_class: int = 4) -> Path:
    from PIL import Image

    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (32, 32), (60 * c, 30 * i, 100)).save(root / name / f"{i}.png")
    return root


def _monitored_cfg(out: Path, train_root: Path, val_root: Path, *extra: str):
    return make_cfg(
        out,
        "data.train.name=imagefolder",
        f"data.train.root={train_root}",
        "~data.train.kwargs",
        "data.val.name=imagefolder",
        f"data.val.root={val_root}",
        "objective.num_classes=2",
        "train.batch_size=4",
        "train.epochs=1",
        "eval.knn_k=3",
        *extra,
    )


def test_knn_monitor_votes_when_val_shares_the_train_classes(tmp_path, caplog):
    from vitssl.cli.pretrain import PretrainJob, pretrain_job

    train_root = _class_tree(tmp_path / "train", ("cat", "dog"))
    val_root = _class_tree(tmp_path / "val", ("cat", "dog"), per_class=2)
    cfg = _monitored_cfg(tmp_path / "run", train_root, val_root, "eval.knn_every_epochs=1")
    with caplog.at_level("INFO", logger="vitssl"):
        pretrain_job(PretrainJob.from_config(cfg))
    knn = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "knn_top1" in r]
    assert len(knn) == 1 and 0.0 <= knn[0]["knn_top1"] <= 100.0
    assert any("online k-NN monitor every 1 epoch(s): 8 bank images" in r.getMessage() for r in caplog.records)


def test_knn_monitor_refuses_val_classes_that_differ(tmp_path):
    from vitssl.eval.monitor import KnnMonitor

    train_root = _class_tree(tmp_path / "train", ("cat", "dog"))
    for classes, why in ((("cat", "emu"), r"classes data\.train lacks \(emu\)"), (("cat",), "lacks some of them")):
        val_root = _class_tree(tmp_path / "val" / "-".join(classes), classes)
        cfg = _monitored_cfg(tmp_path / "run", train_root, val_root, "eval.knn_every_epochs=1")
        with pytest.raises(ConfigError, match=rf"^data\.val \(imagefolder, .*{why}.*eval\.knn_every_epochs=0$"):
            KnnMonitor(cfg)


def test_knn_monitor_off_says_so(tmp_path, caplog):
    from vitssl.cli.pretrain import PretrainJob, pretrain_job

    cfg = make_cfg(tmp_path, "train.epochs=1", "train.batch_size=32")  # eval.knn_every_epochs is 0
    with caplog.at_level("INFO", logger="vitssl"):
        pretrain_job(PretrainJob.from_config(cfg))
    assert "online k-NN monitor off: eval.knn_every_epochs=0" in caplog.text


# ---------------------------------------------------------------------------------------------- train.log


def test_train_log_holds_what_the_console_showed(tmp_path):
    """`vitssl train` in a subprocess (the real console): every line it logged is in train.log, in order."""
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "vitssl", "train", "pretrain/test_tiny", f"output_dir={run}", "train.epochs=1"],
        capture_output=True,
        text=True,
        check=True,
    )
    # console lines are "HH:MM:SS LEVEL name: message"; train.log adds the date in front
    console = [line.split(" ", 1)[1] for line in out.stderr.splitlines() if " vitssl." in line]
    logged = [line.split(" ", 2)[2] for line in (run / "train.log").read_text().splitlines()]
    assert any(line.startswith("INFO vitssl.engine.trainer: training on shapes") for line in console)
    assert sum(": step " in line for line in console) == 4  # no tty here: the steps are plain lines
    assert logged[: len(console)] == console
    assert logged[len(console) :] == [f"INFO vitssl.engine.logger: finished at step 4; run folder {run}"]
    assert out.stdout.strip() == f"finished at step 4; run folder {run}"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # the metrics stay in metrics.jsonl


def test_train_log_appends_on_resume_and_takes_bar_lines(tmp_path, monkeypatch, caplog):
    """A resumed run appends; with a progress bar (a terminal) the step lines the bar showed become lines."""
    from vitssl.engine import logger as logger_module

    train(make_cfg(tmp_path, "train.stop_after_steps=2"))
    monkeypatch.setattr(logger_module.sys.stderr, "isatty", lambda: True, raising=False)
    with caplog.at_level("INFO", logger="vitssl"):
        train(make_cfg(tmp_path))
    assert not [r for r in caplog.records if "step 3/8" in r.getMessage()]  # the bar showed them, not the log
    text = (tmp_path / "train.log").read_text()
    assert text.count("training on shapes") == 2 and "resumed from" in text
    assert [line.split("step ", 1)[1].split(" ")[0] for line in text.splitlines() if ": step " in line] == [
        "1/8", "2/8", *(f"{s}/8" for s in range(3, 9))
    ]  # fmt: skip
    assert "stopped at step 2" in text and text.rstrip().endswith(f"finished at step 8; run folder {tmp_path}")
