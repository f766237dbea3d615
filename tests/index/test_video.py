"""Video index commands on tiny generated videos: every repeated query answered, damaged files reported or
refused, and a failed build leaving nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests._videos import truncated_copy, write_video
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
    assert _run("index", "query", index, "--video", a, "--video", b, "-k", "2", "--out", out, "--grid",
                tmp_path / "sheet.png") == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert f"{a}:" in printed and f"{b}:" in printed and printed.index(f"{a}:") < printed.index(f"{b}:")
    result = json.loads(out.read_text())
    assert [q["query"] for q in result["queries"]] == [str(a), str(b)]
    for q in result["queries"]:  # each query finds itself first, among k neighbours
        assert len(q["neighbours"]) == 2 and q["neighbours"][0]["sample"] == q["query"]
        assert [h["rank"] for h in q["neighbours"]] == [1, 2]
    assert (tmp_path / "sheet_1.png").is_file() and (tmp_path / "sheet_2.png").is_file()


def test_the_spec_names_the_video_embedder_and_refuses_another_sampling(corpus, index, capsys):
    spec = json.loads((index / "manifest.json").read_text())["spec"]
    assert spec["embedder"]["name"] == "thumbnails" and spec["embedder"]["model"] == "thumbnails:size=4"
    assert spec["corpus"]["kind"] == "videos" and spec["corpus"]["fps"] == 4.0
    capsys.readouterr()
    assert _run("index", "query", index, "--video", corpus / "v1.mp4", "--checkpoint", "thumbnails:size=8") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'thumbnails-4'" in err[0] and "'thumbnails-8'" in err[0] and "thumbnails:size=4" in err[0]


def _corpus_with(corpus: Path, folder: Path, extra: dict[str, bytes]) -> Path:
    """A copy of ``corpus`` plus extra files (name -> bytes)."""
    folder.mkdir()
    for p in sorted(corpus.glob("*.mp4")):
        (folder / p.name).write_bytes(p.read_bytes())
    for name, data in extra.items():
        (folder / name).write_bytes(data)
    return folder


def test_a_damaged_mp4_stops_the_build_in_one_line_or_is_skipped_by_name(corpus, tmp_path, capsys):
    # a download cut in the middle: its frame table (written last) is gone, the reader raises CorruptVideoError
    damaged = truncated_copy(corpus / "v3.mp4", tmp_path / "cut.mp4", 0.5)
    root = _corpus_with(corpus, tmp_path / "c", {"v9_cut.mp4": damaged.read_bytes()})
    bad = root / "v9_cut.mp4"
    spec = f"videos:root={root},fps=4"
    capsys.readouterr()
    assert _run("index", "build", "thumbnails:size=4", "--data", spec, "--out", tmp_path / "i1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "--skip-corrupt" in err[0]
    assert not (tmp_path / "i1").exists() and not (tmp_path / "i1.build").exists()

    summary = tmp_path / "build.json"
    argv = ["index", "build", "thumbnails:size=4", "--data", spec, "--skip-corrupt", "--summary", summary]
    assert _run(*argv, "--out", tmp_path / "i2") == 0
    printed = capsys.readouterr().out
    assert "skipped 1 damaged or unreadable videos" in printed and str(bad) in printed
    result = json.loads(summary.read_text())
    assert result["count"] == 4 and result["num_skipped"] == 1 and result["skipped"] == [str(bad)]
    manifest = json.loads((tmp_path / "i2" / "manifest.json").read_text())
    assert manifest["count"] == 4 and manifest["video"]["skipped"] == [str(bad)]

    # sharded: each shard skips its own, the merge's summary names them all
    assert _run(*argv, "--out", tmp_path / "i3", "--shards", 2) == 0
    assert json.loads(summary.read_text())["skipped"] == [str(bad)]
    assert not (tmp_path / "i3.build").exists()


def test_a_decoder_failing_midway_is_skipped_too(corpus, tmp_path, monkeypatch, capsys):
    """A file that opens and probes but whose decoder fails at a later frame: the readers raise
    CorruptVideoError there (they never pad), and the build treats it as any damaged file."""
    from vitssl.video import io as vio

    root = _corpus_with(corpus, tmp_path / "c", {})
    broken = root / "v1.mp4"
    read = vio.read_frames

    def failing(path, indices, decoder="auto"):
        if Path(path) == broken and max(indices) > 5:
            raise vio.CorruptVideoError(f"cannot read video {path}: decoding stopped at frame 6 of 30")
        return read(path, indices, decoder)

    monkeypatch.setattr(vio, "read_frames", failing)
    spec = f"videos:root={root},fps=4"
    capsys.readouterr()
    assert _run("index", "build", "thumbnails:size=4", "--data", spec, "--out", tmp_path / "i1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(broken) in err[0] and "frame 6" in err[0]
    assert not (tmp_path / "i1").exists() and not (tmp_path / "i1.build").exists()
    assert _run("index", "build", "thumbnails:size=4", "--data", spec, "--out", tmp_path / "i2", "--skip-corrupt") == 0
    assert json.loads((tmp_path / "i2" / "manifest.json").read_text())["video"]["skipped"] == [str(broken)]


def _fingerprint(index: Path) -> dict[str, bytes]:
    return {p.relative_to(index).as_posix(): p.read_bytes() for p in sorted(index.rglob("*")) if p.is_file()}


def test_a_failed_sharded_build_leaves_nothing_and_keeps_the_finished_index(corpus, tmp_path, monkeypatch, capsys):
    root = _corpus_with(corpus, tmp_path / "c", {})
    out = tmp_path / "idx"
    base = ["index", "build", "thumbnails:size=4", "--data", f"videos:root={root},fps=4", "--out", out, "--shards", 2]
    assert _run(*base, "--factory", "IVF1,Flat") == 0
    # success keeps only what was asked for: no shards, no trained quantizer, no empty work folder
    assert not Path(f"{out}.build").exists()
    finished = _fingerprint(out)

    # the second shard meets a damaged file: nothing is left and the finished index is untouched
    (root / "v9_bad.mp4").write_bytes(b"\x00" * 300)
    assert _run(*base, "--overwrite") == 2
    assert not Path(f"{out}.build").exists() and _fingerprint(out) == finished

    # Ctrl-C during the merge; a work folder that was there before keeps what it held
    (root / "v9_bad.mp4").unlink()
    work = Path(f"{out}.build")
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    from vitssl.index import build

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "merge_shards", interrupted)  # the merge step index_merge runs
    assert _run(*base, "--overwrite", "--factory", "IVF1,Flat") == 130
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"] and _fingerprint(out) == finished


def test_a_video_query_returns_each_neighbours_file_size(corpus, index, tmp_path, capsys):
    out = tmp_path / "hits.json"
    capsys.readouterr()
    assert _run("index", "query", index, "--video", corpus / "v1.mp4", "-k", "3", "--out", out) == 0
    printed = capsys.readouterr().out.splitlines()
    hits = json.loads(out.read_text())["queries"][0]["neighbours"]
    assert len(hits) == 3 and hits[0]["sample"] == str(corpus / "v1.mp4")
    for h, line in zip(hits, printed[1:]):
        size = Path(h["sample"]).stat().st_size
        assert h["meta"] == {"bytes": size} and line.endswith(f"{h['sample']}  bytes={size}")
