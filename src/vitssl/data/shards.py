"""Streaming image–text WebDataset shards: read sequentially, split across ranks and loader workers, exact resume.

``webdataset_stream`` is the input path for web-scale corpora (img2dataset output: ``<key>.jpg`` + ``<key>.txt``
+ ``<key>.json`` in uncompressed tars). Nothing is opened when the dataset is built: the shard pattern is expanded
and the first shard checked, so start-up time and memory do not depend on the corpus size. Reading uses the
``webdataset`` library (tar streaming, grouping of members by key, the shuffle buffer).

Order. Rank ``r`` and loader worker ``w`` (of ``W``) form one of ``S = world x W`` *slots*, ``slot = r * W + w``.
In epoch ``e`` every slot draws the same permutation of the shards from ``(seed, e)`` and takes every ``S``-th
one starting at its own index (when its shards run out, it continues with the next permutation, from
``(seed, e, cycle)``); with ``resampled=True`` each slot draws shards with replacement from ``(seed, e, slot)``
instead (open_clip's ``--dataset-resampled``). A slot reads its shards one after the other through a shuffle
buffer seeded from ``(seed, e, slot)``. An epoch is ``num_samples`` samples over all ranks (open_clip's
``--train-num-samples``), not a pass over the shards.

Exact resume. The engine asks each rank for whole batches of ``batch_size`` stream items; PyTorch's DataLoader
takes batch ``i`` of an iterator from worker ``i mod W``, so after ``b`` batches of an epoch the slot of worker
``w`` has given ``len(range(w, b, W))`` batches. A resumed run recreates each slot's stream for the epoch and
fast-forwards it by that many items without decoding them (the tar members of the worker's part of the epoch so
far are read again; nothing is decoded or transformed), then continues exactly where the interrupted run was.
Augmentations are seeded per item from ``(seed, epoch, position in the slot's stream, slot)``.

Corrupt data. An undecodable image, a sample without image member, a missing or empty caption, and a truncated
or unreadable shard raise :class:`CorruptImageError` naming shard and key; with ``skip_corrupt`` the item becomes
``None`` (counted by :func:`collate_skip_none`, so the engine reports it) and a warning names it.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
from collections.abc import Callable, Iterator
from itertools import count, islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from vitssl.data.common import DATASETS, IMG_EXTENSIONS, SKIP_HINT, CorruptImageError, open_rgb
from vitssl.data.wrappers import sample_seed
from vitssl.errors import DataError, MissingFileError

_logger = logging.getLogger(__name__)

SIZES_FILE = "sizes.json"  # open_clip's optional {shard name: sample count} file next to the shards
_NUM_SAMPLES_HINT = (
    "set data.train.kwargs.num_samples to the samples per epoch (open_clip's --train-num-samples; "
    "e.g. the sum of img2dataset's *_stats.json 'successes'), or put a sizes.json next to the shards"
)


def list_shards(root: str | os.PathLike, split: str = "train") -> list[str]:
    """Shard paths of a brace pattern (``/data/{00000..01242}.tar``), a glob, ``a.tar::b.tar``, one tar or a folder.

    Only a folder or a glob lists a directory; a brace pattern is expanded without touching the file system (a
    missing shard is reported, by name, when it is read), so this costs the same for 10 or 40,000 shards.

    Args:
        root: the pattern or folder (``~`` and environment variables are expanded).
        split: sub-folder of a folder root that has one.

    Raises:
        MissingFileError: nothing matches, or the first shard does not exist.
    """
    from webdataset.shardlists import expand_urls

    text = os.path.expandvars(os.path.expanduser(str(root)))
    if Path(text).is_dir():
        folder = Path(text) / split if (Path(text) / split).is_dir() else Path(text)
        shards = sorted(str(p) for p in folder.glob("*.tar"))
        if not shards:
            raise MissingFileError(f"webdataset_stream: folder {str(folder)!r} holds no .tar shards")
        return shards
    shards = []
    for url in expand_urls(text):
        if glob.has_magic(url):
            hits = sorted(glob.glob(url))
            if not hits:
                raise MissingFileError(f"webdataset_stream: no shard matches {url!r} (from data root {str(root)!r})")
            shards += hits
        else:
            shards.append(url)
    if "://" not in shards[0] and not shards[0].startswith("pipe:") and not Path(shards[0]).is_file():
        raise MissingFileError(
            f"webdataset_stream: shard {shards[0]!r} (from data root {str(root)!r}) does not exist; point "
            "data.train.root at the shards, e.g. /data/cc12m/{00000..01242}.tar"
        )
    return shards


def _sizes_total(shards: list[str]) -> int | None:
    """Samples of all shards from a ``sizes.json`` beside the first one (open_clip's convention), if there is one."""
    path = Path(shards[0]).parent / SIZES_FILE
    if not path.is_file():
        return None
    try:
        sizes = json.loads(path.read_text())
        return int(sum(int(sizes[Path(s).name]) for s in shards))
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"webdataset_stream: {path} does not give the size of every shard ({err!r})") from None


