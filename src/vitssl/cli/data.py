"""``vitssl data profile RECIPE [key=value ...]``: per-stage timing of a recipe's training input pipeline."""

from __future__ import annotations

import argparse
from typing import Any


def _cmd_profile(args: argparse.Namespace) -> int:
    from vitssl.config import load_config
    from vitssl.data import build_dataset
    from vitssl.data.profile import profile_pipeline
    from vitssl.data.transforms import resolve_augment_device
    from vitssl.distributed import resolve_device
    from vitssl.engine.trainer import build_objective

    cfg = load_config(args.config, args.overrides)
    device = resolve_device(args.device)
    cfg.data.augment_device = resolve_augment_device(cfg.data.augment_device, device)
    train = cfg.data.train
    dataset = build_dataset(train.name, root=train.root, split=train.split, **dict(train.kwargs))
    sample_fn = build_objective(cfg).train_sample_fn(cfg.data)
    profile = profile_pipeline(
        dataset, sample_fn, args.samples, args.batch_size, device, list(cfg.data.mean), list(cfg.data.std)
    )
    print(
        f"{cfg.objective.name} on {train.name} ({profile.samples} samples, img_size {cfg.data.img_size}, "
        f"augment_device={cfg.data.augment_device}), one thread:"
    )
    print(profile.format(args.target_img_s))
    return 0


def register_commands(subparsers: argparse._SubParsersAction, groups: dict[str, Any]) -> None:
    """Add ``vitssl data profile``."""
    from vitssl.cli._args import add_device_option, add_parser

    p = add_parser(
        groups["data"], "profile", help="time each stage of a recipe's input pipeline and the img/s one core feeds"
    )
    p.add_argument("config", help="recipe path or shipped recipe name, e.g. pretrain/mocov3_vit_base")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.train.root=/data/imagenet")
    p.add_argument("--samples", type=int, default=256, help="samples to time (default 256)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch for collate and device stages")
    add_device_option(p, "where the host-to-device and device stages run")
    p.add_argument(
        "--target-img-s", type=float, default=1000.0,
        help="training speed to size the loader for (default 1000: MoCo v3 ViT-B/16 on one H200)",
    )  # fmt: skip
    p.set_defaults(func=_cmd_profile)
