"""Sweeps: the cartesian product of comma-separated overrides, one run folder each, ONE job array.

``vitssl sweep pretrain/x optim.lr=1e-4,3e-4 train.epochs=10,20 seed=0`` gives four runs under the recipe's
``output_dir``, named after what varies (``optim.lr=1e-4,train.epochs=10``, ...); on SLURM they are the
tasks of one job array, locally they run one after the other. ``sweep_summary`` tabulates the final
metrics of every run folder of a sweep.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vitssl.config import ConfigError, load_config
from vitssl.errors import MissingFileError
from vitssl.launch.common import Target, absolute_output_dir, read_job_records

_logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+\-]")


def split_top_level(value: str) -> list[str]:
    """Split ``value`` on commas outside brackets, braces and quotes (``[0.9,0.95]`` stays one value)."""
    parts, depth, quote, current = [], 0, "", []
    for ch in value:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts


def parse_sweep(overrides: list[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Separate fixed overrides from swept ones.

    Args:
        overrides: ``key=value`` strings; a value with top-level commas (``optim.lr=1e-4,3e-4``) is an axis.

    Returns:
        ``(fixed, axes)`` with ``axes`` as ``[(key, [value, ...]), ...]`` in the given order.

    Raises:
        ConfigError: an override without ``=``, an empty value in a list, or a key swept twice.
    """
    fixed, axes, seen = [], [], set()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"sweep override {item!r} must look like key=value or key=v1,v2,...")
        key, value = item.split("=", 1)
        values = split_top_level(value)
        if len(values) == 1:
            fixed.append(item)
            continue
        if any(not v.strip() for v in values):
            raise ConfigError(f"sweep override {item!r} has an empty value; write key=v1,v2 without empty items")
        if key in seen:
            raise ConfigError(f"sweep key {key!r} is given twice; put all its values in one key=v1,v2,...")
        if key == "launch" or key.startswith("launch."):
            raise ConfigError(f"sweep key {key!r}: launch settings cannot vary, the runs share one job array")
        seen.add(key)
        axes.append((key, values))
    return fixed, axes


def combinations(axes: list[tuple[str, list[str]]]) -> list[list[str]]:
    """The cartesian product of the axes, as lists of ``key=value`` overrides (first axis varies slowest)."""
    if not axes:
        return [[]]
    keys = [key for key, _ in axes]
    return [[f"{k}={v}" for k, v in zip(keys, values)] for values in itertools.product(*(v for _, v in axes))]


def run_name(combo: list[str]) -> str:
    """Folder name of one sweep member: its varying overrides, ``key=value`` joined by commas."""
    name = ",".join(combo) or "base"
    return _UNSAFE.sub("_", name)


def build_sweep(config: str | Path, overrides: list[str]) -> tuple[Path, list[tuple[str, DictConfig]]]:
    """Resolve every member of a sweep.

    Args:
        config: the recipe.
        overrides: fixed and swept ``key=value`` overrides.

    Returns:
        ``(sweep_dir, [(run_name, cfg), ...])``; ``sweep_dir`` is the recipe's (overridden) ``output_dir``
        and each member writes to ``sweep_dir/<run_name>``.

    Raises:
        ConfigError: nothing varies, or an override is invalid (checked for every member).
    """
    fixed, axes = parse_sweep(overrides)
    if not axes:
        raise ConfigError("nothing to sweep: give at least one key with several values, e.g. optim.lr=1e-4,3e-4,1e-3")
    sweep_dir = absolute_output_dir(load_config(config, fixed))
    members = []
    for combo in combinations(axes):
        if any(item.split("=", 1)[0] == "output_dir" for item in combo):
            raise ConfigError("output_dir cannot be swept: each member's folder is named after its values")
        cfg = load_config(config, fixed + combo)
        name = run_name(combo)
        cfg.output_dir = str(sweep_dir / name)
        members.append((name, cfg))
    return sweep_dir, members


