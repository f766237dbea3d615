"""Per-sample transforms with reproducible randomness, multi-view sample functions and a None-skipping collate."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from vitssl.data.common import SKIP_HINT, CorruptImageError

_logger = logging.getLogger(__name__)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed for one sample of one epoch, well mixed by numpy's SeedSequence (hash-based, no overlap)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0])


class TransformedDataset(Dataset):
    """Applies ``sample_fn(img, target)`` to each item of ``base`` under a seed derived from (seed, epoch, index).

    torch's CPU generator, Python's ``random`` and numpy's global generator are seeded per item and restored
    afterwards, so an item's augmentation depends only on (seed, epoch, index): a resumed run sees the same
    augmentations as the original, whatever the number of DataLoader workers or the order of access.

    The epoch is a plain attribute: call ``set_epoch`` before iterating a DataLoader, and do not use
    ``persistent_workers=True`` (workers would keep their copy of the old epoch).

    Args:
        base: a dataset whose items are ``(img, target)``.
        sample_fn: the per-sample transform, e.g. ``MultiView([...])``; it must use torch, ``random`` or the global
            numpy generator for its randomness.
        seed: the run's data seed (non-negative).
        skip_corrupt: return None (and log a warning naming the file) for items that raise ``CorruptImageError``;
            use ``collate_skip_none`` to drop them from the batch.
    """

    def __init__(
        self, base: Dataset, sample_fn: Callable[[Any, Any], Any], seed: int, skip_corrupt: bool = False
    ) -> None:
        if seed < 0:
            raise ValueError(f"the data seed must be non-negative, got {seed}")
        self.base = base
        self.sample_fn = sample_fn
        self.seed = int(seed)
        self.skip_corrupt = skip_corrupt
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch``."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        # classes, targets, sample_id, ... of the wrapped dataset; only called when normal lookup fails.
        if name == "base":  # not yet set (e.g. during unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, index: int) -> Any:
        value = sample_seed(self.seed, self.epoch, index)
        py_state = random.getstate()
        np_state = np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only (the one fork_rng restores): torch.manual_seed also queues a seed for every
            # lazily initialised device (CUDA, MTIA, ...) with a captured stack trace, ~17 ms an item, a growing
            # queue, and reseeds an initialised GPU's generator without restoring it.
            torch.default_generator.manual_seed(value)
            random.seed(value)
            np.random.seed(value & 0xFFFF_FFFF)  # numpy's legacy global seed is 32-bit
            try:
                # Reading is seeded too: a video dataset draws its clip's frame indices while it reads.
                # The sample function is inside the try too: a lazily opened JPEG is decoded there.
                try:
                    img, target = self.base[index]
                    return self.sample_fn(img, target)
                except CorruptImageError as exc:
                    if not self.skip_corrupt:
                        raise
                    # skipping is on: the hint that says how to turn it on would only be noise here
                    _logger.warning("skipping corrupt sample %d: %s", index, str(exc).replace(f" ({SKIP_HINT})", ""))
                    return None
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def collate_skip_none(samples: Sequence[Any]) -> tuple[Any, int]:
    """Collate the samples that are not None with torch's ``default_collate``.

    Returns:
        ``(batch, n_skipped)``; ``batch`` is None when every sample was None.
    """
    kept = [s for s in samples if s is not None]
    skipped = len(samples) - len(kept)
    return (default_collate(kept) if kept else None), skipped


class MultiView:
    """Sample function giving ``([t1(img), t2(img), ...], target)``: one independently augmented view per transform.

    Args:
        transforms: one transform per view (at least one).
    """

    def __init__(self, transforms: Sequence[Callable[[Any], Any]]) -> None:
        if len(transforms) == 0:
            raise ValueError("MultiView needs at least one transform")
        self.transforms = list(transforms)

    def __call__(self, img: Any, target: Any) -> tuple[list[Any], Any]:
        return [t(img) for t in self.transforms], target

    def __repr__(self) -> str:
        return f"MultiView({self.transforms!r})"


class SingleView:
    """Sample function giving ``(transform(img), target)``, e.g. for evaluation with ``eval_transform``.

    Args:
        transform: the image transform.
    """

    def __init__(self, transform: Callable[[Any], Any]) -> None:
        self.transform = transform

    def __call__(self, img: Any, target: Any) -> tuple[Any, Any]:
        return self.transform(img), target

    def __repr__(self) -> str:
        return f"SingleView({self.transform!r})"
