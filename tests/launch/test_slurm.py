"""Launching on a real SLURM cluster (started by the ``slurm_cluster`` fixture): DDP, preemption, time-outs,
sweeps as job arrays, dependent jobs, failures; plus the sbatch script of a dry run (no cluster needed).

Jobs import this module by name (targets ``"tests.test_slurm:..."``), so they get the repository on PYTHONPATH through
``launch.setup``, exactly as a user adds ``module load`` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import tests
from vitssl.cli.launch import register_commands
from vitssl.cli.pretrain import PRETRAIN_TARGET, PretrainJob, pretrain_job
from vitssl.config import load_config
from vitssl.engine.checkpoint import LAST_NAME, list_step_checkpoints, load_checkpoint
from vitssl.launch import JobFailedError, launch, launch_sweep, submit_array_then, wait_for
from vitssl.launch.jobs import job_info
from vitssl.ssl import OBJECTIVES, register_objective
from vitssl.ssl.supervised import Supervised, SupervisedConfig

# The folder holding the `tests` package, so a job can unpickle the classes this module defines.
TESTS_ROOT = Path(tests.__file__).resolve().parent.parent
# $VAR, not ${VAR}: OmegaConf would resolve that. One thread per rank, as in the local reference run.
SETUP = [f'export PYTHONPATH="{TESTS_ROOT}:$PYTHONPATH"', "export OMP_NUM_THREADS=1"]
JOB_TIMEOUT_S = 240


# ------------------------------------------------------------------------------------ what the jobs run
@dataclass
class PausingConfig(SupervisedConfig):
    name: str = "test_pausing"
    pause_at_steps: list[int] = field(default_factory=list)  # steps after which every rank waits
    pause_dir: str = ""  # marker files: paused_<step>_rank<r> written, release_<step> awaited


if "test_pausing" not in OBJECTIVES:

    @register_objective("test_pausing")
    class Pausing(Supervised):
        """Supervised (same weights, same math), but it waits after chosen steps until the test releases it.

        The test sends its SLURM signal while the job is parked there, so the interruption lands
        mid-training at a known step, however slow or fast the machine is.
        """

        Config = PausingConfig

        def on_step_end(self, step: int, total_steps: int) -> None:
            super().on_step_end(step, total_steps)
            if step not in self.cfg.pause_at_steps:
                return
            pause_dir = Path(self.cfg.pause_dir)
            release = pause_dir / f"release_{step}"
            if release.exists():
                return
            (pause_dir / f"paused_{step}_rank{os.environ.get('RANK', '0')}").touch()
            deadline = time.monotonic() + 180
            while not release.exists() and time.monotonic() < deadline:
                time.sleep(0.1)


def train_target(job: PretrainJob):
    """The training job, reached through this module so that jobs register the test objective first."""
    return pretrain_job(job)


def failing_target(job: PretrainJob):
    raise ValueError(f"deliberate failure for the test in {job.config['output_dir']}")


def write_shard(folder: str, index: int) -> int:
    Path(folder, f"shard_{index}.txt").write_text(str(10 * (index + 1)))
    return index


def merge_shards(folder: str, n: int) -> int:
    """Fails unless every shard exists: the dependency must hold it back until the array finished."""
    return sum(int(Path(folder, f"shard_{i}.txt").read_text()) for i in range(n))


# -------------------------------------------------------------------------------------------- helpers
def run(target: str, cfg, kind: str = "train"):
    """Launch ``target`` with the training payload of ``cfg``, as `vitssl pretrain` does."""
    return launch(target, PretrainJob.from_config(cfg), cfg.launch, cfg.output_dir, kind=kind)


def slurm_cfg(out: Path, *overrides: str, tasks: int = 1):
    cfg = load_config(
        "pretrain/test_tiny",
        [
            f"output_dir={out}",
            "launch=slurm",
            f"launch.tasks_per_node={tasks}",
            "launch.cpus_per_task=1",
            *overrides,
        ],
    )
    cfg.launch.setup = SETUP
    return cfg


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / LAST_NAME)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ in {different[:5]}"


def wait_for_files(paths: list[Path], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"timed out waiting for {[str(p) for p in paths if not p.exists()]}"
        time.sleep(0.2)


def wait_for_log(path: Path, text: str, count: int = 1, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and path.read_text(errors="replace").count(text) >= count):
        assert time.monotonic() < deadline, f"{text!r} did not appear {count}x in {path}"
        time.sleep(0.2)


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="vitssl")
    register_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


STOP_MESSAGE = "received SIGUSR2"


@pytest.fixture(scope="module")
def reference(slurm_cluster, local_two_process_run) -> dict[str, torch.Tensor]:
    """Final weights of the recipe run uninterrupted by the local launcher in 2 gloo processes."""
    out, result = local_two_process_run
    assert result.status == "finished" and result.step == 8
    return weights(out)


# -------------------------------------------------------------------------------------------- the tests
@pytest.mark.slurm
def test_two_task_job_matches_local_run(slurm_cluster, reference, tmp_path, capsys):
    job = run(f"{__name__}:train_target", slurm_cfg(tmp_path, tasks=2))
    printed = capsys.readouterr().out
    assert f"Submitted SLURM job {job.job_id}" in printed and str(job.paths.stdout) in printed
    result = wait_for(job, timeout_s=JOB_TIMEOUT_S)
    assert result.status == "finished" and result.step == 8
    assert_same_weights(weights(tmp_path), reference)
    rank1 = job.task(1).result()  # submitit's own reading of task 1's result file
    assert (rank1.status, rank1.step) == ("finished", 8)
    assert job_info(job.job_id, job.paths.folder, 2).log_path(1, "err").is_file()  # one log per task


@pytest.mark.slurm
def test_preemption_requeues_and_resumes_exactly(slurm_cluster, reference, tmp_path):
    pause = tmp_path / "pause"
    pause.mkdir()
    out = tmp_path / "run"
    cfg = slurm_cfg(out, "objective.name=test_pausing", "objective.pause_at_steps=[3]", f"objective.pause_dir={pause}",
                    tasks=2)  # fmt: skip
    job = run(f"{__name__}:train_target", cfg)
    wait_for_files([pause / "paused_3_rank0", pause / "paused_3_rank1"])
    job._interrupt()  # preemption: SIGTERM, then USR2 to every task
    info = job_info(job.job_id, job.paths.folder, 2)
    for rank in (0, 1):
        wait_for_log(info.log_path(rank, "err"), STOP_MESSAGE)
    (pause / "release_3").touch()
    result = wait_for(job, timeout_s=JOB_TIMEOUT_S)
    assert result.status == "finished" and result.step == 8
    assert_same_weights(weights(out), reference)
    info = job_info(job.job_id, job.paths.folder, 2)
    assert info.restarts == 1
    log = info.log_path(0, "err").read_text()
    assert "this job is preempted" in log
    assert "(3 remaining timeouts)" in log  # a preemption does not use up launch.max_requeue
    assert re.search(r"resumed from \S+ at step 4\b", log)  # the stop checkpoint: the step after the signal
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # the stop checkpoint at step 4, then 5..8 after the requeue


@pytest.mark.slurm
def test_preempted_fsdp_job_resumes_from_its_sharded_checkpoint(slurm_cluster, local_two_process_run, tmp_path):
    """train.strategy=fsdp on 2 tasks: the stop checkpoint is a .dcp folder, the requeued job reshards from it and
    ends with the losses and weights of the uninterrupted (DDP) local run."""
    pause = tmp_path / "pause"
    pause.mkdir()
    out = tmp_path / "run"
    cfg = slurm_cfg(out, "train.strategy=fsdp", "objective.name=test_pausing", "objective.pause_at_steps=[3]",
                    f"objective.pause_dir={pause}", tasks=2)  # fmt: skip
    job = run(f"{__name__}:train_target", cfg)
    wait_for_files([pause / "paused_3_rank0", pause / "paused_3_rank1"])
    job._interrupt()  # preemption
    info = job_info(job.job_id, job.paths.folder, 2)
    for rank in (0, 1):
        wait_for_log(info.log_path(rank, "err"), STOP_MESSAGE)
    (pause / "release_3").touch()
    result = wait_for(job, timeout_s=JOB_TIMEOUT_S)
    assert result.status == "finished" and result.step == 8
    log = job_info(job.job_id, job.paths.folder, 2).log_path(0, "err").read_text()
    assert re.search(r"resumed from \S+checkpoint_00000004\.dcp at step 4\b", log)
    reference_dir = local_two_process_run[0]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = {
        r["step"]: r["loss"] for r in map(json.loads, (reference_dir / "metrics.jsonl").read_text().splitlines())
    }
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records:
        assert r["loss"] == pytest.approx(expected[r["step"]], abs=1e-5), r["step"]
    step, newest = max(list_step_checkpoints(out))
    assert step == 8 and newest.suffix == ".dcp"
    final, reference = load_checkpoint(newest)["model"], weights(reference_dir)
    assert final.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=1e-5)


@pytest.mark.slurm
def test_timeout_requeues_until_max_requeue(slurm_cluster, tmp_path):
    pause = tmp_path / "pause"
    pause.mkdir()
    out = tmp_path / "run"
    # With a time limit under 10 min submitit counts every USR2 as a time-out (not a preemption).
    cfg = slurm_cfg(out, "objective.name=test_pausing", "objective.pause_at_steps=[2,5]",
                    f"objective.pause_dir={pause}", "launch.timeout_min=5", "launch.max_requeue=1")  # fmt: skip
    job = run(f"{__name__}:train_target", cfg)
    err_log = job_info(job.job_id, job.paths.folder).log_path(0, "err")
    wait_for_files([pause / "paused_2_rank0"])
    job._interrupt(timeout=True)
    wait_for_log(err_log, STOP_MESSAGE)
    (pause / "release_2").touch()
    # requeued once (max_requeue=1): the new incarnation resumes from step 3 and parks at step 5
    wait_for_files([pause / "paused_5_rank0"])
    assert job_info(job.job_id, job.paths.folder).restarts == 1
    assert "this job is timed-out" in err_log.read_text() and "(0 remaining timeouts)" in err_log.read_text()
    job._interrupt(timeout=True)
    wait_for_log(err_log, STOP_MESSAGE, count=2)
    (pause / "release_5").touch()
    with pytest.raises(JobFailedError) as failure:
        wait_for(job, timeout_s=JOB_TIMEOUT_S)
    message = str(failure.value)
    assert "launch.max_requeue=1" in message and "time limit 2 time(s)" in message
    assert str(out / "checkpoint_00000006.pth") in message and str(err_log) in message
    assert max(list_step_checkpoints(out))[0] == 6  # the stop checkpoint is there to resume from


@pytest.mark.slurm
def test_sweep_is_one_array_of_three(slurm_cluster, tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    overrides = [f"output_dir={sweep_dir}", "optim.lr=1e-3,2e-3,4e-3", "train.epochs=1", "launch=slurm",
                 "launch.cpus_per_task=1"]  # fmt: skip
    jobs = launch_sweep("pretrain/test_tiny", overrides, PRETRAIN_TARGET, PretrainJob.from_config)
    assert len(jobs) == 3
    array_id = jobs[0].job_id.split("_")[0]
    assert [j.job_id for j in jobs] == [f"{array_id}_{i}" for i in range(3)]
    results = [wait_for(job, timeout_s=JOB_TIMEOUT_S) for job in jobs]
    assert [r.status for r in results] == ["finished"] * 3
    runs = sorted(p.name for p in sweep_dir.iterdir() if (p / LAST_NAME).exists())
    assert runs == ["optim.lr=1e-3", "optim.lr=2e-3", "optim.lr=4e-3"]
    capsys.readouterr()
    assert cli("sweep-summary", sweep_dir, "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["run"], r["status"], r["step"]) for r in rows] == [(name, "finished", 4) for name in runs]
    assert len({r["loss"] for r in rows}) == 3  # three different learning rates, three different losses
    assert cli("jobs", sweep_dir) == 0
    listing = capsys.readouterr().out
    assert listing.count("COMPLETED") == 3 and "finished at step 4" in listing


@pytest.mark.slurm
def test_failed_job_surfaces_error_and_log(slurm_cluster, tmp_path, capsys):
    job = run(f"{__name__}:failing_target", slurm_cfg(tmp_path), kind="eval")
    with pytest.raises(JobFailedError) as failure:
        wait_for(job, timeout_s=JOB_TIMEOUT_S)
    message = str(failure.value)
    assert "ValueError: deliberate failure for the test" in message
    assert str(job.paths.stderr) in message and "Traceback" in message
    capsys.readouterr()
    assert cli("jobs", tmp_path) == 1
    listing = capsys.readouterr().out
    assert "FAILED" in listing and "ValueError: deliberate failure" in listing and str(job.paths.stderr) in listing
    assert cli("logs", tmp_path, "--err") == 0
    assert "failing_target" in capsys.readouterr().out  # the traceback in the job's stderr


@pytest.mark.slurm
def test_array_then_dependent_job(slurm_cluster, tmp_path):
    cfg = slurm_cfg(tmp_path)
    shards = tmp_path / "shards"
    shards.mkdir()
    calls = [(f"{__name__}:write_shard", (str(shards), i)) for i in range(2)]
    jobs, merge = submit_array_then(calls, (f"{__name__}:merge_shards", (str(shards), 2)), cfg.launch,
                                    tmp_path / "submitit")  # fmt: skip
    assert "afterok:" + jobs[0].job_id.split("_")[0] in merge.paths.submission_file.read_text()
    assert wait_for(merge, timeout_s=JOB_TIMEOUT_S) == 30
    assert [wait_for(j) for j in jobs] == [0, 1]


def test_dry_run_prints_the_sbatch_script(tmp_path, capsys):
    cfg = load_config(
        "pretrain/test_tiny",
        [
            f"output_dir={tmp_path / 'run'}",
            "launch=slurm",
            "launch.dry_run=true",
            "launch.nodes=2",
            "launch.gpus_per_node=4",
            "launch.cpus_per_task=10",
            "launch.mem_gb=256",
            "launch.partition=gpu",
            "launch.timeout_min=120",
            "launch.account=vision",
            "launch.qos=high",
            "launch.constraint=volta32gb",
            "launch.signal_delay_s=120",
            "launch.sbatch_extra={exclude: node7}",
            "launch.setup=[module load cuda/12.1]",
        ],
    )
    script = run(PRETRAIN_TARGET, cfg)
    assert capsys.readouterr().out.strip() == script.strip()
    lines = set(script.splitlines())
    expected = [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",  # one task per GPU
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=10",
        "#SBATCH --mem=256GB",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=120",
        "#SBATCH --account=vision",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=volta32gb",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --exclude=node7",
        "#SBATCH --job-name=vitssl-train-run",
        "#SBATCH --open-mode=append",
        "module load cuda/12.1",
    ]
    assert [e for e in expected if e not in lines] == []
    folder = tmp_path / "run" / "submitit"
    assert f"#SBATCH --output={folder}/%j_0_log.out" in lines
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun and f"-m submitit.core._submit {folder}" in srun
    assert not folder.exists()  # nothing written, nothing submitted
