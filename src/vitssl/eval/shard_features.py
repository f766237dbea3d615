"""Features of a streamed shard corpus (``webdataset_stream``): every sample once, each rank a share of the shards.

The corpus is read as it is stored: rank ``r`` with loader worker ``w`` reads its own shards sequentially (see
:meth:`vitssl.data.shards.ShardStream.eval_items`), nothing is indexed or seeked. The parts are gathered on every
rank and put in (shard, position in shard) order (this one path still gathers: a stream has no row order to
shard by before it is read), so the result does not depend on the number of ranks or
workers. :func:`vitssl.eval.features.extract_cached` uses this for streamed corpora (feature cache, ``vitssl index
build``); rows of such a set are positions in that order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from vitssl import distributed as dist
from vitssl.eval.extract import CorruptSampleError, corrupt_sample_error
from vitssl.eval.gather import RankPart, gather_rows
from vitssl.eval.progress import Progress


@torch.no_grad()
def extract_stream(
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: Any,
    sample_fn: Callable[[Any, Any], Any],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    skip_corrupt: bool = False,
    desc: str = "features",
) -> tuple[np.ndarray, list[str], int]:
    """Embed every sample of a streamed shard corpus once.

    Args:
        feature_fn: maps a transformed batch (B, C_in, H, W) to (B, C) features.
        dataset: a :class:`~vitssl.data.shards.ShardStream`.
        sample_fn: the evaluation transform ``(image, caption) -> (tensor, target)``.
        batch_size: images per forward pass (per rank).
        device: where ``feature_fn`` runs.
        num_workers: data-loading processes per rank (each reads shards of its own).
        skip_corrupt: leave out unreadable samples (counted) instead of failing with their name.
        desc: what the progress display calls the loop.

    Returns:
        ``(features (M, C) float32, M sample ids "shard:key", samples skipped)``, in (shard, position) order.

    Raises:
        CorruptSampleError: a sample cannot be read (without ``skip_corrupt``), or none can.
    """
    from vitssl.data import CorruptImageError, collate_skip_none

    items = dataset.eval_items(sample_fn, skip_corrupt)
    loader = DataLoader(
        items,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_skip_none,
        pin_memory=torch.device(device).type == "cuda",
    )
    world = dist.get_world_size()

    def local() -> RankPart:
        feats: list[np.ndarray] = []
        places: list[np.ndarray] = []
        ids: list[str] = []
        skipped = 0
        try:
            with Progress(len(dataset), desc if world == 1 else f"{desc} [rank 0 of {world}]") as progress:
                for batch, n_skipped in loader:
                    skipped += n_skipped
                    if batch is not None:
                        images, (shard, position, sample_ids) = batch  # (b, C_in, H, W); (b,), (b,), b ids
                        feats.append(feature_fn(images.to(device, non_blocking=True)).float().cpu().numpy())  # (b, C)
                        places.append(np.stack([np.asarray(shard), np.asarray(position)], axis=1))  # (b, 2)
                        ids.extend(sample_ids)
                    progress.update(n_skipped + (len(images) if batch is not None else 0))
        except CorruptImageError as err:
            raise corrupt_sample_error(err) from None
        where = np.concatenate(places) if places else np.zeros((0, 2), dtype=np.int64)
        return RankPart(where, np.concatenate(feats) if feats else None, ids, info=skipped)

    # ordered by shard, then position in it; an unreadable sample on one rank raises on every rank
    gathered = gather_rows(local)
    total_skipped = sum(gathered.infos)
    if gathered.vectors is None:
        raise CorruptSampleError(f"no readable image in the shards of {dataset!r} ({total_skipped} skipped as corrupt)")
    return np.ascontiguousarray(gathered.vectors, dtype=np.float32), list(gathered.extras), total_skipped


__all__ = ["extract_stream"]
