"""SLURM through submitit: executors from ``cfg.launch``, the job classes, preemption and time limits.

How a preempted or timed-out training job stops (all ranks at the same step boundary):

1. SLURM sends ``SIGUSR2`` (``#SBATCH --signal=USR2@<launch.signal_delay_s>`` before the time limit, or on
   preemption) to every task. submitit's own handler would call ``checkpoint()`` on rank 0 right inside the
   signal handler, possibly in the middle of an optimizer step, so :class:`RunJob` replaces it (keeping
   the original) with one that only calls :func:`vitssl.engine.request_stop` on every rank.
2. The engine agrees on the stop through its per-step all-reduce, writes its atomic checkpoint at that step
   boundary on all ranks, and returns ``TrainResult(status="stopped")``.
3. Rank 0 then calls submitit's original handler: it tells a time-out from a preemption (by the job's
   walltime), calls :meth:`RunJob.checkpoint` (the same job with ``payload.requeued()``), requeues the job with
   ``scontrol requeue`` and exits. Time-outs count down from ``launch.max_requeue`` (submitit's
   ``max_num_timeout``); preemptions do not count. Past the limit rank 0 raises :class:`RequeueLimitError`.
   Other ranks return; the requeue ends the job's processes anyway.
4. The requeued job runs the batch script again: a fresh rendezvous (new processes, new process group),
   and the engine resumes exactly from the checkpoint.

If the engine does not reach a step boundary within two thirds of ``launch.signal_delay_s`` (a step or an
epoch-end evaluation longer than that), a watchdog on rank 0 requeues without a new checkpoint; the job then
resumes from the last periodic one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vitssl.config import ConfigError, LaunchConfig
from vitssl.launch.common import (
    DIST_VARS,
    LaunchError,
    Target,
    append_job_record,
    as_launch_config,
    requeued,
    resolve_target,
    target_name,
    tasks_per_node,
)

_logger = logging.getLogger(__name__)

# Kinds of work whose target stops gracefully on request_stop() and resumes from its checkpoint.
STOPPABLE_KINDS = ("train",)


class RequeueLimitError(LaunchError):
    """A job reached its time limit more than ``launch.max_requeue`` times and was not requeued again."""


# ----------------------------------------------------------------------------------------------- executors
def executor_parameters(launch_cfg: Any, job_name: str) -> dict[str, Any]:
    """``SlurmExecutor.update_parameters`` keywords (= ``#SBATCH`` options) for a ``launch`` block.

    Args:
        launch_cfg: the ``launch`` block of a config.
        job_name: the SLURM job name.

    Raises:
        ConfigError: a value SLURM cannot take (the message names the ``launch.*`` key).
    """
    ntasks = tasks_per_node(launch_cfg)
    if launch_cfg.gpus_per_node and ntasks != launch_cfg.gpus_per_node:
        _logger.warning(
            "launch.tasks_per_node=%d with launch.gpus_per_node=%d: DDP expects one task per GPU",
            ntasks,
            launch_cfg.gpus_per_node,
        )
    if launch_cfg.timeout_min < 1:
        raise ConfigError(f"launch.timeout_min={launch_cfg.timeout_min} must be at least 1 minute")
    if launch_cfg.signal_delay_s < 1:
        raise ConfigError(f"launch.signal_delay_s={launch_cfg.signal_delay_s} must be at least 1 second")
    if launch_cfg.max_requeue < 0:
        raise ConfigError(f"launch.max_requeue={launch_cfg.max_requeue} must be 0 or more")
    if launch_cfg.cpus_per_task < 1:
        raise ConfigError(f"launch.cpus_per_task={launch_cfg.cpus_per_task} must be at least 1")
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": int(launch_cfg.nodes),
        "ntasks_per_node": ntasks,
        "cpus_per_task": int(launch_cfg.cpus_per_task),
        "time": int(launch_cfg.timeout_min),
        "signal_delay_s": int(launch_cfg.signal_delay_s),
        # One failed rank ends the step: the others would otherwise wait in a collective until the time limit.
        "srun_args": ["--kill-on-bad-exit=1"],
    }
    if launch_cfg.gpus_per_node:
        params["gpus_per_node"] = int(launch_cfg.gpus_per_node)
    if launch_cfg.mem_gb is not None:
        if launch_cfg.mem_gb < 1:
            raise ConfigError(f"launch.mem_gb={launch_cfg.mem_gb} must be at least 1 (or null: the default)")
        params["mem"] = f"{int(launch_cfg.mem_gb)}GB"
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(launch_cfg, key)
        if value is not None:
            params[key] = str(value)
    if launch_cfg.setup:
        params["setup"] = [str(line) for line in launch_cfg.setup]
    extra = dict(launch_cfg.sbatch_extra or {})
    if extra:
        params["additional_parameters"] = {str(k): v for k, v in extra.items()}
    return params


def submit_command(folder: str | Path) -> str:
    """The command each task runs (what submitit's SlurmExecutor puts after ``srun``)."""
    return f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"


def make_executor(launch_cfg: Any, folder: str | Path, job_name: str) -> Any:
    """A ``submitit.SlurmExecutor`` writing into ``folder``, set up from a ``launch`` block.

    Args:
        launch_cfg: the ``launch`` block of a config.
        folder: submitit folder (job pickles, sbatch scripts, logs, results).
        job_name: the SLURM job name.

    Raises:
        LaunchError: SLURM's ``srun`` is not on PATH (not a SLURM login node).
    """
    import submitit

    try:
        executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=int(launch_cfg.max_requeue))
    except RuntimeError as err:
        raise LaunchError(
            f"launch=slurm but SLURM is not available here ({err}); run on a SLURM login node, use "
            "launch.dry_run=true to see the sbatch script, or launch=local"
        ) from None
    executor.update_parameters(**executor_parameters(launch_cfg, job_name))
    return executor


def sbatch_script(launch_cfg: Any, folder: str | Path, job_name: str, array_size: int | None = None) -> str:
    """The sbatch script submitit would submit for these settings (works without SLURM installed).

    Args:
        launch_cfg: the ``launch`` block of a config.
        folder: submitit folder.
        job_name: the SLURM job name.
        array_size: number of array tasks, or None for a single job.
    """
    from submitit.slurm.slurm import _make_sbatch_string  # the renderer SlurmExecutor itself uses

    params = executor_parameters(launch_cfg, job_name)
    if array_size is not None and array_size > 1:
        params["map_count"] = array_size
    folder = Path(folder).absolute()
    return _make_sbatch_string(command=submit_command(folder), folder=folder, **params)


# -------------------------------------------------------------------------------------------- in the job
def _setup_job_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
            stream=sys.stderr,
        )


