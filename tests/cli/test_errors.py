"""Ordinary mistakes give one line on stderr and exit status 2, never a traceback, through the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitssl.cli import main

TINY = "pretrain/test_tiny"


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line or "Traceback" in line]
    return code, "\n".join(lines)


def assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


def image_tree(root: Path, corrupt: bool) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    if corrupt:
        (root / "a" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def imagefolder_overrides(tmp_path: Path, root: Path | str, *extra: str) -> list[str]:
    return [
        f"output_dir={tmp_path / 'run'}",
        "data.train.name=imagefolder",
        f"data.train.root={root}",
        "~data.train.kwargs",  # the recipe sets num_samples for its generated set
        "objective.num_classes=2",
        "train.batch_size=4",
        "train.epochs=1",
        *extra,
    ]


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_in_pretraining(tmp_path, capsys, workers):
    root = image_tree(tmp_path / "images", corrupt=True)
    args = imagefolder_overrides(tmp_path, root, f"data.num_workers={workers}")
    code, err = run_cli(capsys, "pretrain", TINY, *args)
    assert_one_line(code, err, "0.png", "data.skip_corrupt=true")
    assert "DataLoader worker" not in err and "Original Traceback" not in err


def test_skipping_corrupt_images_does_not_repeat_the_hint(tmp_path, capsys, caplog):
    root = image_tree(tmp_path / "images", corrupt=True)
    args = imagefolder_overrides(tmp_path, root, "data.skip_corrupt=true", "train.stop_after_steps=2")
    assert main(["pretrain", TINY, *args]) == 0
    skipped = [r.getMessage() for r in caplog.records if "skipping corrupt sample" in r.getMessage()]
    assert skipped and all("skip_corrupt" not in m for m in skipped)


def test_imagefolder_root_missing_or_a_file(tmp_path, capsys):
    code, err = run_cli(capsys, "pretrain", TINY, *imagefolder_overrides(tmp_path, tmp_path / "nope"))
    assert_one_line(code, err, "does not exist")
    (tmp_path / "file.txt").write_text("x")
    code, err = run_cli(capsys, "pretrain", TINY, *imagefolder_overrides(tmp_path, tmp_path / "file.txt"))
    assert_one_line(code, err, "is a file")


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["optim.lr=fast"], ["optim.lr", "float"]),
        (["optim.lrr=1"], ["optim.lrr", "optim.lr"]),
        (["model.backbone_kwargs=null"], ["~model.backbone_kwargs"]),
        (["~model.nothing"], ["model.nothing"]),
        (["model.backbone=nope_vit"], ["nope_vit"]),
    ],
)
def test_config_mistakes(tmp_path, capsys, overrides, needles):
    code, err = run_cli(capsys, "pretrain", TINY, f"output_dir={tmp_path}", *overrides)
    assert_one_line(code, err, *needles)


def test_unknown_backbone_hides_test_variants(tmp_path, capsys):
    code, err = run_cli(capsys, "pretrain", TINY, f"output_dir={tmp_path}", "model.backbone=vit_smal")
    assert_one_line(code, err, "vit_small")
    assert "test_vit" not in err


def test_backbone_options_that_do_not_fit(tmp_path, capsys):
    args = [f"output_dir={tmp_path}", "model.backbone=pvt_tiny", "model.backbone_kwargs={pos_embed: sincos}"]
    code, err = run_cli(capsys, "pretrain", TINY, *args)
    assert_one_line(code, err, "pvt_tiny", "pos_embed", "~model.backbone_kwargs")
    code, err = run_cli(
        capsys, "pretrain", TINY, f"output_dir={tmp_path}", "model.backbone=pvt_tiny", "data.img_size=40"
    )
    assert_one_line(code, err, "pvt_tiny", "data.img_size")


def test_options_and_overrides_in_any_order(tmp_path, capsys):
    for argv in (["--dry-run", "launch=slurm"], ["launch=slurm", "--dry-run"]):
        assert main(["pretrain", TINY, f"output_dir={tmp_path}", *argv]) == 0
        assert "#SBATCH" in capsys.readouterr().out


def test_demo_reports_bad_settings_in_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "vitssl.demo", "optim.lr=fast", f"output_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # recipes ship inside the package: found from any folder
    )
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "optim.lr" in out.stderr, out.stderr


def test_knn_monitor_refuses_a_val_set_of_another_dataset(tmp_path, capsys):
    """The demo recipe's digits val set with photo folders as data.train: refused before anything is written."""
    root = image_tree(tmp_path / "images", corrupt=False)
    args = [f"output_dir={tmp_path / 'run'}", "data.train.name=imagefolder", f"data.train.root={root}"]
    code, err = run_cli(capsys, "pretrain", "pretrain/mocov3_demo", *args)
    assert_one_line(code, err, "data.val is 'digits' but data.train is 'imagefolder'", "eval.knn_every_epochs=0")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("data.train.root=/data/photos", ["data.train.root='/data/photos'", "data.train.kwargs.num_samples"]),
        ("data.train.kwargs.num_sample=8", ["data.train.kwargs.num_sample", "'num_samples'", "data.train.split"]),
        ("data.val={name: digits, root: /data/x}", ["data.val.root='/data/x'", "'digits'", "data.val.kwargs.seed"]),
    ],
)
def test_dataset_keys_the_dataset_does_not_take(tmp_path, capsys, override, needles):
    extra = ["eval.knn_every_epochs=1"] if override.startswith("data.val") else []
    code, err = run_cli(capsys, "pretrain", TINY, f"output_dir={tmp_path / 'run'}", override, *extra)
    assert_one_line(code, err, *needles)


def test_a_run_folder_is_accepted_where_a_checkpoint_is_expected(tmp_path, capsys):
    from vitssl.engine import load_objective

    run = tmp_path / "run"
    assert main(["pretrain", TINY, f"output_dir={run}", "train.epochs=1", "train.batch_size=32"]) == 0
    _, cfg, state = load_objective(run)
    assert state["step"] == 2 and cfg.output_dir == str(run)
    out = tmp_path / "knn.json"
    spec = [
        "--train",
        "shapes:num_samples=16",
        "--val",
        "shapes:split=val,num_samples=8",
        "--out",
        str(out),
        "--k",
        "3",
    ]
    assert main(["eval", "knn", str(run), *spec]) == 0
    assert "checkpoint_last.pth" in out.read_text()
    code, err = run_cli(capsys, "eval", "knn", str(tmp_path / "nope"), *spec)
    assert_one_line(code, err, "does not exist: give a checkpoint file or the run folder that holds it")
    (tmp_path / "empty").mkdir()
    code, err = run_cli(capsys, "export", "open_clip", str(tmp_path / "empty"), "--out", str(tmp_path / "x"))
    assert_one_line(
        code,
        err,
        "run folder",
        "holds no checkpoint (checkpoint_last.pth, checkpoint_<step>.pth or checkpoint_<step>.dcp)",
    )
