"""MoCo v3 and CLIP losses: reference formulas, open_clip's ClipLoss, and 2 gloo ranks vs one process.

Multi-process comparisons: W = 2 ranks each get N rows of a global batch of W·N rows; one process gets the
whole batch. DDP averages parameter gradients over ranks, so the gradient a rank's features effectively
contribute is (that rank's feature gradient) / W; that is what is compared with the one-process gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from tests._dist import run_distributed
from vitssl.distributed import get_rank, get_world_size
from vitssl.ssl.losses import clip_loss, contrastive_loss

_N, _D, _W = 4, 8, 2  # rows per rank, feature width, ranks in the multi-process test
_TAU = 0.2
_LOG_SCALE = math.log(1 / 0.07)  # CLIP's initial logit scale (log of the multiplier)
_CLIP_MODES = [(False, False), (True, False), (False, True), (True, True)]  # (gather_with_grad, local_loss)


def _reference_moco(q: np.ndarray, k: np.ndarray, tau: float) -> float:
    """MoCo v3's loss written out one query at a time."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    total = 0.0
    for i in range(len(q)):
        logits = [float(q[i] @ k[j]) / tau for j in range(len(k))]
        top = max(logits)
        total += top + math.log(sum(math.exp(v - top) for v in logits)) - logits[i]
    return total / len(q) * 2 * tau


@pytest.mark.parametrize("gather", [True, False])
def test_contrastive_loss_matches_reference(gather: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen) * 3  # keys not unit-norm
    loss = contrastive_loss(q, k, _TAU, gather=gather)
    assert loss.item() == pytest.approx(_reference_moco(q.double().numpy(), k.double().numpy(), _TAU), abs=1e-6)


def test_contrastive_loss_gradient_reaches_queries_only() -> None:
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(5, 3, generator=gen, requires_grad=True)
    k = torch.randn(5, 3, generator=gen, requires_grad=True)
    contrastive_loss(q, k, _TAU).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None  # keys are targets (the momentum encoder's output)


@pytest.mark.parametrize("tau", [0.05, 0.2, 1.0])
def test_contrastive_loss_on_orthogonal_pairs(tau: float) -> None:
    # q = k = identity: positives score 1/τ, negatives 0, so loss = 2τ·log(1 + (N−1)·e^(−1/τ)); → 0 as τ → 0.
    n = 6
    eye = torch.eye(n, dtype=torch.float64)
    expected = 2 * tau * math.log(1 + (n - 1) * math.exp(-1 / tau))
    assert contrastive_loss(eye, eye, tau).item() == pytest.approx(expected, rel=1e-12)


def test_losses_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"q and k must both be \(N, D\).*\(4, 3\) and \(4, 2\)"):
        contrastive_loss(torch.randn(4, 3), torch.randn(4, 2), _TAU)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        contrastive_loss(torch.randn(4, 3), torch.randn(4, 3), 0.0)
    with pytest.raises(ValueError, match="image_features and text_features"):
        clip_loss(torch.randn(4, 3), torch.randn(5, 3), 10.0)


