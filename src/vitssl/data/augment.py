"""MoCo v3's photometric augmentations as drawn parameters, applied on uint8 crops (CPU) or on batches (any device).

One draw, two executors. :func:`draw_view_params` draws everything random about one view except its crop — colour
jitter (applied with ``jitter_p``, its four factors and their random order, as torchvision's ``ColorJitter``),
greyscale, blur σ, solarize, flip — into a vector of ``NUM_PARAMS`` floats. Then either

* :func:`apply_params_uint8` applies them in the loader worker to one (S, S, 3) uint8 crop with OpenCV's uint8
  kernels (the same formulas as PIL's ``ImageEnhance``, ``convert("HSV")``, ``ImageOps.solarize`` and
  ``GaussianBlur(radius=σ)``, whose three fractional box passes are one separable kernel here), or
* :func:`augment_batch` applies a batch of them to a (B, 3, S, S) uint8 batch on the training device in float32,
  per sample, with no host synchronisation.

The order is the official one: colour jitter → greyscale → blur → solarize → flip. Both executors reproduce the
torchvision/PIL pipeline's distribution (tests/data/test_transforms.py compares them with a transcription of it).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

cv2.setNumThreads(1)  # one thread per loader worker: the crops are small and the workers are the parallelism

# Layout of a view's parameter vector.
P_BRIGHTNESS, P_CONTRAST, P_SATURATION, P_HUE = 0, 1, 2, 3  # jitter factors (identity: 1, 1, 1, 0)
P_ORDER = 4  # 4 slots: the jitter operations' order, as indices 0-3 into (brightness, contrast, saturation, hue)
P_GREY = 8  # 1: convert to grey
P_SIGMA = 9  # blur σ in pixels, 0: no blur
P_SOLARIZE = 10  # 1: invert pixels >= 128
P_FLIP = 11  # 1: horizontal flip
NUM_PARAMS = 12

_IDENTITY = (1.0, 1.0, 1.0, 0.0)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's convert("L") and OpenCV's RGB2GRAY


def blur_kernel_size(img_size: int) -> int:
    """Odd Gaussian-blur kernel of about 10% of the image side, at least 3 (23 at 224 px, as in BYOL).

    MoCo v3 blurs with PIL's ``GaussianBlur(radius=σ)``, whose support follows σ; its kernel has at most 13 taps
    for σ ≤ 2, so at ImageNet sizes this cap never binds. On tiny images it caps the support at a few
    pixels, so σ = 2 softens a 32 px image instead of wiping it out.
    """
    k = round(0.1 * img_size)
    k = k if k % 2 == 1 else k + 1
    return max(3, k)


def _box_radius(sigma: float | torch.Tensor, passes: int = 3) -> Any:
    """PIL's fractional box radius whose ``passes``-fold box blur has std ``sigma`` (Gwosdek et al., 2011)."""
    sigma2 = sigma * sigma / passes
    length = (12.0 * sigma2 + 1.0) ** 0.5  # ideal box length
    whole = ((length - 1.0) / 2.0) // 1  # integer part of the radius
    frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2) / (6 * (sigma2 - (whole + 1) ** 2))
    return whole + frac


def pil_blur_kernel(sigma: float, cap: int) -> np.ndarray:
    """The 1-D kernel of PIL's ``GaussianBlur(radius=sigma)``: three passes of a box of fractional radius, whose
    two end taps carry the fraction. At most ``cap`` taps (renormalised), float32, odd length."""
    radius = float(_box_radius(sigma))
    whole = int(radius)
    box = np.ones(2 * whole + 3, dtype=np.float64)
    box[0] = box[-1] = radius - whole
    box /= 2 * radius + 1
    kernel = np.convolve(np.convolve(box, box), box)
    if len(kernel) > cap:
        cut = (len(kernel) - cap) // 2
        kernel = kernel[cut : cut + cap]
    return (kernel / kernel.sum()).astype(np.float32)


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high))


