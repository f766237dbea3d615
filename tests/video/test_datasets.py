"""Video datasets (videofolder, video_csv, motion), clip transforms and their use under TransformedDataset."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests._videos import copy_video, damaged_copy, decode_index, write_video
from vitssl.data.common import CorruptImageError, build_dataset
from vitssl.data.wrappers import SingleView, TransformedDataset, collate_skip_none
from vitssl.errors import DataError, MissingFileError
from vitssl.video.datasets import Motion, VideoCSV, VideoFolder
from vitssl.video.io import CorruptVideoError
from vitssl.video.samplers import dense_indices, segment_indices
from vitssl.video.transforms import ClipEvalTransform, clip_eval_transform, clip_train_transform

W, H = 64, 48  # frame size of the test videos


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny index-spelling videos, written once: 40 frames (.mp4) and 24 frames (.mkv)."""
    folder = tmp_path_factory.mktemp("videos")
    return {
        "mp4": write_video(folder / "v40.mp4", num_frames=40, width=W, height=H),
        "mkv": write_video(folder / "v24.mkv", num_frames=24, width=W, height=H),
    }


def _tree(root: Path, videos: dict[str, Path], layout: dict[str, list[str]]) -> Path:
    """``layout``: class folder (may include a split) -> file names; .mkv names copy the 24-frame video."""
    for cls, names in layout.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for name in names:
            copy_video(videos["mkv" if name.endswith(".mkv") else "mp4"], root / cls / name)
    return root


def _indices(clip: torch.Tensor) -> list[int]:
    return [decode_index(frame.numpy()) for frame in clip]


# ---------------------------------------------------------------------------------------------------------
# videofolder
# ---------------------------------------------------------------------------------------------------------


def test_videofolder_with_split_folders(tmp_path: Path, videos: dict[str, Path]) -> None:
    root = _tree(tmp_path, videos, {"train/run": ["a.mp4", "b.mkv"], "train/jump": ["c.MP4"], "val/run": ["d.mp4"]})
    (tmp_path / "train" / "run" / "notes.txt").write_text("not a video")
    ds = build_dataset("videofolder", root, "train", num_frames=4)
    assert isinstance(ds, VideoFolder)
    assert ds.classes == ["jump", "run"]
    assert ds.targets == [0, 1, 1]
    assert ds.sample_id(0) == str(root / "train" / "jump" / "c.MP4")
    assert ds.frame_counts == {}  # nothing probed while listing
    clip, label = ds[2]
    assert clip.dtype == torch.uint8 and clip.shape == (4, H, W, 3)
    assert label == 1
    assert ds.frame_counts == {2: 24}  # probed on first read, remembered
    val = build_dataset("videofolder", root, "val", num_frames=4)
    assert val.classes == ["run"] and len(val) == 1 and not val.train


def test_videofolder_without_split_folder_and_test_sampling(tmp_path: Path, videos: dict[str, Path]) -> None:
    root = _tree(tmp_path, videos, {"a": ["x.mp4"], "b": ["y.mp4"]})
    ds = build_dataset("videofolder", root, "val", num_frames=8)
    assert ds.classes == ["a", "b"] and ds.targets == [0, 1]
    # test mode: TSN segment centres, the same every time
    assert _indices(ds[0][0]) == list(segment_indices(40, 8, train=False))
    dense = build_dataset("videofolder", root, "val", num_frames=4, sampler="dense", stride=2, num_clips=3)
    views = [
        _indices(build_dataset("videofolder", root, "val", num_frames=4, sampler="dense", stride=2, num_clips=3,
                               clip_index=c)[0][0])
        for c in range(3)
    ]  # fmt: skip
    assert views == dense_indices(40, 4, 2, train=False, num_clips=3).tolist()
    assert views[0] == _indices(dense[0][0])
    # the dataset key `spacing` places the dense test clips as the sampler's reference spacings do
    for spacing in ("pyslowfast", "mmaction2_0x"):
        spaced = [
            _indices(VideoFolder(root, "val", num_frames=4, sampler="dense", stride=3, num_clips=4, clip_index=c,
                                 spacing=spacing)[0][0])
            for c in range(4)
        ]  # fmt: skip
        assert spaced == dense_indices(40, 4, 3, train=False, num_clips=4, spacing=spacing).tolist()
        assert spaced != dense_indices(40, 4, 3, train=False, num_clips=4).tolist()  # not the default's
    # multi-view TSN: the views take different offsets within the segments
    tsn = [_indices(VideoFolder(root, "val", num_frames=4, num_clips=2, clip_index=c)[0][0]) for c in range(2)]
    assert tsn == [[2, 12, 22, 32], [7, 17, 27, 37]]


