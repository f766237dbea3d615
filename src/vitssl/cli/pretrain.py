"""``vitssl train|pretrain RECIPE [key=value ...]``: train any objective, here or on SLURM.

The job itself is the library's :func:`vitssl.eval.train_job.pretrain_job`; this module parses, launches it
(:data:`~vitssl.eval.train_job.PRETRAIN_TARGET`) and prints where the run went.
"""

from __future__ import annotations

import argparse
from typing import Any

# Re-exported: tests, benchmarks and the SLURM pickles of runs started by earlier releases name them here.
from vitssl.eval.train_job import PRETRAIN_TARGET, PretrainJob, pretrain_job  # noqa: F401


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from vitssl.config import load_config
    from vitssl.launch import launch

    if args.plan:
        return _print_plan(args)
    cfg = load_config(args.config, [*args.overrides, *(["launch.dry_run=true"] if args.dry_run else [])])
    job = PretrainJob.from_config(cfg)
    result = launch(PRETRAIN_TARGET, job, cfg.launch, cfg.output_dir, kind="train")
    if cfg.launch.backend == "local" and not cfg.launch.dry_run:
        print(f"{result.status} at step {result.step}; run folder {result.output_dir}")
    return 0


def _print_plan(args: argparse.Namespace) -> int:
    """``--plan``: the memory plan of the recipe (nothing is trained)."""
    from vitssl.config import load_config
    from vitssl.engine.plan import format_plan, plan_memory

    cfg = load_config(args.config, list(args.overrides))
    world = args.world_size or max(1, cfg.launch.nodes * (cfg.launch.tasks_per_node or cfg.launch.gpus_per_node or 1))
    print(format_plan(plan_memory(cfg, world, args.config), args.gpu_memory_gb, args.overhead_gb))
    return 0


def register_commands(subparsers: argparse._SubParsersAction, groups: dict[str, Any]) -> None:
    """Add ``vitssl train`` (any objective: pretraining, video heads) and ``vitssl pretrain`` (the same command)."""
    from vitssl.cli._args import add_parser

    for name, text in (
        ("train", "train any objective from a YAML recipe (+ key=value overrides): pretraining or a video head"),
        ("pretrain", "pretrain a backbone from a YAML recipe (+ key=value overrides); the same as `vitssl train`"),
    ):
        p = add_parser(subparsers, name, help=text)
        p.add_argument(
            "config", help="recipe path or shipped recipe name, e.g. pretrain/mocov3_demo (`vitssl recipes`)"
        )
        p.add_argument(
            "overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4 launch=slurm; ~key deletes"
        )
        p.add_argument(
            "--dry-run", action="store_true", help="with launch=slurm: print the sbatch script, submit nothing"
        )
        p.add_argument(
            "--plan", action="store_true",
            help="print parameters, activation memory per sample (with/without checkpointing) and the largest batch "
            "per GPU for DDP and FSDP, from an analytic model; trains nothing (reads one sample of data.train)",
        )  # fmt: skip
        p.add_argument("--world-size", type=int, default=None, help="with --plan: GPUs (default: the launch.* ones)")
        p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="with --plan: memory per GPU in GiB")
        p.add_argument("--overhead-gb", type=float, default=2.0, help="with --plan: GiB kept for CUDA and allocator")
        p.set_defaults(func=_cmd_pretrain)
