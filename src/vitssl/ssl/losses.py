"""The two contrastive losses: MoCo v3's InfoNCE and CLIP's symmetric image–text loss.

Both run in one CPU process without any process group; their multi-process behaviour is chosen by
arguments, and ranks come from :mod:`vitssl.distributed` (rank 0 of 1 without a group).

What the multi-process versions compute, with W ranks of N samples each and DDP averaging parameter
gradients over ranks (so the effective gradient of a sample's features is its rank's gradient / W):

- ``contrastive_loss``: the mean over ranks of the losses is the loss of one process on the concatenated
  batch (W·N samples), and the effective gradient w.r.t. q equals that process's gradient.
- ``clip_loss`` with ``gather_with_grad`` (global or ``local_loss``): the same two equalities, w.r.t. both
  feature sets and the logit scale.
- ``clip_loss`` without ``gather_with_grad`` (open_clip's default): the loss is the same, but only the local
  slice carries gradient, so the effective feature gradient is 1/W of the single-process one (global loss),
  or misses the column terms (``local_loss``). This is open_clip's behaviour, kept so results compare.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from vitssl.distributed import all_gather_no_grad, all_gather_with_grad, get_rank, get_world_size

_logger = logging.getLogger(__name__)


def _check_pair(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"{names} must both be (N, D) with the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float, gather: bool = True) -> torch.Tensor:
    """MoCo v3 InfoNCE: each query's positive is the key of the same sample; all other keys are negatives.

    Keys are targets (MoCo computes them with the momentum encoder): no gradient flows into ``k``. The loss
    is scaled by 2τ, as in MoCo v3, so its gradient magnitude does not depend on the temperature.

    Args:
        q: queries ``(N, D)``, not necessarily normalised.
        k: keys ``(N, D)``; row i is the positive of query i.
        temperature: softmax temperature τ (MoCo v3 uses 0.2 for ViT).
        gather: use the keys of all ranks as negatives (global batch); False keeps them local.

    Returns:
        Scalar loss for this rank's queries.
    """
    _check_pair(q, k, "q and k")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    keys = all_gather_no_grad(k) if gather else k.detach()  # (N·W, D) or (N, D)
    logits = q @ keys.T / temperature  # (N, N·W)
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * (get_rank() if gather else 0)  # (N,)
    return F.cross_entropy(logits, labels) * (2 * temperature)


def _gather_features(x: torch.Tensor, with_grad: bool, keep_local_grad: bool) -> torch.Tensor:
    if get_world_size() == 1:
        return x  # nothing to gather; the features keep their graph, as in open_clip's single-process path
    if with_grad:
        return all_gather_with_grad(x)  # (N·W, D)
    gathered = all_gather_no_grad(x)  # (N·W, D)
    if not keep_local_grad:
        return gathered
    # Splice the local tensor back in so at least this rank's own features get gradient (open_clip does the same).
    n, rank = x.shape[0], get_rank()
    return torch.cat([gathered[: rank * n], x, gathered[(rank + 1) * n :]], dim=0)  # (N·W, D)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    gather_with_grad: bool = False,
    local_loss: bool = False,
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CLIP's symmetric cross-entropy over image–text similarities (open_clip ``ClipLoss`` semantics).

    The features are L2-normalised here. open_clip's ``ClipLoss`` expects already-normalised features;
    normalising twice changes nothing, so for normalised input the two agree.

    Args:
        image_features: ``(N, D)`` image embeddings of this rank; row i matches text row i.
        text_features: ``(N, D)`` text embeddings of this rank.
        logit_scale: multiplier of the cosine similarities, already exponentiated (CLIP learns its log,
            initialised to ln(1/0.07)); a tensor when it is learned.
        gather_with_grad: gather the other ranks' features with gradient, giving the exact global gradient;
            otherwise they are constants and only the local slice gets gradient.
        local_loss: each rank scores only its own rows against all columns (labels offset by N·rank), which
            costs N × N·W instead of (N·W)²; otherwise every rank computes the full global matrix.
        return_logits: also return the image→text and text→image logits.

    Returns:
        The scalar loss, or ``(loss, logits_per_image, logits_per_text)`` with ``return_logits``.
    """
    _check_pair(image_features, text_features, "image_features and text_features")
    image = F.normalize(image_features, dim=-1)
    text = F.normalize(text_features, dim=-1)
    n = image.shape[0]
    # open_clip keeps the local slice only for the global matrix: with local_loss the rows already carry it.
    all_image = _gather_features(image, gather_with_grad, keep_local_grad=not local_loss)  # (N·W, D)
    all_text = _gather_features(text, gather_with_grad, keep_local_grad=not local_loss)  # (N·W, D)
    if local_loss:
        logits_per_image = logit_scale * image @ all_text.T  # (N, N·W)
        logits_per_text = logit_scale * text @ all_image.T  # (N, N·W)
        labels = torch.arange(n, device=image.device) + n * get_rank()  # (N,)
    else:
        logits_per_image = logit_scale * all_image @ all_text.T  # (N·W, N·W)
        logits_per_text = logits_per_image.T  # (N·W, N·W)
        labels = torch.arange(all_image.shape[0], device=image.device)  # (N·W,)
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    if return_logits:
        return loss, logits_per_image, logits_per_text
    return loss
