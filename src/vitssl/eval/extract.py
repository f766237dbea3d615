"""The one extraction loop: a checkpoint's features of dataset rows, batch by batch, on this rank.

:func:`embed_batches` yields the features of the rows it is given; the feature stores
(:mod:`vitssl.eval.store`) write them to this rank's shard as they come, with no exchange between ranks.
:func:`extract_rows` (the index builder, the video frame cache) and :func:`extract_features` (the online k-NN
monitor, the demo) return arrays in dataset order on every rank instead: rank ``r`` of ``W`` embeds rows
``r::W`` and the parts are gathered, so their memory grows with the whole dataset on every rank; use a store
for large data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vitssl import distributed as dist
from vitssl.config import ConfigError
from vitssl.errors import UserError
from vitssl.eval.gather import RankPart, gather_rows
from vitssl.eval.progress import Progress

_logger = logging.getLogger(__name__)

# What evaluation commands tell a user whose data holds an unreadable sample (the training fix, a config key,
# does not apply to them).
SKIP_CORRUPT_HINT = "pass --skip-corrupt to leave such samples out (they are counted and logged)"
# Streamed shard corpora (webdataset_stream) are embedded whole, in one job per command.
STREAM_HINT = "embed it whole (no --shard/--shards/--train-only), or read it with the map-style 'webdataset'"


class CorruptSampleError(UserError, RuntimeError):
    """A sample to evaluate cannot be read (undecodable or missing image); the message names it and the option
    that skips such samples."""


def corrupt_sample_error(err: BaseException, hint: str = SKIP_CORRUPT_HINT) -> CorruptSampleError:
    """The data layer's ``CorruptImageError`` with the fix of an evaluation command instead of the training one.

    The data layer's message ends in the config key a training run sets (``data.skip_corrupt=true``); evaluation
    commands take ``--skip-corrupt`` instead. A DataLoader worker re-raises the error with the worker's traceback
    as its message; the original message is its last line.

    Args:
        err: the ``CorruptImageError`` (or any error naming an unreadable sample).
        hint: what the user can do about it.
    """
    from vitssl.data.common import SKIP_HINT

    text = str(err).strip()
    if "Original Traceback" in text:  # re-raised by a DataLoader worker
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split("Error: ", 1)[-1].strip()
    text = text.replace(f" ({SKIP_HINT})", "").replace(SKIP_HINT, "").rstrip(" ;")
    return CorruptSampleError(f"{text}; {hint}" if hint else text)


class _RowItems(Dataset):
    """Items ``(image, row)`` of ``base`` at ``rows`` (``(image, (row, target))`` with ``targets``): the row says
    which items a corrupt-skipping loader returned."""

    def __init__(self, base: Dataset, rows: np.ndarray, targets: bool = False) -> None:
        self.base = base
        self.rows = rows
        self.targets = targets

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        row = int(self.rows[index])
        image, target = self.base[row]
        return image, ((row, target) if self.targets else row)


def _as_is(image: Any, target: Any) -> tuple[Any, Any]:
    """The sample function of datasets whose items are transformed already (picklable for loader workers)."""
    return image, target


@torch.no_grad()
def embed_batches(
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    sample_fn: Callable[[Any, Any], Any] | None,
    rows: np.ndarray,
    batch_size: int,
    device: torch.device | str,
    num_workers: int,
    skip_corrupt: bool,
    progress: Progress,
    keep_targets: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray, list[Any] | None]]:
    """The one extraction loop: features of the dataset ``rows`` given to this process, batch by batch.

    Args:
        feature_fn: maps a transformed batch (B, C_in, H, W) to (B, C) features.
        dataset: map-style items ``(image, target)``.
        sample_fn: the evaluation transform ``(image, target) -> (tensor, target)``; None: items are tensors.
        rows: (M,) int64 dataset rows to embed, in the order wanted.
        batch_size: images per forward pass.
        device: where ``feature_fn`` runs.
        num_workers: data-loading processes.
        skip_corrupt: leave out unreadable items (counted in the progress) instead of failing with their name.
        progress: advanced by every item done or skipped.
        keep_targets: also yield the items' targets.

    Yields:
        ``(features (b, C) float32, rows (b,) int64, targets or None)`` per batch, in the order of ``rows``
        (skipped items missing).

    Raises:
        CorruptSampleError: an item cannot be read (without ``skip_corrupt``).
    """
    from vitssl.data import CorruptImageError, TransformedDataset, collate_skip_none, is_stream

    if is_stream(dataset):
        raise ConfigError(f"{dataset!r} streams its shards: rows cannot be picked from it; {STREAM_HINT}")
    mine = _RowItems(dataset, np.asarray(rows, dtype=np.int64), keep_targets)
    wrapped = TransformedDataset(mine, sample_fn or _as_is, seed=0, skip_corrupt=skip_corrupt)
    pin = torch.device(device).type == "cuda"
    loader = DataLoader(
        wrapped, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skip_none, pin_memory=pin
    )
    try:
        for batch, skipped in loader:
            done = 0
            if batch is not None:
                images, info = batch  # (b, C_in, H, W); rows (b,) or [rows (b,), targets]
                batch_rows = np.asarray(info[0] if keep_targets else info, dtype=np.int64)
                feats = feature_fn(images.to(device, non_blocking=True)).float().cpu().numpy()  # (b, C)
                targets = None
                if keep_targets:
                    targets = info[1].tolist() if isinstance(info[1], torch.Tensor) else list(info[1])
                done = len(batch_rows)
            progress.update(done + skipped)
            if batch is not None:
                yield feats, batch_rows, targets
    except CorruptImageError as err:
        raise corrupt_sample_error(err) from None


def _embed(
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    sample_fn: Callable[[Any, Any], Any] | None,
    rows: Sequence[int] | None,
    batch_size: int,
    device: torch.device | str,
    num_workers: int,
    skip_corrupt: bool,
    desc: str,
    keep_targets: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[Any] | None]:
    """Rank ``r`` of ``W`` embeds ``rows[r::W]``; the parts are gathered on every rank (the in-memory path).

    Returns:
        ``(features (M, C) float32, rows (M,) int64, targets or None)`` in ascending row order; M < len(rows) only
        when corrupt items were skipped.
    """
    n = len(dataset)  # type: ignore[arg-type]
    all_rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(list(rows), dtype=np.int64)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = all_rows[rank::world]
    desc = desc if world == 1 else f"{desc} [rank 0 of {world}]"

    def local() -> RankPart:
        feats: list[np.ndarray] = []
        got: list[np.ndarray] = []
        targets: list[Any] = []
        with Progress(len(mine), desc) as progress:
            for f, r, t in embed_batches(
                feature_fn, dataset, sample_fn, mine, batch_size, device, num_workers, skip_corrupt, progress,
                keep_targets,
            ):  # fmt: skip
                feats.append(f)
                got.append(r)
                if t is not None:
                    targets.extend(t)
        rows_ = np.concatenate(got) if got else np.zeros(0, dtype=np.int64)
        return RankPart(rows_, np.concatenate(feats) if feats else None, targets if keep_targets else [])

    gathered = gather_rows(local)  # an unreadable item on one rank raises on every rank
    if gathered.vectors is None:
        raise CorruptSampleError(f"no readable image among the {len(all_rows)} items to embed (all skipped as corrupt)")
    return (
        np.ascontiguousarray(gathered.vectors, dtype=np.float32),
        gathered.rows,
        gathered.extras if keep_targets else None,
    )


def extract_features(
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``feature_fn`` over a dataset of ``(image tensor, label)`` items (transformed already).

    Rank ``r`` of ``W`` processes items ``r, r + W, ...``; the shards are gathered back, so every rank returns
    features in dataset order.

    Args:
        feature_fn: maps a (B, 3, H, W) batch to (B, C) features (e.g. ``objective.eval_features``).
        dataset: yields ``(tensor, int label)``.
        batch_size: images per forward pass.
        device: where ``feature_fn`` runs.
        num_workers: data-loading processes.
        desc: what the progress display calls the loop.

    Returns:
        ``(features (N, C) float32 on the CPU, labels (N,) int64)``.
    """
    features, _, labels = _embed(
        feature_fn, dataset, None, None, batch_size, device, num_workers, False, desc, keep_targets=True
    )
    return torch.from_numpy(features), torch.as_tensor(labels, dtype=torch.long)


