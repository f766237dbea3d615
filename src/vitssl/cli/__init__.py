"""``vitssl <command>``: parse, build the config, hand over to launch. A module per command group.

Building the parser imports no torch (``vitssl --help`` and ``--version`` answer at once): each command
module imports what it needs inside its command functions.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from vitssl import __version__

# Areas that add their own subcommands through ``register_commands(subparsers, groups)``: ``subparsers``
# takes top-level commands, ``groups[name]`` the sub-commands of a group (``vitssl eval knn``).
_COMMAND_MODULES: tuple[str, ...] = (
    "vitssl.cli.pretrain",
    "vitssl.cli.launch",
    "vitssl.cli.igpt",
    "vitssl.cli.eval",
    "vitssl.cli.index",
    "vitssl.cli.video",
    "vitssl.cli.track",
    "vitssl.cli.export",
    "vitssl.cli.data",
)
_GROUPS = {
    "eval": "evaluate frozen features of a checkpoint (features, knn, linear, zeroshot, retrieval)",
    "index": "build, merge, query and evaluate faiss retrieval indexes",
    "igpt": "iGPT utilities (sample completions from a checkpoint)",
    "video": "read, prepare and evaluate videos (probe, readers, prepare, eval)",
    "track": "multi-object tracking in the MOTChallenge format: generate sequences, track, evaluate",
    "export": "write a run's weights for other libraries (open_clip)",
    "data": "inspect training input pipelines (profile: per-stage time, img/s per core)",
}


def _cmd_backbones(args: argparse.Namespace) -> int:
    from vitssl.backbones import format_backbone_table

    print(format_backbone_table(args.pattern, include_test=args.all))
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from vitssl.config import CONFIG_DIR, list_recipes

    for name in list_recipes():
        print(name)
    print(f"(shipped in {CONFIG_DIR}; copy one to change it, or override keys with key=value)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitssl",
        description="Self-supervised pretraining of vision transformers: MoCo v3, iGPT and CLIP on ViT / PVT / "
        "Swin, frozen-feature evaluation on faiss, local or SLURM launching.",
    )
    parser.add_argument("--version", action="version", version=f"vitssl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="more logging, and tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("backbones", help="list registered backbones (params, feature width, pyramid strides)")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style wildcard, e.g. 'pvt*'")
    p.add_argument("--all", action="store_true", help="include the tiny test_* variants used by the tests")
    p.set_defaults(func=_cmd_backbones)

    p = sub.add_parser("recipes", help="list the shipped recipes (vitssl pretrain NAME)")
    p.set_defaults(func=_cmd_recipes)

    groups = {}
    for name, text in _GROUPS.items():
        group = sub.add_parser(name, help=text)
        groups[name] = group.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)
    for module in _COMMAND_MODULES:
        importlib.import_module(module).register_commands(sub, groups)
    return parser


def _configure_logging(verbose: bool) -> None:
    """INFO for vitssl (DEBUG with -v); other libraries say only warnings unless -v."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("vitssl").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        for noisy in ("faiss", "faiss.loader", "torch.distributed", "submitit"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"sklearn\..*")


def main(argv: list[str] | None = None) -> int:
    """Console entry point; an error the user can fix prints one line and exits with status 2."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    from vitssl.errors import UserError

    try:
        return int(args.func(args) or 0)
    except UserError as err:
        if args.verbose:
            logging.getLogger(__name__).exception("%s failed", args.command)
        message = " ".join(str(err).split("\n")[0].split()) if not args.verbose else str(err)
        print(f"vitssl {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vitssl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