def draw_view_params(
    jitter: Sequence[float],
    jitter_p: float,
    grayscale_p: float,
    blur_p: float,
    blur_sigma: Sequence[float],
    solarize_p: float,
    flip: bool,
) -> torch.Tensor:
    """One view's photometric parameters, drawn from torch's generator as torchvision's transforms draw them.

    Args:
        jitter: ColorJitter (brightness, contrast, saturation, hue) strengths.
        jitter_p: probability of applying the colour jitter.
        grayscale_p: probability of converting to grey.
        blur_p: probability of blurring.
        blur_sigma: (min, max) of the blur's σ in pixels.
        solarize_p: probability of solarizing.
        flip: draw a horizontal flip with probability 0.5.

    Returns:
        A (NUM_PARAMS,) float32 vector (layout: the ``P_*`` constants).
    """
    p = [*_IDENTITY, 0.0, 1.0, 2.0, 3.0] + [0.0] * (NUM_PARAMS - 8)  # a list: tensor item writes cost µs each
    if jitter_p > 0 and float(torch.rand(1)) < jitter_p:
        p[P_ORDER : P_ORDER + 4] = torch.randperm(4).tolist()
        b, c, s, h = (float(v) for v in jitter)
        if b > 0:
            p[P_BRIGHTNESS] = _uniform(max(0.0, 1 - b), 1 + b)
        if c > 0:
            p[P_CONTRAST] = _uniform(max(0.0, 1 - c), 1 + c)
        if s > 0:
            p[P_SATURATION] = _uniform(max(0.0, 1 - s), 1 + s)
        if h > 0:
            p[P_HUE] = _uniform(-h, h)
    if grayscale_p > 0 and float(torch.rand(1)) < grayscale_p:
        p[P_GREY] = 1.0
    if blur_p > 0 and float(torch.rand(1)) < blur_p:
        p[P_SIGMA] = _uniform(float(blur_sigma[0]), float(blur_sigma[1]))
    if solarize_p > 0 and float(torch.rand(1)) < solarize_p:
        p[P_SOLARIZE] = 1.0
    if flip and float(torch.rand(1)) < 0.5:
        p[P_FLIP] = 1.0
    return torch.tensor(p, dtype=torch.float32)


# ------------------------------------------------------------------------------ uint8 executor (loader workers)
_SOLARIZE_LUT = np.where(np.arange(256) >= 128, 255 - np.arange(256), np.arange(256)).astype(np.uint8)


def _grey3(x: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def _jitter_uint8(x: np.ndarray, op: int, factor: float) -> np.ndarray:
    if op == P_BRIGHTNESS:  # PIL: blend(black, img, f)
        return cv2.convertScaleAbs(x, alpha=factor)
    if op == P_CONTRAST:  # PIL: blend(grey image of the rounded mean luma, img, f)
        mean = int(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).mean() + 0.5)
        return cv2.addWeighted(x, factor, x, 0.0, (1.0 - factor) * mean)
    if op == P_SATURATION:  # PIL: blend(luma, img, f)
        return cv2.addWeighted(x, factor, _grey3(x), 1.0 - factor, 0.0)
    # hue: PIL's 8-bit HSV, the hue channel shifted by int(f * 255) modulo 256 (torchvision's PIL path)
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] += np.uint8(int(factor * 255) % 256)  # uint8 arithmetic wraps, as the hue circle does
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


_JITTER_NAMES = ("brightness", "contrast", "saturation", "hue")


def apply_params_uint8(
    x: np.ndarray, params: torch.Tensor, kernel_cap: int, timings: dict[str, float] | None = None
) -> np.ndarray:
    """Apply one view's parameters to an (S, S, 3) uint8 RGB crop; returns a new (S, S, 3) uint8 array.

    Args:
        x: the resized crop.
        params: its (NUM_PARAMS,) vector from :func:`draw_view_params`.
        kernel_cap: largest blur kernel (:func:`blur_kernel_size` of the output side).
        timings: when given, seconds per operation are added to it (``vitssl data profile``).
    """
    p = params.tolist()
    t = time.perf_counter() if timings is not None else 0.0

    def tick(name: str) -> None:
        nonlocal t
        if timings is not None:
            now = time.perf_counter()
            timings[name] = timings.get(name, 0.0) + now - t
            t = now

    for slot in range(4):
        op = int(p[P_ORDER + slot])
        if p[op] != _IDENTITY[op]:  # torchvision leaves an operation with strength 0 out
            x = _jitter_uint8(x, op, p[op])
            tick(_JITTER_NAMES[op])
    if p[P_GREY]:
        x = _grey3(x)
        tick("grayscale")
    sigma = p[P_SIGMA]
    if sigma > 0:
        k = pil_blur_kernel(sigma, kernel_cap)
        x = cv2.sepFilter2D(x, -1, k, k, borderType=cv2.BORDER_REPLICATE)  # PIL's blur repeats edge pixels
        tick("blur")
    if p[P_SOLARIZE]:
        x = cv2.LUT(x, _SOLARIZE_LUT)
        tick("solarize")
    if p[P_FLIP]:
        x = cv2.flip(x, 1)
        tick("flip")
    return x