def _export_distributed_env() -> Any:
    """Export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from SLURM's variables.

    Variables inherited from the submitting shell are dropped first; the port is then derived from the job
    id, so every (re)start of the job gets a fresh rendezvous.
    """
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    for name in DIST_VARS:
        os.environ.pop(name, None)
    dist_env = TorchDistributedEnvironment()
    if JobEnvironment().num_nodes == 1:
        try:
            socket.getaddrinfo(dist_env.master_addr, None)
        except OSError:  # a node name DNS does not know; on one node the loopback address always works
            _logger.warning("cannot resolve node name %r; using 127.0.0.1 as MASTER_ADDR", dist_env.master_addr)
            dist_env.master_addr = "127.0.0.1"
    # CUDA_VISIBLE_DEVICES stays as SLURM set it: the engine binds GPU LOCAL_RANK itself.
    return dist_env.export(set_cuda_visible_devices=False)


def _limit_threads() -> None:
    """Use the task's CPUs for intra-op threads unless OMP_NUM_THREADS says otherwise."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and cpus.isdigit():
        import torch

        os.environ["OMP_NUM_THREADS"] = cpus  # for subprocesses (data-loader workers)
        torch.set_num_threads(int(cpus))


@contextlib.contextmanager
def _process_group_teardown() -> Iterator[None]:
    """Leave the process group the target joined: exiting with a live gloo group aborts the process."""
    try:
        yield
    finally:
        if "torch" in sys.modules:
            from vitssl.distributed import destroy_distributed

            destroy_distributed()


def _preempt_signal() -> signal.Signals:
    # submitit reads the same variable (JobEnvironment.USR_SIG) when it writes --signal and installs handlers
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return signal.Signals[f"SIG{name}"]


class _GracefulStop:
    """Turns the preemption signal into ``request_stop()`` and hands over to submitit after the stop.

    Args:
        rank: global rank of this task (only rank 0 requeues).
        grace_s: seconds rank 0 waits for the engine to stop before its watchdog requeues anyway.
    """

    def __init__(self, rank: int, grace_s: float) -> None:
        self.rank = rank
        self.grace_s = grace_s
        self.signum = _preempt_signal()
        self.received = False
        self._pid = os.getpid()
        self._submitit_handler: Any = None
        self._lock = threading.Lock()
        self._handed_over = False
        self._watchdog: threading.Timer | None = None
        self._watchdog_done = threading.Event()
        self._exit = os._exit  # ends the process from the watchdog thread (replaced in tests)

    def install(self) -> None:
        """Replace submitit's handler (installed before the job runs) with ours, keeping it for later."""
        self._submitit_handler = signal.getsignal(self.signum)
        signal.signal(self.signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        from vitssl.engine import request_stop

        if os.getpid() != self._pid:
            return  # a forked data-loader worker inherited the handler; the main process handles it
        request_stop()
        if self.received:
            return
        self.received = True
        _logger.warning(
            "received %s (preemption or time limit): stopping at the next step boundary to checkpoint and requeue",
            signal.Signals(signum).name,
        )
        if self.rank == 0 and callable(self._submitit_handler):
            self._watchdog = threading.Timer(self.grace_s, self._requeue_without_checkpoint)
            self._watchdog.daemon = True
            self._watchdog.start()

    def disarm(self) -> None:
        """The target returned: no watchdog may requeue from now on."""
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _requeue_without_checkpoint(self) -> None:
        with self._lock:
            if self._handed_over:
                return
            self._handed_over = True
        _logger.error(
            "the run did not reach a step boundary within %.0f s of the signal; requeueing without a new "
            "checkpoint (the job resumes from the last periodic one)",
            self.grace_s,
        )
        try:
            self._submitit_handler(self.signum, None)
        except SystemExit:
            self._exit(1)  # requeued: this incarnation is over; the main thread is still inside a step
        except Exception as err:  # not requeued (e.g. too many time-outs): SLURM's time limit ends the job
            _logger.error("the job was not requeued: %s", err)
        finally:
            self._watchdog_done.set()

    def hand_over(self, result: Any, launch_cfg: Any) -> None:
        """Rank 0, after the engine stopped: checkpoint() + requeue through submitit (exits the process).

        Raises:
            RequeueLimitError: the job timed out more than ``launch.max_requeue`` times.
        """
        from submitit.core.utils import UncompletedJobError

        with self._lock:
            watchdog_fired = self._handed_over
            self._handed_over = True
        if watchdog_fired:  # it requeues and ends the process, unless the requeue failed
            self._watchdog_done.wait()
            raise LaunchError("the job was stopped but could not be requeued; see the log above")
        if not callable(self._submitit_handler):
            _logger.warning("not running under submitit's job runner: nothing requeues this job")
            return
        try:
            self._submitit_handler(self.signum, None)  # requeues and raises SystemExit, or raises
        except UncompletedJobError as err:
            ckpt = getattr(result, "checkpoint_path", None) or "the run folder"
            raise RequeueLimitError(
                f"job stopped for good: it reached its time limit {launch_cfg.max_requeue + 1} time(s) and "
                f"launch.max_requeue={launch_cfg.max_requeue} (launch.timeout_min={launch_cfg.timeout_min}). "
                f"Its last checkpoint is {ckpt}; submit the same command again to continue from it "
                "(resume=auto), with a larger launch.timeout_min or launch.max_requeue"
            ) from err


def _stopped_on_request(result: Any, signalled: bool) -> bool:
    """Whether the run stopped because some rank got the preemption signal (not at train.stop_after_steps).

    The engine agrees on a stop across ranks, so rank 0 may return "stopped" for a signal only another
    rank received: the result's ``stop_requested`` says so.
    """
    if getattr(result, "status", None) != "stopped":
        return False
    return signalled or bool(getattr(result, "stop_requested", False))


class RunJob:
    """A submitit job running ``target(payload)`` on every task of a SLURM job; requeues on preemption/time-out.

    Args:
        target: ``"module:function"`` (safest to pickle) or a module-level callable taking the payload.
        payload: the job's picklable payload.
        launch_cfg: the job's resources and requeue policy (``signal_delay_s``, ``max_requeue``, ...).
        kind: ``"train"`` stops gracefully through the engine and resumes; other kinds rerun from the start
            after a requeue (their outputs are cached).
    """

    def __init__(self, target: Target, payload: Any, launch_cfg: LaunchConfig, kind: str = "train") -> None:
        self.target = target
        self.payload = payload
        self.launch_cfg = launch_cfg
        self.kind = kind

    def __call__(self) -> Any:
        import submitit

        _setup_job_logging()
        env = submitit.JobEnvironment()
        _export_distributed_env()
        _limit_threads()
        fn = resolve_target(self.target)
        payload = self.payload
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if self.kind in STOPPABLE_KINDS and restarts > 0:
            payload = requeued(payload)  # SLURM requeued the job by itself (node failure): continue, never restart
        _logger.info("%s: %s, %s, restart %d", self.kind, target_name(self.target), env, restarts)
        if self.kind not in STOPPABLE_KINDS:
            with _process_group_teardown():
                return fn(payload)
        stopper = _GracefulStop(env.global_rank, grace_s=max(5.0, self.launch_cfg.signal_delay_s * 2 / 3))
        stopper.install()
        try:
            with _process_group_teardown():
                result = fn(payload)
        finally:
            stopper.disarm()
        if _stopped_on_request(result, stopper.received):
            if env.global_rank == 0:
                stopper.hand_over(result, self.launch_cfg)
            else:
                _logger.info("stopped at step %s; rank 0 requeues the job", getattr(result, "step", "?"))
        return result

    def checkpoint(self) -> Any:
        """What submitit resubmits after a preemption or time-out: the same job, resuming its run."""
        from submitit.helpers import DelayedSubmission

        payload = requeued(self.payload) if self.kind in STOPPABLE_KINDS else self.payload
        return DelayedSubmission(RunJob(self.target, payload, self.launch_cfg, self.kind))


class CallJob:
    """A submitit job calling ``target(*args, **kwargs)``; reruns from the start after a requeue.

    Args:
        target: ``"module:function"`` or a module-level callable.
        args: positional arguments (picklable).
        kwargs: keyword arguments (picklable).
    """

    def __init__(self, target: Target, args: tuple = (), kwargs: dict[str, Any] | None = None) -> None:
        self.target = target
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})

    def __call__(self) -> Any:
        _setup_job_logging()
        _export_distributed_env()
        _limit_threads()
        fn = resolve_target(self.target)
        with _process_group_teardown():
            return fn(*self.args, **self.kwargs)

    def checkpoint(self) -> Any:
        """Resubmit the same call (it is idempotent, or resumes from its own outputs)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(CallJob(self.target, self.args, self.kwargs))


# --------------------------------------------------------------------------------------------- submitting
def _submitit_folder(launch_cfg: LaunchConfig, out: Path) -> Path:
    return Path(os.path.expanduser(str(launch_cfg.folder))).absolute() if launch_cfg.folder else out / "submitit"


@contextlib.contextmanager
def _submission_env() -> Iterator[None]:
    """Hide the variables of an enclosing SLURM job or launcher while submitting (sbatch would pass them on).

    Like ``submitit.helpers.clean_env`` but keeps ``SLURM_CONF`` (which cluster to talk to), the user's
    ``SBATCH_*`` defaults and ``SUBMITIT_PREEMPT_SIGNAL`` (the job must handle the signal sbatch sends).
    """
    keep = ("SLURM_CONF", "SUBMITIT_PREEMPT_SIGNAL")
    hidden = {
        name: os.environ.pop(name)
        for name in list(os.environ)
        if (name.startswith(("SLURM_", "SLURMD_", "SRUN_", "SUBMITIT_")) and name not in keep) or name in DIST_VARS
    }
    try:
        yield
    finally:
        os.environ.update(hidden)


def _record(job: Any, run_dir: Path, kind: str, target: Target, ntasks: int) -> None:
    append_job_record(
        run_dir,
        {
            "backend": "slurm",
            "job_id": job.job_id,
            "folder": str(job.paths.folder),  # with %j / %A placeholders of launch.folder filled in
            "kind": kind,
            "target": target_name(target),
            "tasks": ntasks,
        },
    )


def submit(target: Target, payload: Any, launch_cfg: Any, output_dir: str | Path, kind: str = "train") -> Any:
    """Submit ``target(payload)`` as one SLURM job (all nodes × tasks per node) and return the submitit Job.

    The submitit folder is ``launch.folder`` or ``<output_dir>/submitit``; the job is also recorded in
    ``<output_dir>/jobs.jsonl`` for ``vitssl jobs`` / ``vitssl logs``.

    Args:
        target: ``"module:function"`` or a module-level callable taking the payload.
        payload: the job's picklable payload.
        launch_cfg: resources and requeue policy (a ``launch`` block).
        output_dir: the job's folder.
        kind: ``"train"`` (graceful stop + exact resume) or another label (rerun after a requeue).
    """
    lcfg = as_launch_config(launch_cfg)
    out = Path(os.path.expanduser(str(output_dir))).absolute()
    folder = _submitit_folder(lcfg, out)
    job_name = f"vitssl-{kind}-{out.name}"
    executor = make_executor(lcfg, folder, job_name)
    with _submission_env():
        job = executor.submit(RunJob(target, payload, lcfg, kind))
    ntasks = lcfg.nodes * tasks_per_node(lcfg)
    _record(job, out, kind, target, ntasks)
    _logger.info("submitted %s job %s (%d task(s)) from %s", kind, job.job_id, ntasks, folder)
    return job


def dry_run_script(launch_cfg: Any, output_dir: str | Path, kind: str = "train", array_size: int | None = None) -> str:
    """The sbatch script :func:`submit` would submit (nothing is written or submitted)."""
    lcfg = as_launch_config(launch_cfg)
    out = Path(os.path.expanduser(str(output_dir))).absolute()
    return sbatch_script(lcfg, _submitit_folder(lcfg, out), f"vitssl-{kind}-{out.name}", array_size)


def submit_array(
    runs: list[tuple[Target, Any, str | Path]], launch_cfg: Any, folder: str | Path, name: str, kind: str = "train"
) -> list[Any]:
    """Submit several runs as ONE SLURM job array (same resources), each writing to its own output_dir.

    Args:
        runs: ``(target, payload, output_dir)`` per run.
        launch_cfg: the resources every array task gets.
        folder: submitit folder shared by the array.
        name: job name.
        kind: as in :func:`submit`.

    Returns:
        One submitit Job per run, in order.
    """
    lcfg = as_launch_config(launch_cfg)
    folder = Path(folder).absolute()
    executor = make_executor(lcfg, folder, name)
    with _submission_env():
        jobs = executor.submit_array([RunJob(target, payload, lcfg, kind) for target, payload, _ in runs])
    ntasks = lcfg.nodes * tasks_per_node(lcfg)
    for job, (target, _, out) in zip(jobs, runs):
        _record(job, Path(out).absolute(), kind, target, ntasks)
    return jobs


def submit_array_then(
    calls: list[tuple[Target, tuple]],
    then: tuple[Target, tuple],
    launch_cfg: Any,
    folder: str | Path,
    name: str = "vitssl-array",
    then_launch_cfg: Any | None = None,
) -> tuple[list[Any], Any]:
    """Submit ``calls`` as one job array plus a job that starts only when every array task succeeded.

    Used for sharded work followed by a merge (``index build --shards n``). With ``launch.backend=local``
    everything runs here, in order, and the results are returned instead of jobs.

    Args:
        calls: ``(target, args)`` per array task; each runs ``target(*args)``.
        then: ``(target, args)`` of the dependent job (``afterok`` on the whole array).
        launch_cfg: resources of the array tasks.
        folder: submitit folder for all of them.
        name: job name (the dependent job gets ``-then`` appended).
        then_launch_cfg: resources of the dependent job; default ``launch_cfg``.

    Returns:
        ``(array_jobs, then_job)``, or ``(array_results, then_result)`` for the local backend.
    """
    if not calls:
        raise ValueError("submit_array_then needs at least one call for the array")
    then_launch_cfg = launch_cfg if then_launch_cfg is None else then_launch_cfg
    if launch_cfg.backend == "local":
        results = [resolve_target(target)(*args) for target, args in calls]
        then_target, then_args = then
        return results, resolve_target(then_target)(*then_args)
    folder = Path(folder).absolute()
    executor = make_executor(launch_cfg, folder, name)
    with _submission_env():
        jobs = executor.submit_array([CallJob(target, args) for target, args in calls])
    array_id = str(jobs[0].job_id).split("_")[0]
    then_executor = make_executor(then_launch_cfg, folder, f"{name}-then")
    extra = dict(then_executor.parameters.get("additional_parameters") or {})
    # kill-on-invalid-dep: if a shard fails, the merge job is cancelled instead of pending forever
    extra.update({"dependency": f"afterok:{array_id}", "kill-on-invalid-dep": "yes"})
    then_executor.update_parameters(additional_parameters=extra)
    then_target, then_args = then
    with _submission_env():
        then_job = then_executor.submit(CallJob(then_target, then_args))
    _logger.info("submitted array %s (%d tasks) and job %s after it", array_id, len(jobs), then_job.job_id)
    return jobs, then_job
