"""Colour palettes for iGPT: k-means on RGB pixels, and images ↔ palette-token grids.

iGPT (Chen et al., 2020) shrinks the vocabulary of a pixel from 256³ colours to a 512-colour palette fitted by
k-means on RGB pixels of the training set (9 bits per token), so a 32×32 image becomes a sequence of 1024 tokens.
Here a palette is a float32 array ``(K, 3)`` of RGB colours in [0, 1]; token ``k`` is colour ``palette[k]``.
Images are ``(B, 3, H, W)`` tensors in [0, 1] (what ``ToTensor`` gives) or uint8 in [0, 255]. The quantisation
error of a palette is the mean, over pixels, of the squared RGB distance to the nearest colour.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vitssl.errors import MissingFileError
from vitssl.io import atomic_open

_logger = logging.getLogger(__name__)

# Pixels per chunk when assigning colours: bounds the (chunk, K) distance matrix to 32 MiB at K = 512.
_CHUNK = 16384
# ITU-R BT.601 luma weights: palettes are stored darkest colour first, so token ids do not depend on k-means init.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def sample_pixels(
    dataset: Dataset,
    img_size: int,
    num_images: int,
    seed: int = 0,
    skip_corrupt: bool = False,
) -> np.ndarray:
    """RGB pixels of ``num_images`` random images of a dataset, at the token resolution.

    Each image is resized (short side) and centre-cropped to ``img_size`` first, as the model sees it, so the
    palette fits the colours of downsampled images rather than of full-resolution ones.

    Args:
        dataset: items ``(PIL image, target)``.
        img_size: side of the token grid in pixels.
        num_images: images drawn without replacement (all of them if the dataset is smaller).
        seed: seed of the draw.
        skip_corrupt: leave out images that raise ``CorruptImageError`` instead of failing.

    Returns:
        ``(num_images * img_size**2, 3)`` float32 in [0, 1].
    """
    from torchvision.transforms import v2 as T

    from vitssl.data import CorruptImageError

    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("cannot fit a palette on an empty dataset")
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(n, size=min(num_images, n), replace=False))
    transform = low_res_transform(img_size)
    to_array = T.Compose([transform, T.ToDtype(torch.float32, scale=True)])
    pixels = []
    for index in indices.tolist():
        try:
            image, _ = dataset[index]
        except CorruptImageError:
            if not skip_corrupt:
                raise
            _logger.warning("palette: skipping corrupt image %d", index)
            continue
        pixels.append(to_array(image).reshape(3, -1).T)  # (H*W, 3)
    if not pixels:
        raise ValueError("every image drawn for the palette was corrupt")
    return torch.cat(pixels).numpy().astype(np.float32, copy=False)


def low_res_transform(img_size: int) -> torch.nn.Module:
    """PIL image → uint8 tensor ``(3, img_size, img_size)``: short side resized (antialiased), centre crop."""
    from torchvision.transforms import v2 as T

    return T.Compose([T.ToImage(), T.Resize(img_size, antialias=True), T.CenterCrop(img_size)])


def fit_palette(pixels: np.ndarray, num_colours: int, seed: int = 0, iters: int = 20) -> tuple[np.ndarray, float]:
    """k-means (faiss) on RGB pixels; the centroids, darkest first, and their quantisation error on ``pixels``.

    Every pixel is used (no sub-sampling), so the returned error is the palette's exact error on this sample.

    Args:
        pixels: ``(N, 3)`` RGB in [0, 1], N >= ``num_colours``.
        num_colours: K, the vocabulary size (iGPT: 512).
        seed: seed of the k-means initialisation.
        iters: k-means iterations (Lloyd steps).

    Returns:
        ``(palette (K, 3) float32 in [0, 1], mean squared RGB distance of a pixel to its colour)``.
    """
    from vitssl._faiss import faiss  # the one module that imports (and tunes) faiss

    x = np.ascontiguousarray(pixels, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != 3:
        raise ValueError(f"pixels must be an (N, 3) RGB array, got shape {x.shape}")
    if num_colours < 2:
        raise ValueError(f"a palette needs at least 2 colours, got {num_colours}")
    if len(x) < num_colours:
        raise ValueError(
            f"{len(x)} pixels cannot fit {num_colours} colours: sample more images (objective.palette_images) "
            "or choose fewer colours (objective.palette_size)"
        )
    # min_points_per_centroid=1: small fits (tests, tiny data sets) are fine; faiss would warn on stderr
    kmeans = faiss.Kmeans(
        3,
        num_colours,
        niter=iters,
        seed=seed,
        max_points_per_centroid=math.ceil(len(x) / num_colours) + 1,
        min_points_per_centroid=1,
    )
    kmeans.train(x)
    palette = np.clip(kmeans.centroids.reshape(num_colours, 3), 0.0, 1.0).astype(np.float32)
    palette = palette[np.argsort(palette @ _LUMA, kind="stable")]
    index = faiss.IndexFlatL2(3)
    index.add(palette)
    dist, _ = index.search(x, 1)  # (N, 1) squared distances to the nearest colour
    mse = float(dist.astype(np.float64).mean())
    _logger.info(
        "palette: %d colours from %d pixels, quantisation error %.3g (RGB in [0, 1])", num_colours, len(x), mse
    )
    return palette, mse


def _as_unit_float(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()


def quantize(images: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Nearest palette colour of every pixel: images ``(B, 3, H, W)`` → tokens ``(B, H, W)`` int64.

    Args:
        images: RGB in [0, 1] (float) or [0, 255] (uint8).
        palette: ``(K, 3)`` RGB colours in [0, 1].
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"quantize takes (B, 3, H, W) RGB images, got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    # fp32 even under autocast: bf16 distances would tie neighbouring colours
    # (meta tensors, for vitssl.engine.plan, have no autocast of their own: turning off the CPU's is the same no-op)
    with torch.autocast("cpu" if images.device.type == "meta" else images.device.type, enabled=False):
        pal = palette.float().to(images.device)  # (K, 3)
        pixels = _as_unit_float(images).permute(0, 2, 3, 1).reshape(-1, 3)  # (B*H*W, 3)
        pal_sq = (pal * pal).sum(1)  # (K,)
        tokens = torch.empty(pixels.shape[0], dtype=torch.long, device=images.device)
        for start in range(0, pixels.shape[0], _CHUNK):
            chunk = pixels[start : start + _CHUNK]  # (c, 3)
            # |x - p|² = |x|² - 2 x·p + |p|²; |x|² is the same for every colour, so it drops out of the argmin
            tokens[start : start + _CHUNK] = (pal_sq[None, :] - 2.0 * chunk @ pal.T).argmin(1)  # (c,)
    return tokens.reshape(b, h, w)  # (B, H, W)


def dequantize(tokens: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Palette colours of tokens ``(B, H, W)`` → images ``(B, 3, H, W)`` float in [0, 1].

    Args:
        tokens: int token ids in [0, K).
        palette: ``(K, 3)`` RGB colours.
    """
    return palette.float().to(tokens.device)[tokens].permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)


