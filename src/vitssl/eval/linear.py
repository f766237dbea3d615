"""Linear probes on cached frozen features: the SGD protocol (MoCo v3 / MAE) and scikit-learn logistic regression.

SGD protocol: BatchNorm1d without affine parameters, then a linear layer; SGD with momentum 0.9, weight decay 0,
a per-iteration cosine schedule from the base lr to 0. An lr sweep is trained in ONE pass: H heads sit side by
side in one module (one shared parameter-free BatchNorm - identical to H separate ones, since every head sees
the same batch - and one batched matmul), each head in its own optimizer parameter group with its own lr, all on
the same batches. The best lr is picked on a stratified held-out part of train, then that head is reported on
val (it is not retrained on the held-out part).

Both probes return the same result dict (see :func:`train_linear_probe`); :func:`result_to_json` makes it JSON
serialisable, :func:`vitssl.eval.metrics.save_confusion_png` draws its confusion matrix.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitssl.distributed import resolve_device
from vitssl.errors import UserError
from vitssl.eval.features import Progress
from vitssl.eval.metrics import classification_report

_logger = logging.getLogger(__name__)

# Base learning rates of the sweep, scaled by batch / 256 (the linear scaling rule of MoCo v3 / MAE probes).
DEFAULT_BASE_LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
DEFAULT_CS = (0.01, 0.1, 1.0, 10.0, 100.0)
_EVAL_BATCH = 8192  # rows per forward when scoring (no gradients, so only activation memory matters)


class ProbeError(UserError, ValueError):
    """A probe cannot be trained with these settings on this data: too few rows or classes after the holdout, or
    every learning rate diverged. The message says what to change."""


def default_lrs(batch_size: int, base_lrs: Sequence[float] = DEFAULT_BASE_LRS) -> tuple[float, ...]:
    """The lr sweep for ``batch_size``: each base lr times batch_size / 256."""
    return tuple(b * batch_size / 256 for b in base_lrs)


class MultiHeadLinear(nn.Module):
    """H linear classifiers over one parameter-free BatchNorm1d; heads start from the same initial weights.

    Args:
        dim: feature dimension D.
        num_classes: classes C.
        num_heads: heads H.
        generator: RNG for the initial weights (normal, std 0.01, as in MoCo v3 / MAE; biases zero).
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        # eps 1e-6 as in MAE's probe head; affine=False: the linear layer after it has the scale and shift.
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        init = torch.randn(num_classes, dim, generator=generator) * 0.01  # (C, D)
        self.weights = nn.ParameterList([nn.Parameter(init.clone()) for _ in range(num_heads)])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(num_classes)) for _ in range(num_heads)])

    def head_params(self, h: int) -> list[nn.Parameter]:
        """The parameters of head ``h`` (one optimizer parameter group)."""
        return [self.weights[h], self.biases[h]]

    def forward(self, x: torch.Tensor, head: int | None = None) -> torch.Tensor:
        """Logits of every head, (H, B, C), or of one head, (B, C)."""
        x = self.bn(x)  # (B, D)
        if head is not None:
            return x @ self.weights[head].T + self.biases[head]  # (B, C)
        w = torch.stack(list(self.weights))  # (H, C, D)
        b = torch.stack(list(self.biases))  # (H, C)
        return torch.einsum("bd,hcd->hbc", x, w) + b[:, None, :]  # (H, B, C)


def _as_tensor(x: np.ndarray | torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(x, (np.ndarray, torch.Tensor)) and hasattr(x, "__array__"):  # a feature store's view
        x = np.asarray(x)
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x if x.flags.writeable else np.array(x))  # memory maps of stores are read-only
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    return x.detach().to(dtype)