def test_videofolder_errors(tmp_path: Path, videos: dict[str, Path]) -> None:
    def message(exc_type: type[Exception], root: object, **kwargs: object) -> str:
        with pytest.raises(exc_type) as info:
            build_dataset("videofolder", root, "train", **kwargs)
        text = str(info.value)
        assert "\n" not in text
        return text

    assert "data.train.root=PATH" in message(DataError, None)
    assert "does not exist" in message(MissingFileError, tmp_path / "nope")
    (tmp_path / "file.mp4").write_bytes(b"x")
    assert "is a file" in message(DataError, tmp_path / "file.mp4")
    (tmp_path / "empty").mkdir()
    assert "no class sub-folders" in message(MissingFileError, tmp_path / "empty")
    root = _tree(tmp_path / "tree", videos, {"a": ["x.mp4"]})
    (root / "b").mkdir()
    assert "b hold no videos" in message(MissingFileError, root)
    split_root = _tree(tmp_path / "split", videos, {"val/a": ["x.mp4"]})
    assert "no 'train'" in message(MissingFileError, split_root)
    assert "Valid options" in message(DataError, root, frames=4)
    assert "sampler" in message(DataError, split_root / "val", sampler="random")
    assert "num_clips" in message(DataError, split_root / "val", num_clips=2)  # random train clips have no views
    assert "spacing must be one of mmaction2, pyslowfast" in message(DataError, root, sampler="dense", spacing="x")
    assert "set sampler=dense" in message(DataError, root, spacing="pyslowfast")  # TSN segments have no spacing
    with pytest.raises(DataError, match=r"dataset 'motion' has no option 'spacing'"):
        build_dataset("motion", None, "val", spacing="pyslowfast")


# ---------------------------------------------------------------------------------------------------------
# video_csv
# ---------------------------------------------------------------------------------------------------------


def test_video_csv_list_file(tmp_path: Path, videos: dict[str, Path]) -> None:
    _tree(tmp_path / "clips", videos, {"": ["a.mp4", "b b.mp4", "c.mkv"]})
    lst = tmp_path / "train.txt"
    lst.write_text("# Kinetics-style list\nclips/a.mp4 walking\n\nclips/b b.mp4  abseiling\nclips/c.mkv walking\n")
    ds = build_dataset("video_csv", tmp_path, "train", num_frames=4)  # a folder root finds <split>.txt
    assert isinstance(ds, VideoCSV)
    assert ds.classes == ["abseiling", "walking"] and ds.targets == [1, 0, 1]
    assert ds.sample_id(1) == str(tmp_path / "clips" / "b b.mp4")
    assert ds[2][0].shape == (4, H, W, 3)
    # integer labels, paths under a prefix, classes given so that ids mean the same in every split
    ids = tmp_path / "lists" / "val.txt"
    ids.parent.mkdir()
    ids.write_text("a.mp4 2\nc.mkv 0\n")
    ds = build_dataset("video_csv", ids, "val", prefix=str(tmp_path / "clips"))
    assert ds.classes == ["0", "1", "2"] and ds.targets == [2, 0]
    assert ds.sample_id(0) == str(tmp_path / "clips" / "a.mp4")
    named = build_dataset("video_csv", lst, "val", classes=["abseiling", "walking", "zumba"])
    assert named.classes == ["abseiling", "walking", "zumba"] and named.targets == [1, 0, 1]


def test_video_csv_with_header(tmp_path: Path, videos: dict[str, Path]) -> None:
    copy_video(videos["mp4"], tmp_path / "a.mp4")
    copy_video(videos["mkv"], tmp_path / "b.mkv")
    (tmp_path / "list.csv").write_text("path,label,extra\na.mp4,1,x\nb.mkv,0,y\n")
    ds = build_dataset("video_csv", tmp_path / "list.csv", "train", num_frames=2)
    assert ds.targets == [1, 0] and ds.classes == ["0", "1"]
    (tmp_path / "named.tsv").write_text("video\tclass name\nb.mkv\tpush up\na.mp4\tjump\n")
    ds = build_dataset(
        "video_csv", tmp_path / "named.tsv", "val", path_column="video", label_column="class name", delimiter="\t"
    )
    assert ds.classes == ["jump", "push up"] and ds.targets == [1, 0]
    assert _indices(ds[0][0]) == list(segment_indices(24, 8, train=False))


