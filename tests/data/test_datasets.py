"""Datasets, per-sample seeding, multi-view wrappers and transforms of ``vitssl.data`` (all on generated data)."""

from __future__ import annotations

import io
import logging
import pickle
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vitssl.data import (
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PALETTE,
    SHAPE_CLASSES,
    CorruptImageError,
    MultiView,
    SingleView,
    TransformedDataset,
    blur_kernel_size,
    build_dataset,
    collate_skip_none,
    dataset_parameters,
    eval_transform,
    expand_braces,
    list_datasets,
    moco_v3_views,
)
from vitssl.data import shapes as shapes_module
from vitssl.errors import DataError
from vitssl.registry import UnknownNameError

# ----------------------------------------------------------------------------------------------- helpers


def _save(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _png_bytes(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def _truncated_png(path: Path) -> Path:
    data = _png_bytes((1, 2, 3)) + b"\0" * 64
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 3])
    return path


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _tensor_of(item):
    return item[0] if isinstance(item, tuple) else item


# ---------------------------------------------------------------------------------------------- registry


def test_registry_lists_all_datasets_and_rejects_unknown_names_and_options():
    expected = {"imagefolder", "cifar10", "cifar100", "digits", "shapes", "shapes_captions", "image_text_csv"}
    assert expected | {"webdataset"} <= set(list_datasets())
    assert list_datasets("shape*") == ["shapes", "shapes_captions"]
    with pytest.raises(UnknownNameError, match=r"Valid names: .*digits"):
        build_dataset("digitz")
    with pytest.raises(ValueError, match=r"no option 'imgsize'.*Did you mean 'img_size'.*num_samples"):
        build_dataset("shapes", imgsize=16)
    # None means "the dataset's default".
    ds = build_dataset("shapes", num_samples=16, img_size=None)
    assert ds[0][0].size == (32, 32)
    assert DATASETS.get("shapes") is type(ds)


# Generated datasets read nothing from disk: their builders have no root parameter (the one declaration).
GENERATED = {"digits", "shapes", "shapes_captions", "motion", "motion_frames"}


@pytest.mark.parametrize("name", list_datasets())
def test_every_dataset_refuses_the_keys_it_does_not_take(name, tmp_path):
    """Checked before anything is read: the key's name and every key the dataset takes are in the message."""
    params = dataset_parameters(name)
    assert ("root" not in params) == (name in GENERATED)
    taken = ", ".join(
        ["data.train.name"]
        + [f"data.train.{p}" for p in ("root", "split") if p in params]
        + [f"data.train.kwargs.{p}" for p in params if p not in ("root", "split")]
    )
    with pytest.raises(DataError) as err:
        build_dataset(name, root=None, key="data.train", no_such_option=1)
    assert str(err.value).startswith(f"data.train.kwargs.no_such_option: dataset '{name}' has no option")
    assert str(err.value).endswith(f"Keys '{name}' takes: {taken}")
    if name in GENERATED:
        with pytest.raises(DataError) as err:
            build_dataset(name, root=tmp_path, key="data.train")
        assert str(err.value).startswith(f"data.train.root='{tmp_path}': dataset '{name}' is generated")
        assert "set data.train.root=null" in str(err.value) and str(err.value).endswith(taken)
        with pytest.raises(
            DataError, match=rf"^root=.*so it takes no root; leave root out .*Keys '{name}' takes: split, "
        ):
            build_dataset(name, root=tmp_path)  # outside a config (a data spec): the option names


def test_generated_datasets_still_build_without_a_root():
    assert len(build_dataset("digits", split="val", key="data.val")) == 397
    assert len(build_dataset("shapes", root="", num_samples=4)) == 4  # an empty root is no root


# ------------------------------------------------------------------------------------------- imagefolder


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    _save(root / "train" / "cat" / "a.png", (200, 0, 0))
    _save(root / "train" / "cat" / "sub" / "b.JPG", (190, 10, 10))
    _save(root / "train" / "dog" / "c.jpeg", (0, 0, 200))
    _truncated_png(root / "train" / "dog" / "d_broken.png")
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    _save(root / "val" / "cat" / "e.png", (200, 0, 0))
    _save(root / "val" / "dog" / "f.png", (0, 0, 200))
    return root


