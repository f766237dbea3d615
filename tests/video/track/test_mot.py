"""MOTChallenge I/O: the MOT text format, sequences (folders and videos), generated sequences, rendering."""

from __future__ import annotations

import numpy as np
import pytest

from vitssl.errors import DataError, MissingFileError
from vitssl.video.track.mot import (
    format_mot,
    list_sequences,
    load_sequence,
    read_mot,
    write_mot,
    xywh_to_xyxy,
    xyxy_to_xywh,
)
from vitssl.video.track.render import id_colour, render_tracks
from vitssl.video.track.synth import write_sequence, write_sequences


@pytest.fixture(scope="module")
def sequences(tmp_path_factory):
    root = tmp_path_factory.mktemp("mot")
    return write_sequences(root, num_sequences=2, num_frames=24, size=(64, 96), seed=3)


def test_boxes_round_trip_through_the_mot_format(tmp_path):
    rng = np.random.default_rng(0)
    rows = np.zeros((50, 10))
    rows[:, 0] = rng.integers(1, 100, 50)
    rows[:, 1] = rng.integers(-1, 20, 50)
    rows[:, 2:4] = rng.uniform(-50, 1000, (50, 2))  # boxes may start outside the image
    rows[:, 4:6] = rng.uniform(0, 300, (50, 2))
    rows[:, 6] = rng.random(50)
    rows[:, 7:] = -1
    write_mot(tmp_path / "r.txt", rows)
    back = read_mot(tmp_path / "r.txt")
    np.testing.assert_array_equal(back, rows)  # exact, not to a tolerance
    # the xyxy <-> xywh conversions the tracker uses are inverse to each other
    np.testing.assert_allclose(xyxy_to_xywh(xywh_to_xyxy(back[:, 2:6])), rows[:, 2:6], rtol=0, atol=1e-9)
    assert not list(tmp_path.glob(".*tmp*")), "atomic write left a temporary behind"


def test_short_lines_blank_lines_and_spaces_are_read(tmp_path):
    path = tmp_path / "gt.txt"
    path.write_text("1,1,10,20,30,40\n\n2, 2, 5.5, 6, 7, 8, 0, 3, 0.25\n   \n3 3 1 2 3 4 0.9 -1 -1 -1\n")
    rows = read_mot(path)
    assert rows.shape == (3, 10)
    np.testing.assert_array_equal(rows[0], [1, 1, 10, 20, 30, 40, 1, -1, -1, -1])  # conf 1, the rest -1
    np.testing.assert_array_equal(rows[1], [2, 2, 5.5, 6, 7, 8, 0, 3, 0.25, -1])
    np.testing.assert_array_equal(rows[2], [3, 3, 1, 2, 3, 4, 0.9, -1, -1, -1])
    (tmp_path / "empty.txt").write_text("\n")
    assert read_mot(tmp_path / "empty.txt").shape == (0, 10)
    assert format_mot(np.zeros((0, 10))) == ""


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("1,2,3", "expected 6 to 10 numbers"),
        ("1,2,a,4,5,6", "not a number"),
        ("0,1,1,1,1,1", "1-based"),
        ("1.5,1,1,1,1,1", "integer >= 1"),
        ("1,1.5,1,1,1,1", "id must be an integer"),
        ("1,1,1,1,-4,1", "negative box size"),
        ("1,1,nan,1,1,1", "non-finite"),
    ],
)
def test_a_bad_line_is_one_line_naming_file_and_line(tmp_path, line, needle):
    path = tmp_path / "bad.txt"
    path.write_text(f"1,1,1,1,1,1\n\n{line}\n")
    with pytest.raises(DataError) as info:
        read_mot(path)
    message = str(info.value)
    assert f"{path}:3" in message and needle in message and "\n" not in message


