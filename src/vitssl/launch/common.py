"""What the local and SLURM launchers share: targets, process counts, launch records, errors."""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vitssl.config import ConfigError, LaunchConfig
from vitssl.errors import UserError

_logger = logging.getLogger(__name__)

Target = str | Callable[..., Any]
"""What a launcher runs: ``target(payload)`` on every rank, ``target`` a ``"module:function"`` string or a
module-level function, ``payload`` a picklable dataclass that says everything the job needs (a training run's
config, an evaluation's arguments). A payload with a ``requeued()`` method returns from it the payload a
requeued job runs with (a training job: the same config with ``resume=auto``)."""

# Variables a launcher exports for torch.distributed; stale values from the submitting shell must not leak in.
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")

# Each run folder keeps one JSON line per launch (local run or SLURM job): `vitssl jobs` reads it.
JOBS_FILE = "jobs.jsonl"


class LaunchError(UserError, RuntimeError):
    """A launch failed: a local rank died or raised, or a SLURM job could not be submitted."""


class JobFailedError(LaunchError):
    """A SLURM job ended in error; the message holds its traceback (or log tail) and its log paths."""


class RemoteTraceback(Exception):
    """Carries the traceback text of an exception raised in another process (shown as the cause)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


def resolve_target(target: Target) -> Callable[..., Any]:
    """Turn ``"package.module:function"`` into the function; callables pass through.

    Args:
        target: an importable ``"module:attr"`` string (dots allowed in ``attr``) or a callable.

    Raises:
        ValueError: the string is malformed, the module cannot be imported or lacks the attribute.
    """
    if callable(target):
        return target
    if not isinstance(target, str) or ":" not in target:
        raise ValueError(f"launch target {target!r} must be a callable or a 'module:function' string")
    module_name, attr = target.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"launch target {target!r}: cannot import module {module_name!r}: {err}") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"launch target {target!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"launch target {target!r} is not callable")
    return obj


def target_name(target: Target) -> str:
    """A readable ``module:function`` name for logs and job names."""
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or "?"
    return f"{module}:{getattr(target, '__qualname__', type(target).__name__)}"


def tasks_per_node(launch_cfg: Any) -> int:
    """Processes per node: ``launch.tasks_per_node``, else one per GPU, else one.

    Args:
        launch_cfg: the ``launch`` block of a config.

    Raises:
        ConfigError: a count is not positive.
    """
    if launch_cfg.nodes < 1:
        raise ConfigError(f"launch.nodes={launch_cfg.nodes} must be at least 1")
    if launch_cfg.gpus_per_node < 0:
        raise ConfigError(f"launch.gpus_per_node={launch_cfg.gpus_per_node} must be 0 (CPU) or more")
    tasks = launch_cfg.tasks_per_node
    if tasks is None:
        tasks = launch_cfg.gpus_per_node or 1
    if tasks < 1:
        raise ConfigError(f"launch.tasks_per_node={tasks} must be at least 1 (or null: one per GPU)")
    return int(tasks)


def append_job_record(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Add one launch record to ``<run_dir>/jobs.jsonl`` (created with the folder if needed)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
    with open(run_dir / JOBS_FILE, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def read_job_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """The launch records of a run folder, oldest first (empty when it has none)."""
    path = Path(run_dir) / JOBS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            _logger.warning("skipping an unreadable line in %s: %r", path, line[:80])
    return records


def requeued(payload: Any) -> Any:
    """The payload a requeued or restarted job runs with: ``payload.requeued()`` where defined, else the same."""
    return payload.requeued() if hasattr(payload, "requeued") else payload


def as_launch_config(launch_cfg: Any) -> LaunchConfig:
    """A plain, picklable :class:`LaunchConfig` from a config's ``launch`` block (DictConfig or dataclass)."""
    if isinstance(launch_cfg, LaunchConfig):
        return launch_cfg
    if isinstance(launch_cfg, DictConfig):
        return OmegaConf.to_object(launch_cfg)  # type: ignore[return-value]
    return LaunchConfig(**dict(launch_cfg))


def absolute_output_dir(cfg: DictConfig) -> Path:
    """Make ``cfg.output_dir`` absolute in place (jobs may start in another folder) and return it."""
    out = Path(os.path.expanduser(str(cfg.output_dir))).absolute()
    cfg.output_dir = str(out)
    return out
