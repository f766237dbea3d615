"""``vitssl export open_clip|checkpoint|backbone RUN_OR_CHECKPOINT --out PATH``: a run's weights for other tools.

``export checkpoint`` writes a sharded checkpoint (``train.strategy=fsdp``) as one single-file ``.pth``
checkpoint; ``export backbone`` writes the backbone of any checkpoint, sharded or not, in timm's safetensors
layout. ``export open_clip`` writes a CLIP run as an open_clip model folder:

The folder holds ``open_clip_config.json`` (model and preprocessing config) and ``open_clip_model.safetensors``;
open_clip loads it by itself::

    import vitssl.ssl.open_clip_io  # only for timm image towers open_clip's timm lacks (PVT v1, the test_* ones)
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:DIR")

and gives the image and text embeddings vitssl gives. The folder is also what ``vitssl eval zeroshot|retrieval``
and a CLIP run's ``objective.init_from`` accept. A checkpoint of an older vitssl CLIP (own text tower) is
converted on the way (its ViT image tower becomes open_clip's timm tower over the same timm ViT).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vitssl.config import ConfigError


def _cmd_open_clip(args: argparse.Namespace) -> int:
    from vitssl.engine.checkpoint import resolve_checkpoint
    from vitssl.eval.zeroshot import load_clip_checkpoint
    from vitssl.ssl.open_clip_io import CONFIG_FILE, export_open_clip

    checkpoint = resolve_checkpoint(args.checkpoint)  # a run folder: its checkpoint_last.pth
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise ConfigError(f"--out {out} already exists and is not empty; pass --force to replace it")
    model, cfg, step = load_clip_checkpoint(checkpoint, "cpu")
    export_open_clip(model, out, cfg.data, source=str(checkpoint.absolute()), step=step)
    tower = "open_clip VisionTransformer" if model.vision_tower == "open_clip" else "open_clip timm tower"
    print(f"exported {checkpoint} (step {step}, {tower} image tower) to {out}/ ({CONFIG_FILE}, weights)")
    print(f"  open_clip.create_model_and_transforms('local-dir:{out}')")
    return 0


def _refuse_existing(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ConfigError(f"--out {out} already exists; pass --force to replace it")


def _cmd_checkpoint(args: argparse.Namespace) -> int:
    from vitssl.engine.checkpoint import resolve_checkpoint
    from vitssl.engine.export import consolidate_checkpoint

    checkpoint, out = resolve_checkpoint(args.checkpoint), Path(args.out)
    _refuse_existing(out, args.force)
    consolidate_checkpoint(checkpoint, out)
    print(f"wrote {checkpoint} as the single-file checkpoint {out}")
    return 0


def _cmd_backbone(args: argparse.Namespace) -> int:
    from vitssl.engine.checkpoint import resolve_checkpoint
    from vitssl.engine.export import export_backbone

    checkpoint, out = resolve_checkpoint(args.checkpoint), Path(args.out)
    _refuse_existing(out, args.force)
    export_backbone(checkpoint, out)
    print(f"wrote the backbone of {checkpoint} to {out} (timm's layout; vitssl.backbones.load_backbone reads it)")
    return 0


def register_commands(
    subparsers: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction] | None = None
) -> None:
    """Add ``export open_clip``, ``export checkpoint`` and ``export backbone``.

    Args:
        subparsers: the top-level commands (nothing is added there).
        groups: the sub-command groups; ``groups["export"]`` gets the commands.
    """
    if not groups or "export" not in groups:
        raise ValueError("vitssl.cli.export.register_commands needs the 'export' command group")
    p = groups["export"].add_parser(
        "open_clip",
        help="a CLIP run as an open_clip model folder (local-dir:DIR)",
        description="Write open_clip_config.json and open_clip_model.safetensors, which "
        "open_clip.create_model_and_transforms('local-dir:DIR') loads with the same embeddings.",
    )
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="a clip run folder or one of its checkpoints")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (replaced as a whole)")
    p.add_argument("--force", action="store_true", help="replace --out when it already holds files")
    p.set_defaults(func=_cmd_open_clip)
    for name, func, text, out_help in (
        ("checkpoint", _cmd_checkpoint, "a sharded checkpoint (train.strategy=fsdp) as one single-file checkpoint",
         "the .pth file to write"),
        ("backbone", _cmd_backbone, "the backbone of any checkpoint (sharded or not) as timm-layout safetensors",
         "the .safetensors file to write"),
    ):  # fmt: skip
        p = groups["export"].add_parser(name, help=text, description=text)
        p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="a run folder or one of its checkpoints")
        p.add_argument("--out", required=True, metavar="FILE", help=out_help)
        p.add_argument("--force", action="store_true", help="replace --out when it exists")
        p.set_defaults(func=func)


__all__ = ["register_commands"]
