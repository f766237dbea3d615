"""Streamed WebDataset shards: shard order, splitting, exact resume (2 ranks x 2 workers, SIGKILL), corrupt data."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vitssl.config import ConfigError, load_config
from vitssl.data import CorruptImageError, build_dataset, collate_skip_none
from vitssl.data.shards import ShardStream, list_shards, shapes_samples, shard_order, write_shards
from vitssl.engine import load_checkpoint, train
from vitssl.engine.checkpoint import LAST_NAME
from vitssl.errors import DataError, MissingFileError

# A CLIP run of seconds: test_vit towers on 32 px captioned shapes, 64 samples an epoch in batches of 8.
RECIPE = """
seed: 0
model: {backbone: test_vit}
objective: {name: clip, embed_dim: 16, text_width: 16, text_depth: 1, text_heads: 2, context_length: 16}
data:
  train: {name: webdataset_stream, root: ROOT, kwargs: {num_samples: 64, shuffle_buffer: 12, shuffle_initial: 6}}
  img_size: 32
  num_workers: 2
train: {epochs: 2, batch_size: 8, checkpoint_every_steps: 3, log_every_steps: 1, keep_last: 2}
optim: {name: adamw, lr: 1.0e-3, lr_scaling: none, weight_decay: 0.05}
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 shards of 12 generated samples (96 in all), as img2dataset writes them."""
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, shapes_samples(96, img_size=16), per_shard=12)
    return folder


def _recipe(folder: Path, root: Path) -> Path:
    path = folder / "recipe.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(RECIPE.replace("ROOT", str(root)))
    return path


def _losses(out: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def _captions(ds: ShardStream, epoch: int, batches: int, start: int = 0, workers: int = 2) -> list[str]:
    ds.set_epoch(epoch, 4, batches, start_batch=start)
    loader = DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate_skip_none)
    return [c for batch, _ in loader for c in batch[1]]


def _caption_fn(image, caption):
    return torch.tensor(image.size), caption


# ------------------------------------------------------------------------------------------ order and split


def test_shard_order_covers_every_shard_once_per_pass_and_depends_on_seed_and_epoch():
    slots = 4
    first = [list(_take(shard_order(10, 0, 0, s, slots), 3 if s < 2 else 2)) for s in range(slots)]
    assert sorted(i for part in first for i in part) == list(range(10))  # one pass, split over the slots
    again = [list(_take(shard_order(10, 0, 0, s, slots), 3 if s < 2 else 2)) for s in range(slots)]
    assert again == first
    assert [list(_take(shard_order(10, 0, 1, s, slots), 2)) for s in range(slots)] != [p[:2] for p in first]
    assert list(_take(shard_order(10, 1, 0, 0, slots), 3)) != first[0]
    resampled = list(_take(shard_order(3, 0, 0, 0, 4, resampled=True), 30))
    assert resampled == list(_take(shard_order(3, 0, 0, 0, 4, resampled=True), 30)) and set(resampled) == {0, 1, 2}


def _take(it, n):
    for _, value in zip(range(n), it, strict=False):
        yield value


def test_building_touches_only_the_first_shard(tmp_path: Path, corpus: Path):
    """A pattern naming 100,000 shards builds at once; a missing one is named when it is read."""
    (tmp_path / "00000.tar").write_bytes((corpus / "00000.tar").read_bytes())
    ds = build_dataset("webdataset_stream", root=str(tmp_path / "{00000..99999}.tar"), num_samples=10**6)
    assert len(ds.shards) == 100_000 and len(ds) == 10**6
    with pytest.raises(MissingFileError, match=r"shard '.*none-0\.tar' .* does not exist"):
        build_dataset("webdataset_stream", root=str(tmp_path / "none-{0..3}.tar"))
    with pytest.raises(MissingFileError, match="no shard matches"):
        list_shards(tmp_path / "none-*.tar")
    assert list_shards(corpus) == sorted(str(p) for p in corpus.glob("*.tar"))
    (corpus / "sizes.json").write_text(json.dumps({p.name: 12 for p in corpus.glob("*.tar")}))
    try:
        assert len(build_dataset("webdataset_stream", root=corpus)) == 96  # open_clip's sizes.json
    finally:
        (corpus / "sizes.json").unlink()
    with pytest.raises(DataError, match="num_samples"):
        build_dataset("webdataset_stream", root=corpus).bind(_caption_fn, 0, 0, 1, False)


def test_ranks_read_their_own_stream_and_resume_mid_epoch_in_the_round_robin(corpus: Path):
    parts = []
    for rank in range(2):
        ds = ShardStream(corpus, num_samples=96, shuffle_buffer=8, shuffle_initial=4)
        ds.bind(_caption_fn, seed=3, rank=rank, world_size=2, skip_corrupt=False)
        full = _captions(ds, 0, 6)
        assert _captions(ds, 0, 6, start=3) == full[12:]  # batch 3 was worker 1's: the round-robin continues
        assert _captions(ds, 1, 6) != full
        parts.append(full)
        ds.check_slots(2)
        with pytest.raises(DataError, match=r"8 shard\(s\) for 2 rank\(s\) x 5 loader worker\(s\).*resampled=true"):
            ds.check_slots(5)
    assert len(parts[0]) == len(parts[1]) == 24
    # the 4 readers (2 ranks x 2 workers) of an epoch's first pass read 2 shards each, every shard once
    ds = ShardStream(corpus, num_samples=96, shuffle_buffer=1)
    ds.bind(_caption_fn, seed=3, rank=0, world_size=2, skip_corrupt=False)
    read = [{s["__url__"] for s in islice(ds.slot_stream(slot, 4), 24)} for slot in range(4)]
    assert all(len(r) == 2 for r in read) and set().union(*read) == set(list_shards(corpus))


# ------------------------------------------------------------------------------------------- corrupt data


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def bad_corpus(tmp_path: Path, corpus: Path) -> Path:
    """A good shard, a shard with an undecodable image, an empty caption and a caption-less image, and a
    truncated shard."""
    folder = tmp_path / "bad"
    folder.mkdir()
    good = corpus / "00000.tar"
    (folder / "a.tar").write_bytes(good.read_bytes())
    jpg = next(iter(shapes_samples(1, img_size=16)))[1]
    with tarfile.open(folder / "b.tar", "w") as tar:
        _add(tar, "k1.jpg", b"\xff\xd8 not a jpeg")
        _add(tar, "k1.txt", b"broken image")
        _add(tar, "k2.jpg", jpg)
        _add(tar, "k2.txt", b"  ")
        _add(tar, "k3.jpg", jpg)
        _add(tar, "k4.jpg", jpg)
        _add(tar, "k4.txt", b"fine")
    data = (corpus / "00001.tar").read_bytes()
    (folder / "c.tar").write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    return folder


def test_corrupt_members_are_named_or_skipped_and_counted(bad_corpus: Path):
    ds = ShardStream(bad_corpus, num_samples=24, shuffle_buffer=1, shuffle_initial=0)
    ds.bind(_caption_fn, seed=0, rank=0, world_size=1, skip_corrupt=True)
    ds.set_epoch(0, 25, 1)
    items = list(ds)  # one reader: a.tar, b.tar, c.tar in the order of (seed 0, epoch 0), then the next pass
    first_pass = items[: 12 + 4 + 7]  # 12 good, 4 in b.tar (3 bad), c.tar: 6 whole samples + truncation
    assert sum(i is None for i in first_pass) >= 4 and sum(i is not None for i in first_pass) >= 12
    ds.skip_corrupt = False
    with pytest.raises(CorruptImageError, match=r"b\.tar:k1 \(member k1\.jpg\)|c\.tar is truncated"):
        list(ds)
    messages = []
    for sample in islice(ds.slot_stream(0, 1), 23):
        try:
            ds._decode(sample)
        except CorruptImageError as err:
            messages.append(str(err))
    text = "\n".join(messages)
    assert "b.tar:k1 (member k1.jpg)" in text and "b.tar:k2: empty caption" in text
    assert "b.tar:k3: no .txt caption member" in text
    assert re.search(r"shard .*c\.tar is truncated or unreadable \(ReadError", text)


# ------------------------------------------------------------------------------------------- exact resume


def _pretrain(recipe: str, out: Path) -> subprocess.Popen:
    """``vitssl pretrain`` in 2 local ranks (each with 2 loader workers), in a session of its own."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same float reductions in every run
    cmd = [sys.executable, "-m", "vitssl", "pretrain", recipe, f"output_dir={out}", "launch.tasks_per_node=2"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err.decode()[-3000:]


def test_exact_resume_after_sigkill_two_ranks_two_workers(tmp_path: Path, corpus: Path):
    """SIGKILL after a mid-epoch checkpoint, resume: the same losses and bit-identical weights as a run that was
    never interrupted, with 2 ranks x 2 loader workers reading the shards."""
    recipe = str(_recipe(tmp_path, corpus))
    full, killed = tmp_path / "full", tmp_path / "killed"
    _finish(_pretrain(recipe, full))
    proc = _pretrain(recipe, killed)
    try:
        deadline = time.time() + 180
        while not (killed / "checkpoint_00000012.pth").exists():  # mid-epoch 2 (8 steps an epoch)
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher, its ranks and their loader workers, all at once
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "checkpoint_00000015.pth").exists()
    state = load_checkpoint(killed / "checkpoint_00000012.pth")
    assert state["data_stream"] == {
        "epoch": 1,
        "num_workers": 2,
        "batches": 4,
        "samples_by_rank_and_worker": [[8, 8], [8, 8]],
    }
    _finish(_pretrain(recipe, killed))
    assert _losses(killed) == _losses(full)
    weights_full, weights_killed = (load_checkpoint(d / LAST_NAME)["model"] for d in (full, killed))
    for key, value in weights_full.items():
        assert torch.equal(value, weights_killed[key]), key