def extract_rows(
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    sample_fn: Callable[[Any, Any], Any],
    rows: Sequence[int] | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    skip_corrupt: bool = False,
    desc: str = "features",
) -> tuple[np.ndarray, np.ndarray]:
    """Features of the items ``rows`` of an untransformed dataset, every rank a shard, gathered on every rank.

    Args:
        feature_fn: maps a transformed batch to (B, C) features.
        dataset: items ``(PIL image, target)``.
        sample_fn: the evaluation transform ``(image, target) -> (tensor, target)``.
        rows: dataset rows to embed, ascending; None = all.
        batch_size: images per forward pass (per rank).
        device: where ``feature_fn`` runs.
        num_workers: data-loading processes per rank.
        skip_corrupt: leave out unreadable items (logged) instead of failing with their name.
        desc: what the progress display calls the loop.

    Returns:
        ``(features (M, C) float32, rows (M,) int64)`` in ascending row order; M < len(rows) only when corrupt
        items were skipped.

    Raises:
        CorruptSampleError: an item cannot be read (without ``skip_corrupt``), or none can.
    """
    features, got, _ = _embed(feature_fn, dataset, sample_fn, rows, batch_size, device, num_workers, skip_corrupt, desc)
    return features, got


__all__ = [
    "SKIP_CORRUPT_HINT",
    "STREAM_HINT",
    "CorruptSampleError",
    "corrupt_sample_error",
    "embed_batches",
    "extract_features",
    "extract_rows",
]