def _open_clip(loss: ClipLoss, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # open_clip expects normalised features; normalising inside the graph makes the gradients comparable.
    return loss(F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale)


@pytest.mark.parametrize("local_loss", [False, True])
def test_clip_loss_matches_open_clip(local_loss: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    image = torch.randn(8, 16, generator=gen, requires_grad=True)
    text = torch.randn(8, 16, generator=gen, requires_grad=True)
    log_scale = torch.tensor(_LOG_SCALE, requires_grad=True)
    ours = clip_loss(image, text, log_scale.exp(), local_loss=local_loss)
    ours_grads = torch.autograd.grad(ours, (image, text, log_scale))
    ref = _open_clip(ClipLoss(local_loss=local_loss), image, text, log_scale.exp())
    ref_grads = torch.autograd.grad(ref, (image, text, log_scale))
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)
    for got, want in zip(ours_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_clip_loss_returns_logits() -> None:
    image, text = torch.randn(3, 4), torch.randn(3, 4)
    loss, per_image, per_text = clip_loss(image, text, 2.0, return_logits=True)
    cosine = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T  # (3, 3)
    torch.testing.assert_close(per_image, 2.0 * cosine)
    torch.testing.assert_close(per_text, per_image.T)
    assert loss.item() == pytest.approx(clip_loss(image, text, 2.0).item())


@pytest.mark.parametrize(("scale", "expected"), [(100.0, 0.0), (1.0, math.log(math.e + 5) - 1)])
def test_clip_loss_on_aligned_features(scale: float, expected: float) -> None:
    # Image i = text i = e_i (scaled, to show normalisation): positives score `scale`, negatives 0, so
    # loss = log(e^s + N − 1) − s per row: ≈ 0 for a large scale.
    eye = torch.eye(6, dtype=torch.float64)
    assert clip_loss(3 * eye, 0.5 * eye, scale).item() == pytest.approx(expected, abs=1e-12)


def _global_batch() -> tuple[torch.Tensor, ...]:
    """The same W·N-row batch in every process: MoCo (q, k) and CLIP (image, text) features, float64."""
    gen = torch.Generator().manual_seed(3)
    return tuple(torch.randn(_W * _N, _D, generator=gen, dtype=torch.float64) for _ in range(4))


def _clip_with_grads(
    fn: Callable[..., torch.Tensor], image: torch.Tensor, text: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """(loss, d image, d text, d log-scale) of ``fn(image, text, exp(log-scale))``."""
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    log_scale = torch.tensor(_LOG_SCALE, dtype=torch.float64, requires_grad=True)
    loss = fn(image, text, log_scale.exp())
    return (loss.detach(), *torch.autograd.grad(loss, (image, text, log_scale)))


def _two_rank_losses() -> dict:
    """Runs on every rank of a 2-process gloo group: this rank's losses and gradients, ours and open_clip's."""
    rank, world = get_rank(), get_world_size()
    rows = slice(rank * _N, (rank + 1) * _N)
    q, k, image, text = (t[rows] for t in _global_batch())

    q = q.clone().requires_grad_()
    moco = contrastive_loss(q, k, _TAU)
    (moco_grad,) = torch.autograd.grad(moco, q)
    out: dict = {"moco": (moco.detach(), moco_grad)}
    for gather_with_grad, local_loss in _CLIP_MODES:
        ours = partial(clip_loss, gather_with_grad=gather_with_grad, local_loss=local_loss)
        ref_loss = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world)
        ref = partial(_open_clip, ref_loss)
        out[gather_with_grad, local_loss] = (_clip_with_grads(ours, image, text), _clip_with_grads(ref, image, text))
    return out


@pytest.fixture(scope="module")
def two_rank_results() -> list[dict]:
    return run_distributed(_two_rank_losses, _W)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_contrastive_loss_two_ranks_equal_one_process(two_rank_results: list[dict]) -> None:
    q, k, _, _ = _global_batch()
    q = q.clone().requires_grad_()
    single = contrastive_loss(q, k, _TAU)
    (single_grad,) = torch.autograd.grad(single, q)
    losses, grads = zip(*(out["moco"] for out in two_rank_results))
    _close(torch.stack(losses).mean(), single.detach())  # the mean of the rank losses is the global loss
    _close(torch.cat(grads) / _W, single_grad)  # DDP-averaged gradient = one-process gradient


@pytest.mark.parametrize(("gather_with_grad", "local_loss"), _CLIP_MODES)
def test_clip_loss_two_ranks_match_open_clip(
    two_rank_results: list[dict], gather_with_grad: bool, local_loss: bool
) -> None:
    for out in two_rank_results:
        ours, ref = out[gather_with_grad, local_loss]
        for got, want in zip(ours, ref):  # loss, d image, d text, d log-scale on this rank
            _close(got, want)


@pytest.mark.parametrize(("gather_with_grad", "local_loss"), _CLIP_MODES)
def test_clip_loss_two_ranks_vs_one_process(
    two_rank_results: list[dict], gather_with_grad: bool, local_loss: bool
) -> None:
    _, _, image, text = _global_batch()
    single_loss, single_image, single_text, single_scale = _clip_with_grads(clip_loss, image, text)
    ranks = [out[gather_with_grad, local_loss][0] for out in two_rank_results]
    losses, image_grads, text_grads, scale_grads = (torch.stack(x) for x in zip(*ranks))
    if local_loss:
        _close(losses.mean(), single_loss)  # each rank scores its own rows: the rank mean is the global loss
    else:
        _close(losses, single_loss.expand(_W))  # every rank computes the whole global matrix
    _close(scale_grads.mean(), single_scale)  # the scale multiplies every logit a rank uses: no term is missed
    image_grads, text_grads = image_grads.flatten(0, 1), text_grads.flatten(0, 1)  # (W·N, D) in rank order
    if gather_with_grad:
        _close(image_grads / _W, single_image)
        _close(text_grads / _W, single_text)
    elif not local_loss:
        # open_clip's default: only the local slice of the global matrix has gradient, so the gradients
        # are the one-process ones and DDP's average makes them 1/W of it.
        _close(image_grads, single_image)
        _close(text_grads, single_text)
    # Without gather_with_grad, local_loss leaves out the column terms: no global gradient to compare with;
    # its per-rank gradients are checked against open_clip's above.
