"""``vitssl igpt sample`` and ``vitssl igpt evaluate``: completions and validation bits/token of a checkpoint.

``vitssl igpt sample CHECKPOINT --n 16 --out grid.png`` completes the bottom half of ``n`` validation images with
an autoregressive checkpoint and writes a PNG grid, one image per row: the original (at the token resolution),
its top half as the model is given it (palette colours; the hidden half blue), then the sampled completions.
``vitssl igpt evaluate CHECKPOINT`` prints the validation bits and nats per token as JSON.

The validation images are ``data.val`` of the checkpoint's config, else ``data.train`` with ``split=val``;
``--split`` picks another split of that dataset.
"""

from __future__ import annotations

import argparse
import json
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


def _device(name: str) -> torch.device:
    from vitssl.engine.trainer import resolve_device

    return resolve_device(name)


def _cmd_sample(args: argparse.Namespace) -> int:
    if args.n < 1 or args.completions < 1 or args.scale < 1:
        raise ConfigError("--n, --completions and --scale must be positive")
    cfg, objective = load_igpt_checkpoint(args.checkpoint, _device(args.device))
    if objective.mode != "ar":
        raise ConfigError(
            f"checkpoint {args.checkpoint} is a bert model (objective.mode=bert): only an autoregressive "
            "(mode=ar) model samples completions; `vitssl igpt evaluate` reports its bits/token"
        )
    dataset = validation_dataset(cfg, objective, args.split)
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(args.n, len(dataset))).round().astype(int))
    images = torch.stack([dataset[int(i)][0] for i in picks])  # (n, 3, H, W)
    grid = completion_grid(objective, images, args.completions, args.temperature, args.top_k, args.seed, args.scale)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    print(f"wrote {out}: {len(picks)} images x (original, top half, {args.completions} completions)")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from torch.utils.data import Subset

    from vitssl.ssl.igpt import evaluate_bits_per_token

    device = _device(args.device)
    cfg, objective = load_igpt_checkpoint(args.checkpoint, device)
    dataset = validation_dataset(cfg, objective, args.split)
    if args.max_images is not None and args.max_images < len(dataset):
        dataset = Subset(dataset, range(args.max_images))
    result = evaluate_bits_per_token(objective, dataset, args.batch_size, device, seed=args.seed)
    print(json.dumps({"checkpoint": str(args.checkpoint), "mode": objective.mode, **result}))
    return 0


def register_commands(subparsers: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``sample`` and ``evaluate`` to the ``vitssl igpt`` group.

    Args:
        subparsers: top-level commands (unused: iGPT adds none).
        groups: sub-command groups by name; uses ``groups["igpt"]``.
    """
    igpt = groups["igpt"]
    p = igpt.add_parser("sample", help="complete the bottom half of validation images (ar) into a PNG grid")
    p.add_argument("checkpoint", help="an iGPT training checkpoint (objective.mode=ar)")
    p.add_argument("--n", type=int, default=16, help="validation images, evenly spread over the split (16)")
    p.add_argument("--out", default="igpt_samples.png", help="PNG file to write (igpt_samples.png)")
    p.add_argument("--completions", type=int, default=4, help="sampled completions per image (4)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest colours (all)")
    p.add_argument("--split", default=None, help="dataset split (data.val's, else 'val' of data.train)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    p.add_argument("--scale", type=int, default=4, help="pixel upscaling in the PNG (4)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to sample (auto)")
    p.set_defaults(func=_cmd_sample)

    p = igpt.add_parser("evaluate", help="validation bits / nats per token of a checkpoint, as JSON")
    p.add_argument("checkpoint", help="an iGPT training checkpoint")
    p.add_argument("--split", default=None, help="dataset split (data.val's, else 'val' of data.train)")
    p.add_argument("--max-images", type=int, default=None, help="evaluate the first N images only (all)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bert masks (0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run (auto)")
    p.set_defaults(func=_cmd_evaluate)


__all__ = ["completion_grid", "load_igpt_checkpoint", "register_commands", "validation_dataset"]
