"""Evaluation jobs as typed library calls: the payloads of ``vitssl eval features|knn|linear`` and what they share.

A payload is a frozen dataclass (:class:`FeaturesJob`, :class:`KnnJob`, :class:`LinearJob`; the index jobs of
``vitssl index build`` extend :class:`EvalJob` too) that says everything a job needs, so it travels to spawned
processes and SLURM tasks as a pickle. The job functions take one and return a :class:`JobResult` on rank 0
(``None`` on the other ranks, which only extract their shards): :func:`run_features` here, :func:`~vitssl.eval.
probe_jobs.run_knn` and :func:`~vitssl.eval.probe_jobs.run_linear` in :mod:`vitssl.eval.probe_jobs`. The command
line builds the same payloads and hands them to :func:`vitssl.launch.launch`; a Python user calls the function::

    from vitssl.eval.probe_jobs import run_knn
    from vitssl.eval.jobs import KnnJob

    result = run_knn(KnnJob(checkpoint="/runs/moco/checkpoint_last.pth", train="digits:split=train",
                            val="digits:split=val", train_split="train", val_split="val", out="/tmp/knn.json"))
    print(result.report)

Every probe reads frozen features through the cache of :mod:`vitssl.eval.features`, so running a job again on
the same checkpoint and data costs no backbone forward.

The job registry (:data:`EVAL_JOBS`) maps each payload type to its job function, and :func:`run_eval_job`, the
launch target of every evaluation and index job (:data:`JOB_TARGET`), runs a payload on this rank through it. To
run a payload in N local processes or on SLURM, as the command line does, hand it to :func:`launch_job`::

    from vitssl.config import LaunchConfig
    from vitssl.eval.jobs import launch_job

    launch_job(job, LaunchConfig(backend="slurm", gpus_per_node=8), "/runs/moco/eval")

A payload defined elsewhere registers its function with :func:`register_job` when its module is imported (the
index jobs of :mod:`vitssl.index.jobs` do), which unpickling the payload in a spawned process or SLURM job always
does first.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from vitssl.config import ConfigError
from vitssl.registry import Registry

DEFAULT_KS = (10, 20, 100, 200)
# The launch targets, by name: spawned processes and SLURM jobs import them from here.
JOB_TARGET = "vitssl.eval.jobs:run_eval_job"
CALL_TARGET = "vitssl.eval.jobs:run_eval_call"

PayloadT = TypeVar("PayloadT")


# --------------------------------------------------------------------------------------------------------------
# Payloads
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EvalJob:
    """What every job that embeds images with a checkpoint needs (the base of the evaluation payloads)."""

    checkpoint: str  # absolute path of the engine checkpoint (any objective)
    device: str = "auto"  # auto | cpu | cuda: where each rank runs the backbone
    layer: str = "pooled"  # feature layer: pooled | cls | mean | lastN
    cache_dir: str | None = None  # feature cache folder (absolute); None: <checkpoint folder>/features
    batch_size: int = 256  # images per forward pass and process
    num_workers: int | None = None  # data-loading processes per process; None: its CPUs less one, at most 8
    skip_corrupt: bool = False  # leave unreadable images out (counted) instead of failing


@dataclass(frozen=True, kw_only=True)
class FeaturesJob(EvalJob):
    """``vitssl eval features``: extract and cache the features of one dataset."""

    data: str  # data spec, NAME[:key=value,...]
    split: str  # the split used (from --split or the spec)
    feature_dtype: str = "float16"  # stored precision of the feature store: float16 | float32


@dataclass(frozen=True, kw_only=True)
class ProbeJob(EvalJob):
    """What the probes share: labelled training and evaluation data, and the result file."""

    train: str  # data spec of the training data (--train)
    val: str  # data spec of the evaluation data (--val)
    train_split: str  # split of --train (default train)
    val_split: str  # split of --val (default val)
    out: str  # result JSON (absolute)
    train_features: str | None = None  # an existing feature store to use instead of extracting --train
    val_features: str | None = None  # an existing feature store to use instead of extracting --val
    feature_dtype: str = "float16"  # stored precision of extracted feature stores: float16 | float32


@dataclass(frozen=True, kw_only=True)
class KnnJob(ProbeJob):
    """``vitssl eval knn``: weighted k-NN top-1 / top-5 for several k."""

    ks: tuple[int, ...] = DEFAULT_KS  # neighbour counts
    temperature: float = 0.07  # vote temperature T: a neighbour votes exp(similarity / T)
    approx: bool = False  # search an IVF index (parameters from the bank size) instead of exactly
    backend: str = "auto"  # exact search: torch (matmul + top-k) | faiss | auto (faiss-gpu if installed, else torch)

    def check(self) -> None:
        """Fail, naming the command-line option, on settings no data can make work.

        Raises:
            ConfigError: a neighbour count below 1 or a temperature that is not a positive finite number.
        """
        from vitssl.eval.knn import BACKENDS, check_temperature

        if self.backend not in BACKENDS:
            raise ConfigError(f"--knn-backend {self.backend}: choose one of {', '.join(BACKENDS)}")
        if any(k < 1 for k in self.ks):
            raise ConfigError(f"--k {' '.join(map(str, self.ks))}: neighbour counts must be positive")
        try:
            check_temperature(self.temperature)
        except ValueError as err:
            raise ConfigError(f"--temperature {self.temperature}: {err}") from None


@dataclass(frozen=True, kw_only=True)
class LinearJob(ProbeJob):
    """``vitssl eval linear``: SGD linear probe (on cached or augmented features) and/or logistic regression."""

    method: str = "sgd"  # sgd | logreg | both | sweep (lrs x wds x feature variants of the layer)
    wds: tuple[float, ...] = (0.0,)  # sweep: weight decays
    epochs: int = 90  # SGD epochs
    lrs: tuple[float, ...] | None = None  # SGD learning rates, one head each; None: 0.01..3.0 x batch / 256
    cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)  # logistic-regression inverse regularisations
    max_iter: int = 1000  # logistic-regression lbfgs iterations
    probe_batch_size: int = 256  # SGD rows per step
    holdout_fraction: float = 0.1  # share of train used to pick lr / C
    seed: int = 0  # split, initialisation and order seed
    finetune_aug: bool = False  # SGD through the frozen backbone on augmented images (the paper protocol)
    aug_scale_min: float = 0.08  # with finetune_aug: smallest random-resized-crop area

    def check(self) -> None:
        """Fail, naming the command-line option, on probe settings no data can make work.

        Raises:
            ConfigError: the first setting that cannot work, and how to change it.
        """
        if self.finetune_aug and self.method == "logreg":
            raise ConfigError("--finetune-aug trains the SGD probe through the backbone; use --method sgd or both")
        if self.epochs < 1 or self.max_iter < 1:
            raise ConfigError(f"--epochs {self.epochs} and --max-iter {self.max_iter} must be at least 1")
        if self.probe_batch_size < 2:  # BatchNorm needs two rows
            raise ConfigError(f"--probe-batch-size {self.probe_batch_size} must be at least 2")
        if not 0 <= self.holdout_fraction < 1:
            raise ConfigError(f"--holdout-fraction {self.holdout_fraction} must lie in [0, 1)")
        if not 0 < self.aug_scale_min <= 1:
            raise ConfigError(f"--aug-scale-min {self.aug_scale_min} must lie in (0, 1]")
        for option, values in (("--lrs", self.lrs or ()), ("--cs", self.cs)):
            if any(v <= 0 for v in values):
                raise ConfigError(f"{option} {' '.join(map(str, values))}: every value must be positive")
        sweeps_lr = self.method != "logreg" and (self.lrs is None or len(self.lrs) > 1)  # default: a 6-lr sweep
        sweeps_c = self.method != "sgd" and len(self.cs) > 1
        several = [o for o, sweeps in (("--lrs", sweeps_lr), ("--cs", sweeps_c)) if sweeps]
        if self.holdout_fraction == 0 and several:
            raise ConfigError(
                f"--holdout-fraction 0 holds out nothing to choose among the values of {' and '.join(several)}; "
                "raise it or give a single value"
            )


@dataclass(frozen=True)
class JobResult:
    """What an evaluation job returns on rank 0."""

    task: str  # features | knn | linear
    record: dict[str, Any]  # the result: what the probes write as JSON; for features, the feature folder's summary
    report: str  # the text the command prints (tables, where the result went)
    path: Path | None = None  # the result JSON written; None for features (the folder is record["folder"])


# --------------------------------------------------------------------------------------------------------------
# What the jobs share (the index jobs use these too)
# --------------------------------------------------------------------------------------------------------------


def is_main() -> bool:
    from vitssl.distributed import is_main_process

    return is_main_process()


def write_result(obj: dict[str, Any], path: str | Path) -> None:
    """Write a job's result as JSON (atomically; values JSON does not know become strings)."""
    from vitssl.io import write_json

    write_json(obj, Path(path), default=str)


