"""Reading video frames (vitssl.video.io) and ``vitssl video probe``: exact frames, fallbacks, broken files.

The videos are tiny (64x48, 40 frames, a keyframe every 12) and spell their frame index in their pixels
(tests/_videos.py), so every read is checked frame by frame.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._videos import damaged_copy, decode_index, truncated_copy, write_video
from vitssl.cli import main
from vitssl.data.common import CorruptImageError
from vitssl.errors import MissingFileError
from vitssl.video import io as video_io
from vitssl.video.io import CorruptVideoError, ReaderUnavailableError, VideoInfo, probe, read_frames

# every reader that loads here (torchcodec needs FFmpeg's libraries: .ci/run installs them)
READERS = [r for r in ("torchcodec", "pyav", "decord") if video_io.reader_problem(r) is None]

FRAMES = 40
KINDS = {"h264.mp4": ("h264", ".mp4"), "mpeg4.mp4": ("mpeg4", ".mp4"), "h264.mkv": ("h264", ".mkv")}


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    out = {
        name: write_video(root / f"v_{codec}{suffix}", FRAMES, 64, 48, codec=codec)
        for name, (codec, suffix) in KINDS.items()
    }
    out["w48"] = write_video(root / "w48.mp4", FRAMES, 48, 48)  # a width decord decodes to 4-"channel" frames
    out["cut.mp4"] = truncated_copy(out["h264.mp4"], root / "cut.mp4")
    out["cut.mkv"] = truncated_copy(out["h264.mkv"], root / "cut.mkv")
    return out


@pytest.fixture(scope="module")
def auto() -> str:
    """What decoder="auto" reads with: measured once a test session (in conftest's cache folder)."""
    return video_io.resolve_decoder("auto")


def indices_of(frames: torch.Tensor) -> list[int]:
    assert frames.dtype == torch.uint8 and frames.ndim == 4 and frames.shape[-1] == 3
    return [decode_index(f) for f in frames.numpy()]


@pytest.mark.parametrize("kind", list(KINDS))
def test_probe_reports_the_stream(videos, kind, auto):
    info = probe(videos[kind])
    codec = KINDS[kind][0]
    # auto: the reader this machine's measurement chose (probe reports it, never measures); decord reads these too
    # the fields older code knows come first, in their order: positional construction still works
    assert info == VideoInfo(str(videos[kind]), FRAMES, 25.0, 64, 48, FRAMES / 25.0, codec, auto, header_frames=FRAMES)
    assert (info.damaged, info.decoded_frames, info.error, info.rotation) == (False, FRAMES, None, 0)
    assert probe(videos[kind], decoder="decord").decoder == "decord"
    assert probe(videos[kind], full=True).damaged is False


@pytest.mark.parametrize("decoder", ["auto", *READERS])
@pytest.mark.parametrize("kind", list(KINDS))
def test_read_frames_returns_exactly_the_asked_frames(videos, kind, decoder):
    rng = np.random.default_rng(0)
    # random order across GOPs, a duplicate, the first and last frames
    wanted = [*rng.permutation(FRAMES)[:10].tolist(), 13, 13, 0, FRAMES - 1, 25]
    frames = read_frames(videos[kind], wanted, decoder=decoder)
    assert frames.shape == (len(wanted), 48, 64, 3)
    assert indices_of(frames) == wanted


def test_indices_past_the_end_and_negative_ones_are_rejected(videos):
    # no padding: a frame the video does not have is an error, never a copy of the last one
    with pytest.raises(ValueError, match=r"frame index 40 is past the end of .*\(40 frames\)"):
        read_frames(videos["h264.mp4"], [39, 40, 2])
    with pytest.raises(ValueError, match=">= 0"):
        read_frames(videos["h264.mp4"], [3, -1])
    assert read_frames(videos["h264.mp4"], []).shape == (0, 48, 64, 3)


def test_a_width_decord_misdecodes_is_read_by_the_others(videos, auto):
    info = probe(videos["w48"])
    assert (info.decoder, info.width, info.num_frames) == (auto, 48, FRAMES)
    wanted = [30, 3, 17, 3, 39, 0, 12, 11]
    assert indices_of(read_frames(videos["w48"], wanted)) == wanted
    with pytest.raises(CorruptVideoError, match="3-channel"):
        read_frames(videos["w48"], [0], decoder="decord")


def test_a_truncated_mp4_is_corrupt(videos):
    # PyAV writes the mp4 index (moov) at the end: cut in the middle, nothing of the file can be read
    path = videos["cut.mp4"]
    for call in (lambda: probe(path), lambda: read_frames(path, [0])):
        with pytest.raises(CorruptVideoError, match=re.escape(str(path))) as err:
            call()
        assert isinstance(err.value, CorruptImageError)  # what TransformedDataset(skip_corrupt=True) skips
        assert "\n" not in str(err.value)


def test_a_truncated_mkv_is_damaged_and_never_padded(videos):
    # matroska is streamable: the frames before the cut decode, but its header's duration still says 40 frames
    info = probe(videos["cut.mkv"])
    assert info.damaged and info.header_frames == FRAMES and 0 < info.num_frames < FRAMES
    assert info.error.startswith(f"decoding stops at frame {info.num_frames} of {FRAMES}")
    last = info.num_frames - 1
    for decoder in ("auto", *READERS):
        assert indices_of(read_frames(videos["cut.mkv"], [last, 0], decoder=decoder)) == [last, 0]
        with pytest.raises(CorruptVideoError, match=rf"cut\.mkv: frame {FRAMES - 1} does not decode: decoding stops"):
            read_frames(videos["cut.mkv"], [0, FRAMES - 1], decoder=decoder)


def test_a_missing_file_is_a_missing_file_error(tmp_path):
    with pytest.raises(MissingFileError, match=r"nope\.mp4"):
        read_frames(tmp_path / "nope.mp4", [0])
    with pytest.raises(MissingFileError):
        probe(tmp_path / "nope.mp4")


def test_a_file_that_is_no_video_is_corrupt(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("not a video")
    with pytest.raises(CorruptVideoError, match=r"notes\.mp4"):
        probe(path)


class _Clips(torch.utils.data.Dataset):
    """Item i: frames ``(i, i + 7, i + 3)`` of a video; the reader is opened inside each call."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        return read_frames(self.paths[i % len(self.paths)], [i, i + 7, i + 3])


def test_reads_inside_dataloader_workers(videos):
    paths = [videos["h264.mp4"], videos["w48"]]
    probe(paths[0])  # the parent has used decord (and cached an index) before the workers fork
    loader = torch.utils.data.DataLoader(_Clips(paths), batch_size=None, num_workers=2)
    for i, frames in enumerate(loader):
        assert indices_of(frames) == [i, i + 7, i + 3]


def test_cli_probe_prints_a_line_per_file(videos, capsys, auto):
    assert main(["video", "probe", str(videos["h264.mp4"]), str(videos["w48"])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        f"{videos['h264.mp4']}: 40 frames, 25.00 fps, 64x48, 1.60 s, h264, {auto}",
        f"{videos['w48']}: 40 frames, 25.00 fps, 48x48, 1.60 s, h264, {auto}",
    ]


def test_cli_probe_with_decord_names_a_file_it_misdecodes(videos, capsys):
    assert main(["video", "probe", "--decoder", "decord", str(videos["h264.mp4"])]) == 0
    assert capsys.readouterr().out.strip().endswith("h264, decord")
    assert main(["video", "probe", "--decoder", "decord", str(videos["w48"])]) == 2
    assert "decoder='pyav'" in capsys.readouterr().err


def test_cli_probe_json(videos, capsys, auto):
    assert main(["video", "probe", "--json", str(videos["mpeg4.mp4"])]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry == {
        "path": str(videos["mpeg4.mp4"]),
        "num_frames": 40,
        "fps": 25.0,
        "width": 64,
        "height": 48,
        "duration": 1.6,
        "codec": "mpeg4",
        "decoder": auto,
        "damaged": False,
        "decoded_frames": 40,
        "header_frames": 40,
        "error": None,
        "rotation": 0,
    }


def test_cli_probe_reports_damaged_files_and_fails_when_all_are(videos, capsys):
    healthy, unreadable, cut = str(videos["h264.mp4"]), str(videos["cut.mp4"]), str(videos["cut.mkv"])
    assert main(["video", "probe", healthy, unreadable, cut]) == 0  # one file is healthy
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0].startswith(f"{healthy}: 40 frames")
    assert lines[1].startswith(f"{unreadable}: DAMAGED: cannot read video {unreadable}")
    assert lines[2].startswith(f"{cut}: ") and ", DAMAGED: decoding stops at frame" in lines[2]
    assert "skip_corrupt" not in captured.out  # not an option of probe
    assert "2 of 3 files are damaged" in captured.err
    assert main(["video", "probe", "--json", unreadable, cut]) == 1  # every file damaged
    entries = json.loads(capsys.readouterr().out)
    assert [e["damaged"] for e in entries] == [True, True]
    assert entries[0]["decoded_frames"] == 0 and entries[1]["header_frames"] == FRAMES
    assert entries[1]["error"].startswith(f"decoding stops at frame {entries[1]['decoded_frames']} of {FRAMES}")


def test_cli_probe_of_a_missing_file_is_a_one_line_error(videos, tmp_path, capsys):
    assert main(["video", "probe", str(videos["h264.mp4"]), str(tmp_path / "gone.mp4")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()[-1:]
    assert line.startswith("vitssl video: error: video file not found") and "gone.mp4" in line


def _decodable_indices(path: Path) -> list[int]:
    """The frame indices PyAV decodes from the start, in order, up to the first undecodable packet."""
    import av

    spelled: list[int] = []
    with av.open(str(path)) as container:
        try:
            for frame in container.decode(container.streams.video[0]):
                spelled.append(decode_index(frame.to_ndarray(format="rgb24")))
        except av.FFmpegError:
            pass  # the cut: nothing past it decodes
    return spelled


def test_a_damaged_mp4_is_reported_where_decoding_stops(tmp_path):
    # An mp4 with its frame table first (faststart, as served on the web), cut short: it still opens, and its
    # header (the table decord's len() also reads) still lists all 50 frames, but decoding fails part-way. probe
    # must say so and where; every reader returns the frames before that point and raises for the others.
    import av

    whole = write_video(tmp_path / "fast.mp4", 50, 64, 48, faststart=True, texture=True)
    cut = damaged_copy(whole, tmp_path / "fast_cut.mp4", fraction=0.6)
    with av.open(str(cut)) as container:
        claimed = container.streams.video[0].frames
    real = _decodable_indices(cut)
    assert claimed == 50 and 0 < len(real) < 50
    assert real == list(range(len(real)))  # frame-exact up to the cut

    info = probe(cut)
    assert (info.damaged, info.num_frames, info.decoded_frames, info.header_frames) == (True, len(real), len(real), 50)
    assert info.error.startswith(f"decoding stops at frame {len(real)} of 50 (InvalidDataError")
    assert info.duration == pytest.approx(len(real) / info.fps)
    last = len(real) - 1
    for decoder in ("auto", "pyav", "torchcodec"):
        if decoder != "auto" and decoder not in READERS:
            continue
        assert indices_of(read_frames(cut, [last, 0, last // 2], decoder=decoder)) == [last, 0, last // 2]
        for wanted in ([0, len(real)], [claimed - 1]):
            with pytest.raises(CorruptVideoError) as err:
                read_frames(cut, wanted, decoder=decoder)
            assert f"fast_cut.mp4: frame {max(wanted)} does not decode: decoding stops at frame {len(real)}" in str(
                err.value
            )
    with pytest.raises(CorruptVideoError, match=r"fast_cut\.mp4"):  # decord 0.6 cannot open it: said so, by name
        read_frames(cut, [0], decoder="decord")


# ---------------------------------------------------------------------------------------------------------
# rotation, reader agreement, readers unavailable, import cost
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The agreement set: two codecs in two containers, a -90-rotated phone video (568x320 stored, 320x568
    shown), a variable frame rate one, and a damaged web mp4 (its header lists 50 frames, about 30 decode)."""
    root = tmp_path_factory.mktemp("assets")
    return {
        "h264.mp4": write_video(root / "h264.mp4", 30, 64, 48),
        "mpeg4.mkv": write_video(root / "mpeg4.mkv", 30, 64, 48, codec="mpeg4"),
        "phone.mp4": write_video(root / "phone.mp4", 16, 568, 320, rotation=-90),
        "vfr.mp4": write_video(root / "vfr.mp4", 30, 64, 48, vfr=True),
        "damaged.mp4": damaged_copy(
            write_video(root / "web.mp4", 50, 64, 48, faststart=True, texture=True), root / "damaged.mp4"
        ),
    }


def test_a_rotated_phone_video_probes_and_reads_upright(assets):
    info = probe(assets["phone.mp4"])
    assert (info.width, info.height, info.rotation, info.damaged) == (320, 568, 270, False)  # -90 = 270 ccw
    wanted = [9, 0, 15, 4]
    for decoder in READERS:
        frames = read_frames(assets["phone.mp4"], wanted, decoder=decoder)
        assert frames.shape == (4, 568, 320, 3), decoder  # (T, H, W, 3) upright: tall
        assert indices_of(frames) == wanted, decoder  # the index spells right only when the frame is upright
    assert read_frames(assets["phone.mp4"], []).shape == (0, 568, 320, 3)


def test_a_variable_frame_rate_video_reads_by_presentation_order(assets):
    info = probe(assets["vfr.mp4"])
    assert info.num_frames == 30 and not info.damaged
    assert info.duration == pytest.approx(30 / info.fps)


@pytest.mark.parametrize("asset", ["h264.mp4", "mpeg4.mkv", "phone.mp4", "vfr.mp4", "damaged.mp4"])
def test_every_reader_returns_the_same_frames(assets, asset):
    # frame-exact agreement: the same indices spell the same frames, pixels within 2 levels of PyAV's
    path = assets[asset]
    n = probe(path).num_frames
    wanted = [*sorted({0, n - 1, n // 2, 3, n // 3 + 1}), 5, 0]
    reference = read_frames(path, wanted, decoder="pyav")
    assert indices_of(reference) == wanted
    for decoder in READERS:
        if decoder == "decord" and asset == "damaged.mp4":
            continue  # decord 0.6 cannot open a cut faststart mp4 at all (test above): it raises, never pads
        frames = read_frames(path, wanted, decoder=decoder)
        assert indices_of(frames) == wanted, decoder
        diff = (frames.int() - reference.int()).abs().max().item()
        assert diff <= 2, f"{decoder} differs from pyav by {diff} levels on {asset}"


def test_a_damaged_file_fails_the_same_way_in_every_reader(assets):
    path = assets["damaged.mp4"]
    info = probe(path)
    assert info.damaged and info.header_frames == 50
    messages = set()
    for decoder in ("auto", *READERS):
        with pytest.raises(CorruptVideoError) as err:
            read_frames(path, [0, info.num_frames + 2], decoder=decoder)
        messages.add(str(err.value))
    (message,) = messages  # one message, from the index, whatever the reader
    assert f"frame {info.num_frames + 2} does not decode: decoding stops at frame {info.num_frames} of 50" in message


def test_a_reader_that_does_not_load_is_reported_not_a_crash(monkeypatch, videos):
    monkeypatch.setitem(video_io._AVAILABLE, "torchcodec", "torchcodec does not load: no FFmpeg (apt-get ...)")
    assert video_io.resolve_decoder("auto") == "pyav"
    assert probe(videos["h264.mp4"]).decoder == "pyav"
    with pytest.raises(ReaderUnavailableError, match=r"torchcodec does not load.*decoder=pyav"):
        read_frames(videos["h264.mp4"], [0], decoder="torchcodec")
    with pytest.raises(ValueError, match="decodes on the CPU only"):
        read_frames(videos["h264.mp4"], [0], decoder="pyav", device="cuda")


def test_vitssl_works_without_ffmpeg_libraries(videos):
    # torchcodec failing to import (no FFmpeg shared libraries) leaves every other reader working
    code = (
        "import sys; sys.modules['torchcodec'] = None\n"  # any import of it now raises ImportError
        "from vitssl.video.io import read_frames, resolve_decoder, reader_problem\n"
        f"print(resolve_decoder('auto'), read_frames({str(videos['h264.mp4'])!r}, [3]).shape[0])\n"
        "print(reader_problem('torchcodec'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    first, second = out.strip().splitlines()
    assert first == "pyav 1" and second.startswith("torchcodec does not load")


def test_cli_readers_lists_and_measures(videos, capsys, auto):
    assert main(["video", "readers"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("torchcodec") and f"decoder=auto reads with {auto}" in out
    assert main(["video", "readers", "--json", "--seconds", "0.2", str(videos["h264.mp4"])]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {row["name"]: row for row in report["readers"]}
    assert set(rows) == {"torchcodec", "pyav", "decord"} and report["auto"] == auto
    for name in READERS:
        assert rows[name]["sequential_fps"] > 0 and rows[name]["random_fps"] > 0


# ---------------------------------------------------------------------------------------------------------
# decoder="auto": chosen by a measurement cached per machine (the figures are injected: no timing in a test)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def measured(tmp_path, monkeypatch):
    """Both auto readers load, an empty cache folder, nothing memoised; ``measured(figures)`` sets what the
    measurement returns and gives the list of its calls."""
    from vitssl.video import reader_choice

    monkeypatch.setitem(video_io._AVAILABLE, "torchcodec", None)
    monkeypatch.setitem(video_io._AVAILABLE, "pyav", None)
    monkeypatch.setenv("VITSSL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(reader_choice, "_MEMO", {})
    calls: list[list[str]] = []

    def set_figures(figures: dict[str, float] | None) -> list[list[str]]:
        def measure(candidates):
            if figures is None:
                raise AssertionError("measured although it must not")
            calls.append(list(candidates))
            return {k: v for k, v in figures.items() if k in candidates}

        monkeypatch.setattr(video_io, "_measure_here", measure)
        return calls

    return set_figures


def test_auto_reads_with_the_faster_reader_and_remembers_it(measured, videos):
    from vitssl.video import reader_choice

    calls = measured({"torchcodec": 12.0, "pyav": 30.0})
    assert probe(videos["h264.mp4"]).decoder == "auto"  # not measured yet: probe never measures
    assert calls == [] and not (reader_choice.cache_path()).exists()
    assert video_io.resolve_decoder("auto") == "pyav"
    assert calls == [["torchcodec", "pyav"]]
    assert probe(videos["h264.mp4"]).decoder == "pyav"
    reader_choice.forget()  # another process on this machine: the cache answers, nothing is measured
    measured(None)
    assert video_io.auto_choice().source == "cache" and probe(videos["h264.mp4"]).decoder == "pyav"
    # remeasured (vitssl video readers --remeasure): the entry is rewritten
    calls = measured({"torchcodec": 40.0, "pyav": 30.0})
    assert video_io.auto_choice(refresh=True).reader == "torchcodec" and len(calls) == 2
    (entry,) = json.loads(reader_choice.cache_path().read_text())["entries"]
    assert entry["reader"] == "torchcodec" and entry["key"]["readers"].keys() == {"torchcodec", "pyav"}


def test_auto_never_chooses_a_reader_that_does_not_load(measured, monkeypatch, videos):
    calls = measured({"torchcodec": 100.0, "pyav": 1.0})
    monkeypatch.setitem(video_io._AVAILABLE, "torchcodec", "torchcodec does not load: no FFmpeg")
    choice = video_io.auto_choice()
    assert (choice.reader, choice.source, calls) == ("pyav", "only", [])
    assert "only reader that loads" in choice.describe()
    assert indices_of(read_frames(videos["h264.mp4"], [5, 1])) == [5, 1]


def test_auto_on_a_cuda_device_is_torchcodec_unmeasured(measured):
    measured(None)
    assert video_io.resolve_decoder("auto", device="cuda") == "torchcodec"
    assert video_io.resolve_decoder("auto", device="cuda:1") == "torchcodec"


def test_the_real_measurement_times_each_reader_that_loads():
    candidates = [r for r in video_io.AUTO_READERS if r in READERS]
    figures = video_io._measure_here(candidates)
    assert set(figures) == set(candidates) and all(v > 0 for v in figures.values())


def test_cli_readers_says_why_auto_chose(measured, capsys):
    from vitssl.video import reader_choice

    measured({"torchcodec": 10.0, "pyav": 20.0})
    assert main(["video", "readers"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    path = reader_choice.cache_path()
    assert (
        last
        == f"decoder=auto reads with pyav (measured now: pyav 20.0 clips/s, torchcodec 10.0 clips/s; cached in {path})"
    )
    reader_choice.forget()
    measured(None)
    assert main(["video", "readers", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["auto"] == "pyav" and report["auto_choice"]["source"] == "cache"
    assert report["auto_choice"]["figures"] == {"pyav": 20.0, "torchcodec": 10.0}
    measured({"torchcodec": 30.0, "pyav": 20.0})
    assert main(["video", "readers", "--remeasure"]) == 0
    assert "decoder=auto reads with torchcodec (measured now: torchcodec 30.0" in capsys.readouterr().out


def test_probe_imports_no_model_library(videos):
    # `vitssl video probe` answers in about a second: it must not import open_clip, timm or torch
    code = (
        "import sys\n"
        "from vitssl.cli import main\n"
        f"assert main(['video', 'probe', {str(videos['h264.mp4'])!r}]) == 0\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'open_clip', 'timm', 'torch', 'torchvision'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_frame_features_skip_a_damaged_video_by_name(assets, caplog):
    from vitssl.video.frames import ThumbnailModel, sample_frames, video_frame_features

    with pytest.raises(CorruptVideoError, match=r"damaged video .*damaged\.mp4: decoding stops at frame"):
        sample_frames(assets["damaged.mp4"], num_frames=4)
    with caplog.at_level("WARNING"):
        out = video_frame_features(ThumbnailModel(4), [assets["h264.mp4"], assets["damaged.mp4"]], skip_corrupt=True)
    assert out[0].shape == (2, 48) and out[1] is None  # 30 frames at 25 fps, 1 fps: 2 frames
    assert "skipped 1 of 2 unreadable or damaged videos" in caplog.text and "damaged.mp4" in caplog.text