def test_video_csv_errors_name_file_and_line(tmp_path: Path) -> None:
    def message(text: str, **kwargs: object) -> str:
        path = tmp_path / "list.txt"
        path.write_text(text)
        with pytest.raises(DataError) as info:
            build_dataset("video_csv", path, "train", **kwargs)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert f'{tmp_path / "list.txt"}:3: expected "path label"' in message("a.mp4 0\n\nlonely.mp4\n")
    assert "set path_column/label_column" in message("video,class\na.mp4,0\n")
    assert ":2: label 'b'" in message("a.mp4 0\nb.mp4 b\n")  # ids and names mixed
    assert ":1: label -1" in message("a.mp4 -1\n")
    assert ":2: class 'c'" in message("a.mp4 a\nb.mp4 c\n", classes=["a", "b"])
    assert "lists no videos" in message("# only a comment\n")
    assert ":3: empty 'label'" in message("path,label\na.mp4,0\nb.mp4,\n")


# ---------------------------------------------------------------------------------------------------------
# motion
# ---------------------------------------------------------------------------------------------------------


def test_motion_is_deterministic_with_disjoint_splits() -> None:
    ds = build_dataset("motion", None, "train", num_samples=8, img_size=16, num_frames=4)
    clip, label = ds[5]
    assert clip.dtype == torch.uint8 and clip.shape == (4, 16, 16, 3)
    assert label == 1 and ds.classes[label] == "right"
    assert torch.equal(clip, Motion(split="train", num_samples=8, img_size=16, num_frames=4)[5][0])
    assert not torch.equal(clip, ds[1][0])
    val = Motion(split="val", num_samples=8, img_size=16, num_frames=4)
    assert not torch.equal(clip, val[5][0])
    assert not torch.equal(clip, Motion(split="train", num_samples=8, img_size=16, num_frames=4, seed=1)[5][0])
    assert ds.sample_id(5) == "motion/train/5" and val.sample_id(5) == "motion/val/5"


def _ridge_accuracy(train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor, y_test: torch.Tensor) -> float:
    """Held-out accuracy of one-vs-rest ridge regression (dual form: few samples, many pixels)."""
    mu, sd = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mu) / sd, (test - mu) / sd
    targets = torch.nn.functional.one_hot(y_train, 4).double()
    gram = train @ train.T  # (N, N)
    alpha = torch.linalg.solve(gram + 0.01 * len(train) * torch.eye(len(train), dtype=gram.dtype), targets)
    return ((test @ train.T @ alpha).argmax(1) == y_test).double().mean().item()


def _flow_direction(clips: torch.Tensor) -> torch.Tensor:
    """Class from frame differences: the global Lucas-Kanade velocity, ``d ≈ -v · ∇f`` (contrast-invariant)."""
    grey = clips.mean(-1)  # (N, T, S, S)
    diff = grey[:, 1:] - grey[:, :-1]  # (N, T-1, S, S); the static background cancels
    gx = ((grey.roll(-1, -1) - grey.roll(1, -1)) / 2)[:, :-1]  # (N, T-1, S, S)
    gy = ((grey.roll(-1, -2) - grey.roll(1, -2)) / 2)[:, :-1]
    vx = -(diff * gx).sum((1, 2, 3)) / (gx * gx).sum((1, 2, 3))  # (N,)
    vy = -(diff * gy).sum((1, 2, 3)) / (gy * gy).sum((1, 2, 3))
    return torch.stack([-vx, vx, -vy, vy], 1).argmax(1)  # left, right, up, down