def data_workers(requested: int | None) -> int:
    """``--num-workers``, or by default the CPUs this process may use, shared by the processes on this node, less
    one for the process itself (at most 8)."""
    if requested is not None:
        return int(requested)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_procs = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, cpus // local_procs - 1))


def eval_model(job: EvalJob) -> Any:
    """The job's checkpoint, loaded for evaluation on this rank's device."""
    from vitssl.eval.features import EvalModel

    return EvalModel(job.checkpoint, job.device)


def job_features(
    model: Any, job: EvalJob, spec: str, split: str, option: str, rows: tuple[int, int] | None = None
) -> Any:
    """The cached (or freshly extracted) :class:`~vitssl.eval.features.FeatureSet` of ``spec`` for ``job``.

    Args:
        model: the job's :class:`~vitssl.eval.features.EvalModel`.
        job: the payload (layer, cache, batch size, workers, corrupt-sample handling).
        spec: data spec.
        split: its split.
        option: the command-line option the spec came from, named in errors.
        rows: only dataset rows ``[start, stop)`` (an index shard).
    """
    from vitssl.eval.features import extract_cached

    return extract_cached(
        model,
        spec,
        split,
        job.layer,
        job.cache_dir,
        job.batch_size,
        num_workers=data_workers(job.num_workers),
        skip_corrupt=job.skip_corrupt,
        rows=rows,
        option=option,
        dtype=getattr(job, "feature_dtype", "float32"),  # index jobs keep full precision
    )


