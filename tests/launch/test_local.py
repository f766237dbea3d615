"""The local launcher (N gloo processes, error propagation), sweeps, and the job listing without SLURM.

Targets below are module-level so spawned processes import them by name. Every spawned process imports
torch (through ``vitssl``), so each test here that spawns costs several seconds: there are two.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from vitssl.cli.launch import register_commands
from vitssl.config import ConfigError, load_config
from vitssl.eval.train_job import PRETRAIN_TARGET, PretrainJob
from vitssl.launch import LaunchError, launch, launch_sweep, run_local, sweep_summary
from vitssl.launch.common import RemoteTraceback, append_job_record, requeued, resolve_target
from vitssl.launch.local import _rank_error
from vitssl.launch.slurm import RequeueLimitError, _GracefulStop, _stopped_on_request, executor_parameters
from vitssl.launch.sweep import combinations, parse_sweep, run_name, split_top_level


def tiny_cfg(out: Path, *overrides: str):
    return load_config("pretrain/test_tiny", [f"output_dir={out}", *overrides])


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="vitssl")
    register_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


# ------------------------------------------------------------------------------------- spawned targets
def raise_on_rank_one(job):
    if os.environ["RANK"] == "1":
        raise ValueError(f"bad value on rank 1 ({job.config['data']['img_size']} px)")
    time.sleep(600)  # rank 0 stands for a rank stuck in a collective that will never complete


def pid_target(job):
    return os.getpid()


def run(target, cfg, kind="train"):
    """Launch ``target`` with the training payload of ``cfg``, as `vitssl pretrain` does."""
    return launch(target, PretrainJob.from_config(cfg), cfg.launch, cfg.output_dir, kind=kind)


# ------------------------------------------------------------------------------------------- local launch
def test_one_process_runs_in_this_process(tmp_path):
    assert run(pid_target, tiny_cfg(tmp_path), kind="eval") == os.getpid()


def test_rank_exception_reaches_the_caller_with_its_traceback(tmp_path):
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"bad value on rank 1 \(32 px\)") as excinfo:
        run_local(f"{__name__}:raise_on_rank_one", PretrainJob.from_config(tiny_cfg(tmp_path)), nprocs=2, grace_s=1.0)
    assert time.monotonic() - start < 60  # the stuck rank 0 was terminated, not waited for
    cause = excinfo.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "[rank 1]" in str(cause) and "raise_on_rank_one" in str(cause) and "Traceback" in str(cause)


def test_ranks_that_die_without_exception_are_reported():
    assert "rank 1 exited with code 3 without a result" in str(_rank_error(1, None, 3))
    assert "rank 2 was killed by signal SIGKILL" in str(_rank_error(2, None, -9))


def test_local_two_process_pretraining(local_two_process_run):
    """`launch.tasks_per_node=2`: two spawned ranks in one gloo group (DDP), rank 0's result comes back."""
    out, result = local_two_process_run
    assert result.status == "finished" and result.step == 8 and result.output_dir == str(out)
    assert "world_size: 2" in (out / "config.yaml").read_text()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # rank 0 alone writes the metrics
    record = json.loads((out / "jobs.jsonl").read_text().splitlines()[-1])
    assert record["backend"] == "local" and record["status"] == "finished" and record["step"] == 8


def test_launch_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"launch.nodes=2 needs launch=slurm"):
        run(pid_target, tiny_cfg(tmp_path, "launch.nodes=2"))
    with pytest.raises(ConfigError, match=r"launch.tasks_per_node=0"):
        run(pid_target, tiny_cfg(tmp_path, "launch.tasks_per_node=0"))
    bad = {"launch.timeout_min=0": "launch.timeout_min", "launch.max_requeue=-1": "launch.max_requeue"}
    for override, key in bad.items():
        with pytest.raises(ConfigError, match=key):
            executor_parameters(tiny_cfg(tmp_path, override).launch, "job")
    with pytest.raises(ValueError, match="no attribute 'nope'"):
        resolve_target("vitssl.engine:nope")
    with pytest.raises(ValueError, match="'module:function'"):
        resolve_target("vitssl.engine.train")


def test_slurm_launch_without_slurm_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun on PATH: not a SLURM login node
    with pytest.raises(LaunchError, match=r"launch.dry_run=true"):
        run(PRETRAIN_TARGET, tiny_cfg(tmp_path, "launch=slurm"))


