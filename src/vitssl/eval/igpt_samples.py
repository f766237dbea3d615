"""iGPT completions and validation data of a checkpoint (what ``vitssl igpt sample`` draws).

The validation images are ``data.val`` of the checkpoint's config, else ``data.train`` with ``split=val``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vitssl.config import ConfigError

_logger = logging.getLogger(__name__)

_GAP = 2  # pixels between grid cells (after upscaling)
# colour of the hidden bottom half: a blue no greyscale image has, so it never reads as image content
_BLANK = (0.35, 0.45, 0.75)


def load_igpt_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[Any, torch.nn.Module]:
    """The run config and the iGPT objective (palette included, eval mode) of a training checkpoint.

    Args:
        path: a checkpoint written by the engine for ``objective.name=igpt``.
        device: where the model goes.
    """
    from vitssl.engine import CheckpointError, load_objective

    def only_igpt(cfg: Any) -> None:
        if cfg.objective.name != "igpt":
            raise ConfigError(f"checkpoint {path} was trained with objective {cfg.objective.name!r}, not igpt")

    try:
        objective, cfg, _ = load_objective(path, device, check=only_igpt)
    except CheckpointError as err:
        raise ConfigError(str(err)) from None
    return cfg, objective


def validation_dataset(cfg: Any, objective: torch.nn.Module, split: str | None = None) -> torch.utils.data.Dataset:
    """The checkpoint's validation images as ``objective.eval_sample_fn`` gives them.

    Args:
        cfg: the run config.
        objective: the iGPT objective.
        split: a split of the dataset instead of the configured one.
    """
    from vitssl.data import TransformedDataset, build_dataset

    if cfg.data.val is not None:
        d, default_split = cfg.data.val, cfg.data.val.split
    else:
        d, default_split = cfg.data.train, "val"
    base = build_dataset(d.name, root=d.root, split=split or default_split, **dict(d.kwargs))
    return TransformedDataset(base, objective.eval_sample_fn(cfg.data), seed=cfg.seed)


def completion_grid(
    objective: torch.nn.Module,
    images: torch.Tensor,
    num_completions: int = 4,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    scale: int = 4,
) -> Image.Image:
    """Complete the bottom half of each image and lay out original | top half | completions, one row per image.

    Args:
        objective: an autoregressive iGPT objective.
        images: ``(n, 3, H, W)`` RGB in [0, 1] at the token resolution.
        num_completions: samples per image.
        temperature: softmax temperature.
        top_k: sample among the k likeliest tokens; None = all.
        seed: seed of the sampling.
        scale: upscaling factor of every cell (nearest neighbour).
    """
    device = objective.palette.device
    images = images.to(device)
    n = images.shape[0]
    h, w = objective.grid
    given = (h // 2) * w  # raster positions of the top half
    tokens = objective.tokenize(images)  # (n, N)
    prompts = tokens.repeat_interleave(num_completions, dim=0)  # (n*c, N)
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = objective.complete(prompts, given, temperature, top_k, generator)  # (n*c, N)
    top = objective.detokenize(tokens)  # (n, 3, H, W)
    top[:, :, h // 2 :] = torch.tensor(_BLANK, device=device)[:, None, None]  # (3, 1, 1) over the hidden rows
    done = objective.detokenize(samples).reshape(n, num_completions, 3, h, w)  # (n, c, 3, H, W)
    columns = [images[:, None], top[:, None], done]
    grid = torch.cat(columns, dim=1).clamp(0, 1).cpu()  # (n, 2 + c, 3, H, W)
    return _tile(grid, scale)


def sample_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    n: int = 16,
    num_completions: int = 4,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    scale: int = 4,
    split: str | None = None,
    device: torch.device | str = "cpu",
) -> int:
    """``vitssl igpt sample``: complete ``n`` validation images (evenly spread over the split) with an
    autoregressive checkpoint and write the PNG grid of :func:`completion_grid` to ``out``.

    Args:
        checkpoint: an iGPT training checkpoint with ``objective.mode=ar``.
        out: the PNG file (its folder is created).
        n: validation images; fewer when the split is smaller.
        num_completions, temperature, top_k, seed, scale: as :func:`completion_grid` takes them.
        split: a split of the dataset instead of the configured one (:func:`validation_dataset`).
        device: where to sample.

    Returns:
        The number of images (grid rows) written.
    """
    if n < 1 or num_completions < 1 or scale < 1:
        raise ConfigError("--n, --completions and --scale must be positive")
    cfg, objective = load_igpt_checkpoint(checkpoint, device)
    if objective.mode != "ar":
        raise ConfigError(
            f"checkpoint {checkpoint} is a bert model (objective.mode=bert): only an autoregressive "
            "(mode=ar) model samples completions; `vitssl igpt evaluate` reports its bits/token"
        )
    dataset = validation_dataset(cfg, objective, split)
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().astype(int))
    images = torch.stack([dataset[int(i)][0] for i in picks])  # (n, 3, H, W)
    grid = completion_grid(objective, images, num_completions, temperature, top_k, seed, scale)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return len(picks)


def evaluate_checkpoint(
    checkpoint: str | Path,
    split: str | None = None,
    max_images: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """``vitssl igpt evaluate``: validation bits and nats per token of a checkpoint.

    Args:
        checkpoint: an iGPT training checkpoint (ar or bert).
        split: a split of the dataset instead of the configured one.
        max_images: evaluate the first N images only (None: all).
        batch_size: images per forward pass.
        seed: seed of the bert masks.
        device: where to run.

    Returns:
        ``checkpoint``, ``mode`` and what :func:`vitssl.ssl.igpt.evaluate_bits_per_token` reports.
    """
    from torch.utils.data import Subset

    from vitssl.ssl.igpt import evaluate_bits_per_token

    cfg, objective = load_igpt_checkpoint(checkpoint, device)
    dataset = validation_dataset(cfg, objective, split)
    if max_images is not None and max_images < len(dataset):
        dataset = Subset(dataset, range(max_images))
    result = evaluate_bits_per_token(objective, dataset, batch_size, device, seed=seed)
    return {"checkpoint": str(checkpoint), "mode": objective.mode, **result}


def _tile(cells: torch.Tensor, scale: int) -> Image.Image:
    """A white-gapped PIL image of ``cells`` ``(rows, cols, 3, H, W)``, each cell upscaled ``scale`` times."""
    rows, cols, _, h, w = cells.shape
    ch, cw = h * scale, w * scale
    canvas = np.full((rows * (ch + _GAP) + _GAP, cols * (cw + _GAP) + _GAP, 3), 255, dtype=np.uint8)
    pixels = (cells * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()  # (rows, cols, H, W, 3)
    pixels = pixels.repeat(scale, axis=2).repeat(scale, axis=3)  # (rows, cols, ch, cw, 3)
    for r in range(rows):
        for c in range(cols):
            y, x = _GAP + r * (ch + _GAP), _GAP + c * (cw + _GAP)
            canvas[y : y + ch, x : x + cw] = pixels[r, c]
    return Image.fromarray(canvas)