def test_imagefolder_reads_splits_classes_and_lazy_rgb_images(image_tree: Path):
    ds = build_dataset("imagefolder", root=image_tree, split="train")
    assert ds.classes == ["cat", "dog"]
    assert len(ds) == 4  # notes.txt is not an image
    assert ds.targets == [0, 0, 1, 1]
    assert ds.sample_id(1).endswith("cat/sub/b.JPG")
    img, label = ds[2]
    assert img.mode == "RGB" and img.size == (12, 10) and label == 1
    assert img.getpixel((0, 0))[2] > 150
    val = build_dataset("imagefolder", root=image_tree, split="val")
    assert len(val) == 2 and val.targets == [0, 1]
    # A root without split folders is itself the class tree.
    flat = build_dataset("imagefolder", root=image_tree / "val", split="train")
    assert flat.classes == ["cat", "dog"] and len(flat) == 2


def test_imagefolder_corrupt_image_names_file_and_suggests_skip(image_tree: Path):
    ds = build_dataset("imagefolder", root=image_tree)
    with pytest.raises(CorruptImageError, match=r"d_broken\.png.*data\.skip_corrupt=true"):
        ds[3]
    assert issubclass(CorruptImageError, RuntimeError)


def test_skip_corrupt_returns_none_logs_file_and_collate_counts(image_tree: Path, caplog):
    ds = build_dataset("imagefolder", root=image_tree)
    tds = TransformedDataset(ds, SingleView(eval_transform(8, resize_ratio=1.0)), seed=0, skip_corrupt=True)
    with caplog.at_level(logging.WARNING, logger="vitssl.data.wrappers"):
        assert tds[3] is None
    assert "d_broken.png" in caplog.text
    batches = list(DataLoader(tds, batch_size=4, collate_fn=collate_skip_none))
    (x, y), skipped = batches[0]
    assert skipped == 1 and x.shape == (3, 3, 8, 8) and y.tolist() == [0, 0, 1]
    strict = TransformedDataset(ds, SingleView(eval_transform(8, resize_ratio=1.0)), seed=0)
    with pytest.raises(CorruptImageError):
        strict[3]


def test_imagefolder_missing_empty_and_wrong_split_messages(tmp_path: Path, image_tree: Path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=rf"{missing}.*does not exist.*root/<class>/<image>"):
        build_dataset("imagefolder", root=missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"{empty}.*no class sub-folders.*<class>/<image>"):
        build_dataset("imagefolder", root=empty)
    (empty / "cat").mkdir()
    with pytest.raises(FileNotFoundError, match=r"class folder\(s\) cat hold no images"):
        build_dataset("imagefolder", root=empty)
    with pytest.raises(FileNotFoundError, match=r"split folders train, val but no 'test'"):
        build_dataset("imagefolder", root=image_tree, split="test")
    with pytest.raises(ValueError, match=r"needs a root: set data\.train\.root=PATH \(data\.val\.root"):
        build_dataset("imagefolder")


# ------------------------------------------------------------------------------------------------- CIFAR


def _cifar_batch(n: int, offset: int, label_keys: dict[str, int]) -> dict:
    data = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    for i in range(n):
        data[i, 0], data[i, 1], data[i, 2] = offset + i, 100, 200  # R, G, B planes
        data[i, 0, 0, 1] = 7  # one distinct pixel at (x=1, y=0) to pin the layout
    batch = {"data": data.reshape(n, 3072), "filenames": [f"img{i}.png" for i in range(n)]}
    for key, num_classes in label_keys.items():
        batch[key] = [(offset + i) % num_classes for i in range(n)]
    return batch


def _write_pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    c10 = tmp_path / "cifar-10-batches-py"
    for b in range(1, 6):
        _write_pickle(c10 / f"data_batch_{b}", _cifar_batch(2, 10 * b, {"labels": 10}))
    _write_pickle(c10 / "test_batch", _cifar_batch(3, 100, {"labels": 10}))
    _write_pickle(c10 / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    c100 = tmp_path / "cifar-100-python"
    keys = {"fine_labels": 100, "coarse_labels": 20}
    _write_pickle(c100 / "train", _cifar_batch(4, 0, keys))
    _write_pickle(c100 / "test", _cifar_batch(2, 50, keys))
    names = {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"s{i}" for i in range(20)]}
    _write_pickle(c100 / "meta", names)
    return tmp_path


