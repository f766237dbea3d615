"""Frozen-feature extraction: every rank a shard, gathered back in dataset order."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from vitssl.engine import distributed as dist

_logger = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``feature_fn`` over a dataset of ``(image tensor, label)`` items.

    Rank ``r`` of ``W`` processes items ``r, r + W, ...``; the shards are gathered and interleaved back, so
    every rank returns features in dataset order.

    Args:
        feature_fn: maps a (B, 3, H, W) batch to (B, C) features (e.g. ``objective.eval_features``).
        dataset: yields ``(tensor, int label)``.
        batch_size: images per forward pass.
        device: where ``feature_fn`` runs.
        num_workers: data-loading processes.

    Returns:
        ``(features (N, C) float32 on the CPU, labels (N,) int64)``.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    shard = Subset(dataset, range(rank, len(dataset), world))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers)
    feats, labels = [], []
    for images, targets in loader:
        feats.append(feature_fn(images.to(device)).float().cpu())  # (b, C)
        labels.append(torch.as_tensor(targets))
    local = (torch.cat(feats), torch.cat(labels))
    if world == 1:
        return local
    shards = dist.all_gather_object(local)
    out_f = torch.empty(len(dataset), shards[0][0].shape[1])
    out_l = torch.empty(len(dataset), dtype=torch.long)
    for r, (f, lab) in enumerate(shards):
        out_f[r::world], out_l[r::world] = f, lab
    return out_f, out_l