# ----------------------------------------------------------------------------------------------- sweeps
def test_sweep_overrides_make_a_cartesian_product():
    fixed, axes = parse_sweep(["optim.lr=1e-4,3e-4", "seed=0", "optim.betas=[0.9,0.95]", "train.epochs=1,2,3"])
    assert fixed == ["seed=0", "optim.betas=[0.9,0.95]"]
    assert axes == [("optim.lr", ["1e-4", "3e-4"]), ("train.epochs", ["1", "2", "3"])]
    combos = combinations(axes)
    assert len(combos) == 6 and combos[0] == ["optim.lr=1e-4", "train.epochs=1"]
    assert run_name(combos[-1]) == "optim.lr=3e-4,train.epochs=3"
    assert run_name(["data.train.root=/data/x y"]) == "data.train.root=_data_x_y"
    assert split_top_level("a,'b,c',{k: [1,2]}") == ["a", "'b,c'", "{k: [1,2]}"]
    with pytest.raises(ConfigError, match="launch settings cannot vary"):
        parse_sweep(["launch.gpus_per_node=1,2"])
    with pytest.raises(ConfigError, match="empty value"):
        parse_sweep(["optim.lr=1e-4,"])


def test_local_sweep_and_summary(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    overrides = [f"output_dir={sweep_dir}", "optim.lr=1e-3,5e-3", "train.epochs=1", "train.stop_after_steps=3"]
    results = launch_sweep("pretrain/test_tiny", overrides, PRETRAIN_TARGET, PretrainJob.from_config)
    assert [(r.status, r.step) for r in results] == [("stopped", 3), ("stopped", 3)]
    rows = sweep_summary(sweep_dir)
    assert [(r["run"], r["status"], r["step"]) for r in rows] == [
        ("optim.lr=1e-3", "stopped", 3),
        ("optim.lr=5e-3", "stopped", 3),
    ]
    assert rows[0]["loss"] != rows[1]["loss"]  # step 1 ran at lr 0 (warm-up); by step 3 the lr matters
    capsys.readouterr()
    assert cli("sweep-summary", sweep_dir, "--sort", "loss") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:5] == ["run", "status", "step", "epoch", "loss"] and len(table) == 3
    with pytest.raises(ConfigError, match="nothing to sweep"):
        launch_sweep("pretrain/test_tiny", [f"output_dir={sweep_dir}"], PRETRAIN_TARGET, PretrainJob.from_config)


# ------------------------------------------------------------------------------- jobs / logs from files
def test_jobs_and_logs_read_a_failed_job_from_its_files(tmp_path, capsys):
    from submitit.core.utils import cloudpickle_dump

    run = tmp_path / "run"
    folder = run / "submitit"
    folder.mkdir(parents=True)
    job_id = "987654321"  # not a job of any cluster: the result files alone must tell what happened
    (folder / f"{job_id}_submitted.pkl").write_bytes(b"")
    trace = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: shard 7 is corrupt\n'
    cloudpickle_dump(("error", trace), folder / f"{job_id}_0_result.pkl")
    (folder / f"{job_id}_0_log.err").write_text(trace)
    (folder / f"{job_id}_0_log.out").write_text("starting\n")
    append_job_record(run, {"backend": "slurm", "job_id": job_id, "folder": str(folder), "tasks": 1})
    assert cli("jobs", run) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "ValueError: shard 7 is corrupt" in out and f"{job_id}_0_log.err" in out
    assert cli("logs", run, "--stderr") == 0
    assert "shard 7 is corrupt" in capsys.readouterr().out
    with pytest.warns(FutureWarning, match="--err is deprecated .* use --stderr"):  # the old spelling, one release
        assert cli("logs", run, "--err") == 0
    assert "shard 7 is corrupt" in capsys.readouterr().out
    assert cli("logs", run, "--task", "3") == 1
    assert "has tasks 0..0" in capsys.readouterr().err


# ------------------------------------------------------------------- preemption signal logic (no SLURM)
class _FakeSubmitit:
    """Stands for submitit's SIGUSR2 handler: records calls, then requeues (SystemExit) or gives up."""

    def __init__(self, outcome: BaseException) -> None:
        self.calls = 0
        self.outcome = outcome

    def __call__(self, signum, frame):
        self.calls += 1
        raise self.outcome


