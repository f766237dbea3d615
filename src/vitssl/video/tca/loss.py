"""TCA's contrastive losses: InfoNCE and CircleLoss over cosine logits, the view wiring and the official one."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from vitssl import distributed as dist

LOSSES = ("infonce", "circle", "circle_official")


def tca_logits_loss(
    sim: torch.Tensor,
    positive: torch.Tensor,
    exclude: torch.Tensor,
    loss: Literal["infonce", "circle"] = "infonce",
    temperature: float = 0.07,
    margin: float = 0.25,
    gamma: float = 256.0,
) -> torch.Tensor:
    """Mean loss of queries over cosine similarities to candidate keys, one positive per row.

    InfoNCE: ``CE(sim / τ, positive)``. CircleLoss (Sun et al. 2020, the TCA code's default): with
    ``α_p = [1 + m - s_p]₊``, ``α_n = [s_n + m]₊`` (no gradient), ``Δ_p = 1 - m``, ``Δ_n = m``, the logits are
    ``γ α (s - Δ)`` and the loss is their cross-entropy at the positive. (The official ``CircleLoss`` indexes
    ``alpha[labels]`` with a vector of zeros, which rewrites row 0 instead of the positive column; this is the
    formula it means.)

    Args:
        sim: ``(N, C)`` cosine similarities of each query to every candidate.
        positive: ``(N,)`` column of each query's positive.
        exclude: ``(N, C)`` bool, candidates that are neither positive nor negative (same-group videos).
        loss: ``infonce`` or ``circle``.
        temperature: τ of InfoNCE.
        margin: m of CircleLoss.
        gamma: γ of CircleLoss.
    """
    is_pos = F.one_hot(positive, sim.shape[1]).bool()  # (N, C)
    if loss == "infonce":
        logits = sim / temperature  # (N, C)
    elif loss == "circle":
        alpha = torch.where(is_pos, (1 + margin - sim).clamp_min(0), (sim + margin).clamp_min(0)).detach()  # (N, C)
        delta = torch.where(is_pos, 1 - margin, margin)  # (N, C)
        logits = gamma * alpha * (sim - delta)  # (N, C)
    else:
        raise ValueError(f"loss must be infonce or circle, got {loss!r}")
    logits = logits.masked_fill(exclude & ~is_pos, float("-inf"))  # (N, C)
    return F.cross_entropy(logits, positive)


def tca_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    groups: torch.Tensor | None = None,
    queue_groups: torch.Tensor | None = None,
    loss: Literal["infonce", "circle"] = "infonce",
    temperature: float = 0.07,
    margin: float = 0.25,
    gamma: float = 256.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TCA's contrastive loss of this rank's queries against the global batch's keys and the queue.

    Query i's positive is key i of this rank; the keys of all ranks (gathered without gradient, in rank order)
    and the queue are its negatives, except those of its own group. The mean over ranks of the returned losses
    equals the loss of one process on the concatenated batch.

    Args:
        q: ``(N, E)`` queries (normalised here).
        k: ``(N, E)`` keys, row i the positive of query i; no gradient flows into them.
        queue: ``(K, E)`` earlier keys (normalised), constants.
        groups: ``(N,)`` int group of each video (default: every video its own group).
        queue_groups: ``(K,)`` group of each queue entry (default: none shared with any query; -1 = unknown).
        loss: ``infonce`` or ``circle`` (see :func:`tca_logits_loss`).
        temperature: τ of InfoNCE.
        margin: m of CircleLoss.
        gamma: γ of CircleLoss.

    Returns:
        ``(loss, all_keys (N·W, E), all_groups (N·W,))``: the scalar loss and what the caller enqueues.
    """
    if q.ndim != 2 or q.shape != k.shape or queue.shape[1:] != q.shape[1:]:
        raise ValueError(f"q, k must be (N, E) and queue (K, E), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(queue.shape)}")  # fmt: skip
    n = q.shape[0]
    offset = n * dist.get_rank()
    if groups is None:  # distinct groups on every rank
        groups = torch.arange(n, device=q.device) + offset
    if queue_groups is None:
        queue_groups = torch.full((queue.shape[0],), -1, dtype=torch.long, device=q.device)
    q, k = F.normalize(q, dim=1), F.normalize(k.detach(), dim=1)
    all_keys = dist.all_gather_no_grad(k)  # (N·W, E)
    all_groups = dist.all_gather_no_grad(groups.long())  # (N·W,)
    sim = torch.cat([q @ all_keys.T, q @ queue.detach().to(q.dtype).T], dim=1)  # (N, N·W + K)
    cand_groups = torch.cat([all_groups, queue_groups.to(all_groups.device)])  # (N·W + K,)
    exclude = (groups.long()[:, None] == cand_groups[None, :]) & (cand_groups[None, :] >= 0)  # (N, N·W + K)
    positive = torch.arange(n, device=q.device) + offset  # (N,)
    sim = sim.to(torch.promote_types(sim.dtype, torch.float32))  # the loss in float32 at least under autocast
    value = tca_logits_loss(sim, positive, exclude, loss, temperature, margin, gamma)
    return value, all_keys, all_groups


def official_circle_loss(logits: torch.Tensor, margin: float = 0.25, gamma: float = 256.0) -> torch.Tensor:
    """The official TCA code's ``CircleLoss`` on ``(N, 1 + K)`` logits with target 0, exactly as it computes.

    It writes the positive's weights with ``alpha[labels]`` for ``labels = zeros(N)``, which indexes rows: row 0
    gets ``α_p = [1 + m - s]₊`` and ``Δ_p = 1 - m`` in every column, every other row ``α_n = [s + m]₊`` and
    ``Δ_n = m`` in every column, its positive included; then ``CE(γ α (s - Δ), 0)``. This is what the published
    model trained with (``loss: circle`` is the formula it means).

    Args:
        logits: ``(N, 1 + K)`` logits, the positive in column 0.
        margin: m.
        gamma: γ.
    """
    first = (torch.arange(logits.shape[0], device=logits.device) == 0)[:, None]  # (N, 1)
    alpha = torch.where(first, (1 + margin - logits).clamp_min(0), (logits + margin).clamp_min(0)).detach()  # (N, C)
    delta = torch.where(first, 1 - margin, margin)  # (N, 1)
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(gamma * alpha * (logits - delta), target)


def tca_official_loss(
    q: torch.Tensor,
    p: torch.Tensor,
    queue: torch.Tensor,
    loss: Literal["infonce", "circle", "circle_official"] = "circle_official",
    temperature: float = 1.0,
    margin: float = 0.25,
    gamma: float = 256.0,
) -> torch.Tensor:
    """The official TCA training loss: each anchor against its positive and the queue, target 0.

    Logits ``[q·p, q·queue] / T`` (``(N, 1 + K)``); the queue holds earlier negatives only (the caller enqueues
    this step's negatives after the loss), no in-batch candidates and no exclusions. ``circle_official`` is the
    official ``CircleLoss`` (:func:`official_circle_loss`); ``circle`` and ``infonce`` are
    :func:`tca_logits_loss` on the same logits (InfoNCE then takes T from here, not a second time).

    Args:
        q: ``(N, E)`` anchor embeddings of the query encoder (normalised here).
        p: ``(N, E)`` positive embeddings of the key encoder (normalised here, no gradient).
        queue: ``(K, E)`` normalised negatives of earlier steps.
        loss: ``circle_official``, ``circle`` or ``infonce``.
        temperature: T dividing the logits (the published command: 1.0).
        margin: m of CircleLoss.
        gamma: γ of CircleLoss.
    """
    if q.ndim != 2 or q.shape != p.shape or queue.shape[1:] != q.shape[1:]:
        raise ValueError(f"q, p must be (N, E) and queue (K, E), got {tuple(q.shape)}, {tuple(p.shape)}, "
                         f"{tuple(queue.shape)}")  # fmt: skip
    q, p = F.normalize(q, dim=1), F.normalize(p.detach(), dim=1)
    l_pos = (q * p).sum(1, keepdim=True)  # (N, 1)
    l_neg = q @ queue.detach().to(q.dtype).T  # (N, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # (N, 1 + K)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 at least under autocast
    if loss == "circle_official":
        return official_circle_loss(logits, margin, gamma)
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    exclude = torch.zeros_like(logits, dtype=torch.bool)  # (N, 1 + K)
    return tca_logits_loss(logits, target, exclude, loss, 1.0, margin, gamma)