def test_cifar10_reads_pickles_from_folder_or_parent(cifar_root: Path):
    train = build_dataset("cifar10", root=cifar_root, split="train")
    assert len(train) == 10 and train.classes[3] == "c3"
    assert train.targets[:4] == [0, 1, 0, 1]  # labels (10+i) % 10 and (20+i) % 10
    img, label = train[1]
    assert img.mode == "RGB" and img.size == (32, 32) and label == 1
    assert img.getpixel((5, 5)) == (11, 100, 200)
    assert img.getpixel((1, 0)) == (7, 100, 200)  # channel-first rows map to (x, y) correctly
    test = build_dataset("cifar10", root=cifar_root / "cifar-10-batches-py", split="val")  # alias of test
    assert len(test) == 3 and test.sample_id(2) == "cifar10/test/2"


def test_cifar100_fine_and_coarse_labels(cifar_root: Path):
    fine = build_dataset("cifar100", root=cifar_root)
    coarse = build_dataset("cifar100", root=cifar_root, split="test", label_mode="coarse")
    assert len(fine) == 4 and len(fine.classes) == 100 and fine.targets == [0, 1, 2, 3]
    assert len(coarse.classes) == 20 and coarse.targets == [50 % 20, 51 % 20]


def test_cifar_missing_files_and_bad_split(cifar_root: Path):
    (cifar_root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks data_batch_3.*cifar-10-batches-py"):
        build_dataset("cifar10", root=cifar_root)
    with pytest.raises(ValueError, match="no split 'holdout'; valid splits: train, test"):
        build_dataset("cifar100", root=cifar_root, split="holdout")


# ------------------------------------------------------------------------------------------------ digits


def test_digits_split_sizes_determinism_and_stratification():
    train = build_dataset("digits", split="train")
    val = build_dataset("digits", split="val")
    assert (len(train), len(val)) == (1400, 397)
    assert set(train.indices.tolist()).isdisjoint(val.indices.tolist())
    img, label = val[5]
    assert img.mode == "RGB" and img.size == (16, 16) and label == val.targets[5]
    assert val.sample_id(17) == "digits/val/17"
    again = build_dataset("digits", split="val")
    assert np.array_equal(again.indices, val.indices)
    assert np.array_equal(np.asarray(again[5][0]), np.asarray(img))
    # Stratified: each class's val count is its proportional share up to rounding.
    total = Counter(train.targets) + Counter(val.targets)
    for cls, count in Counter(val.targets).items():
        assert abs(count - total[cls] * 397 / 1797) < 1.0
    other = build_dataset("digits", split="val", seed=1)
    assert not np.array_equal(other.indices, val.indices)
    big = build_dataset("digits", split="train", img_size=32, val_fraction=0.5)
    assert len(big) == 1797 - round(0.5 * 1797) and big[0][0].size == (32, 32)


# ------------------------------------------------------------------------------------------------ shapes


def test_shapes_deterministic_balanced_and_splits_differ():
    a = build_dataset("shapes", split="train", num_samples=40)
    b = build_dataset("shapes", split="train", num_samples=40)
    val = build_dataset("shapes", split="val", num_samples=40)
    other_seed = build_dataset("shapes", split="train", num_samples=40, seed=3)
    assert len(a.classes) >= 6 and a.classes == list(SHAPE_CLASSES)
    counts = Counter(build_dataset("shapes", num_samples=1003).targets)
    assert len(counts) == len(SHAPE_CLASSES) and max(counts.values()) - min(counts.values()) <= 1
    pix = [np.asarray(a[i][0]) for i in (0, 7, 39)]
    assert all(np.array_equal(p, np.asarray(b[i][0])) for p, i in zip(pix, (0, 7, 39)))
    assert pix[0].shape == (32, 32, 3) and a[0][0].mode == "RGB"
    assert not np.array_equal(pix[0], np.asarray(val[0][0]))
    assert not np.array_equal(pix[0], np.asarray(other_seed[0][0]))
    assert build_dataset("shapes", img_size=48, num_samples=2)[1][0].size == (48, 48)
    assert a.sample_id(3) == "shapes/train/3"


def test_shapes_captions_name_shape_colour_and_position():
    ds = build_dataset("shapes", split="val", num_samples=64)
    positions = {p for row in shapes_module._POSITIONS for p in row}
    colours_seen = set()
    for i in range(len(ds)):
        params = ds.params(i)
        caption = ds.caption(i)
        assert SHAPE_CLASSES[ds.targets[i]] in caption
        assert params.colour in caption and params.colour in PALETTE
        assert caption.endswith(params.position) and params.position in positions
        assert caption.startswith("an " if caption.split()[1][0] in "aeiou" else "a ")
        colours_seen.add(params.colour)
    assert len(colours_seen) >= 6
    # A shape centred in the top-left cell is captioned as such.
    p = ds.params(0)
    assert shapes_module.ShapeParams(**{**p.__dict__, "cx": 3.0, "cy": 4.0}).position == "in the top left"
    caps = build_dataset("shapes_captions", split="val", num_samples=64)
    assert caps.targets == [ds.caption(i) for i in range(64)]
    assert caps.labels == ds.targets and caps.classes == ds.classes
    assert np.array_equal(np.asarray(caps[9][0]), np.asarray(ds[9][0]))
    assert isinstance(caps[9][1], str)


def test_shapes_background_does_not_reveal_the_class():
    """A nearest-centroid classifier on the background's mean colour and spread stays near chance (1/8)."""
    ds = build_dataset("shapes", num_samples=480, seed=5)
    feats = []
    for i in range(len(ds)):
        img = np.asarray(ds[i][0], dtype=np.float64) / 255.0
        alpha = shapes_module._shape_mask(SHAPE_CLASSES[ds.targets[i]], ds.params(i), ds.img_size)
        bg = img[alpha == 0.0]  # (P, 3) pixels the shape does not touch
        feats.append(np.concatenate([bg.mean(0), bg.std(0)]))
    x, y = np.array(feats), np.array(ds.targets)
    assert x[:, 3:].mean() > 0.03  # textured, not flat
    fit, test = slice(0, 320), slice(320, None)
    centroids = np.stack([x[fit][y[fit] == c].mean(0) for c in range(len(SHAPE_CLASSES))])
    pred = ((x[test][:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == y[test]).mean() < 0.3


# -------------------------------------------------------------------------------------------- image-text


def test_image_text_csv_resolves_paths_and_names_bad_rows(tmp_path: Path, caplog):
    _save(tmp_path / "imgs" / "a.png", (10, 200, 10))
    _save(tmp_path / "imgs" / "b.png", (200, 10, 10))
    _truncated_png(tmp_path / "imgs" / "c.png")
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text(
        "filepath,title\nimgs/a.png,a green square\nimgs/b.png,\nimgs/c.png,broken\nimgs/missing.png,gone\n"
    )
    with caplog.at_level(logging.WARNING, logger="vitssl.data.image_text"):
        ds = build_dataset("image_text_csv", root=csv_path)
    assert "1 of 4 samples" in caplog.text and "row 3: empty caption" in caplog.text
    assert len(ds) == 4 and ds.classes == []
    img, caption = ds[0]
    assert caption == "a green square" and img.getpixel((0, 0)) == (10, 200, 10)
    assert ds.sample_id(0) == str(tmp_path / "imgs" / "a.png")
    with pytest.raises(CorruptImageError, match=r"pairs\.csv row 3: empty caption.*skip_corrupt"):
        ds[1]
    with pytest.raises(CorruptImageError, match=r"c\.png.*row 4"):
        ds[2]
    with pytest.raises(CorruptImageError, match=r"not found.*missing\.png"):
        ds[3]
    tds = TransformedDataset(ds, SingleView(eval_transform(8, resize_ratio=1.0)), seed=0, skip_corrupt=True)
    batch, skipped = collate_skip_none([tds[i] for i in range(4)])
    assert skipped == 3 and batch[0].shape == (1, 3, 8, 8) and list(batch[1]) == ["a green square"]


def test_image_text_tsv_columns_delimiter_and_folder_root(tmp_path: Path):
    _save(tmp_path / "x.png", (1, 2, 3))
    (tmp_path / "train.tsv").write_text("caption\timage\nsomething, with a comma\tx.png\n")
    ds = build_dataset("image_text_csv", root=tmp_path, image_column="image", caption_column="caption")
    assert ds.targets == ["something, with a comma"] and ds[0][0].size == (12, 10)
    (tmp_path / "semi.csv").write_text("img;txt\nx.png;hello\n")
    assert build_dataset("image_text_csv", root=tmp_path / "semi.csv", image_column="img", caption_column="txt",
                         delimiter=";").targets == ["hello"]  # fmt: skip
    with pytest.raises(ValueError, match=r"no column 'filepath' \(set image_column\).*\['caption', 'image'\]"):
        build_dataset("image_text_csv", root=tmp_path / "train.tsv")
    with pytest.raises(FileNotFoundError, match=r"neither val\.csv nor val\.tsv"):
        build_dataset("image_text_csv", root=tmp_path, split="val")


def test_expand_braces():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/{8..10}") == ["a/8", "a/9", "a/10", "b/8", "b/9", "b/10"]
    assert expand_braces("plain.tar") == ["plain.tar"]


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    folder = tmp_path / "wds"
    folder.mkdir()
    with tarfile.open(folder / "shard-000.tar", "w") as tar:
        _add(tar, "s0/k000.jpg", _png_bytes((250, 0, 0)))  # content sniffed, not the extension
        _add(tar, "s0/k000.txt", b"a red thing")
        _add(tar, "s0/k001.png", _png_bytes((0, 250, 0)))
        _add(tar, "s0/k001.txt", "ein grünes Ding\n".encode())
        _add(tar, "s0/k001.json", b"{}")
    with tarfile.open(folder / "shard-001.tar", "w") as tar:
        _add(tar, "k002.png", _png_bytes((0, 0, 250)))
        _add(tar, "k002.txt", b"   ")
        _add(tar, "k003.png", b"\x89PNG\r\n\x1a\n broken")
        _add(tar, "k003.txt", b"broken image")
        _add(tar, "k004.txt", b"caption only")
    return folder


def test_webdataset_reads_shards_from_brace_pattern_glob_and_folder(shards: Path):
    ds = build_dataset("webdataset", root=str(shards / "shard-{000..001}.tar"))
    assert len(ds) == 5 and ds.classes == []
    assert ds.targets[:2] == ["a red thing", "ein grünes Ding"]
    img, caption = ds[1]
    assert img.mode == "RGB" and img.getpixel((3, 3)) == (0, 250, 0) and caption == "ein grünes Ding"
    assert ds.sample_id(0) == f"{shards / 'shard-000.tar'}:s0/k000"
    assert ds[0][0].getpixel((0, 0)) == (250, 0, 0)
    assert build_dataset("webdataset", root=str(shards / "shard-*.tar")).targets == ds.targets
    assert build_dataset("webdataset", root=shards).keys == ds.keys


def test_webdataset_bad_samples_name_shard_and_key(shards: Path):
    ds = build_dataset("webdataset", root=shards)
    with pytest.raises(CorruptImageError, match=r"shard-001\.tar:k002: empty caption"):
        ds[2]
    with pytest.raises(CorruptImageError, match=r"shard-001\.tar:k003 \(member k003\.png\)"):
        ds[3]
    with pytest.raises(CorruptImageError, match=r"shard-001\.tar:k004: no image member"):
        ds[4]
    tds = TransformedDataset(ds, SingleView(eval_transform(8, resize_ratio=1.0)), seed=0, skip_corrupt=True)
    batch, skipped = collate_skip_none([tds[i] for i in range(len(ds))])
    assert skipped == 3 and batch[0].shape == (2, 3, 8, 8)


def test_webdataset_missing_and_compressed_shards(tmp_path: Path, shards: Path):
    with pytest.raises(FileNotFoundError, match=r"shard-002\.tar.*does not exist"):
        build_dataset("webdataset", root=str(shards / "shard-{000..002}.tar"))
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        build_dataset("webdataset", root=str(tmp_path / "none-*.tar"))
    with tarfile.open(tmp_path / "gz.tar", "w:gz") as tar:
        _add(tar, "k.txt", b"x")
    with pytest.raises(ValueError, match=r"gz\.tar.*must be uncompressed"):
        build_dataset("webdataset", root=tmp_path / "gz.tar")
    with pytest.raises(ValueError, match="needs a root"):
        build_dataset("webdataset")


# ------------------------------------------------------------------------------------- seeding and views


def _views_dataset(num_samples: int = 6) -> TransformedDataset:
    base = build_dataset("shapes", num_samples=num_samples)
    return TransformedDataset(base, MultiView(moco_v3_views(32)), seed=11)


def test_transformed_dataset_same_seed_epoch_index_gives_same_views_in_any_order():
    first = _views_dataset()
    forward = {i: first[i] for i in range(6)}
    second = _views_dataset()
    random.random(), torch.rand(3)  # unrelated use of the global generators must not matter
    for i in reversed(range(6)):
        (v1, v2), label = second[i]
        assert torch.equal(v1, forward[i][0][0]) and torch.equal(v2, forward[i][0][1]) and label == forward[i][1]
    assert not torch.equal(forward[0][0][0], forward[0][0][1])  # two views of one image differ
    second.set_epoch(1)
    assert not torch.equal(second[0][0][0], forward[0][0][0])
    second.set_epoch(0)
    assert torch.equal(second[0][0][0], forward[0][0][0])
    assert second.classes == list(SHAPE_CLASSES) and second.sample_id(2) == "shapes/train/2"  # delegated


def test_transformed_dataset_restores_global_rng_state():
    tds = _views_dataset()
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    expected = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    tds[0]
    assert torch.equal(torch.rand(2), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]


def test_transformed_dataset_independent_of_worker_count():
    tds = _views_dataset(num_samples=8)
    tds.set_epoch(3)

    def collect(workers: int) -> torch.Tensor:
        loader = DataLoader(tds, batch_size=4, num_workers=workers, collate_fn=collate_skip_none)
        return torch.cat([batch[0][0][1] for batch, _ in loader])

    assert torch.equal(collect(0), collect(2))


def test_collate_skip_none_and_multiview():
    assert collate_skip_none([None, None]) == (None, 2)
    batch, skipped = collate_skip_none([(torch.ones(2), 1), None, (torch.zeros(2), 0)])
    assert skipped == 1 and batch[0].shape == (2, 2) and batch[1].tolist() == [1, 0]
    img = Image.new("RGB", (4, 4), (1, 2, 3))
    views, target = MultiView([lambda x: x.size, lambda x: x.mode, lambda x: x.getpixel((0, 0))])(img, 5)
    assert views == [(4, 4), "RGB", (1, 2, 3)] and target == 5
    with pytest.raises(ValueError, match="at least one transform"):
        MultiView([])


# ------------------------------------------------------------------------------------------- transforms


def test_moco_views_are_asymmetric_solarize_only_on_view_two():
    img = Image.new("RGB", (32, 32), (200, 40, 130))
    only = dict(crop_scale=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0), flip=False)
    v1, v2 = moco_v3_views(32, solarize_p=(0.0, 1.0), mean=(0, 0, 0), std=(1, 1, 1), **only)
    x1, x2 = v1(img), v2(img)
    assert torch.allclose(x1[:, 0, 0], torch.tensor([200, 40, 130]) / 255.0)
    assert torch.allclose(x2[:, 0, 0], torch.tensor([255 - 200, 40, 255 - 130]) / 255.0)  # >= 128 inverted
    # The default recipe: blur always on view 1 and rarely on view 2, solarize on view 2 only.
    d1, d2 = moco_v3_views(224)
    names1, names2 = [type(t).__name__ for t in d1.transforms], [type(t).__name__ for t in d2.transforms]
    assert "RandomSolarize" not in names1 and "RandomSolarize" in names2
    blur_p = [next(t.p for t in v.transforms if type(t).__name__ == "RandomApply" and
                   type(t.transforms[0]).__name__ == "GaussianBlur") for v in (d1, d2)]  # fmt: skip
    assert blur_p == [1.0, 0.1]
    assert next(t for t in d2.transforms if type(t).__name__ == "RandomSolarize").p == 0.2
    with pytest.raises(ValueError, match="solarize_p needs one probability per view"):
        moco_v3_views(32, solarize_p=(0.2,))
    with pytest.raises(ValueError, match="crop_scale"):
        moco_v3_views(32, crop_scale=(0.5, 0.2))


def test_moco_views_output_shape_and_blur_kernel():
    img = Image.new("RGB", (40, 30), (90, 90, 90))
    torch.manual_seed(0)
    out = [v(img) for v in moco_v3_views(32)]
    assert all(o.shape == (3, 32, 32) for o in out)
    assert [blur_kernel_size(s) for s in (8, 16, 32, 64, 96, 224)] == [3, 3, 3, 7, 11, 23]


def test_eval_transform_resize_crop_normalise():
    tf = eval_transform(224)
    assert tf.transforms[0].size == 256 and tf.transforms[1].size == (224, 224)
    x = eval_transform(16, resize_ratio=1.0)(Image.new("RGB", (40, 20), (255, 0, 0)))
    assert x.shape == (3, 16, 16)
    expected = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[:, 8, 8], expected, atol=1e-6)
    with pytest.raises(ValueError, match="resize_ratio must be >= 1"):
        eval_transform(32, resize_ratio=0.5)