def shard_order(
    num_shards: int, seed: int, epoch: int, slot: int, num_slots: int, resampled: bool = False
) -> Iterator[int]:
    """The endless sequence of shard indices one slot reads in one epoch (see the module docstring).

    Args:
        num_shards: shards in the corpus.
        seed: the run's seed.
        epoch: the epoch.
        slot: ``rank * workers + worker``.
        num_slots: ``world_size * workers``.
        resampled: draw shards with replacement instead of passes over permutations.
    """
    if resampled:
        rng = np.random.default_rng([seed, epoch, slot, 1])
        while True:
            yield int(rng.integers(num_shards))
    for cycle in count():
        perm = np.random.default_rng([seed, epoch, cycle]).permutation(num_shards)
        yield from (int(i) for i in perm[slot::num_slots])


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _ShardReader:
    """Tar members grouped into samples (``webdataset.tarfile_to_samples``), with read errors turned into markers.

    A shard that cannot be read to its end (truncated, not a tar, missing) does not stop the stream: the error
    becomes a sample ``{"__error__": why}`` at the place it happened, so where it lands is as reproducible as the
    samples around it.
    """

    def __init__(self, shards: list[str], order: Iterator[int]) -> None:
        self.shards = shards
        self.order = order
        self.current = ""
        self.errors: list[tuple[str, str]] = []  # (shard, why) not yet reported

    def _urls(self) -> Iterator[dict[str, Any]]:
        for index in self.order:
            self.current = self.shards[index]
            yield {"url": self.current}

    def _handler(self, exn: Exception) -> bool:
        why = str(exn.args[0]).split(" @ ")[0] if exn.args else ""
        self.errors.append((self.current, f"{type(exn).__name__}: {why}" if why else type(exn).__name__))
        return True  # go on with the next shard; the marker reports it

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import tarfile_samples

        for sample in tarfile_samples(self._urls(), handler=self._handler):
            yield from self._markers()
            yield sample
        yield from self._markers()

    def _markers(self) -> Iterator[dict[str, Any]]:
        while self.errors:
            url, why = self.errors.pop(0)
            yield {"__error__": why, "__url__": url, "__key__": "(shard)"}


class _Seeded:
    """Run a function with torch, ``random`` and numpy's global generator seeded.

    In the training process the generators are restored afterwards (they drive dropout and masks, and are saved
    in checkpoints); a loader worker's generators serve nothing else, so there they are only seeded. Only the CPU
    generator of torch is seeded: ``torch.manual_seed`` also queues a seed for every CUDA device, which took
    1.6 ms a call here (a sample's whole augmentation takes a few).
    """

    def __init__(self, value: int, restore: bool) -> None:
        self.value, self.restore = value, restore

    def __call__(self, fn: Callable[[], Any]) -> Any:
        if not self.restore:
            torch.default_generator.manual_seed(self.value)
            random.seed(self.value)
            np.random.seed(self.value & 0xFFFF_FFFF)
            return fn()
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.value)
            random.seed(self.value)
            np.random.seed(self.value & 0xFFFF_FFFF)
            try:
                return fn()
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


