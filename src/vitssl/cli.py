"""``vitssl <command>``: parse, build the config, hand over to launch. Nothing else lives here."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from vitssl import __version__

# Areas that add their own subcommands through ``register_commands(subparsers, groups)``: ``subparsers``
# takes top-level commands, ``groups[name]`` the sub-commands of a group (``vitssl eval knn``).
_COMMAND_MODULES: tuple[str, ...] = ("vitssl.launch.cli", "vitssl.ssl.igpt_cli", "vitssl.eval.cli")
_GROUPS = {
    "eval": "evaluate frozen features of a checkpoint (features, knn, linear, zeroshot, retrieval)",
    "index": "build, merge, query and evaluate faiss retrieval indexes",
    "igpt": "iGPT utilities (sample completions from a checkpoint)",
}


def _cmd_backbones(args: argparse.Namespace) -> int:
    from vitssl.backbones import format_backbone_table

    try:
        print(format_backbone_table(args.pattern))
    except KeyError as err:
        print(f"vitssl backbones: {err.args[0]}", file=sys.stderr)
        return 2
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from vitssl.config import load_config
    from vitssl.launch import launch

    cfg = load_config(args.config, [*args.overrides, *(["launch.dry_run=true"] if args.dry_run else [])])
    result = launch("vitssl.engine:train", cfg, kind="train")
    if cfg.launch.backend == "local" and not cfg.launch.dry_run:
        print(f"{result.status} at step {result.step}; run folder {result.output_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitssl",
        description="Self-supervised pretraining of vision transformers: MoCo v3, iGPT and CLIP on ViT / PVT / "
        "Swin, frozen-feature evaluation on faiss, local or SLURM launching.",
    )
    parser.add_argument("--version", action="version", version=f"vitssl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("backbones", help="list registered backbones (params, feature width, pyramid strides)")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style wildcard, e.g. 'pvt*'")
    p.set_defaults(func=_cmd_backbones)

    p = sub.add_parser("pretrain", help="pretrain a backbone from a YAML recipe (+ key=value overrides)")
    p.add_argument("config", help="recipe path or name under configs/, e.g. pretrain/mocov3_demo")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4 launch=slurm")
    p.add_argument("--dry-run", action="store_true", help="with launch=slurm: print the sbatch script, submit nothing")
    p.set_defaults(func=_cmd_pretrain)

    groups = {}
    for name, text in _GROUPS.items():
        group = sub.add_parser(name, help=text)
        groups[name] = group.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)
    for module in _COMMAND_MODULES:
        importlib.import_module(module).register_commands(sub, groups)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point; user errors print one clear line and exit with status 2."""
    from vitssl.config import ConfigError
    from vitssl.engine import CheckpointError, NonFiniteLossError
    from vitssl.launch import LaunchError
    from vitssl.registry import UnknownNameError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UnknownNameError, FileNotFoundError, CheckpointError, NonFiniteLossError, LaunchError) as err:
        print(f"vitssl {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