def provenance(model: Any, job: EvalJob) -> dict[str, Any]:
    """What was evaluated: the checkpoint (path and content hash), its objective, the layer and transform."""
    import vitssl

    return {
        "checkpoint": str(model.path),
        "checkpoint_sha256": model.checkpoint_hash,
        "objective": model.objective_name,
        "layer": job.layer,
        "transform": model.transform,
        "vitssl_version": vitssl.__version__,
    }


def default_result_path(checkpoint: str, task: str, what: dict[str, Any]) -> Path:
    """Where a probe writes its result by default:
    ``<checkpoint folder>/eval/<task>-<train data>-<val data>-<val split>-<layer>-<digest>.json``.

    The name says what was evaluated, and the digest of every input (checkpoint file, both data specs with their
    options and splits or feature stores, layer, the probe's own options such as k or the learning rates) keeps
    two evaluations from writing to one file.

    Args:
        checkpoint: the checkpoint's absolute path.
        task: ``knn`` or ``linear``.
        what: ``train``, ``val`` (data specs or None), ``train_split``, ``val_split``, ``train_features``,
            ``val_features`` (store folders or None), ``layer`` and ``options`` (the probe's fields, JSON-able).
    """
    from vitssl.eval.spec import parse_data_spec

    def name(spec: str | None, store: str | None) -> str:
        text = Path(store).name.split("-")[0] if store else parse_data_spec(spec or "data")[0]
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:40]

    digest = hashlib.sha256(json.dumps({"checkpoint": checkpoint, **what}, sort_keys=True).encode()).hexdigest()[:10]
    train, val = name(what["train"], what["train_features"]), name(what["val"], what["val_features"])
    return Path(checkpoint).parent / "eval" / f"{task}-{train}-{val}-{what['val_split']}-{what['layer']}-{digest}.json"


# --------------------------------------------------------------------------------------------------------------
# eval features
# --------------------------------------------------------------------------------------------------------------


def run_features(job: FeaturesJob) -> JobResult | None:
    """Extract and cache the features of ``job.data`` (every rank its shards); the folder on rank 0.

    Args:
        job: the payload.

    Returns:
        On rank 0, ``record`` holds ``task``, ``folder``, ``count``, ``dim`` and ``cache_hit``; None elsewhere.
    """
    model = eval_model(job)
    fs = job_features(model, job, job.data, job.split, "--data")
    if not is_main():
        return None
    how = "read from the cache" if fs.meta["cache_hit"] else f"extracted in {fs.meta['seconds']:.1f} s"
    report = "\n".join(
        [
            f"{len(fs)} x {fs.dim} features of {job.data} ({fs.meta['key']['split']}, layer {job.layer}) {how}",
            f"  folder: {fs.path}",
            f"  reuse it: vitssl eval knn|linear {job.checkpoint} --train-features {fs.path} --val-features <DIR> "
            "(or --train/--val with the same data: the cache finds it)",
        ]
    )
    hit = fs.meta["cache_hit"]
    record = {"task": "features", "folder": str(fs.path), "count": len(fs), "dim": fs.dim, "cache_hit": hit}
    return JobResult("features", record, report)


# --------------------------------------------------------------------------------------------------------------
# The job registry and the launch targets
# --------------------------------------------------------------------------------------------------------------