@DATASETS.register("webdataset_stream")
class ShardStream(IterableDataset):
    """Image–caption WebDataset shards, streamed (see the module docstring); the engine drives it.

    Built from the config like any dataset (``data.train.name=webdataset_stream``); the engine then calls
    :meth:`bind` once and :meth:`set_epoch` before each epoch, and iterates it through a DataLoader whose
    ``batch_size`` is the one given to :meth:`set_epoch`. Items are ``sample_fn(image, caption)``, or None for a
    skipped corrupt sample.

    Args:
        root: shard pattern (``/data/cc12m/{00000..01242}.tar``, a glob, ``a.tar::b.tar``) or a folder of shards.
        split: sub-folder used when ``root`` is a folder that has one.
        num_samples: samples per epoch over all ranks (open_clip's ``--train-num-samples``); default: the total of
            a ``sizes.json`` beside the shards. Evaluation reads every shard once and does not need it.
        resampled: draw shards with replacement for every slot (open_clip's ``--dataset-resampled``) instead of
            passes over a permutation; needed when there are fewer shards than ranks x workers.
        shuffle_buffer: undecoded samples in each worker's shuffle buffer (open_clip: 5000); a worker holds this
            many encoded samples.
        shuffle_initial: samples gathered before the buffer yields its first one (open_clip: 1000).
        image_exts: member extensions accepted as the image, in order of preference.
        caption_ext: member extension of the caption.
    """

    def __init__(
        self,
        root: str | os.PathLike | None,
        split: str = "train",
        num_samples: int | None = None,
        resampled: bool = False,
        shuffle_buffer: int = 1000,
        shuffle_initial: int = 1000,
        image_exts: tuple[str, ...] = tuple(e.lstrip(".") for e in IMG_EXTENSIONS),
        caption_ext: str = "txt",
    ) -> None:
        if root is None or str(root) == "":
            raise DataError(
                "dataset 'webdataset_stream' needs a root: set data.train.root to a shard pattern such as "
                "/data/cc12m/{00000..01242}.tar, a glob, or a folder of .tar shards"
            )
        if shuffle_buffer < 1 or shuffle_initial < 0:
            raise DataError(
                f"webdataset_stream: shuffle_buffer={shuffle_buffer} must be >= 1 and shuffle_initial="
                f"{shuffle_initial} >= 0 (1 and 0 keep the shards' own order)"
            )
        self.root = str(root)
        self.shards = list_shards(root, split)
        self.num_samples = int(num_samples) if num_samples is not None else _sizes_total(self.shards)
        if self.num_samples is not None and self.num_samples <= 0:
            raise DataError(f"webdataset_stream: num_samples={num_samples} must be positive")
        self.resampled = bool(resampled)
        self.shuffle_buffer, self.shuffle_initial = int(shuffle_buffer), int(shuffle_initial)
        self.image_exts = tuple(e.lower().lstrip(".") for e in image_exts)
        self.caption_ext = caption_ext.lower().lstrip(".")
        self.classes: list[str] = []
        # set by bind() / set_epoch()
        self.sample_fn: Callable[[Any, Any], Any] | None = None
        self.seed, self.rank, self.world_size, self.skip_corrupt = 0, 0, 1, False
        self.epoch, self.batch_size, self.start_batch, self.num_batches = 0, 1, 0, 0

    def __len__(self) -> int:
        """Samples per epoch over all ranks (0 when not configured)."""
        return self.num_samples or 0

    def __repr__(self) -> str:
        return f"ShardStream({self.root!r}, shards={len(self.shards)}, num_samples={self.num_samples})"

    # ------------------------------------------------------------------------------------------- driving
    def bind(
        self, sample_fn: Callable[[Any, Any], Any], seed: int, rank: int, world_size: int, skip_corrupt: bool
    ) -> None:
        """Fix what stays the same for a run: the per-sample function, the seed and this process's place.

        Raises:
            DataError: ``num_samples`` is unknown.
        """
        if self.num_samples is None:
            raise DataError(f"webdataset_stream {self.root!r}: the epoch length is unknown; {_NUM_SAMPLES_HINT}")
        self.sample_fn, self.seed, self.skip_corrupt = sample_fn, int(seed), bool(skip_corrupt)
        self.rank, self.world_size = int(rank), int(world_size)

    def check_slots(self, num_workers: int) -> None:
        """Fail when plain passes over the shards cannot give every rank x worker a shard of its own.

        Raises:
            DataError: fewer shards than ``world_size x max(1, num_workers)`` without ``resampled``.
        """
        slots = self.world_size * max(1, num_workers)
        if not self.resampled and len(self.shards) < slots:
            raise DataError(
                f"webdataset_stream: {len(self.shards)} shard(s) for {self.world_size} rank(s) x "
                f"{max(1, num_workers)} loader worker(s) = {slots} readers; every reader needs a shard of its own: "
                "lower data.num_workers, split the data into more shards, or set data.train.kwargs.resampled=true"
            )

    def set_epoch(self, epoch: int, batch_size: int, num_batches: int, start_batch: int = 0) -> None:
        """Select the stream of ``epoch`` on this rank: ``num_batches`` batches, the first ``start_batch`` of
        which were consumed already (resuming mid-epoch)."""
        if not 0 <= start_batch <= num_batches:
            raise ValueError(f"start_batch {start_batch} outside 0..{num_batches}")
        self.epoch, self.batch_size = int(epoch), int(batch_size)
        self.num_batches, self.start_batch = int(num_batches), int(start_batch)

    @staticmethod
    def worker_batches(num_batches: int, num_workers: int) -> list[int]:
        """Batches each worker gives when ``num_batches`` are taken round-robin (what a checkpoint records)."""
        workers = max(1, num_workers)
        return [len(range(w, num_batches, workers)) for w in range(workers)]

    # ------------------------------------------------------------------------------------------- reading
    def _decode(self, sample: dict[str, Any]) -> tuple[Any, str]:
        """``(RGB image, caption)`` of a grouped sample; CorruptImageError naming shard and key otherwise."""
        name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        if "__error__" in sample:
            raise CorruptImageError(
                f"webdataset shard {sample.get('__url__')} is truncated or unreadable ({sample['__error__']}) "
                f"({SKIP_HINT})"
            )
        ext = next((e for e in self.image_exts if e in sample), None)
        members = ", ".join(sorted(k for k in sample if not k.startswith("__")))
        if ext is None:
            raise CorruptImageError(f"webdataset sample {name}: no image member; members: {members} ({SKIP_HINT})")
        raw = sample.get(self.caption_ext)
        if raw is None:
            raise CorruptImageError(f"webdataset sample {name}: no .{self.caption_ext} caption member ({SKIP_HINT})")
        caption = raw.decode("utf-8", errors="replace").strip()
        if not caption:
            raise CorruptImageError(f"webdataset sample {name}: empty caption ({SKIP_HINT})")
        return open_rgb(io.BytesIO(sample[ext]), name=f"{name} (member {sample['__key__']}.{ext})"), caption

    def _item(self, sample: dict[str, Any], fn: Callable[[Any, Any], Any], skip_corrupt: bool) -> Any:
        try:
            image, caption = self._decode(sample)
        except CorruptImageError as exc:
            if not skip_corrupt:
                raise
            _logger.warning("skipping corrupt sample: %s", str(exc).replace(f" ({SKIP_HINT})", ""))
            return None
        return fn(image, caption)

    def slot_stream(self, slot: int, num_slots: int) -> Iterator[dict[str, Any]]:
        """The undecoded samples of one slot in this epoch, shuffled, endless."""
        from webdataset.filters import _shuffle

        order = shard_order(len(self.shards), self.seed, self.epoch, slot, num_slots, self.resampled)
        rng = random.Random(sample_seed(self.seed, self.epoch, 1_000_003 + slot))
        samples = iter(_ShardReader(self.shards, order))
        if self.shuffle_buffer <= 1:
            return samples
        return _shuffle(samples, bufsize=self.shuffle_buffer, initial=self.shuffle_initial, rng=rng)

    def __iter__(self) -> Iterator[Any]:
        if self.sample_fn is None:
            raise RuntimeError("ShardStream.bind() must be called before iterating (the engine does it)")
        worker, workers = _worker()
        # The first batch of this iterator comes from worker 0; it continues the round-robin at start_batch.
        role = (worker + self.start_batch) % workers
        slot, num_slots = self.rank * workers + role, self.world_size * workers
        done = len(range(role, self.start_batch, workers)) * self.batch_size
        todo = len(range(role, self.num_batches, workers)) * self.batch_size - done
        fn = self.sample_fn
        stream = islice(self.slot_stream(slot, num_slots), done, done + todo)  # fast-forward: nothing decoded
        in_worker = get_worker_info() is not None
        for position, sample in enumerate(stream, start=done):
            seeded = _Seeded(sample_seed(self.seed, self.epoch, position * num_slots + slot), restore=not in_worker)
            yield seeded(lambda s=sample: self._item(s, fn, self.skip_corrupt))

    # ---------------------------------------------------------------------------------------- evaluation
    def eval_items(self, sample_fn: Callable[[Any, Any], Any], skip_corrupt: bool) -> _EvalItems:
        """Every sample once, in shard order, split over ranks and workers, for feature extraction."""
        return _EvalItems(self, sample_fn, skip_corrupt)


