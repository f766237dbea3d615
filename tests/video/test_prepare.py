"""vitssl.video.prepare and ``vitssl video prepare``: re-encoded copies that read the same frames, upright."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests._videos import damaged_copy, decode_index, write_video
from vitssl.cli import main
from vitssl.video.io import CorruptVideoError, probe, read_frames
from vitssl.video.prepare import prepare_videos


def _spelled(path: str) -> list[int]:
    n = probe(path).num_frames
    return [decode_index(f) for f in read_frames(path, range(n), decoder="pyav").numpy()]


def _keyframes(path: str) -> int:
    import av

    with av.open(path) as container:
        return sum(p.is_keyframe for p in container.demux(video=0) if p.size)


def test_prepare_keeps_frames_layout_and_orientation(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    write_video(src / "a" / "long_gop.mkv", 40, 96, 64, gop=40)
    write_video(src / "phone.mp4", 12, 568, 320, rotation=-90)
    manifest = prepare_videos(src, tmp_path / "dst", short_side=64, gop=4)
    by_name = {Path(v["output"]).relative_to(tmp_path / "dst").as_posix(): v for v in manifest["videos"]}
    assert set(by_name) == {"a/long_gop.mp4", "phone.mp4"}
    assert json.loads((tmp_path / "dst" / "manifest.json").read_text()) == manifest
    out = by_name["a/long_gop.mp4"]["output"]
    assert (by_name["a/long_gop.mp4"]["width"], by_name["a/long_gop.mp4"]["height"]) == (96, 64)
    assert _spelled(out) == list(range(40)) and _keyframes(out) == 10  # a keyframe every 4 frames
    phone = probe(by_name["phone.mp4"]["output"])
    assert (phone.width, phone.height, phone.rotation) == (64, 114, 0)  # upright, no display matrix left
    assert _spelled(phone.path) == list(range(12))


def test_prepare_at_a_fixed_fps_and_all_intra(tmp_path: Path) -> None:
    write_video(tmp_path / "v.mp4", 30, 64, 48, fps=25)
    manifest = prepare_videos(tmp_path / "v.mp4", tmp_path / "dst", fps=12.5, gop=1)
    (entry,) = manifest["videos"]
    assert (entry["frames"], entry["fps"]) == (15, 12.5)
    assert _spelled(entry["output"]) == list(range(0, 30, 2))  # every other source frame
    assert _keyframes(entry["output"]) == 15


def test_prepare_refuses_or_skips_a_damaged_source(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_video(src / "good.mp4", 10, 64, 48)
    damaged_copy(write_video(tmp_path / "web.mp4", 40, 64, 48, faststart=True, texture=True), src / "bad.mp4")
    with pytest.raises(CorruptVideoError, match=r"damaged video .*bad\.mp4: decoding stops"):
        prepare_videos(src, tmp_path / "dst")
    assert not (tmp_path / "dst" / "manifest.json").exists()
    assert main(["video", "prepare", str(src), str(tmp_path / "dst"), "--skip-corrupt"]) == 0
    assert "1 videos (10 frames)" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "dst" / "manifest.json").read_text())
    assert [Path(s["source"]).name for s in manifest["skipped"]] == ["bad.mp4"]
    assert main(["video", "prepare", str(src), str(tmp_path / "dst2")]) == 2
    assert "bad.mp4" in capsys.readouterr().err
