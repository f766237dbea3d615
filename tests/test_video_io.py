"""Reading video frames (vitssl.video.io) and ``vitssl video probe``: exact frames, fallbacks, broken files.

The videos are tiny (64x48, 40 frames, a keyframe every 12) and spell their frame index in their pixels
(tests/_videos.py), so every read is checked frame by frame.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from _videos import decode_index, truncated_copy, write_video
from vitssl.cli import main
from vitssl.data.common import CorruptImageError
from vitssl.errors import MissingFileError
from vitssl.video.io import CorruptVideoError, VideoInfo, probe, read_frames

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


def indices_of(frames: torch.Tensor) -> list[int]:
    assert frames.dtype == torch.uint8 and frames.ndim == 4 and frames.shape[-1] == 3
    return [decode_index(f) for f in frames.numpy()]


@pytest.mark.parametrize("kind", list(KINDS))
def test_probe_reports_the_stream(videos, kind):
    info = probe(videos[kind])
    codec = KINDS[kind][0]
    # auto reads with PyAV, the faster reader here (benchmarks/video_reading.py); decord reads these files too
    assert info == VideoInfo(str(videos[kind]), FRAMES, 25.0, 64, 48, FRAMES / 25.0, codec, "pyav")
    assert probe(videos[kind], decoder="decord").decoder == "decord"


@pytest.mark.parametrize("decoder", ["auto", "decord", "pyav"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_read_frames_returns_exactly_the_asked_frames(videos, kind, decoder):
    rng = np.random.default_rng(0)
    # random order across GOPs, a duplicate, the first and last frames
    wanted = [*rng.permutation(FRAMES)[:10].tolist(), 13, 13, 0, FRAMES - 1, 25]
    frames = read_frames(videos[kind], wanted, decoder=decoder)
    assert frames.shape == (len(wanted), 48, 64, 3)
    assert indices_of(frames) == wanted


def test_indices_past_the_end_are_clamped_and_negative_ones_rejected(videos):
    assert indices_of(read_frames(videos["h264.mp4"], [39, 40, 1000, 2])) == [39, 39, 39, 2]
    with pytest.raises(ValueError, match=">= 0"):
        read_frames(videos["h264.mp4"], [3, -1])
    assert read_frames(videos["h264.mp4"], []).shape == (0, 48, 64, 3)


def test_a_width_decord_misdecodes_falls_back_to_pyav(videos):
    info = probe(videos["w48"])
    assert (info.decoder, info.width, info.num_frames) == ("pyav", 48, FRAMES)
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


def test_a_truncated_mkv_reads_up_to_the_cut(videos):
    # matroska is streamable: the frames before the cut decode, so the verified count is smaller than the
    # header's (its duration still says 40 frames) and later indices clamp to the last frame that decodes
    info = probe(videos["cut.mkv"])
    assert 0 < info.num_frames < FRAMES
    last = info.num_frames - 1
    for decoder in ("auto", "pyav"):
        assert indices_of(read_frames(videos["cut.mkv"], [FRAMES - 1, 0, last], decoder=decoder)) == [last, 0, last]


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


def test_cli_probe_prints_a_line_per_file(videos, capsys):
    assert main(["video", "probe", str(videos["h264.mp4"]), str(videos["w48"])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        f"{videos['h264.mp4']}: 40 frames, 25.00 fps, 64x48, 1.60 s, h264, pyav",
        f"{videos['w48']}: 40 frames, 25.00 fps, 48x48, 1.60 s, h264, pyav",
    ]


def test_cli_probe_with_decord_names_a_file_it_misdecodes(videos, capsys):
    assert main(["video", "probe", "--decoder", "decord", str(videos["h264.mp4"])]) == 0
    assert capsys.readouterr().out.strip().endswith("h264, decord")
    assert main(["video", "probe", "--decoder", "decord", str(videos["w48"])]) == 2
    assert "decoder='pyav'" in capsys.readouterr().err


def test_cli_probe_json(videos, capsys):
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
        "decoder": "pyav",
    }


def test_cli_probe_of_a_corrupt_file_is_a_one_line_error(videos, capsys):
    assert main(["video", "probe", str(videos["h264.mp4"]), str(videos["cut.mp4"])]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()[-1:]
    assert line.startswith("vitssl video: error: cannot read video") and str(videos["cut.mp4"]) in line


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


def test_frame_count_is_verified_where_the_header_claims_more(tmp_path):
    # An mp4 with its frame table first (faststart, as served on the web), cut short: it still opens, and its
    # header (the table decord's len() also reads) still lists all 40 frames, but only the frames before the cut
    # decode. probe must count those, and reads past them must clamp instead of hanging or failing.
    import av

    whole = write_video(tmp_path / "fast.mp4", FRAMES, 64, 48, faststart=True, texture=True)
    cut = truncated_copy(whole, tmp_path / "fast_cut.mp4", fraction=0.5)
    with av.open(str(cut)) as container:
        claimed = container.streams.video[0].frames
    real = _decodable_indices(cut)
    assert claimed == FRAMES and 0 < len(real) < FRAMES
    assert real == list(range(len(real)))  # frame-exact up to the cut

    info = probe(cut)
    assert info.num_frames == len(real)
    assert info.duration == pytest.approx(len(real) / info.fps)
    last = len(real) - 1
    for decoder in ("auto", "pyav"):
        frames = read_frames(cut, [claimed - 1, 0, last, claimed // 2], decoder=decoder)
        assert indices_of(frames) == [last, 0, last, min(claimed // 2, last)]
    with pytest.raises(CorruptVideoError, match=r"fast_cut\.mp4"):  # decord 0.6 cannot open it: said so, by name
        read_frames(cut, [0], decoder="decord")