class _EvalItems(IterableDataset):
    """Items ``(sample_fn(image, caption)[0], (shard index, position in shard, "shard:key"))`` of a rank's shards.

    Rank ``r`` of ``R`` with worker ``w`` of ``W`` reads shards ``r * W + w, ... + R * W`` once, in order; a skipped
    corrupt sample is None (its place is not needed: the ids of the samples read are returned).
    """

    def __init__(self, stream: ShardStream, sample_fn: Callable[[Any, Any], Any], skip_corrupt: bool) -> None:
        from vitssl import distributed as dist

        self.stream, self.sample_fn, self.skip_corrupt = stream, sample_fn, skip_corrupt
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def _first(self, image: Any, caption: str) -> Any:
        return self.sample_fn(image, caption)[0]

    def __iter__(self) -> Iterator[Any]:
        worker, workers = _worker()
        slot, num_slots = self.rank * workers + worker, self.world_size * workers
        shards = self.stream.shards
        mine = list(range(slot, len(shards), num_slots))
        reader = _ShardReader(shards, iter(mine))
        index_of = {shards[i]: i for i in mine}
        position: dict[str, int] = {}
        fn = self._first
        for sample in reader:
            url = str(sample.get("__url__"))
            index = index_of.get(url, -1)
            pos = position.get(url, 0)
            position[url] = pos + 1
            item = self.stream._item(sample, fn, self.skip_corrupt)
            if item is not None:
                yield item, (index, pos, f"{url}:{sample.get('__key__')}")
            else:
                yield None