def test_missing_files_and_folders_are_user_errors(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist"):
        read_mot(tmp_path / "nope.txt")
    with pytest.raises(MissingFileError):
        load_sequence(tmp_path / "nope")
    with pytest.raises(MissingFileError):
        list_sequences(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no sequences"):
        list_sequences(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="neither a MOTChallenge sequence folder nor a video"):
        load_sequence(tmp_path / "notes.txt")


def test_generated_sequences_have_the_motchallenge_layout(sequences):
    assert [p.name for p in sequences] == ["SYN-01", "SYN-02"]
    for folder in sequences:
        assert (folder / "seqinfo.ini").is_file() and (folder / "img1" / "000001.jpg").is_file()
        assert (folder / "img1" / "000024.jpg").is_file() and not (folder / "img1" / "000025.jpg").exists()
        first = (folder / "gt" / "gt.txt").read_text().splitlines()[0]
        assert len(first.split(",")) == 9  # frame,id,l,t,w,h,consider,class,visibility
    loaded = list_sequences(sequences[0].parent)
    assert [s.name for s in loaded] == ["SYN-01", "SYN-02"]
    seq = loaded[0]
    assert (seq.length, seq.width, seq.height, seq.fps) == (24, 96, 64, 10.0)
    assert seq.frame(1).shape == (64, 96, 3) and seq.frame(1).dtype == np.uint8
    with pytest.raises(IndexError):
        seq.frame(0)
    with pytest.raises(IndexError):
        seq.frame(25)


def test_generated_objects_enter_leave_cross_and_occlude(tmp_path):
    seq = load_sequence(write_sequence(tmp_path / "S", num_frames=48, size=(64, 96), seed=7, num_objects=(4, 4)))
    gt = seq.gt
    assert (gt[:, 6] == 1).all() and (gt[:, 7] == 1).all()  # consider, class pedestrian
    ids = np.unique(gt[:, 1])
    assert len(ids) >= 3
    first, last = set(gt[gt[:, 0] == 1, 1]), set(gt[gt[:, 0] == 48, 1])
    assert set(ids) != first or set(ids) != last, "every object is there from the first to the last frame"
    assert gt[:, 8].min() < 0.9, "no object is ever occluded"
    assert ((gt[:, 8] >= 0) & (gt[:, 8] <= 1)).all()
    # boxes are inside the frame and each object's box moves between frames
    assert (gt[:, 2] >= 0).all() and (gt[:, 2] + gt[:, 4] <= 96).all() and (gt[:, 3] + gt[:, 5] <= 64).all()
    track = gt[gt[:, 1] == gt[0, 1]]
    assert len(np.unique(track[:, 2:4], axis=0)) > 1
    # the object is in the frame where its gt says: its box differs from the empty background there
    frame = seq.frame(int(track[0, 0])).astype(float)
    left, top, w, h = track[0, 2:6].astype(int)
    assert frame[top : top + h, left : left + w].std() > 10
    # detections: most gt boxes have a detection overlapping them well
    det = seq.det
    assert (det[:, 1] == -1).all() and ((det[:, 6] > 0) & (det[:, 6] <= 1)).all()
    from vitssl.video.track.associate import box_iou

    hits = 0
    for row in gt[gt[:, 8] > 0.5]:
        d = det[det[:, 0] == row[0]]
        hits += bool(len(d)) and box_iou(xywh_to_xyxy(row[2:6]), xywh_to_xyxy(d[:, 2:6])).max() > 0.5
    assert hits / max(1, (gt[:, 8] > 0.5).sum()) > 0.7


def test_generation_is_deterministic_and_seeds_differ(tmp_path):
    a = write_sequence(tmp_path / "a", num_frames=10, size=(48, 64), seed=5)
    b = write_sequence(tmp_path / "b", num_frames=10, size=(48, 64), seed=5)
    c = write_sequence(tmp_path / "c", num_frames=10, size=(48, 64), seed=6)
    assert (a / "gt" / "gt.txt").read_bytes() == (b / "gt" / "gt.txt").read_bytes()
    assert (a / "det" / "det.txt").read_bytes() == (b / "det" / "det.txt").read_bytes()
    assert (a / "img1" / "000005.jpg").read_bytes() == (b / "img1" / "000005.jpg").read_bytes()
    assert (a / "gt" / "gt.txt").read_bytes() != (c / "gt" / "gt.txt").read_bytes()


def test_a_sequence_folder_without_frames_or_with_a_bad_seqinfo_is_a_data_error(tmp_path, sequences):
    (tmp_path / "S" / "gt").mkdir(parents=True)
    with pytest.raises(DataError, match="no frame folder img1"):
        load_sequence(tmp_path / "S")
    (tmp_path / "S" / "img1").mkdir()
    with pytest.raises(DataError, match="no frames"):
        load_sequence(tmp_path / "S")
    (tmp_path / "S" / "img1" / "000001.jpg").write_bytes((sequences[0] / "img1" / "000001.jpg").read_bytes())
    (tmp_path / "S" / "seqinfo.ini").write_text("[Sequence]\nseqLength=5\n")
    with pytest.raises(DataError, match="seqLength=5"):
        load_sequence(tmp_path / "S")
    (tmp_path / "S" / "seqinfo.ini").write_text("no section here\n")
    with pytest.raises(DataError, match=r"seqinfo\.ini"):
        load_sequence(tmp_path / "S")
    (tmp_path / "S" / "seqinfo.ini").unlink()
    (tmp_path / "S" / "img1" / "000002.jpg").write_bytes(b"not a jpeg")
    seq = load_sequence(tmp_path / "S")  # no seqinfo.ini: length and size from the frames
    assert (seq.length, seq.gt, seq.det) == (2, None, None)
    with pytest.raises(DataError, match=r"000002\.jpg"):
        seq.frame(2)


def test_render_writes_a_video_that_loads_back_as_a_sequence(tmp_path, sequences):
    seq = load_sequence(sequences[0])
    out = render_tracks(seq, seq.gt, tmp_path / "tracks.mp4")
    # a video with its gt beside it is a sequence too
    write_mot(tmp_path / "tracks.gt.txt", seq.gt)
    video = load_sequence(out)
    assert video.video_path == out and video.frame_paths is None
    assert (video.length, video.width, video.height) == (24, 96, 64)
    np.testing.assert_array_equal(video.gt, seq.gt)
    # the first gt box's outline has its id's colour (h264 is lossy: compare loosely)
    row = seq.gt[0]
    frame = video.frame(int(row[0])).astype(float)
    left, top, w, _ = row[2:6].astype(int)
    edge = frame[top, left + 2 : left + w - 2].mean(axis=0)
    assert np.abs(edge - np.array(id_colour(int(row[1])))).max() < 60
    assert sum(1 for _ in video.frames()) == 24
    assert [s.name for s in list_sequences(tmp_path)] == ["tracks"]


def test_track_synth_command_writes_sequences_and_rejects_impossible_sizes(tmp_path, capsys):
    from vitssl.cli import main

    args = ["track", "synth", str(tmp_path / "s"), "--num-sequences", "1", "--num-frames", "5", "--size", "32", "48"]
    assert main(args) == 0
    seq = load_sequence(tmp_path / "s" / "SYN-01")
    assert (seq.length, seq.height, seq.width) == (5, 32, 48)
    capsys.readouterr()
    assert main(["track", "synth", str(tmp_path / "t"), "--size", "8", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitssl track: error:") and "size >= (16, 16)" in err and "\n" not in err


def test_frames_are_ordered_by_number_not_by_name(tmp_path):
    from PIL import Image

    (tmp_path / "S" / "img1").mkdir(parents=True)
    for number in (1, 2, 10):
        Image.new("RGB", (20, 16), (number * 20, 0, 0)).save(tmp_path / "S" / "img1" / f"{number}.png")
    seq = load_sequence(tmp_path / "S")
    assert [p.name for p in seq.frame_paths] == ["1.png", "2.png", "10.png"]
    assert (seq.length, seq.width, seq.height, seq.frame(3)[0, 0, 0]) == (3, 20, 16, 200)
