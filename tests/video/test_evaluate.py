"""``vitssl video eval``: a video_action checkpoint scored on a videofolder, multi-view, and its one-line errors."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

import vitssl.ssl
import vitssl.video.registered  # noqa: F401  (registers video_action, blob_position, motion, motion_frames)
from tests._videos import write_video
from vitssl.cli import main
from vitssl.config import load_config

T, S, K = 4, 16, 5  # frames, side, classes of the checkpoint (5: top-5 is reported)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


TINY = ["model.backbone=test_vit", "~model.backbone_kwargs", f"data.img_size={S}", "train.epochs=1",
        "train.batch_size=4"]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from vitssl.engine import train

    root = tmp_path_factory.mktemp("runs")
    action = [
        f"output_dir={root / 'action'}",
        *TINY,
        "objective.num_heads=2",
        f"objective.num_classes={K}",
        f"objective.num_frames={T}",
        f"data.train.kwargs={{num_samples: 8, img_size: {S}, num_frames: {T}}}",
        "data.val=null",
    ]
    train(load_config("video/action_demo", action))
    position = [f"output_dir={root / 'position'}", *TINY, f"data.train.kwargs={{num_samples: 8, img_size: {S}}}"]
    train(load_config("video/action_demo_pretrain", position))
    return {"action": root / "action" / "checkpoint_last.pth", "position": root / "position" / "checkpoint_last.pth"}


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/val/<class>/<video>.mp4: 3 classes, 2 videos each (the 3 of the checkpoint's 5 classes)."""
    root = tmp_path_factory.mktemp("videos")
    for c in ("a", "b", "c"):
        for i in range(2):
            (root / "val" / c).mkdir(parents=True, exist_ok=True)
            write_video(root / "val" / c / f"{i}.mp4", num_frames=10 + 3 * i, width=32, height=24)
    return root


def test_eval_prints_scores_writes_json_and_a_confusion_png(checkpoints, videos, tmp_path, capsys) -> None:
    out = tmp_path / "scores.json"
    spec = f"videofolder:root={videos}"
    assert main(["video", "eval", str(checkpoints["action"]), "--data", spec, "--views", "2x2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    scores = json.loads(out.read_text())
    assert scores["views"] == [2, 2] and scores["num_videos"] == 6 and scores["split"] == "val"
    assert scores["classes"] == ["a", "b", "c"] and len(scores["per_class"]) == K
    assert scores["per_class"][3] is None and sum(map(sum, scores["confusion"])) == 6
    assert 0 <= scores["top1"] <= scores["top5"] <= 100
    assert f"top-1 {scores['top1']:.2f} %" in text and f"top-5 {scores['top5']:.2f} %" in text
    assert "2x2 views" in text and all(f"  {c} " in text for c in ("a", "b", "c"))
    png = Path(scores["confusion_png"])
    assert png == out.with_suffix(".png") and png.read_bytes()[:8] == PNG_MAGIC and str(png) in text


def test_eval_default_png_lies_by_the_checkpoint(checkpoints, videos, capsys) -> None:
    assert main(["video", "eval", str(checkpoints["action"]), "--data", f"videofolder:root={videos}"]) == 0
    png = checkpoints["action"].parent / "confusion_val.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and "1x1 views" in capsys.readouterr().out


def test_eval_old_json_spelling_still_writes_the_scores_with_a_future_warning(checkpoints, videos, tmp_path, capsys):
    out = tmp_path / "old.json"
    with pytest.warns(FutureWarning, match=r"--json is deprecated.*use --out"):
        assert main(["video", "eval", str(checkpoints["action"]), "--data", f"videofolder:root={videos}",
                     "--json", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["num_videos"] == 6
    capsys.readouterr()
    with contextlib.suppress(SystemExit):
        main(["video", "eval", "--help"])
    shown = capsys.readouterr().out
    assert "--out OUT.json" in shown and "--json" not in shown  # the old spelling is hidden


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing", "nope.pth"),
        ("not_video", "blob_position"),
        ("views", "--views '3by2'"),
        ("views0", "--views '0x3'"),
        ("data", "no_such_dataset"),
    ],
)
def test_eval_bad_input_is_one_line_and_exit_2(checkpoints, videos, tmp_path, capsys, case, needle) -> None:
    ckpt = {"missing": tmp_path / "nope.pth", "not_video": checkpoints["position"]}.get(case, checkpoints["action"])
    views = {"views": "3by2", "views0": "0x3"}.get(case, "1x1")
    spec = "no_such_dataset:root=x" if case == "data" else f"videofolder:root={videos}"
    assert main(["video", "eval", str(ckpt), "--data", spec, "--views", views]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("vitssl video: error: ") and needle in line