def is_stream(dataset: Any) -> bool:
    """Whether ``dataset`` is a streamed shard set (driven with bind/set_epoch, read with eval_items)."""
    return isinstance(dataset, ShardStream)


def write_shards(
    folder: str | os.PathLike,
    samples: Iterator[tuple[str, bytes, str, dict[str, Any]]],
    per_shard: int,
    pattern: str = "{:05d}.tar",
) -> list[Path]:
    """Write samples as img2dataset does (``<key>.jpg`` + ``<key>.txt`` + ``<key>.json``), ``per_shard`` a tar.

    Each tar is written through ``vitssl.io.atomic_open``, so a crash never leaves a half-written shard.

    Args:
        folder: where the shards go (created).
        samples: ``(key, JPEG bytes, caption, metadata)`` tuples.
        per_shard: samples per tar.
        pattern: shard file name, formatted with the shard number.

    Returns:
        The shard paths, in order.
    """
    from webdataset import TarWriter

    from vitssl.io import atomic_open

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    samples = iter(samples)
    while True:
        chunk = list(islice(samples, per_shard))
        if not chunk:
            return paths
        path = folder / pattern.format(len(paths))
        with atomic_open(path, "wb") as f:
            writer = TarWriter(f)
            for key, jpg, caption, meta in chunk:
                writer.write({"__key__": key, "jpg": jpg, "txt": caption.encode("utf-8"), "json": meta})
            writer.close()
        paths.append(path)


def shapes_samples(num_samples: int, img_size: int = 32, seed: int = 0) -> Iterator[tuple[str, bytes, str, dict]]:
    """Generated captioned shapes as ``(key, JPEG bytes, caption, metadata)``: test and benchmark corpora."""
    from vitssl.data.shapes import ShapesCaptions

    data = ShapesCaptions(split="train", num_samples=num_samples, img_size=img_size, seed=seed)
    for index in range(num_samples):
        image, caption = data[index]
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        yield f"{index:09d}", buffer.getvalue(), caption, {"key": f"{index:09d}", "caption": caption}


__all__ = ["SIZES_FILE", "ShardStream", "is_stream", "list_shards", "shapes_samples", "shard_order", "write_shards"]
