"""Many linear probes in one pass over cached features: learning rates x weight decays x feature variants.

DINOv2's linear evaluation trains a grid of linear heads on frozen features at once and keeps the best: learning
rates, and feature variants built from the last blocks (the class token of the last block or of the last 4,
each with or without the average-pooled patch tokens). Here every head of the grid is trained on the same
batches in one pass: one parameter-free BatchNorm over all feature columns (per column, so it is identical to
one BatchNorm per variant), then per variant one batched matmul for all its heads. SGD with momentum 0.9 and
PyTorch's weight-decay convention (``d_p = grad + wd x w``), a per-iteration cosine from each head's lr to 0, is
written out on the stacked weights so that each head keeps its own lr and wd without one optimizer group per
head. Heads are independent: each one's gradient is its own loss's, a diverged head only loses itself.

Feature variants come from columns of one stored layer (:func:`layer_variants`): the ``lastNavg`` layer holds
N class tokens and the pooled patch tokens, so all four DINOv2 variants are trained from one store.

Data. Features come from an array or a feature store's memory-mapped view (float16 or float32). When the
training rows fit ``resident_bytes`` they are loaded once, in the stored dtype, onto the training device and
batches are drawn uniformly at random each epoch; otherwise they are streamed: each epoch visits blocks of
``block_rows`` consecutive rows in random order and shuffles rows within a block (memory bounded by the block,
batches less random than a full shuffle). The best head is picked on a stratified held-out part of train and
reported on val; every head's held-out and val top-1 are in the table.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vitssl.distributed import resolve_device
from vitssl.eval.linear import ProbeError, stratified_holdout
from vitssl.eval.metrics import classification_report
from vitssl.eval.progress import Progress
from vitssl.eval.store_view import row_blocks

_logger = logging.getLogger(__name__)

DEFAULT_WDS = (0.0,)
# Training rows held on the device at most before the probe streams from the store instead.
DEFAULT_RESIDENT_BYTES = 4 << 30
DEFAULT_BLOCK_ROWS = 65536  # rows read per block when streaming
_EVAL_ROWS = 8192  # rows per forward when scoring
_MOMENTUM = 0.9


def layer_variants(layer: str, dim: int) -> dict[str, np.ndarray]:
    """The feature variants a stored layer offers, as column indices into its (N, dim) features.

    ``lastNavg`` (N class tokens oldest first, then the mean patch token): ``cls1``, ``cls1+avg``, ``clsN``,
    ``clsN+avg``; ``lastN``: ``cls1`` and ``clsN``; any other layer: ``all``.

    Args:
        layer: the stored layer name.
        dim: the stored width.
    """
    match = re.fullmatch(r"last([1-9][0-9]*)(avg)?", layer)
    if not match:
        return {"all": np.arange(dim)}
    n, avg = int(match.group(1)), bool(match.group(2))
    parts = n + int(avg)
    if dim % parts:
        raise ValueError(f"layer {layer} features of width {dim} do not split into {parts} equal parts")
    c = dim // parts
    last = np.arange((n - 1) * c, n * c)
    every = np.arange(n * c)
    pooled = np.arange(n * c, (n + 1) * c)
    out = {"cls1": last}
    if avg:
        out["cls1+avg"] = np.concatenate([last, pooled])
    if n > 1:
        out[f"cls{n}"] = every
        if avg:
            out[f"cls{n}+avg"] = np.concatenate([every, pooled])
    return out


class _Grid:
    """The heads of the grid: per variant a (H_v, C, D_v) weight and (H_v, C) bias, with per-head lr and wd."""

    def __init__(
        self,
        variants: dict[str, np.ndarray],
        lrs: Sequence[float],
        wds: Sequence[float],
        num_classes: int,
        generator: torch.Generator,
        device: torch.device,
    ) -> None:
        self.heads = [(v, lr, wd) for v in variants for lr in lrs for wd in wds]
        self.cols = {v: torch.as_tensor(c, dtype=torch.long, device=device) for v, c in variants.items()}
        # variants that are every column in order read the features as they are, without a gather
        self.whole = {v: bool(np.array_equal(c, np.arange(len(c)))) for v, c in variants.items()}
        self.weight: dict[str, torch.Tensor] = {}
        self.bias: dict[str, torch.Tensor] = {}
        self.base_lr: dict[str, torch.Tensor] = {}
        self.wd: dict[str, torch.Tensor] = {}
        for v, c in variants.items():
            h = len(lrs) * len(wds)
            init = torch.randn(num_classes, len(c), generator=generator) * 0.01  # (C, D_v): normal std 0.01
            self.weight[v] = init.expand(h, -1, -1).clone().to(device).requires_grad_(True)  # (H_v, C, D_v)
            self.bias[v] = torch.zeros(h, num_classes, device=device, requires_grad=True)  # (H_v, C)
            grid = [(lr, wd) for lr in lrs for wd in wds]
            self.base_lr[v] = torch.tensor([g[0] for g in grid], device=device)  # (H_v,)
            self.wd[v] = torch.tensor([g[1] for g in grid], device=device)  # (H_v,)
        self.momentum = {f"w{v}": torch.zeros_like(w) for v, w in self.weight.items()}
        self.momentum.update({f"b{v}": torch.zeros_like(b) for v, b in self.bias.items()})

    def logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per variant the logits of its heads, (B, H_v, C), from normalised features x (B, D): one matmul of
        the variant's columns against all its heads' weights stacked as (H_v x C, D_v)."""
        out = {}
        for v, w in self.weight.items():
            xv = x if len(self.cols[v]) == x.shape[1] and self.whole[v] else x[:, self.cols[v]]
            h, c, d = w.shape
            out[v] = torch.addmm(self.bias[v].view(1, h * c), xv, w.view(h * c, d).T).view(-1, h, c)
        return out

    @torch.no_grad()
    def step(self, scale: float, diverged: dict[str, torch.Tensor]) -> None:
        """One SGD step (momentum 0.9, weight decay on weights and biases as torch.optim.SGD), lr = base x scale."""
        for v in self.weight:
            keep = (~diverged[v]).float()  # a diverged head stops moving (its loss is excluded from the choice)
            lr = (self.base_lr[v] * scale * keep)[:, None]  # (H_v, 1)
            for name, p in ((f"w{v}", self.weight[v]), (f"b{v}", self.bias[v])):
                shape = (-1,) + (1,) * (p.ndim - 1)
                d_p = p.grad + self.wd[v].view(shape) * p
                buf = self.momentum[name]
                buf.mul_(_MOMENTUM).add_(torch.nan_to_num(d_p, nan=0.0, posinf=0.0, neginf=0.0))
                p.sub_(lr.view(shape) * buf)
                p.grad = None