def test_motion_class_is_in_the_motion_not_in_a_frame() -> None:
    def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        ds = Motion(split=split, num_samples=200, num_frames=4)
        return torch.stack([ds[i][0] for i in range(len(ds))]).double() / 255, torch.tensor(ds.targets)

    x_train, y_train = load("train")  # (N, T, S, S, 3)
    x_val, y_val = load("val")
    # Single frames (first or last, all pixels or the mean colour) stay at chance (0.25).
    for t in (0, 3):
        acc = _ridge_accuracy(x_train[:, t].flatten(1), y_train, x_val[:, t].flatten(1), y_val)
        assert acc < 0.4, f"frame {t} pixels predict the class: {acc:.2f}"
    acc = _ridge_accuracy(x_train[:, 0].mean((1, 2)), y_train, x_val[:, 0].mean((1, 2)), y_val)
    assert acc < 0.4, f"the mean colour predicts the class: {acc:.2f}"
    # Two frames do: the velocity from their difference separates the classes.
    assert (_flow_direction(x_val[:, :2]) == y_val).double().mean().item() > 0.9
    assert (_flow_direction(x_val) == y_val).double().mean().item() > 0.95


# ---------------------------------------------------------------------------------------------------------
# clip transforms
# ---------------------------------------------------------------------------------------------------------


def test_clip_train_transform_applies_one_crop_to_every_frame() -> None:
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(0, 200, (1, 40, 56, 3), generator=gen, dtype=torch.uint8)
    clip = base + torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1) * 10  # (6, 40, 56, 3) frame t = base + 10 t
    std = (0.5, 0.25, 0.2)
    transform = clip_train_transform(24, mean=(0.5, 0.5, 0.5), std=std, crop_scale=(0.2, 0.6))
    for seed in range(5):
        torch.manual_seed(seed)
        out = transform(clip)
        assert out.dtype == torch.float32 and out.shape == (6, 3, 24, 24)
        # Resizing is linear with weights summing to 1: with one crop box and flip for all frames, frame t differs
        # from frame 0 by exactly 10 t / 255 / std everywhere; any other box or flip would leave a texture.
        expected = torch.arange(6).view(6, 1, 1, 1) * 10 / 255 / torch.tensor(std).view(1, 3, 1, 1)
        assert torch.allclose(out - out[:1], expected.float().expand_as(out), atol=1e-4)
    torch.manual_seed(0)
    a = transform(clip)
    torch.manual_seed(1)
    assert not torch.equal(a, transform(clip))  # the box is random across calls


def test_clip_transforms_pickle_repr_and_eval() -> None:
    train = clip_train_transform(16, mean=(0.1, 0.2, 0.3), std=(0.3, 0.3, 0.3), flip=False)
    assert repr(pickle.loads(pickle.dumps(train))) == repr(train)
    assert "flip=False" in repr(train) and "img_size=16" in repr(train)
    assert repr(clip_train_transform(16, mean=(0.1, 0.2, 0.3), std=(0.3, 0.3, 0.3))) != repr(train)
    evaluate = clip_eval_transform(16, mean=(0.5,) * 3, std=(0.5,) * 3, resize_ratio=1.0)
    assert isinstance(pickle.loads(pickle.dumps(evaluate)), ClipEvalTransform)
    assert "resize_ratio=1" in repr(evaluate)
    clip = torch.full((3, 20, 30, 3), 255, dtype=torch.uint8)
    out = evaluate(clip)
    assert out.shape == (3, 3, 16, 16) and torch.allclose(out, torch.ones_like(out))
    with pytest.raises(ValueError, match=r"uint8 tensor \(T, H, W, 3\)"):
        evaluate(clip.permute(0, 3, 1, 2))
    with pytest.raises(DataError, match="crop_scale"):
        clip_train_transform(16, crop_scale=(0.5, 0.2))


# ---------------------------------------------------------------------------------------------------------
# under TransformedDataset and a DataLoader
# ---------------------------------------------------------------------------------------------------------


def _identity(clip: torch.Tensor, target: int) -> tuple[torch.Tensor, int]:
    return clip, target


def test_transformed_videofolder_is_reproducible_per_seed_epoch_index(tmp_path: Path, videos: dict[str, Path]) -> None:
    root = _tree(tmp_path, videos, {"a": ["x.mp4"], "b": ["y.mp4"]})
    for sampler in ("segment", "dense"):
        base = VideoFolder(root, "train", num_frames=6, sampler=sampler, stride=2)
        ds = TransformedDataset(base, _identity, seed=3)
        first = ds[1][0]
        again = TransformedDataset(VideoFolder(root, "train", num_frames=6, sampler=sampler, stride=2), _identity, 3)
        assert torch.equal(again[1][0], first)  # same (seed, epoch, index): the same clip, in a fresh dataset too
        frames = {tuple(_indices(first))}
        for epoch in (1, 2, 3):
            ds.set_epoch(epoch)
            frames.add(tuple(_indices(ds[1][0])))
        assert len(frames) > 1, f"{sampler}: training clips never change across epochs"
        ds.set_epoch(0)
        assert torch.equal(ds[1][0], first)


