"""What happened to a run's SLURM jobs: states, errors, logs, waiting.

Job ids come from the run folder's ``jobs.jsonl`` (written at submission) or, failing that, from the
submitit folder's file names. States come from ``sacct`` when SLURM keeps accounting, else from
``scontrol show job`` (jobs stay visible there for ``MinJobAge`` after they end), else from the result
pickles submitit writes (``("success", value)`` or ``("error", traceback)``).
"""

from __future__ import annotations

import functools
import logging
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitssl.errors import MissingFileError
from vitssl.launch.common import JobFailedError, read_job_records

_logger = logging.getLogger(__name__)

# SLURM states in which a job may still produce results.
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SUSPENDED",
        "STAGE_OUT",
        "SIGNALING",
        "STOPPED",
        "RESV_DEL_HOLD",
    }
)
_SUBMITTED_RE = re.compile(r"^(\d+(?:_\d+)?)_submitted\.pkl$")


@dataclass
class JobInfo:
    """One SLURM job of a run, as far as SLURM and submitit's files tell."""

    job_id: str
    folder: Path  # submitit folder
    state: str  # SLURM state (COMPLETED, FAILED, RUNNING, ...) or UNKNOWN
    restarts: int | None = None  # requeues so far, when SLURM still knows the job
    elapsed: str | None = None
    reason: str | None = None  # SLURM's reason for a pending job
    error: str | None = None  # traceback of the task that raised, if any
    error_task: int | None = None
    result: Any = None  # rank 0's return value when it succeeded
    tasks: int = 1
    extra: dict[str, Any] = field(default_factory=dict)  # the launch record (kind, target, ...)

    @property
    def done(self) -> bool:
        """SLURM ended the job (or is ending it and rank 0 already left its result)."""
        if self.state == "COMPLETING":
            return self.result is not None or self.error is not None
        return self.state not in ACTIVE_STATES and self.state != "UNKNOWN"

    @property
    def failed(self) -> bool:
        return self.error is not None or (self.done and self.state not in ("COMPLETED", "COMPLETING"))

    def log_path(self, task: int = 0, stream: str = "out") -> Path:
        """``stream`` = ``"out"`` or ``"err"``: the log file of ``task`` (submitit's naming)."""
        return self.folder / f"{self.job_id}_{task}_log.{stream}"

    def summary(self) -> str:
        """One line about the outcome: the error's last line, the run's status, or SLURM's reason."""
        if self.error:
            lines = [ln for ln in self.error.strip().splitlines() if ln.strip()]
            last = lines[-1].strip() if lines else "error"
            return f"task {self.error_task}: {last}"
        status = getattr(self.result, "status", None)
        if status is not None:
            return f"{status} at step {getattr(self.result, 'step', '?')}"
        if self.state == "PENDING" and self.reason:
            return f"waiting: {self.reason}"
        return ""

    def failure_message(self) -> str:
        """The full story of a failed job: error or log tail, and where its logs are."""
        parts = [f"SLURM job {self.job_id} {self.state.lower()}"]
        if self.error:
            parts.append(f"task {self.error_task} raised:\n{self.error.rstrip()}")
        else:
            tail = _tail(self.log_path(0, "err"), 30)
            parts.append(f"no Python error was recorded (killed by SLURM?); end of its stderr:\n{tail}")
        task = self.error_task or 0
        parts.append(f"logs: {self.log_path(task, 'err')}\n      {self.log_path(task, 'out')}")
        return "\n".join(parts)


def _tail(path: Path, lines: int) -> str:
    if not path.is_file():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@functools.lru_cache(maxsize=1)
def _sacct_works() -> bool:
    """sacct needs slurmdbd; without it, it fails ("accounting storage is disabled") and we never retry."""
    if shutil.which("sacct") is None:
        return False
    res = subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, text=True, timeout=60)
    return res.returncode == 0


