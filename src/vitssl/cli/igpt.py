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

from vitssl.cli._args import add_device_option


def _cmd_sample(args: argparse.Namespace) -> int:
    from vitssl.distributed import resolve_device
    from vitssl.eval.igpt_samples import sample_checkpoint

    rows = sample_checkpoint(
        args.checkpoint, args.out, args.n, args.completions, args.temperature, args.top_k, args.seed, args.scale,
        args.split, resolve_device(args.device),
    )  # fmt: skip
    print(f"wrote {args.out}: {rows} images x (original, top half, {args.completions} completions)")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from vitssl.distributed import resolve_device
    from vitssl.eval.igpt_samples import evaluate_checkpoint

    device = resolve_device(args.device)
    print(
        json.dumps(
            evaluate_checkpoint(args.checkpoint, args.split, args.max_images, args.batch_size, args.seed, device)
        )
    )
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
    add_device_option(p, "where to sample")
    p.set_defaults(func=_cmd_sample)

    p = igpt.add_parser("evaluate", help="validation bits / nats per token of a checkpoint, as JSON")
    p.add_argument("checkpoint", help="an iGPT training checkpoint")
    p.add_argument("--split", default=None, help="dataset split (data.val's, else 'val' of data.train)")
    p.add_argument("--max-images", type=int, default=None, help="evaluate the first N images only (all)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bert masks (0)")
    add_device_option(p, "where the model runs")
    p.set_defaults(func=_cmd_evaluate)


__all__ = ["register_commands"]