def test_engine_counts_skipped_members_and_names_them_without_skipping(tmp_path: Path, bad_corpus: Path):
    recipe = str(_recipe(tmp_path, bad_corpus))
    base = [
        f"output_dir={tmp_path / 'run'}",
        "data.num_workers=1",
        "train.epochs=1",
        "data.train.kwargs.num_samples=24",
    ]
    result = train(load_config(recipe, [*base, "data.skip_corrupt=true"]))
    assert result.status == "finished" and result.metrics["skipped_corrupt"] >= 4
    with pytest.raises(
        CorruptImageError,
        match=r"^(cannot decode image .*b\.tar:k1 \(member k1\.jpg\)|webdataset shard .*c\.tar is truncated)",
    ):
        train(load_config(recipe, [f"output_dir={tmp_path / 'strict'}", *base[1:]]))
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        train(load_config(recipe, [f"output_dir={tmp_path / 'x'}", *base[1:3], "data.train.kwargs.num_samples=4"]))
    with pytest.raises(DataError, match=r"3 shard\(s\) for 1 rank\(s\) x 4 loader worker\(s\)"):
        train(load_config(recipe, [f"output_dir={tmp_path / 'y'}", "data.num_workers=4"]))


# ----------------------------------------------------------------------------------- features and indexes