# ------------------------------------------------------------------------------ batched executor (any device)
def _luma(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)  # (B, H, W) each
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)  # (B, 1, H, W)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] to HSV with every channel in [0, 1] (torchvision's tensor formulas)."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)  # (B, H, W)
    minc, _ = x.min(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=1)  # (B, 3, H, W)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """HSV in [0, 1] back to RGB: ``c = v - v s clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6h) mod 6`` for n = 5, 3, 1
    (the closed form of torchvision's six-sector formula, without building all six sectors)."""
    h, s, v = x[:, :1], x[:, 1:2], x[:, 2:]  # (B, 1, H, W) each
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h, 6.0)  # (B, 3, H, W)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def _jitter_batch(x: torch.Tensor, op: int, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    if op == P_BRIGHTNESS:
        return (x * f).clamp(0.0, 1.0)
    if op == P_CONTRAST:
        mean = _luma(x).mean(dim=(-3, -2, -1), keepdim=True)  # (B, 1, 1, 1)
        return (f * x + (1.0 - f) * mean).clamp(0.0, 1.0)
    if op == P_SATURATION:
        return (f * x + (1.0 - f) * _luma(x)).clamp(0.0, 1.0)
    hsv = _rgb_to_hsv(x)  # (B, 3, H, W)
    hue = torch.remainder(hsv[:, :1] + f, 1.0)
    return _hsv_to_rgb(torch.cat((hue, hsv[:, 1:]), dim=1))


def _blur_batch(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """PIL's ``GaussianBlur`` of per-sample ``sigma`` (B,) (0 = untouched), edges repeated; ``kernel`` taps at most.

    The 1-D kernel is PIL's three passes of a fractional box (:func:`pil_blur_kernel`), built per sample here.
    """
    b, c, h, w = x.shape
    taps = (torch.arange(kernel, device=x.device, dtype=x.dtype) - kernel // 2).abs()  # (K,)
    radius = _box_radius(sigma.clamp_min(1e-3)).view(-1, 1)  # (B, 1)
    whole = torch.floor(radius)
    box = torch.where(taps <= whole, 1.0, torch.where(taps == whole + 1, radius - whole, 0.0)) / (2 * radius + 1)
    g = box.unsqueeze(0)  # (1, B, K): the box of each sample, convolved with itself twice
    for _ in range(2):
        g = F.conv1d(g, box.flip(-1).unsqueeze(1), padding=kernel // 2, groups=b)
    g = g[0] / g[0].sum(dim=1, keepdim=True)  # (B, K)
    delta = (taps == 0).to(x.dtype).expand_as(g)
    g = torch.where((sigma > 0).view(-1, 1), g, delta)  # (B, K)
    weight = g.repeat_interleave(c, dim=0)  # (B*C, K)
    pad = kernel // 2
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="replicate"), weight.view(b * c, 1, 1, kernel), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="replicate"), weight.view(b * c, 1, kernel, 1), groups=b * c)
    return y.view(b, c, h, w)


def augment_batch(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Apply per-sample parameters to a batch of crops, in float32 on the batch's device.

    Args:
        images: (B, 3, S, S) uint8 crops (or float in [0, 1]).
        params: (B, NUM_PARAMS) vectors from :func:`draw_view_params`.

    Returns:
        (B, 3, S, S) float32 in [0, 1], not normalised.
    """
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()  # (B, 3, S, S)
    p = params.to(device=x.device, dtype=torch.float32)  # (B, NUM_PARAMS)
    identity = torch.tensor(_IDENTITY, device=x.device)
    order = p[:, P_ORDER : P_ORDER + 4].round().long()  # (B, 4)
    for slot in range(4):
        for op in range(4):
            # samples whose slot-th operation is `op` get their factor, the others the identity
            factor = torch.where(order[:, slot] == op, p[:, op], identity[op])  # (B,)
            x = _jitter_batch(x, op, factor)
    x = torch.where(p[:, P_GREY].view(-1, 1, 1, 1) > 0, _luma(x).expand_as(x), x)
    x = _blur_batch(x, p[:, P_SIGMA], blur_kernel_size(x.shape[-1]))
    x = torch.where((p[:, P_SOLARIZE].view(-1, 1, 1, 1) > 0) & (x >= 128 / 255), 1.0 - x, x)
    return torch.where(p[:, P_FLIP].view(-1, 1, 1, 1) > 0, x.flip(-1), x)


def normalize_batch(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x / 255 - mean) / std`` for uint8 (B, 3, H, W), ``(x - mean) / std`` for float in [0, 1]."""
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def prepare_view(view: Any, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A batch of one view as the network takes it: float, normalised.

    Args:
        view: float (B, 3, S, S) (already normalised: returned as is), uint8 (B, 3, S, S) (normalised here), or
            ``{"image": uint8 (B, 3, S, S), "params": (B, NUM_PARAMS)}`` from ``augment_device=gpu`` workers
            (augmented, then normalised here).
        mean: normalisation mean.
        std: normalisation std.
    """
    if isinstance(view, dict):
        with torch.no_grad(), _full_precision(view["image"].device.type):
            return normalize_batch(augment_batch(view["image"], view["params"]), mean, std)
    if view.dtype == torch.uint8:
        with _full_precision(view.device.type):
            return normalize_batch(view, mean, std)
    return view


def _full_precision(device_type: str) -> Any:
    """Autocast off on ``device_type``: pixel arithmetic stays float32 under a bf16 step. The meta device (the
    memory planner's dry run) has no autocast, so nothing to turn off there."""
    if device_type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)