@pytest.fixture
def preempt_signal(monkeypatch):
    """SIGUSR2 handled by a fake submitit handler; engine stop requests recorded instead of set."""
    stops = []
    monkeypatch.setattr("vitssl.engine.request_stop", lambda: stops.append(time.monotonic()))
    previous = signal.getsignal(signal.SIGUSR2)

    def install(outcome: BaseException) -> _FakeSubmitit:
        fake = _FakeSubmitit(outcome)
        signal.signal(signal.SIGUSR2, fake)
        return fake

    yield install, stops
    signal.signal(signal.SIGUSR2, previous)


def _launch_cfg(tmp_path, *overrides):
    return tiny_cfg(tmp_path, "launch.max_requeue=2", "launch.timeout_min=30", *overrides).launch


def test_signal_stops_at_a_step_boundary_then_submitit_requeues(preempt_signal, tmp_path):
    install, stops = preempt_signal
    fake = install(SystemExit(-1))
    stopper = _GracefulStop(rank=0, grace_s=60)
    stopper.install()
    os.kill(os.getpid(), signal.SIGUSR2)
    assert stopper.received and len(stops) == 1 and fake.calls == 0  # nothing saved inside the handler
    os.kill(os.getpid(), signal.SIGUSR2)  # a second signal changes nothing
    assert len(stops) == 2 and fake.calls == 0
    stopper.disarm()  # the engine returned "stopped"
    with pytest.raises(SystemExit):
        stopper.hand_over(SimpleNamespace(status="stopped", checkpoint_path="ckpt"), _launch_cfg(tmp_path))
    assert fake.calls == 1


def test_too_many_timeouts_end_with_a_clear_error(preempt_signal, tmp_path):
    from submitit.core.utils import UncompletedJobError

    install, _ = preempt_signal
    install(UncompletedJobError("Job not requeued because: timed-out too many times."))
    stopper = _GracefulStop(rank=0, grace_s=60)
    stopper.install()
    os.kill(os.getpid(), signal.SIGUSR2)
    stopper.disarm()
    result = SimpleNamespace(status="stopped", checkpoint_path="/runs/x/checkpoint_00000040.pth")
    with pytest.raises(RequeueLimitError, match=r"launch.max_requeue=2 \(launch.timeout_min=30\)") as err:
        stopper.hand_over(result, _launch_cfg(tmp_path))
    assert "/runs/x/checkpoint_00000040.pth" in str(err.value) and "time limit 3 time(s)" in str(err.value)


def test_watchdog_requeues_when_no_step_boundary_comes(preempt_signal, tmp_path):
    install, _ = preempt_signal
    fake = install(SystemExit(-1))
    stopper = _GracefulStop(rank=0, grace_s=0.2)
    exits = []
    stopper._exit = exits.append  # the real one ends the process
    stopper.install()
    os.kill(os.getpid(), signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.calls == 1 and exits == [1]  # requeued without a new checkpoint, then the process ends
    with pytest.raises(LaunchError, match="could not be requeued"):  # only reached if the exit did not happen
        stopper.hand_over(SimpleNamespace(status="stopped"), _launch_cfg(tmp_path))
    assert fake.calls == 1


def test_only_rank_zero_arms_the_watchdog(preempt_signal):
    install, stops = preempt_signal
    fake = install(SystemExit(-1))
    stopper = _GracefulStop(rank=1, grace_s=0.1)
    stopper.install()
    os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(0.5)
    assert stopper.received and len(stops) == 1 and fake.calls == 0


def test_stop_counts_as_preemption_unless_stop_after_steps_was_reached():
    # another rank got the signal: the engine's agreed stop says so
    assert _stopped_on_request(SimpleNamespace(status="stopped", step=3, stop_requested=True), signalled=False)
    assert not _stopped_on_request(SimpleNamespace(status="stopped", step=6, stop_requested=False), signalled=False)
    assert _stopped_on_request(SimpleNamespace(status="stopped", step=6, stop_requested=False), signalled=True)
    assert not _stopped_on_request(SimpleNamespace(status="finished", step=8, stop_requested=False), signalled=True)


def test_requeued_training_payload_resumes():
    job = PretrainJob({"resume": "none", "seed": 3})
    assert requeued(job).config == {"resume": "auto", "seed": 3} and job.config["resume"] == "none"
    assert requeued("plain") == "plain"  # payloads without requeued() run again as they are
