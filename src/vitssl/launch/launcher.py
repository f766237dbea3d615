"""``launch(target, cfg)``: the one way every long command runs, here or on SLURM."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from vitssl.config import ConfigError
from vitssl.launch.common import Target, append_job_record, target_name, tasks_per_node

_logger = logging.getLogger(__name__)


def launch(target: Target, cfg: DictConfig, *, kind: str = "train") -> Any:
    """Run ``target(cfg)`` as ``cfg.launch`` says.

    - ``launch.backend=local``: ``launch.tasks_per_node`` processes on this machine (one: in this process);
      returns what ``target`` returned on rank 0.
    - ``launch.backend=slurm``: submits one job (``launch.nodes`` × tasks per node), prints its id and
      where its logs are, and returns the submitit Job without waiting. With ``launch.dry_run=true`` it
      prints and returns the sbatch script instead.

    Args:
        target: ``"module:function"`` (safest: it pickles by name) or a module-level callable taking the
            config, e.g. ``"vitssl.engine:train"``.
        cfg: the resolved config (``vitssl.config.load_config``).
        kind: ``"train"``: on preemption or time limit the engine stops at a step boundary, checkpoints and
            the job requeues and resumes; any other label (``"eval"``, ``"index"``) reruns the command from
            the start after a requeue.

    Raises:
        ConfigError: invalid launch settings (the message names the ``launch.*`` key).
        Exception: locally, what the target raised (on any rank).
    """
    from vitssl.launch.local import run_local
    from vitssl.launch.slurm import dry_run_script, submit

    lcfg = cfg.launch
    ntasks = tasks_per_node(lcfg)
    if lcfg.backend == "local":
        if lcfg.nodes != 1:
            raise ConfigError(f"launch.nodes={lcfg.nodes} needs launch=slurm; a local launch runs on this machine only")
        if lcfg.dry_run:
            msg = f"dry run: would run {target_name(target)} in {ntasks} local process(es), writing {cfg.output_dir}"
            print(msg)
            return msg
        result = run_local(target, cfg, ntasks)
        if kind == "train" and hasattr(result, "status"):
            append_job_record(
                cfg.output_dir,
                {"backend": "local", "kind": kind, "status": result.status, "step": getattr(result, "step", None)},
            )
        return result
    if lcfg.backend != "slurm":
        raise ConfigError(f"launch.backend={lcfg.backend!r}; valid values: local, slurm")
    if lcfg.dry_run:
        script = dry_run_script(cfg, kind)
        print(script)
        return script
    job = submit(target, cfg, kind)
    total = lcfg.nodes * ntasks
    print(f"Submitted SLURM job {job.job_id}: {kind} {target_name(target)} on {total} task(s)")
    print(f"  logs:   {job.paths.stdout}")
    print(f"          {job.paths.stderr}")
    print(f"  follow: vitssl jobs {cfg.output_dir}   |   vitssl logs {cfg.output_dir}")
    return job