def launch_sweep(
    config: str | Path,
    overrides: list[str],
    target: Target,
    make_payload: Callable[[DictConfig], Any],
    kind: str = "train",
) -> Any:
    """Run a sweep: one SLURM job array (``launch=slurm``) or the members one after the other (local).

    Prints what it submits (or the sbatch script with ``launch.dry_run=true``).

    Args:
        config: the recipe.
        overrides: fixed and swept ``key=value`` overrides.
        target: what each member runs: ``target(make_payload(member_config))``.
        make_payload: the job payload of one member's resolved config.
        kind: as in :func:`vitssl.launch.launch`.

    Returns:
        The submitit Jobs (SLURM), the script (dry run), or the members' results (local).
    """
    from vitssl.launch.launcher import launch
    from vitssl.launch.slurm import sbatch_script, submit_array

    sweep_dir, members = build_sweep(config, overrides)
    launch_cfg = members[0][1].launch
    name = f"vitssl-sweep-{sweep_dir.name}"
    folder = Path(launch_cfg.folder).absolute() if launch_cfg.folder else sweep_dir / "submitit"
    print(f"Sweep of {len(members)} runs in {sweep_dir}:")
    for member, _ in members:
        print(f"  {member}")
    if launch_cfg.backend == "slurm" and launch_cfg.dry_run:
        script = sbatch_script(launch_cfg, folder, name, array_size=len(members))
        print(script)
        return script
    if launch_cfg.backend == "slurm":
        runs = [(target, make_payload(cfg), cfg.output_dir) for _, cfg in members]
        jobs = submit_array(runs, launch_cfg, folder, name, kind)
        array_id = str(jobs[0].job_id).split("_")[0]
        print(f"Submitted job array {array_id} ({len(jobs)} tasks); logs in {folder}")
        print(f"  follow: vitssl jobs {sweep_dir}   |   vitssl sweep-summary {sweep_dir}")
        return jobs
    return [launch(target, make_payload(cfg), cfg.launch, cfg.output_dir, kind=kind) for _, cfg in members]


def _final_metrics(path: Path) -> dict[str, Any]:
    """The last value of every key in a metrics.jsonl (the last line may be, e.g., an evaluation only)."""
    merged: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            merged.update(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill; the rest of the file is good
    return merged


def _run_status(run_dir: Path) -> str:
    records = read_job_records(run_dir)
    if not records:
        return "?"
    last = records[-1]
    if last.get("backend") != "slurm":
        return str(last.get("status", "?"))
    from vitssl.launch.jobs import job_info

    info = job_info(str(last["job_id"]), last["folder"], int(last.get("tasks", 1)))
    if info.error:
        return "failed"
    status = getattr(info.result, "status", None)
    return status or info.state.lower()


def sweep_summary(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per run folder of a sweep: ``run``, ``status`` and the final value of each logged metric.

    Args:
        sweep_dir: the folder holding the members' run folders.

    Raises:
        FileNotFoundError: ``sweep_dir`` is missing or holds no run folders.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise MissingFileError(f"sweep folder {sweep_dir} does not exist")
    rows = []
    for run_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        metrics_path = run_dir / "metrics.jsonl"
        if not metrics_path.is_file() and not (run_dir / "jobs.jsonl").is_file():
            continue  # submitit/, tb/ and other non-run folders
        row: dict[str, Any] = {"run": run_dir.name, "status": _run_status(run_dir)}
        if metrics_path.is_file():
            metrics = _final_metrics(metrics_path)
            metrics.pop("time", None)  # a wall-clock stamp, not a result
            row.update(metrics)
        rows.append(row)
    if not rows:
        raise MissingFileError(f"{sweep_dir} holds no run folders (sub-folders with metrics.jsonl or jobs.jsonl)")
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows as an aligned text table; ``run``, ``status``, ``step``, ``epoch``, ``loss`` first."""
    first = [k for k in ("run", "status", "step", "epoch", "loss") if any(k in r for r in rows)]
    rest = sorted({k for r in rows for k in r} - set(first))
    keys = first + rest

    def fmt(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    cells = [[fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)
