"""Video index commands on tiny generated videos: every repeated query answered, damaged files reported or
refused, and a failed build leaving nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _videos import write_video
from vitssl.cli import main


def _run(*argv: object) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Four short videos of different lengths (so their thumbnails differ)."""
    root = tmp_path_factory.mktemp("videos")
    for i, n in enumerate((20, 30, 40, 50)):
        write_video(root / f"v{i}.mp4", num_frames=n, width=32, height=24, gop=6)
    return root


@pytest.fixture(scope="module")
def index(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("idx") / "vidx"
    assert _run("index", "build", "thumbnails:size=4", "--data", f"videos:root={corpus},fps=4", "--out", out) == 0
    return out


def test_every_repeated_video_query_is_answered_in_order(corpus, index, tmp_path, capsys):
    a, b = corpus / "v2.mp4", corpus / "v0.mp4"
    capsys.readouterr()
    out = tmp_path / "hits.json"
    assert _run("index", "query", index, "--video", a, "--video", b, "-k", "2", "--json", out, "--grid",
                tmp_path / "sheet.png") == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert f"{a}:" in printed and f"{b}:" in printed and printed.index(f"{a}:") < printed.index(f"{b}:")
    result = json.loads(out.read_text())
    assert [q["query"] for q in result["queries"]] == [str(a), str(b)]
    for q in result["queries"]:  # each query finds itself first, among k neighbours
        assert len(q["neighbours"]) == 2 and q["neighbours"][0]["sample"] == q["query"]
        assert [h["rank"] for h in q["neighbours"]] == [1, 2]
    assert (tmp_path / "sheet_1.png").is_file() and (tmp_path / "sheet_2.png").is_file()