def _check_inputs(
    feats: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, num_classes: int, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    f = _as_tensor(feats, f"{name}_feats", torch.float32).cpu()
    y = _as_tensor(labels, f"{name}_labels", torch.int64).cpu()
    if f.ndim != 2:
        raise ValueError(f"{name}_feats must be 2-D (N, D), got shape {tuple(f.shape)}")
    if y.shape != (f.shape[0],):
        raise ValueError(f"{name}_labels must have shape ({f.shape[0]},) to match {name}_feats, got {tuple(y.shape)}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"{name}_labels must lie in [0, {num_classes}) for num_classes={num_classes}, "
            f"found [{int(y.min())}, {int(y.max())}]"
        )
    if not torch.isfinite(f).all():
        raise ValueError(f"{name}_feats contains NaN or inf; check the feature extraction")
    return f, y


def stratified_holdout(labels: np.ndarray | torch.Tensor, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split rows into (fit, holdout) keeping class proportions: round(fraction x n_c) rows of each class held out.

    Args:
        labels: (N,) integer labels.
        fraction: share of each class to hold out, in [0, 1).
        seed: shuffle seed.

    Returns:
        ``(fit_rows, holdout_rows)``, sorted int64 arrays.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout_fraction must lie in [0, 1), got {fraction}")
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    rng = np.random.default_rng(seed)
    hold = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        hold.append(rng.permutation(rows)[: round(fraction * len(rows))])
    holdout = np.sort(np.concatenate(hold)) if hold else np.zeros(0, dtype=np.int64)
    fit = np.setdiff1d(np.arange(len(y)), holdout)
    return fit.astype(np.int64), holdout.astype(np.int64)


@torch.no_grad()
def _predict_every_head(model: MultiHeadLinear, feats: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Top-1 class of every head, (H, N); only the argmax leaves each batch, so memory stays O(H x N)."""
    model.eval()
    preds = [
        model(feats[i : i + _EVAL_BATCH].to(device)).argmax(dim=2).cpu() for i in range(0, len(feats), _EVAL_BATCH)
    ]
    return torch.cat(preds, dim=1)  # (H, N)


@torch.no_grad()
def _head_scores(model: MultiHeadLinear, feats: torch.Tensor, device: torch.device, head: int) -> np.ndarray:
    """Logits of one head, (N, C) float32."""
    model.eval()
    out = [model(feats[i : i + _EVAL_BATCH].to(device), head).float().cpu() for i in range(0, len(feats), _EVAL_BATCH)]
    return torch.cat(out).numpy()


def _best_head(diverged: torch.Tensor, hold_acc: torch.Tensor, lrs: Sequence[float]) -> int:
    """Index of the head with the best held-out top-1 among those that did not diverge.

    Args:
        diverged: (H,) bool on the CPU, True where a head's loss became non-finite.
        hold_acc: (H,) held-out top-1 per head (NaN without a held-out split: the first finite head wins).
        lrs: the swept learning rates, named in the error.

    Returns:
        The head index; ties go to the earlier lr (first maximum).
    """
    if bool(diverged.all()):
        raise ProbeError(f"every head diverged (non-finite loss) for lrs {list(lrs)}; try smaller learning rates")
    return int(torch.argmax(torch.where(diverged, torch.tensor(-1.0), torch.nan_to_num(hold_acc, nan=0.0))))


def _loss_status(loss_h: torch.Tensor) -> str:
    """The lowest finite loss over the heads, for a progress display."""
    finite = loss_h[torch.isfinite(loss_h)]
    return f"best loss {float(finite.min()):.4f}" if len(finite) else "every head diverged"


def _sweep_rows(
    lrs: Sequence[float], hold_acc: torch.Tensor, last_loss: torch.Tensor, diverged: torch.Tensor
) -> list[dict[str, Any]]:
    """One ``sweep`` entry per lr: ``value``, ``holdout_top1``, ``final_loss`` and ``diverged``."""
    return [
        {
            "value": lr,
            "holdout_top1": float(hold_acc[h]),
            "final_loss": float(last_loss[h]),
            "diverged": bool(diverged[h]),
        }
        for h, lr in enumerate(lrs)
    ]


def train_linear_probe(
    train_feats: np.ndarray | torch.Tensor,
    train_labels: np.ndarray | torch.Tensor,
    val_feats: np.ndarray | torch.Tensor,
    val_labels: np.ndarray | torch.Tensor,
    num_classes: int,
    lrs: Sequence[float] | None = None,
    epochs: int = 90,
    batch_size: int = 256,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Train an lr sweep of linear heads in one pass, pick the best lr on a held-out part of train, report on val.

    Args:
        train_feats: (N, D) cached training features.
        train_labels: (N,) labels in [0, num_classes).
        val_feats: (M, D) validation features.
        val_labels: (M,) labels.
        num_classes: C.
        lrs: learning rates, one head each; None = :func:`default_lrs` (base 0.01 .. 3.0 x batch / 256).
        epochs: passes over the training part (90 in the MoCo v3 protocol).
        batch_size: rows per step; the last incomplete batch of an epoch is dropped (BatchNorm needs > 1 row).
        holdout_fraction: stratified share of train used to pick the lr; 0 is allowed with a single lr.
        seed: seed of the split, the initial weights and the batch order (results are deterministic given it
            and the thread count).
        device: where to train; None = CUDA when available.

    Returns:
        dict: ``method`` ("linear_sgd"), ``param`` ("lr"), ``sweep`` (per lr: ``value``, ``holdout_top1``,
        ``final_loss``, ``diverged``), ``best_value`` (the chosen lr; ties go to the earlier one in ``lrs``),
        ``top1``, ``top5``, ``mean_per_class_top1``, ``per_class_top1`` (val, percent), ``confusion_matrix``
        ((C, C) int64 numpy, rows = true class), ``num_fit``, ``num_holdout``, ``num_val``, ``num_classes``,
        ``seconds``, the settings, and ``head_state`` (the chosen head's BatchNorm statistics, weight and bias as
        CPU tensors; dropped by :func:`result_to_json`).
    """
    t0 = time.perf_counter()
    x_all, y_all = _check_inputs(train_feats, train_labels, num_classes, "train")
    x_val, y_val = _check_inputs(val_feats, val_labels, num_classes, "val")
    if x_val.shape[1] != x_all.shape[1]:
        raise ValueError(f"val_feats have dimension {x_val.shape[1]} but train_feats have {x_all.shape[1]}")
    lrs = tuple(float(lr) for lr in (lrs if lrs is not None else default_lrs(batch_size)))
    if not lrs or any(lr <= 0 for lr in lrs):
        raise ValueError(f"lrs must be a non-empty list of positive learning rates, got {list(lrs)}")
    if epochs < 1 or batch_size < 2:
        raise ValueError(f"epochs must be >= 1 and batch_size >= 2, got epochs={epochs}, batch_size={batch_size}")
    fit_rows, hold_rows = stratified_holdout(y_all, holdout_fraction, seed)
    if len(hold_rows) == 0 and len(lrs) > 1:
        raise ProbeError(
            f"holdout_fraction={holdout_fraction} holds out no training rows, so the best of {len(lrs)} lrs cannot "
            "be picked; raise holdout_fraction or pass a single lr"
        )
    if len(fit_rows) < 2:
        raise ProbeError(f"only {len(fit_rows)} training rows remain after the holdout; need at least 2")

    dev = resolve_device(device)
    x_fit, y_fit = x_all[fit_rows].to(dev), y_all[fit_rows].to(dev)
    gen = torch.Generator().manual_seed(seed)
    model = MultiHeadLinear(x_all.shape[1], num_classes, len(lrs), generator=gen).to(dev)
    optimizer = torch.optim.SGD(
        [{"params": model.head_params(h), "lr": lr} for h, lr in enumerate(lrs)], momentum=0.9, weight_decay=0.0
    )
    batch = min(batch_size, len(fit_rows))
    steps_per_epoch = len(fit_rows) // batch
    total_steps = epochs * steps_per_epoch
    # Per-iteration cosine from each group's lr down to 0 (LambdaLR scales every group's initial lr).
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    # Kept on the device: reading them every step would synchronise a GPU every step.
    diverged = torch.zeros(len(lrs), dtype=torch.bool, device=dev)
    last_loss = torch.zeros(len(lrs), device=dev)
    model.train()
    progress = Progress(epochs, f"linear probe ({len(lrs)} lrs, {len(fit_rows)} rows)", unit="epoch")
    with progress:
        for _ in range(epochs):
            order = torch.randperm(len(fit_rows), generator=gen).to(dev)
            for s in range(steps_per_epoch):
                rows = order[s * batch : (s + 1) * batch]
                logits = model(x_fit[rows])  # (H, B, C)
                per_head = F.cross_entropy(logits.flatten(0, 1), y_fit[rows].repeat(len(lrs)), reduction="none").view(
                    len(lrs), -1
                )  # (H, B)
                loss_h = per_head.mean(dim=1)  # (H,)
                # Heads are independent, so the gradient of the sum is each head's own gradient; a diverged head
                # (non-finite loss) only poisons its own parameters and is excluded from the choice below.
                optimizer.zero_grad(set_to_none=True)
                loss_h.sum().backward()
                optimizer.step()
                schedule.step()
                last_loss = loss_h.detach()
                diverged |= ~torch.isfinite(last_loss)
            # one device sync per epoch for the display, none when nothing is shown
            progress.update(1, _loss_status(last_loss) if progress.enabled else None)
    diverged, last_loss = diverged.cpu(), last_loss.cpu()
    fit_s = time.perf_counter() - t0

    if len(hold_rows):
        hold_pred = _predict_every_head(model, x_all[hold_rows], dev)  # (H, N_hold)
        hold_acc = (hold_pred == y_all[hold_rows]).float().mean(dim=1) * 100  # (H,)
    else:
        hold_acc = torch.full((len(lrs),), float("nan"))
    best = _best_head(diverged, hold_acc, lrs)
    val_scores = _head_scores(model, x_val, dev, best)  # (M, C)
    report = classification_report(val_scores, y_val.numpy(), num_classes)
    sweep = _sweep_rows(lrs, hold_acc, last_loss, diverged)
    _logger.info(
        "linear probe: lr sweep %s -> best lr %g (holdout %.2f%%), val top-1 %.2f%%",
        [f"{s['value']:g}:{s['holdout_top1']:.1f}" for s in sweep],
        lrs[best],
        float(hold_acc[best]),
        report["top1"],
    )
    head_state = {
        "bn.running_mean": model.bn.running_mean.detach().cpu().clone(),
        "bn.running_var": model.bn.running_var.detach().cpu().clone(),
        "weight": model.weights[best].detach().cpu().clone(),
        "bias": model.biases[best].detach().cpu().clone(),
    }
    return {
        "method": "linear_sgd",
        "param": "lr",
        "sweep": sweep,
        "best_value": lrs[best],
        **report,
        "num_fit": len(fit_rows),
        "num_holdout": len(hold_rows),
        "num_val": len(y_val),
        "num_classes": num_classes,
        "epochs": epochs,
        "batch_size": batch,
        "holdout_fraction": holdout_fraction,
        "seed": seed,
        "train_seconds": fit_s,
        "seconds": time.perf_counter() - t0,
        "head_state": head_state,
    }


def logistic_regression_probe(
    train_feats: np.ndarray | torch.Tensor,
    train_labels: np.ndarray | torch.Tensor,
    val_feats: np.ndarray | torch.Tensor,
    val_labels: np.ndarray | torch.Tensor,
    num_classes: int,
    Cs: Sequence[float] = DEFAULT_CS,
    max_iter: int = 1000,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    standardize: bool = True,
) -> dict[str, Any]:
    """scikit-learn multinomial logistic regression (lbfgs) with the inverse regularisation C picked on a holdout.

    Args:
        train_feats: (N, D) cached training features.
        train_labels: (N,) labels.
        val_feats: (M, D) validation features.
        val_labels: (M,) labels.
        num_classes: C (classes, not the regularisation).
        Cs: inverse regularisation strengths to sweep.
        max_iter: lbfgs iterations per fit.
        holdout_fraction: stratified share of train used to pick C; 0 is allowed with a single C.
        seed: split seed.
        standardize: scale features to zero mean / unit variance on the fit part first (the role BatchNorm
            plays in the SGD probe; lbfgs also converges much faster on standardised features).

    Returns:
        The dict of :func:`train_linear_probe` with ``method`` "logistic_regression", ``param`` "C", and per C in
        ``sweep`` a ``converged`` flag instead of ``final_loss`` / ``diverged``; no ``head_state``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    x_all, y_all = (t.numpy() for t in _check_inputs(train_feats, train_labels, num_classes, "train"))
    x_val, y_val = (t.numpy() for t in _check_inputs(val_feats, val_labels, num_classes, "val"))
    if not Cs or any(c <= 0 for c in Cs):
        raise ValueError(f"Cs must be a non-empty list of positive values, got {list(Cs)}")
    fit_rows, hold_rows = stratified_holdout(y_all, holdout_fraction, seed)
    if len(hold_rows) == 0 and len(Cs) > 1:
        raise ProbeError(
            f"holdout_fraction={holdout_fraction} holds out no training rows, so the best of {len(Cs)} values of C "
            "cannot be picked; raise holdout_fraction or pass a single C"
        )
    x_fit, y_fit = x_all[fit_rows], y_all[fit_rows]
    if len(np.unique(y_fit)) < 2:
        raise ProbeError("logistic regression needs at least 2 classes in the training part")
    scaler = StandardScaler().fit(x_fit) if standardize else None

    def prep(x: np.ndarray) -> np.ndarray:
        return scaler.transform(x) if scaler is not None else x

    def full_scores(clf: Any, x: np.ndarray) -> np.ndarray:
        # Classes missing from the fit part get no column from sklearn; give them -inf so they are never chosen.
        out = np.full((len(x), num_classes), -np.inf)
        out[:, clf.classes_] = clf.predict_log_proba(prep(x))
        return out

    sweep, models = [], []
    with Progress(len(Cs), f"logistic regression ({len(fit_rows)} rows)", unit="C") as progress:
        for c in Cs:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                clf = LogisticRegression(C=float(c), max_iter=max_iter, random_state=seed).fit(prep(x_fit), y_fit)
            converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
            hold = (
                float((full_scores(clf, x_all[hold_rows]).argmax(1) == y_all[hold_rows]).mean() * 100)
                if len(hold_rows)
                else float("nan")
            )
            sweep.append({"value": float(c), "holdout_top1": hold, "converged": converged})
            models.append(clf)
            progress.update(1, f"C={float(c):g}: holdout top-1 {hold:.2f}")
    best = int(np.argmax([np.nan_to_num(s["holdout_top1"], nan=0.0) for s in sweep]))
    report = classification_report(full_scores(models[best], x_val), y_val, num_classes)
    return {
        "method": "logistic_regression",
        "param": "C",
        "sweep": sweep,
        "best_value": float(Cs[best]),
        **report,
        "num_fit": len(fit_rows),
        "num_holdout": len(hold_rows),
        "num_val": len(y_val),
        "num_classes": num_classes,
        "max_iter": max_iter,
        "standardize": standardize,
        "holdout_fraction": holdout_fraction,
        "seed": seed,
        "seconds": time.perf_counter() - t0,
    }


def result_to_json(result: dict[str, Any]) -> dict[str, Any]:
    """A JSON-serialisable copy of a probe result (arrays to lists, tensors dropped)."""
    out: dict[str, Any] = {}
    for key, value in result.items():
        if key == "head_state":
            continue
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out


def format_probe_table(result: dict[str, Any]) -> str:
    """A short text summary of a probe result: the sweep, the choice, val accuracy."""
    lines = [f"{result['method']}: {result['param']} sweep (holdout top-1 of {result['num_holdout']} rows)"]
    for row in result["sweep"]:
        mark = " <- best" if row["value"] == result["best_value"] else ""
        flag = " (diverged)" if row.get("diverged") else "" if row.get("converged", True) else " (not converged)"
        lines.append(f"  {result['param']}={row['value']:<10g} {row['holdout_top1']:7.2f}{flag}{mark}")
    lines.append(
        f"val ({result['num_val']} rows): top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  "
        f"mean per-class {result['mean_per_class_top1']:.2f}"
    )
    return "\n".join(lines)
