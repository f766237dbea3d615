"""Linear probe trained through the frozen backbone on augmented images (``vitssl eval linear --finetune-aug``).

The paper protocol of MoCo v3 / MAE linear classification: the backbone is frozen (eval mode, no gradients) and
every epoch recomputes its features of randomly cropped and flipped training images; a BatchNorm without affine
parameters plus a linear layer is trained with SGD (momentum 0.9, weight decay 0) under a per-iteration cosine
schedule. As in :func:`vitssl.eval.linear.train_linear_probe`, an lr sweep trains side by side in one pass (the
heads share every batch), the lr is picked on a stratified held-out part of train, and the chosen head is
reported on val. Held-out and val features use the evaluation transform, so they come from the feature cache.

Augmentation: ``RandomResizedCrop(img_size, scale=(0.08, 1))`` and a horizontal flip on the decoded image,
followed by the checkpoint's own evaluation transform (so normalisation, iGPT's colour handling, ... stay those
of the checkpoint). On an ``img_size`` square that transform is the identity for ratio-1 evaluation transforms
(small images, CLIP, iGPT); the ImageNet-style 256/224 resize keeps the central 87.5% of each random crop.

With several processes each rank embeds its slice of every global batch and the head gradients are averaged
(DDP without SyncBN, as the reference code): the result matches one process up to BatchNorm batch statistics.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from vitssl import distributed as dist
from vitssl.eval.features import Progress
from vitssl.eval.linear import ProbeError, _loss_status
from vitssl.eval.metrics import classification_report

_logger = logging.getLogger(__name__)


class AugmentThenEval:
    """Picklable sample function: random-resized crop + flip on the PIL image, then the evaluation transform.

    Args:
        img_size: crop side in pixels.
        eval_fn: the checkpoint's ``(image, target) -> (tensor, target)`` evaluation transform.
        scale: RandomResizedCrop area range.
    """

    def __init__(self, img_size: int, eval_fn: Callable[[Any, Any], Any], scale: Sequence[float] = (0.08, 1.0)):
        from torchvision import transforms as T

        self.crop = T.RandomResizedCrop(img_size, scale=(float(scale[0]), float(scale[1])))
        self.flip = T.RandomHorizontalFlip()
        self.eval_fn = eval_fn

    def __call__(self, image: Any, target: Any) -> Any:
        return self.eval_fn(self.flip(self.crop(image)), target)

    def __repr__(self) -> str:
        return f"AugmentThenEval({self.crop!r}, {self.flip!r}, {self.eval_fn!r})"


class _Rows(Dataset):
    """Items ``(image, label)`` of ``base`` at ``rows`` with the given labels."""

    def __init__(self, base: Dataset, rows: np.ndarray, labels: np.ndarray) -> None:
        self.base, self.rows, self.labels = base, rows, labels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.base[int(self.rows[index])][0], int(self.labels[index])


def _global_batches(n: int, batch: int, epoch: int, seed: int) -> list[np.ndarray]:
    """Position lists of every full global batch of one epoch (same on every rank)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=gen).numpy()
    return [order[s * batch : (s + 1) * batch] for s in range(n // batch)]


def augmented_linear_probe(
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    train_dataset: Dataset,
    train_labels: np.ndarray,
    train_eval_features: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    num_classes: int,
    sample_fn: Callable[[Any, Any], Any],
    lrs: Sequence[float] | None = None,
    epochs: int = 90,
    batch_size: int = 256,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> dict[str, Any]:
    """Train an lr sweep of BN + linear heads on features of augmented images, recomputed every epoch.

    Args:
        feature_fn: frozen features (B, C) of a transformed batch (e.g. ``EvalModel.feature_fn(layer)``).
        train_dataset: the training items ``(PIL image, target)``, untransformed.
        train_labels: (N,) labels of every training item.
        train_eval_features: (N, C) training features with the evaluation transform (the held-out rows are
            scored on these).
        val_features: (M, C) validation features.
        val_labels: (M,) validation labels.
        num_classes: C.
        sample_fn: the training augmentation ``(image, target) -> (tensor, target)`` (:class:`AugmentThenEval`).
        lrs: learning rates, one head each; None = ``vitssl.eval.linear.default_lrs(batch_size)``.
        epochs: passes over the fitting part.
        batch_size: global rows per step; the last incomplete batch of an epoch is dropped.
        holdout_fraction: stratified share of train used to pick the lr (0 allowed with one lr).
        seed: seed of the split, the head initialisation, the batch order and the augmentation.
        device: where the backbone and the heads run.
        num_workers: data-loading processes per rank.

    Returns:
        The dict of :func:`vitssl.eval.linear.train_linear_probe`, with ``method`` "linear_sgd_aug" and the
        augmentation's description under ``augmentation``.
    """
    from vitssl.data import TransformedDataset
    from vitssl.eval.linear import MultiHeadLinear, _best_head, _sweep_rows, default_lrs, stratified_holdout

    t0 = time.perf_counter()
    labels = np.asarray(train_labels, dtype=np.int64)
    if len(labels) != len(train_dataset) or len(train_eval_features) != len(labels):  # type: ignore[arg-type]
        raise ValueError(
            f"train_labels ({len(labels)}) and train_eval_features ({len(train_eval_features)}) must have one row "
            f"per training item ({len(train_dataset)})"  # type: ignore[arg-type]
        )
    lrs = tuple(float(lr) for lr in (lrs if lrs is not None else default_lrs(batch_size)))
    if not lrs or any(lr <= 0 for lr in lrs):
        raise ValueError(f"lrs must be a non-empty list of positive learning rates, got {list(lrs)}")
    fit_rows, hold_rows = stratified_holdout(labels, holdout_fraction, seed)
    if len(hold_rows) == 0 and len(lrs) > 1:
        raise ProbeError(
            f"holdout_fraction={holdout_fraction} holds out no training rows, so the best of {len(lrs)} lrs cannot "
            "be picked; raise holdout_fraction or pass a single lr"
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = min(batch_size, len(fit_rows))
    if epochs < 1 or batch < 2 * world:  # BatchNorm needs two rows per rank
        raise ProbeError(
            f"need epochs >= 1 and at least 2 rows per batch and process, got {epochs} epochs and {batch} rows for "
            f"{world} process(es); raise the probe batch size"
        )
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    dim = int(train_eval_features.shape[1])
    heads = MultiHeadLinear(dim, num_classes, len(lrs), generator=gen).to(dev)
    optimizer = torch.optim.SGD(
        [{"params": heads.head_params(h), "lr": lr} for h, lr in enumerate(lrs)], momentum=0.9, weight_decay=0.0
    )
    steps_per_epoch = len(fit_rows) // batch
    total = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    data = TransformedDataset(_Rows(train_dataset, fit_rows, labels[fit_rows]), sample_fn, seed=seed)
    diverged = torch.zeros(len(lrs), dtype=torch.bool, device=dev)
    last_loss = torch.zeros(len(lrs), device=dev)
    desc = f"augmented linear probe ({len(lrs)} lrs, {len(fit_rows)} images)"
    with Progress(total, desc, unit="step") as progress:  # on rank 0
        for epoch in range(epochs):
            data.set_epoch(epoch)  # a fresh augmentation of every image each epoch
            mine = [b[rank::world].tolist() for b in _global_batches(len(fit_rows), batch, epoch, seed)]
            loader = DataLoader(data, batch_sampler=mine, num_workers=num_workers)
            heads.train()
            for images, targets in loader:
                with torch.no_grad():
                    feats = feature_fn(images.to(dev)).float()  # (b, C) the frozen backbone
                logits = heads(feats)  # (H, b, K)
                per_head = F.cross_entropy(
                    logits.flatten(0, 1), targets.to(dev).repeat(len(lrs)), reduction="none"
                ).view(len(lrs), -1)  # (H, b)
                loss_h = per_head.mean(dim=1)  # (H,)
                optimizer.zero_grad(set_to_none=True)
                loss_h.sum().backward()  # heads are independent: each gets its own gradient
                if world > 1:
                    for p in heads.parameters():
                        if p.grad is not None:
                            p.grad.copy_(dist.all_reduce_mean(p.grad))
                optimizer.step()
                schedule.step()
                last_loss = dist.all_reduce_mean(loss_h.detach())
                diverged |= ~torch.isfinite(last_loss)
                progress.update(1)
            progress.update(0, f"epoch {epoch + 1}/{epochs}: {_loss_status(last_loss)}" if progress.enabled else None)
            _logger.debug("augmented linear probe: epoch %d/%d, loss per lr %s", epoch + 1, epochs, last_loss.tolist())
    heads.eval()
    with torch.no_grad():
        if len(hold_rows):
            hold = torch.from_numpy(np.ascontiguousarray(train_eval_features[hold_rows])).float().to(dev)
            hold_pred = heads(hold).argmax(dim=2).cpu()  # (H, N_hold)
            hold_acc = (hold_pred == torch.from_numpy(labels[hold_rows])).float().mean(dim=1) * 100  # (H,)
        else:
            hold_acc = torch.full((len(lrs),), float("nan"))
        diverged_cpu = diverged.cpu()
        best = _best_head(diverged_cpu, hold_acc, lrs)
        val = torch.from_numpy(np.ascontiguousarray(val_features)).float().to(dev)
        val_scores = heads(val, best).cpu().numpy()  # (M, K)
    report = classification_report(val_scores, np.asarray(val_labels, dtype=np.int64), num_classes)
    sweep = _sweep_rows(lrs, hold_acc, last_loss, diverged_cpu)
    return {
        "method": "linear_sgd_aug",
        "param": "lr",
        "sweep": sweep,
        "best_value": lrs[best],
        **report,
        "num_fit": len(fit_rows),
        "num_holdout": len(hold_rows),
        "num_val": len(val_labels),
        "num_classes": num_classes,
        "epochs": epochs,
        "batch_size": batch,
        "holdout_fraction": holdout_fraction,
        "seed": seed,
        "augmentation": repr(sample_fn),
        "world_size": world,
        "seconds": time.perf_counter() - t0,
    }


__all__ = ["AugmentThenEval", "augmented_linear_probe", "classification_report"]
