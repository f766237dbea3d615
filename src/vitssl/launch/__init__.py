"""Launching: one process, N local processes, or SLURM jobs and job arrays through submitit.

Every long command goes through :func:`launch`; ``cfg.launch.backend`` picks where it runs.
"""

from vitssl.launch.common import JobFailedError, LaunchError, resolve_target
from vitssl.launch.jobs import JobInfo, run_jobs, wait_for
from vitssl.launch.launcher import launch
from vitssl.launch.local import run_local
from vitssl.launch.slurm import CallJob, RequeueLimitError, RunJob, submit, submit_array, submit_array_then
from vitssl.launch.sweep import launch_sweep, sweep_summary

__all__ = [
    "CallJob",
    "JobFailedError",
    "JobInfo",
    "LaunchError",
    "RequeueLimitError",
    "RunJob",
    "launch",
    "launch_sweep",
    "resolve_target",
    "run_jobs",
    "run_local",
    "submit",
    "submit_array",
    "submit_array_then",
    "sweep_summary",
    "wait_for",
]