def quantization_error(images: torch.Tensor, palette: torch.Tensor) -> float:
    """Mean squared RGB distance between images and their quantise → dequantise round trip.

    Args:
        images: ``(B, 3, H, W)`` RGB in [0, 1] (float) or [0, 255] (uint8).
        palette: ``(K, 3)`` RGB colours in [0, 1].
    """
    x = _as_unit_float(images)
    err = (dequantize(quantize(images, palette), palette) - x).pow(2).sum(1)  # (B, H, W)
    return float(err.double().mean())


def save_palette(palette: np.ndarray | torch.Tensor, path: str | os.PathLike[str]) -> Path:
    """Write a palette as a ``.npy`` float32 ``(K, 3)`` array (atomically: a reader never sees half a file).

    Args:
        palette: RGB colours in [0, 1].
        path: output file.
    """
    path = Path(path)
    array = palette.detach().cpu().numpy() if isinstance(palette, torch.Tensor) else np.asarray(palette)
    with atomic_open(path, "wb") as f:
        np.save(f, array.astype(np.float32))
    return path


def load_palette(path: str | os.PathLike[str], num_colours: int | None = None) -> np.ndarray:
    """Read a palette written by :func:`save_palette`, checking its shape and range.

    Args:
        path: a ``.npy`` file holding a ``(K, 3)`` array in [0, 1].
        num_colours: expected K; None accepts any.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"palette file {path} does not exist")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"palette file {path} is not a .npy array: {err}") from None
    if array.ndim != 2 or array.shape[1] != 3:
        raise ValueError(f"palette file {path} holds an array of shape {array.shape}; a palette is (K, 3) RGB")
    if num_colours is not None and array.shape[0] != num_colours:
        raise ValueError(
            f"palette file {path} has {array.shape[0]} colours but objective.palette_size={num_colours}; "
            "set objective.palette_size to match, or fit a new palette"
        )
    if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
        raise ValueError(f"palette file {path}: colours must be finite RGB values in [0, 1]")
    return array.astype(np.float32)


__all__ = [
    "dequantize",
    "fit_palette",
    "load_palette",
    "low_res_transform",
    "quantization_error",
    "quantize",
    "sample_pixels",
    "save_palette",
]
