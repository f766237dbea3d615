"""DETR's Hungarian matcher and set loss, as TransTrack trains both of its decoders.

Boxes are ``(cx, cy, w, h)`` normalised to ``[0, 1]`` by the image size. The matching cost of prediction ``i``
and target ``j`` is ``w_class · class_cost + w_l1 · |b_i − b_j|₁ − w_giou · GIoU(b_i, b_j)``; the class cost is
Deformable DETR's focal cost (positive minus negative focal term at the target's class) or, with softmax
classification, ``−p(class)``. ``scipy.optimize.linear_sum_assignment`` picks the assignment of least total cost.
The loss on the matched pairs is the focal (or cross-entropy) classification loss over every query plus L1 and
``1 − GIoU`` on the matched boxes, each normalised by the number of targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss


@dataclass(frozen=True)
class SetLossWeights:
    """Weights of the matching cost and of the loss terms (Deformable DETR and TransTrack: 2, 5, 2)."""

    cls: float = 2.0  # classification (focal or cross-entropy)
    l1: float = 5.0  # L1 distance of normalised (cx, cy, w, h)
    giou: float = 2.0  # generalised IoU (cost −GIoU, loss 1 − GIoU)
    focal: bool = True  # sigmoid focal classification (alpha 0.25, gamma 2); False: softmax CE with a no-object class
    alpha: float = 0.25  # focal alpha
    gamma: float = 2.0  # focal gamma
    eos_coef: float = 0.1  # softmax CE only: weight of the no-object class (DETR)


def _xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def match_cost(
    logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, tgt_boxes: torch.Tensor, w: SetLossWeights
) -> torch.Tensor:
    """Matching cost (N, M) between N predictions and M targets of one image.

    Args:
        logits: class logits (N, K); with softmax classification the last of the K is "no object".
        boxes: predicted (cx, cy, w, h) boxes (N, 4), normalised.
        labels: target class ids (M,).
        tgt_boxes: target boxes (M, 4), normalised (cx, cy, w, h).
        w: cost weights.
    """
    if w.focal:
        prob = logits.sigmoid()[:, labels]  # (N, M)
        neg = (1 - w.alpha) * prob**w.gamma * -(1 - prob + 1e-8).log()
        pos = w.alpha * (1 - prob) ** w.gamma * -(prob + 1e-8).log()
        cls = pos - neg  # (N, M)
    else:
        cls = -logits.softmax(-1)[:, labels]  # (N, M)
    l1 = torch.cdist(boxes, tgt_boxes, p=1)  # (N, M)
    giou = generalized_box_iou(_xyxy(boxes), _xyxy(tgt_boxes))  # (N, M)
    return w.cls * cls + w.l1 * l1 - w.giou * giou


@torch.no_grad()
def hungarian_match(
    logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, tgt_boxes: torch.Tensor, w: SetLossWeights
) -> tuple[torch.Tensor, torch.Tensor]:
    """The assignment of least total :func:`match_cost`: ``(prediction indices, target indices)``, each (min(N, M),).

    Arguments as :func:`match_cost`.
    """
    if len(labels) == 0 or len(boxes) == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    cost = match_cost(logits.float(), boxes.float(), labels, tgt_boxes.float(), w)  # (N, M)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def set_loss(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    targets: list[tuple[torch.Tensor, torch.Tensor]],
    w: SetLossWeights,
    num_boxes: float | None = None,
) -> dict[str, torch.Tensor]:
    """DETR's set loss of one decoder output over a batch.

    Args:
        logits: class logits (B, N, K).
        boxes: predicted boxes (B, N, 4), normalised (cx, cy, w, h).
        targets: per image, ``(labels (M_b,), boxes (M_b, 4))``.
        w: matching and loss weights.
        num_boxes: the normaliser (targets in the batch, at least 1); default: counted here.

    Returns:
        ``cls``, ``l1`` and ``giou`` terms (unweighted) and ``loss``, their weighted sum.
    """
    b, n, k = logits.shape
    matches = [hungarian_match(logits[i], boxes[i], lab, tb, w) for i, (lab, tb) in enumerate(targets)]
    if num_boxes is None:
        num_boxes = float(sum(len(lab) for lab, _ in targets))
    norm = max(float(num_boxes), 1.0)
    batch_idx = torch.cat([torch.full_like(r, i) for i, (r, _) in enumerate(matches)]).to(logits.device)
    pred_idx = torch.cat([r for r, _ in matches]).to(logits.device)
    matched_labels = torch.cat([lab[c.to(lab.device)] for (lab, _), (_, c) in zip(targets, matches)]).to(logits.device)
    matched_tgt = torch.cat([tb[c.to(tb.device)] for (_, tb), (_, c) in zip(targets, matches)]).to(boxes.device)

    if w.focal:
        onehot = torch.zeros_like(logits)  # (B, N, K)
        onehot[batch_idx, pred_idx, matched_labels] = 1.0
        cls = sigmoid_focal_loss(logits, onehot, alpha=w.alpha, gamma=w.gamma, reduction="sum") / norm
    else:
        classes = torch.full((b, n), k - 1, dtype=torch.long, device=logits.device)  # (B, N) "no object"
        classes[batch_idx, pred_idx] = matched_labels
        weight = torch.ones(k, device=logits.device)
        weight[-1] = w.eos_coef
        cls = F.cross_entropy(logits.transpose(1, 2), classes, weight=weight)

    matched = boxes[batch_idx, pred_idx]  # (P, 4)
    l1 = (matched - matched_tgt).abs().sum() / norm
    giou = (
        (1 - torch.diag(generalized_box_iou(_xyxy(matched), _xyxy(matched_tgt)))).sum() / norm
        if len(matched)
        else (matched.sum() * 0.0)
    )
    return {"loss": w.cls * cls + w.l1 * l1 + w.giou * giou, "cls": cls, "l1": l1, "giou": giou}


def targets_from_padded(boxes: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None) -> list:
    """Per-image ``(labels, boxes)`` from padded batches: boxes (B, M, 4), mask (B, M) of real rows.

    Args:
        boxes: padded target boxes.
        mask: True where a row is a real object.
        labels: padded class ids (B, M); default: class 0 for every object.
    """
    out = []
    for i in range(boxes.shape[0]):
        keep = mask[i].bool()
        lab = labels[i][keep] if labels is not None else torch.zeros(int(keep.sum()), dtype=torch.long)
        out.append((lab.to(boxes.device).long(), boxes[i][keep]))
    return out