def slurm_states(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """SLURM's view of each job: ``{job_id: {"state", "restarts", "elapsed", "reason"}}``; unknown ids are left out.

    Args:
        job_ids: ``"123"`` or ``"123_4"`` (array task) ids.
    """
    if not job_ids:
        return {}
    found: dict[str, dict[str, str]] = {}
    if _sacct_works():
        cmd = ["sacct", "-n", "-P", "-X", "-o", "JobID,State,Elapsed", "-j", ",".join(job_ids)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if res.returncode == 0:
            for line in res.stdout.splitlines():
                parts = line.split("|")
                if len(parts) >= 3 and parts[0] in job_ids:
                    found[parts[0]] = {"state": parts[1].split()[0], "elapsed": parts[2]}
    missing = [job_id for job_id in job_ids if job_id not in found]  # e.g. pending array tasks (123_[0-2])
    if not missing or shutil.which("scontrol") is None:
        return found
    for job_id in missing:
        res = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
        if res.returncode != 0 or "JobState=" not in res.stdout:
            continue  # "Invalid job id": SLURM forgot it (MinJobAge), the result files tell the rest
        fields = dict(tok.split("=", 1) for tok in res.stdout.split() if "=" in tok)
        found[job_id] = {
            "state": fields.get("JobState", "UNKNOWN"),
            "restarts": fields.get("Restarts", ""),
            "elapsed": fields.get("RunTime", ""),
            "reason": fields.get("Reason", ""),
        }
    return found


def _read_results(folder: Path, job_id: str) -> tuple[Any, str | None, int | None]:
    """(rank 0's value, first traceback, its task) from the result pickles of ``job_id``."""
    from submitit.core.utils import pickle_load

    value, error, error_task = None, None, None
    pattern = re.compile(rf"^{re.escape(job_id)}_(\d+)_result\.pkl$")
    for path in sorted(folder.glob(f"{job_id}_*_result.pkl")):
        match = pattern.match(path.name)
        if not match:
            continue
        task = int(match.group(1))
        try:
            outcome, payload = pickle_load(path)
        except Exception as err:  # half-written or unreadable: report, do not crash the listing
            _logger.warning("cannot read %s: %s", path, err)
            continue
        if outcome == "error" and (error_task is None or task < error_task):
            error, error_task = str(payload), task
        elif outcome == "success" and task == 0:
            value = payload
    return value, error, error_task


def job_info(job_id: str, folder: str | Path, tasks: int = 1, state: dict[str, str] | None = None) -> JobInfo:
    """Everything known about one job.

    Args:
        job_id: SLURM id (``"123"`` or ``"123_4"``).
        folder: its submitit folder.
        tasks: number of tasks of the job.
        state: SLURM's entry from :func:`slurm_states` (queried when None).
    """
    folder = Path(folder)
    if state is None:
        state = slurm_states([job_id]).get(job_id, {})
    value, error, error_task = _read_results(folder, job_id)
    slurm_state = state.get("state", "UNKNOWN")
    if slurm_state == "UNKNOWN" and (value is not None or error is not None):
        # SLURM forgot the job; submitit's result files say how it ended
        slurm_state = "FAILED" if error is not None else "COMPLETED"
    restarts = state.get("restarts")
    return JobInfo(
        job_id=job_id,
        folder=folder,
        state=slurm_state,
        restarts=int(restarts) if restarts and restarts.isdigit() else None,
        elapsed=state.get("elapsed") or None,
        reason=state.get("reason") if state.get("reason") not in (None, "", "None") else None,
        error=error,
        error_task=error_task,
        result=value,
        tasks=tasks,
    )


def _submitit_folders(run_dir: Path) -> list[Path]:
    return [p for p in (run_dir / "submitit", run_dir) if p.is_dir() and any(p.glob("*_submitted.pkl"))]


def run_jobs(run_dir: str | Path) -> list[JobInfo]:
    """The SLURM jobs of a run folder, oldest first (from ``jobs.jsonl``, else the submitit folder).

    Args:
        run_dir: a run folder (``output_dir``), or a submitit folder.
    """
    run_dir = Path(run_dir)
    entries: list[tuple[str, Path, int, dict[str, Any]]] = []
    for rec in read_job_records(run_dir):
        if rec.get("backend") == "slurm" and rec.get("job_id"):
            entries.append((str(rec["job_id"]), Path(rec["folder"]), int(rec.get("tasks", 1)), rec))
    if not entries:
        for folder in _submitit_folders(run_dir):
            ids = {m.group(1) for p in folder.iterdir() if (m := _SUBMITTED_RE.match(p.name))}
            entries.extend((jid, folder, 1, {}) for jid in ids)
        entries.sort(key=lambda e: [int(x) for x in e[0].split("_")])
    states = slurm_states([e[0] for e in entries])
    infos = []
    for job_id, folder, tasks, rec in entries:
        info = job_info(job_id, folder, tasks, states.get(job_id, {}))
        info.extra = rec
        infos.append(info)
    return infos


def find_runs(path: str | Path) -> list[Path]:
    """``path`` itself if it is a run folder with jobs, else its sub-folders that are (a sweep folder)."""
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"{path} is not a folder; pass a run folder (its output_dir) or a sweep folder")
    if (path / "jobs.jsonl").is_file() or _submitit_folders(path):
        return [path]
    return sorted(p for p in path.iterdir() if p.is_dir() and ((p / "jobs.jsonl").is_file() or _submitit_folders(p)))


def wait_for(job: Any, folder: str | Path | None = None, timeout_s: float = 3600.0, poll_s: float = 1.0) -> Any:
    """Wait for a SLURM job to end (through requeues) and return rank 0's result.

    Unlike ``submitit.Job.result()``, this also ends for jobs SLURM killed without a result file, and it
    does not need ``sacct``.

    Args:
        job: a submitit Job, or a job id string.
        folder: the submitit folder (taken from the Job when omitted).
        timeout_s: give up after this many seconds.
        poll_s: seconds between checks.

    Raises:
        JobFailedError: the job failed; the message holds the traceback or log tail and the log paths.
        TimeoutError: still running after ``timeout_s``.
    """
    job_id = job if isinstance(job, str) else str(job.job_id)
    folder = Path(folder) if folder is not None else Path(job.paths.folder)
    deadline = time.monotonic() + timeout_s
    unknown = 0
    while True:
        info = job_info(job_id, folder)
        if info.done:
            break
        unknown = unknown + 1 if info.state == "UNKNOWN" else 0
        if unknown >= 5:  # SLURM forgot the job and it left no result: it was killed or never started
            raise JobFailedError(info.failure_message())
        if time.monotonic() > deadline:
            raise TimeoutError(f"SLURM job {job_id} is still {info.state} after {timeout_s:.0f} s")
        time.sleep(poll_s)
    if info.failed:
        raise JobFailedError(info.failure_message())
    return info.result