def test_dataloader_batches_clips_and_skips_corrupt(tmp_path: Path, videos: dict[str, Path]) -> None:
    root = _tree(tmp_path, videos, {"a": ["x.mp4", "y.mkv"], "b": ["z.mp4"]})
    broken = root / "b" / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is no video" * 8)
    base = VideoFolder(root, "train", num_frames=4)
    assert base.sample_id(2) == str(broken)
    transform = SingleView(clip_train_transform(16, crop_scale=(0.5, 1.0)))
    skipping = TransformedDataset(base, transform, seed=0, skip_corrupt=True)
    loader = DataLoader(skipping, batch_size=4, num_workers=2, collate_fn=collate_skip_none)
    (clips, labels), skipped = next(iter(loader))
    assert clips.shape == (3, 4, 3, 16, 16)  # (B, T, C, H, W)
    assert labels.tolist() == [0, 0, 1] and skipped == 1
    strict = TransformedDataset(base, transform, seed=0)
    with pytest.raises(CorruptVideoError) as info:
        strict[2]
    assert isinstance(info.value, CorruptImageError)
    assert str(broken) in str(info.value) and "\n" not in str(info.value)


def test_vanished_file_is_a_corrupt_sample(tmp_path: Path, videos: dict[str, Path]) -> None:
    root = _tree(tmp_path, videos, {"a": ["x.mp4", "gone.mp4"]})
    ds = VideoFolder(root, "val", num_frames=2)
    (root / "a" / "gone.mp4").unlink()
    assert TransformedDataset(ds, _identity, seed=0, skip_corrupt=True)[0] is None
    with pytest.raises(CorruptVideoError, match=r"video file not found: .*gone\.mp4"):
        ds[0]
    assert np.array_equal(_indices(ds[1][0]), segment_indices(40, 2, train=False))


def test_damaged_videos_are_skipped_by_name_or_stop_the_run(
    tmp_path: Path, videos: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    # a web mp4 whose header lists 40 frames but whose data stops part-way: clips drawn from the frames that
    # decode would silently cover part of the video, so the file is a corrupt sample, never a short one
    root = _tree(tmp_path, videos, {"a": ["x.mp4"], "b": ["y.mp4"]})
    web = write_video(tmp_path / "web.mp4", num_frames=40, width=W, height=H, faststart=True, texture=True)
    damaged = damaged_copy(web, root / "b" / "damaged.mp4")
    base = VideoFolder(root, "val", num_frames=4)
    assert base.sample_id(1) == str(damaged)
    with pytest.raises(CorruptVideoError) as info:
        TransformedDataset(base, _identity, seed=0)[1]
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"damaged video {damaged}: decoding stops at frame")
    assert "skip_corrupt" in text
    skipping = TransformedDataset(base, _identity, seed=0, skip_corrupt=True)
    with caplog.at_level("WARNING"):
        items = [skipping[i] for i in range(len(skipping))]
    assert [item is None for item in items] == [False, True, False]
    assert str(damaged) in caplog.text
    (clips, labels), skipped = collate_skip_none(items)
    assert clips.shape == (2, 4, H, W, 3) and labels.tolist() == [0, 1] and skipped == 1


@pytest.mark.parametrize("decoder", ["pyav", "decord", "torchcodec"])
def test_video_datasets_read_with_the_decoder_asked(tmp_path: Path, videos: dict[str, Path], decoder: str) -> None:
    from vitssl.video.io import reader_problem

    if reader_problem(decoder) is not None:
        pytest.skip(reader_problem(decoder))
    root = _tree(tmp_path, videos, {"a": ["x.mp4"]})
    ds = build_dataset("videofolder", root, "val", num_frames=4, decoder=decoder)
    assert ds.decoder == decoder
    assert _indices(ds[0][0]) == list(segment_indices(40, 4, train=False))
    with pytest.raises(DataError, match="decoder must be one of auto, torchcodec, decord, pyav"):
        build_dataset("videofolder", root, "val", decoder="opencv")
