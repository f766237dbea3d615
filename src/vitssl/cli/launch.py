"""Commands of the launch area: ``vitssl jobs``, ``logs``, ``sweep``, ``sweep-summary``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vitssl.cli._args import add_deprecated_spelling
from vitssl.launch.jobs import JobInfo, find_runs, run_jobs


def _job_row(info: JobInfo) -> list[str]:
    log = info.log_path(info.error_task or 0, "err" if info.failed else "out")
    restarts = "-" if info.restarts is None else str(info.restarts)
    return [info.job_id, info.state, restarts, info.elapsed or "-", info.summary() or "-", str(log)]


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def cmd_jobs(args: argparse.Namespace) -> int:
    """``vitssl jobs [RUN]``: the SLURM jobs of a run (or of every run of a sweep folder) with their states."""
    runs = find_runs(args.run)
    if not runs:
        print(f"no jobs recorded under {args.run} (no jobs.jsonl or submitit folder)", file=sys.stderr)
        return 1
    status = 0
    for run in runs:
        infos = run_jobs(run)
        print(f"{run}:")
        if not infos:
            print("  (no SLURM jobs; local runs only)")
            continue
        rows = [_job_row(info) for info in infos]
        text = _table(["JOB", "STATE", "REQUEUES", "ELAPSED", "OUTCOME", "LOG"], rows)
        print("\n".join("  " + line for line in text.splitlines()))
        last = infos[-1]
        if last.failed:
            status = 1
            print(f"  job {last.job_id} failed; full error: vitssl logs {run} --job {last.job_id} --stderr")
    return status


def cmd_logs(args: argparse.Namespace) -> int:
    """``vitssl logs RUN [--task N] [--job ID]``: print a job's stdout and stderr logs."""
    infos = run_jobs(args.run)
    if not infos:
        print(f"no SLURM jobs recorded in {args.run}", file=sys.stderr)
        return 1
    if args.job is None:
        info = infos[-1]
    else:
        matches = [i for i in infos if i.job_id == args.job]
        if not matches:
            valid = ", ".join(i.job_id for i in infos)
            print(f"job {args.job} is not a job of {args.run}; its jobs: {valid}", file=sys.stderr)
            return 1
        info = matches[0]
    if not 0 <= args.task < info.tasks:
        print(f"--task {args.task}: job {info.job_id} has tasks 0..{info.tasks - 1}", file=sys.stderr)
        return 1
    streams = ["out", "err"]
    if args.out_only:
        streams = ["out"]
    elif args.err_only:
        streams = ["err"]
    for stream in streams:
        path = info.log_path(args.task, stream)
        print(f"==> {path} <==")
        if not path.is_file():
            print(f"(no log yet: job {info.job_id} is {info.state})")
            continue
        lines = path.read_text(errors="replace").splitlines()
        if args.tail:
            lines = lines[-args.tail :]
        print("\n".join(lines))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """``vitssl sweep CONFIG key=v1,v2 ...``: one job array over the cartesian product of the values."""
    from vitssl.eval.train_job import PRETRAIN_TARGET, PretrainJob
    from vitssl.launch.sweep import launch_sweep

    overrides = list(args.overrides) + (["launch.dry_run=true"] if args.dry_run else [])
    launch_sweep(args.config, overrides, PRETRAIN_TARGET, PretrainJob.from_config)
    return 0


def cmd_sweep_summary(args: argparse.Namespace) -> int:
    """``vitssl sweep-summary DIR``: final metrics and status of every run of a sweep."""
    from vitssl.launch.sweep import format_table, sweep_summary

    rows = sweep_summary(args.dir)
    if args.sort:
        missing = [r for r in rows if args.sort not in r]
        present = sorted((r for r in rows if args.sort in r), key=lambda r: r[args.sort], reverse=args.reverse)
        rows = present + missing
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
    else:
        print(format_table(rows))
    return 0


def register_commands(
    subparsers: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction] | None = None
) -> None:
    """Add ``jobs``, ``logs``, ``sweep`` and ``sweep-summary`` to the ``vitssl`` command line.

    Args:
        subparsers: the top-level commands.
        groups: sub-command groups of other areas (``eval``, ``index``); launch adds none.
    """
    p = subparsers.add_parser("jobs", help="list a run's SLURM jobs with their states (or a sweep's runs')")
    p.add_argument("run", nargs="?", default=".", type=Path, help="run folder (output_dir) or sweep folder")
    p.set_defaults(func=cmd_jobs)

    p = subparsers.add_parser("logs", help="print the stdout/stderr logs of a run's SLURM job")
    p.add_argument("run", type=Path, help="run folder (output_dir)")
    p.add_argument("--task", type=int, default=0, help="task (rank) whose logs to show (default 0)")
    p.add_argument("--job", default=None, help="job id (default: the run's latest job)")
    p.add_argument("--tail", type=int, default=0, help="only the last N lines of each log")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--stdout", dest="out_only", action="store_true", help="stdout only")
    group.add_argument("--stderr", dest="err_only", action="store_true", help="stderr only")
    # --out / --err were these flags; --out names an output path in every other command
    add_deprecated_spelling(group, "--out", "--stdout", dest="out_only", nargs=0, const=True)
    add_deprecated_spelling(group, "--err", "--stderr", dest="err_only", nargs=0, const=True)
    p.set_defaults(func=cmd_logs)

    p = subparsers.add_parser(
        "sweep",
        help="run every combination of comma-separated overrides (one SLURM job array with launch=slurm)",
        description="Example: vitssl sweep pretrain/mocov3_vit_small optim.lr=1e-4,3e-4 seed=0,1 launch=slurm. "
        "Each run writes to <output_dir>/<key=value,...>.",
    )
    p.add_argument("config", help="recipe path or shipped recipe name (`vitssl recipes`)")
    p.add_argument("overrides", nargs="+", help="key=value (fixed) or key=v1,v2,... (swept) overrides")
    p.add_argument("--dry-run", action="store_true", help="print the job array's sbatch script, submit nothing")
    p.set_defaults(func=cmd_sweep)

    p = subparsers.add_parser("sweep-summary", help="tabulate the final metrics and status of a sweep's runs")
    p.add_argument("dir", type=Path, help="the sweep folder (the recipe's output_dir)")
    p.add_argument("--sort", default=None, help="sort by this metric (e.g. loss)")
    p.add_argument("--reverse", action="store_true", help="sort descending")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_sweep_summary)