def test_features_and_index_build_stream_the_shards(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture):
    """Every sample once, in (shard, position) order whatever the workers; `vitssl index build` reads it so."""
    from vitssl.cli import main
    from vitssl.eval.features import extract_cached

    recipe = str(_recipe(tmp_path, corpus))
    out = tmp_path / "run"
    train(
        load_config(recipe, [f"output_dir={out}", "data.num_workers=0", "train.epochs=1", "train.stop_after_steps=1"])
    )
    ckpt = out / LAST_NAME
    spec = f"webdataset_stream:root={corpus}"
    one = extract_cached(ckpt, spec, "train", cache_dir=tmp_path / "c0", device="cpu", num_workers=0)
    two = extract_cached(ckpt, spec, "train", cache_dir=tmp_path / "c2", device="cpu", num_workers=2)
    expected = [f"{corpus / f'{s:05d}.tar'}:{s * 12 + i:09d}" for s in range(8) for i in range(12)]
    assert one.sample_ids == two.sample_ids == expected and one.meta["count"] == 96
    np.testing.assert_allclose(one.features, two.features, rtol=1e-5, atol=1e-6)
    assert extract_cached(ckpt, spec, "train", cache_dir=tmp_path / "c2", device="cpu").meta["cache_hit"]

    args = ["index", "build", str(ckpt), "--data", spec, "--split", "train", "--num-workers", "2"]
    assert main([*args, "--out", str(tmp_path / "index"), "--device", "cpu"]) == 0
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["count"] == 96
    assert main([*args, "--out", str(tmp_path / "sharded"), "--shards", "2", "--device", "cpu"]) == 2
    assert "streams its shards" in capsys.readouterr().err