def _resident(features: Any, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Features of ``rows`` (sorted) on the device, in the stored dtype (float16 stays float16)."""
    out = []
    for start in range(0, len(rows), DEFAULT_BLOCK_ROWS):
        part = rows[start : start + DEFAULT_BLOCK_ROWS]
        block = np.asarray(features[part[0] : part[-1] + 1])[part - part[0]]
        out.append(torch.from_numpy(np.ascontiguousarray(block)).to(device))
    return torch.cat(out)  # (n, D)


def _streamed_batches(
    features: Any,
    fit: np.ndarray,
    labels: torch.Tensor,
    batch: int,
    block_rows: int,
    generator: torch.Generator,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of full batches read block by block (blocks in random order, rows shuffled within them)."""
    n = int(features.shape[0])
    in_fit = np.zeros(n, dtype=bool)
    in_fit[fit] = True
    starts = torch.randperm(math.ceil(n / block_rows), generator=generator).tolist()
    carry_x: list[torch.Tensor] = []
    carry_y: list[torch.Tensor] = []
    for b in starts:
        a = b * block_rows
        block = np.asarray(features[a : a + block_rows])
        keep = np.flatnonzero(in_fit[a : a + len(block)])
        if not len(keep):
            continue
        perm = keep[torch.randperm(len(keep), generator=generator).numpy()]
        x = torch.from_numpy(np.ascontiguousarray(block[perm])).to(device).float()  # (m, D)
        y = labels[torch.from_numpy(a + perm).to(labels.device)]
        carry_x.append(x)
        carry_y.append(y)
        xs, ys = torch.cat(carry_x), torch.cat(carry_y)
        full = len(xs) // batch * batch
        for s in range(0, full, batch):
            yield xs[s : s + batch], ys[s : s + batch]
        carry_x, carry_y = [xs[full:]], [ys[full:]]


@torch.no_grad()
def _grid_predictions(
    grid: _Grid, bn: torch.nn.BatchNorm1d, features: Any, rows: np.ndarray, device: torch.device
) -> torch.Tensor:
    """Top-1 class of every head on ``rows`` (sorted), (H, n), read block by block."""
    preds = []
    for start in range(0, len(rows), _EVAL_ROWS):
        part = rows[start : start + _EVAL_ROWS]
        block = np.asarray(features[part[0] : part[-1] + 1])[part - part[0]]
        x = bn(torch.from_numpy(np.ascontiguousarray(block)).to(device).float())  # (b, D)
        preds.append(torch.cat([lg.argmax(dim=2).T for lg in grid.logits(x).values()]).cpu())  # (H, b)
    return torch.cat(preds, dim=1) if preds else torch.zeros((len(grid.heads), 0), dtype=torch.long)


@torch.no_grad()
def _head_scores(grid: _Grid, bn: torch.nn.BatchNorm1d, features: Any, head: int, device: torch.device) -> np.ndarray:
    """Logits (N, C) of one head over all rows of ``features``."""
    variant = grid.heads[head][0]
    index = head - sum(1 for h in grid.heads[:head] if h[0] != variant)
    out = []
    for _, block in row_blocks(features, _EVAL_ROWS):
        x = bn(torch.from_numpy(np.ascontiguousarray(block)).to(device).float())
        xv = x[:, grid.cols[variant]]
        out.append((xv @ grid.weight[variant][index].T + grid.bias[variant][index]).cpu())  # (b, C)
    return torch.cat(out).numpy()


def train_linear_sweep(
    train_features: Any,
    train_labels: np.ndarray | torch.Tensor,
    val_features: Any,
    val_labels: np.ndarray | torch.Tensor,
    num_classes: int,
    lrs: Sequence[float],
    wds: Sequence[float] = DEFAULT_WDS,
    variants: dict[str, np.ndarray] | None = None,
    epochs: int = 100,
    batch_size: int = 1024,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    device: str | torch.device | None = None,
    resident_bytes: int = DEFAULT_RESIDENT_BYTES,
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> dict[str, Any]:
    """Train lrs x wds x variants linear heads in one pass; pick the best on a held-out part of train.

    Args:
        train_features: (N, D) features: array, memory map or a store's ``ShardedRows`` (float16 or float32).
        train_labels: (N,) labels in [0, num_classes).
        val_features: (M, D) features.
        val_labels: (M,) labels.
        num_classes: C.
        lrs: learning rates.
        wds: weight decays.
        variants: name -> feature columns (:func:`layer_variants`); None = every column as one variant "all".
        epochs: passes over the training part.
        batch_size: rows per step (the last incomplete batch of an epoch is dropped).
        holdout_fraction: stratified share of train used to pick the head.
        seed: seed of the split, the initial weights and the batch order.
        device: where to train; None = CUDA when available.
        resident_bytes: hold the training rows on the device when they take at most this; else stream them.
        block_rows: rows per block when streaming.

    Returns:
        dict: ``method`` "linear_sweep", ``table`` (per head: ``variant``, ``lr``, ``wd``, ``holdout_top1``,
        ``val_top1``, ``final_loss``, ``diverged``), ``best`` (the chosen head's row), ``top1``, ``top5``,
        ``mean_per_class_top1``, ``per_class_top1``, ``confusion_matrix`` (val, the chosen head), counts,
        settings, ``streamed``, ``train_seconds``, ``seconds`` and ``head_state`` (the chosen head's feature
        columns, BatchNorm statistics, weight and bias; dropped by :func:`vitssl.eval.linear.result_to_json`).
    """
    t0 = time.perf_counter()
    y_all = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    y_val = np.asarray(val_labels, dtype=np.int64)
    n, dim = int(train_features.shape[0]), int(train_features.shape[1])
    if val_features.shape[1] != dim or len(y_all) != n or len(y_val) != val_features.shape[0]:
        raise ValueError(
            f"train ({n} x {dim}, {len(y_all)} labels) and val ({tuple(val_features.shape)}, {len(y_val)} labels) "
            "do not match"
        )
    for name, y in (("train", y_all.numpy()), ("val", y_val)):
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} labels must lie in [0, {num_classes})")
    lrs, wds = tuple(float(x) for x in lrs), tuple(float(x) for x in wds)
    if not lrs or any(x <= 0 for x in lrs) or not wds or any(x < 0 for x in wds):
        raise ValueError(f"lrs must be positive and wds non-negative, got lrs {list(lrs)}, wds {list(wds)}")
    variants = variants or {"all": np.arange(dim)}
    if epochs < 1 or batch_size < 2:
        raise ValueError(f"epochs must be >= 1 and batch_size >= 2, got epochs={epochs}, batch_size={batch_size}")
    fit, hold = stratified_holdout(y_all, holdout_fraction, seed)
    n_heads = len(variants) * len(lrs) * len(wds)
    if len(hold) == 0 and n_heads > 1:
        raise ProbeError(f"holdout_fraction={holdout_fraction} holds out no rows to choose among {n_heads} heads")
    batch = min(batch_size, len(fit))
    if batch < 2:
        raise ProbeError(f"only {len(fit)} training rows remain after the holdout; need at least 2")

    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(seed)
    grid = _Grid(variants, lrs, wds, num_classes, gen, dev)
    bn = torch.nn.BatchNorm1d(dim, affine=False, eps=1e-6).to(dev)  # per column: one BN serves every variant
    itemsize = np.dtype(train_features.dtype).itemsize
    streamed = len(fit) * dim * itemsize > resident_bytes
    resident = None if streamed else _resident(train_features, fit, dev)
    y_dev = y_all.to(dev)
    y_fit = y_dev[torch.from_numpy(fit).to(dev)]
    steps_per_epoch = len(fit) // batch
    total = epochs * steps_per_epoch
    diverged = {v: torch.zeros(len(lrs) * len(wds), dtype=torch.bool, device=dev) for v in variants}
    last_loss = {v: torch.zeros(len(lrs) * len(wds), device=dev) for v in variants}
    step = 0
    bn.train()
    desc = f"linear sweep ({n_heads} heads, {len(fit)} rows{', streamed' if streamed else ''})"
    with Progress(epochs, desc, unit="epoch") as progress:
        for _ in range(epochs):
            if resident is not None:
                order = torch.randperm(len(fit), generator=gen).to(dev)
                batches = (
                    (resident[rows].float(), y_fit[rows])
                    for rows in (order[s * batch : (s + 1) * batch] for s in range(steps_per_epoch))
                )
            else:
                batches = _streamed_batches(train_features, fit, y_dev, batch, block_rows, gen, dev)
            for x, y in batches:
                if step >= total:
                    break
                logits = grid.logits(bn(x))  # per variant (B, H_v, C)
                loss = 0.0
                for v, lg in logits.items():
                    b, h, c = lg.shape
                    per_row = F.cross_entropy(lg.reshape(b * h, c), y.repeat_interleave(h), reduction="none")
                    per_head = per_row.view(b, h).mean(dim=0)  # (H_v,)
                    last_loss[v] = per_head.detach()
                    diverged[v] |= ~torch.isfinite(last_loss[v])
                    loss = loss + torch.nan_to_num(per_head, nan=0.0, posinf=0.0).sum()
                loss.backward()
                grid.step(0.5 * (1 + math.cos(math.pi * step / total)), diverged)
                step += 1
            progress.update(1)
    train_s = time.perf_counter() - t0
    bn.eval()
    flat_div = torch.cat([diverged[v] for v in variants]).cpu()
    flat_loss = torch.cat([last_loss[v] for v in variants]).cpu()
    if bool(flat_div.all()):
        raise ProbeError(f"every head diverged (non-finite loss) for lrs {list(lrs)}; try smaller learning rates")
    hold_pred = _grid_predictions(grid, bn, train_features, hold, dev)  # (H, n_hold)
    hold_acc = (hold_pred == y_all[hold]).float().mean(dim=1) * 100 if len(hold) else torch.zeros(n_heads)
    val_pred = _grid_predictions(grid, bn, val_features, np.arange(len(y_val)), dev)  # (H, M)
    val_acc = (val_pred == torch.from_numpy(y_val)).float().mean(dim=1) * 100
    best = int(torch.argmax(torch.where(flat_div, torch.tensor(-1.0), torch.nan_to_num(hold_acc, nan=0.0))))
    table = [
        {
            "variant": v,
            "lr": lr,
            "wd": wd,
            "holdout_top1": float(hold_acc[h]),
            "val_top1": float(val_acc[h]),
            "final_loss": float(flat_loss[h]),
            "diverged": bool(flat_div[h]),
        }
        for h, (v, lr, wd) in enumerate(grid.heads)
    ]
    report = classification_report(_head_scores(grid, bn, val_features, best, dev), y_val, num_classes)
    _logger.info(
        "linear sweep: %d heads -> best %s lr %g wd %g (holdout %.2f%%), val top-1 %.2f%%",
        n_heads,
        *grid.heads[best],
        float(hold_acc[best]),
        report["top1"],
    )
    variant = grid.heads[best][0]
    index = best - sum(1 for h in grid.heads[:best] if h[0] != variant)
    head_state = {
        "columns": grid.cols[variant].cpu().clone(),
        "bn.running_mean": bn.running_mean.detach().cpu().clone(),
        "bn.running_var": bn.running_var.detach().cpu().clone(),
        "weight": grid.weight[variant][index].detach().cpu().clone(),
        "bias": grid.bias[variant][index].detach().cpu().clone(),
    }
    return {
        "method": "linear_sweep",
        "table": table,
        "best": table[best],
        **report,
        "num_fit": len(fit),
        "num_holdout": len(hold),
        "num_val": len(y_val),
        "num_classes": num_classes,
        "variants": {v: len(c) for v, c in variants.items()},
        "lrs": list(lrs),
        "wds": list(wds),
        "epochs": epochs,
        "batch_size": batch,
        "holdout_fraction": holdout_fraction,
        "seed": seed,
        "streamed": streamed,
        "train_seconds": train_s,
        "seconds": time.perf_counter() - t0,
        "head_state": head_state,
    }


def format_sweep_table(result: dict[str, Any], rows: int = 10) -> str:
    """The best ``rows`` heads of a :func:`train_linear_sweep` result by held-out top-1, and the choice on val."""
    ranked = sorted(result["table"], key=lambda r: -r["holdout_top1"])[:rows]
    lines = [f"linear sweep: {len(result['table'])} heads (holdout top-1 of {result['num_holdout']} rows)"]
    lines.append(f"  {'variant':<10} {'lr':>9} {'wd':>8} {'holdout':>8} {'val':>7}")
    for r in ranked:
        mark = " <- best" if r is result["best"] or r == result["best"] else ""
        flag = " (diverged)" if r["diverged"] else ""
        lines.append(
            f"  {r['variant']:<10} {r['lr']:>9.4g} {r['wd']:>8.2g} {r['holdout_top1']:>8.2f} {r['val_top1']:>7.2f}"
            f"{flag}{mark}"
        )
    lines.append(
        f"val ({result['num_val']} rows): top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  "
        f"mean per-class {result['mean_per_class_top1']:.2f}"
    )
    return "\n".join(lines)


__all__ = ["DEFAULT_WDS", "format_sweep_table", "layer_variants", "train_linear_sweep"]
