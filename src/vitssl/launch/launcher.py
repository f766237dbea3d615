"""``launch(target, payload, launch_cfg, output_dir)``: the one way every long command runs, here or on SLURM."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from vitssl.config import ConfigError
from vitssl.launch.common import Target, append_job_record, as_launch_config, target_name, tasks_per_node

_logger = logging.getLogger(__name__)


def launch(target: Target, payload: Any, launch_cfg: Any, output_dir: str | Path, *, kind: str = "train") -> Any:
    """Run ``target(payload)`` as ``launch_cfg`` says.

    - ``backend=local``: ``tasks_per_node`` processes on this machine (one: in this process); returns what
      ``target`` returned on rank 0.
    - ``backend=slurm``: submits one job (``nodes`` × tasks per node), prints its id and where its logs are,
      and returns the submitit Job without waiting. With ``dry_run`` it prints and returns the sbatch script.

    Args:
        target: ``"module:function"`` (safest: it pickles by name) or a module-level callable taking the payload.
        payload: a picklable dataclass with everything the job needs (see :data:`~vitssl.launch.common.Target`).
        launch_cfg: a config's ``launch`` block (``LaunchConfig`` or its DictConfig).
        output_dir: the job's folder: ``jobs.jsonl`` records each launch there, SLURM logs go to its ``submitit``.
        kind: ``"train"``: on preemption or time limit the target stops at a step boundary, checkpoints and the
            job requeues with ``payload.requeued()``; any other label (``"eval"``, ``"index"``) reruns the job
            from the start after a requeue.

    Raises:
        ConfigError: invalid launch settings (the message names the ``launch.*`` key).
        Exception: locally, what the target raised (on any rank).
    """
    from vitssl.launch.local import run_local
    from vitssl.launch.slurm import dry_run_script, submit

    lcfg = as_launch_config(launch_cfg)
    output_dir = Path(os.path.expanduser(str(output_dir))).absolute()
    ntasks = tasks_per_node(lcfg)
    if lcfg.backend == "local":
        if lcfg.nodes != 1:
            raise ConfigError(f"launch.nodes={lcfg.nodes} needs launch=slurm; a local launch runs on this machine only")
        if lcfg.dry_run:
            msg = f"dry run: would run {target_name(target)} in {ntasks} local process(es), writing {output_dir}"
            print(msg)
            return msg
        result = run_local(target, payload, ntasks)
        if kind == "train" and hasattr(result, "status"):
            append_job_record(
                output_dir,
                {"backend": "local", "kind": kind, "status": result.status, "step": getattr(result, "step", None)},
            )
        return result
    if lcfg.backend != "slurm":
        raise ConfigError(f"launch.backend={lcfg.backend!r}; valid values: local, slurm")
    if lcfg.dry_run:
        script = dry_run_script(lcfg, output_dir, kind)
        print(script)
        return script
    job = submit(target, payload, lcfg, output_dir, kind)
    total = lcfg.nodes * ntasks
    print(f"Submitted SLURM job {job.job_id}: {kind} {target_name(target)} on {total} task(s)")
    print(f"  logs:   {job.paths.stdout}")
    print(f"          {job.paths.stderr}")
    print(f"  follow: vitssl jobs {output_dir}   |   vitssl logs {output_dir}")
    return job
