"""``vitssl train|pretrain RECIPE [key=value ...]``: train any objective, here or on SLURM, and the job that does it.

:func:`pretrain_job` is the launch target of every training run (``vitssl pretrain``, ``vitssl sweep``, the
demo): it imports the objective packages (their import registers them), rebuilds the config from its
:class:`PretrainJob` payload and runs the engine with the callbacks the config asks for.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

# The launch target, by name: spawned processes and SLURM jobs import it from there.
PRETRAIN_TARGET = "vitssl.cli.pretrain:pretrain_job"


@dataclass(frozen=True)
class PretrainJob:
    """The payload of a training job: the resolved run config as plain data (picklable, YAML-able)."""

    config: dict[str, Any]  # vitssl.config.to_container(cfg); output_dir absolute

    @classmethod
    def from_config(cls, cfg: Any) -> PretrainJob:
        """The payload of a resolved config (its ``output_dir`` made absolute: jobs start in other folders)."""
        from vitssl.config import to_container
        from vitssl.launch.common import absolute_output_dir

        absolute_output_dir(cfg)
        return cls(to_container(cfg))

    def requeued(self) -> PretrainJob:
        """The payload of the same run after a preemption or time-out: continue from its last checkpoint."""
        return dataclasses.replace(self, config={**self.config, "resume": "auto"})


def pretrain_job(job: PretrainJob) -> Any:
    """Run (or resume) one training run on this rank; returns the engine's ``TrainResult``."""
    from vitssl.cli._common import register_objectives
    from vitssl.config import from_container
    from vitssl.data import check_dataset_options
    from vitssl.engine import train
    from vitssl.eval.monitor import KnnMonitor

    register_objectives()
    cfg = from_container(job.config)
    for key in ("train", "val"):  # keys a dataset does not take are refused before anything is built
        if cfg.data[key] is not None:
            d = cfg.data[key]
            check_dataset_options(d.name, d.root, dict(d.kwargs), key=f"data.{key}")
    monitor = KnnMonitor(cfg)  # refuses a data.val of other classes now; logs when it is off
    return train(cfg, callbacks=[monitor])


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from vitssl.cli._common import load_run_config
    from vitssl.launch import launch

    if args.plan:
        return _print_plan(args)
    cfg = load_run_config(args.config, [*args.overrides, *(["launch.dry_run=true"] if args.dry_run else [])])
    job = PretrainJob.from_config(cfg)
    result = launch(PRETRAIN_TARGET, job, cfg.launch, cfg.output_dir, kind="train")
    if cfg.launch.backend == "local" and not cfg.launch.dry_run:
        print(f"{result.status} at step {result.step}; run folder {result.output_dir}")
    return 0


def _print_plan(args: argparse.Namespace) -> int:
    """``--plan``: the memory plan of the recipe (nothing is trained)."""
    from vitssl.cli._common import load_run_config
    from vitssl.engine.plan import format_plan, plan_memory

    cfg = load_run_config(args.config, list(args.overrides))
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