# Payload type (by module and qualified name) -> the function that runs it on one rank and returns a JobResult (or
# a result dict) on rank 0. Its first lookup imports the providers: the probes (vitssl.eval.probe_jobs) and the
# index build jobs of the floor above (vitssl.index.jobs), so a fresh interpreter lists every job.
EVAL_JOBS: Registry[Callable[[Any], Any]] = Registry(
    "evaluation job", providers=("vitssl.eval.probe_jobs", "vitssl.index.jobs")
)


def job_key(payload_type: type) -> str:
    """The registry key of a payload type: its module and qualified name."""
    return f"{payload_type.__module__}.{payload_type.__qualname__}"


def register_job(payload_type: type[PayloadT]) -> Callable[[Callable[[PayloadT], Any]], Callable[[PayloadT], Any]]:
    """Register the function that runs payloads of ``payload_type`` (a decorator); it returns a
    :class:`JobResult` (printed by :func:`run_eval_job`), a result dict, or None on ranks without a result."""

    def register(fn: Callable[[PayloadT], Any]) -> Callable[[PayloadT], Any]:
        EVAL_JOBS.register(job_key(payload_type), fn)
        return fn

    return register


def job_for(payload: Any) -> Callable[[Any], Any]:
    """The registered job function of ``payload``.

    Raises:
        TypeError: ``payload`` is no registered payload type.
    """
    key = job_key(type(payload))
    if key not in EVAL_JOBS:
        known = ", ".join(name.rsplit(".", 1)[-1] for name in EVAL_JOBS)
        raise TypeError(f"run_eval_job got a {type(payload).__name__}; evaluation payloads are {known}")
    return EVAL_JOBS.get(key)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn library errors about user input that are not :class:`~vitssl.errors.UserError` into ConfigError."""
    try:
        yield
    except FileExistsError as err:  # an output folder the user named exists already
        raise ConfigError(f"{err}") from None


def run_eval_job(payload: Any) -> dict[str, Any]:
    """Run one evaluation job on this rank (the launch target of every evaluation and index job).

    Args:
        payload: a registered payload (:class:`FeaturesJob`, :class:`KnnJob`, :class:`LinearJob`, the index jobs).

    Returns:
        The job's result on rank 0 (what it also writes as JSON), ``{}`` on other ranks.
    """
    from vitssl.distributed import init_distributed

    job = job_for(payload)
    init_distributed()
    with user_errors():
        result = job(payload)
    if isinstance(result, JobResult):  # None on the ranks that only extracted their shards
        print(result.report)
        return result.record
    return result or {}


def run_eval_call(payload: Any, launch_cfg: Any, output_dir: str) -> Any:
    """Array-task / dependent-job entry (``submit_array_then`` calls ``target(*args)``): one evaluation job.

    Locally it goes through :func:`vitssl.launch.launch`, so ``launch.tasks_per_node`` processes still apply;
    inside a SLURM job it runs on this task directly.

    Args:
        payload: the job's payload.
        launch_cfg: the launch settings it was submitted with (a ``LaunchConfig``).
        output_dir: the job's folder.
    """
    from vitssl.launch.common import as_launch_config

    if as_launch_config(launch_cfg).backend == "local":
        return launch_job(payload, launch_cfg, output_dir)
    return run_eval_job(payload)


def launch_job(payload: Any, launch_cfg: Any, output_dir: str | Path) -> Any:
    """Run ``payload`` as ``launch_cfg`` says: here, in N local processes, or as a SLURM job.

    Args:
        payload: a registered payload.
        launch_cfg: a ``LaunchConfig`` (or its mapping).
        output_dir: the job's folder (``jobs.jsonl``, SLURM logs under ``submitit/``).

    Returns:
        Locally, the job's result on rank 0; on SLURM, the submitted job.
    """
    from vitssl.launch import launch

    job_for(payload)  # fail here, not in the job, on a payload nothing runs
    return launch(JOB_TARGET, payload, launch_cfg, output_dir, kind="eval")


EVAL_JOBS.register(job_key(FeaturesJob), run_features)


__all__ = [
    "CALL_TARGET",
    "DEFAULT_KS",
    "EVAL_JOBS",
    "JOB_TARGET",
    "EvalJob",
    "FeaturesJob",
    "JobResult",
    "KnnJob",
    "LinearJob",
    "ProbeJob",
    "data_workers",
    "default_result_path",
    "eval_model",
    "is_main",
    "job_features",
    "job_for",
    "job_key",
    "launch_job",
    "provenance",
    "register_job",
    "run_eval_call",
    "run_eval_job",
    "run_features",
    "user_errors",
    "write_result",
]
