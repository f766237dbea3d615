"""Evaluation commands: ``vitssl eval features|knn|linear|zeroshot|retrieval``, and the evaluation job they launch.

Every probe reads frozen features through the cache of :mod:`vitssl.eval.features`, so re-running a command on
the same checkpoint and data costs no backbone forward. The long commands (``eval features|knn|linear`` here,
``index build`` in :mod:`vitssl.cli.index`) run through :func:`vitssl.launch.launch` like ``vitssl pretrain``:
``launch=slurm`` and ``launch.*`` overrides may follow anywhere on the command line, e.g.::

    vitssl eval knn runs/moco/checkpoint_last.pth --train imagefolder:root=/data/in1k,split=train \\
        --val imagefolder:root=/data/in1k,split=val launch=slurm launch.gpus_per_node=8

A job is :func:`run_eval_job` with a typed payload: one frozen dataclass per job family (:class:`FeaturesJob`,
:class:`KnnJob`, :class:`LinearJob`; the index jobs in :mod:`vitssl.cli.index`), all sharing the extraction
settings of :class:`EvalJob`. The job's folder (``jobs.jsonl``, SLURM logs under ``submitit/``) is the folder of
its results. Extraction runs on every rank (a shard each); the probes, the index writing and the printing run
on rank 0. ``eval zeroshot|retrieval`` run here, in this process.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from vitssl.cli._args import ListWithOverrides, add_parser, number_or_override
from vitssl.config import ConfigError
from vitssl.eval.spec import LAYER_HELP, SPEC_SYNTAX  # imports no torch: building the parser stays light

# The launch targets, by name: spawned processes and SLURM jobs import them from here.
JOB_TARGET = "vitssl.cli.eval:run_eval_job"
CALL_TARGET = "vitssl.cli.eval:run_eval_call"
DEFAULT_KS = (10, 20, 100, 200)

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


# --------------------------------------------------------------------------------------------------------------
# The job entry points
# --------------------------------------------------------------------------------------------------------------

# Payload type -> the function that runs it on one rank. vitssl.cli.index adds the index jobs when it is
# imported, which unpickling one of its payloads always does first.
_JOBS: dict[type, Callable[[Any], dict[str, Any]]] = {}


def eval_job(
    payload_type: type[PayloadT],
) -> Callable[[Callable[[PayloadT], dict[str, Any]]], Callable[[PayloadT], dict[str, Any]]]:
    """Register the function that runs payloads of ``payload_type`` (a decorator)."""

    def register(fn: Callable[[PayloadT], dict[str, Any]]) -> Callable[[PayloadT], dict[str, Any]]:
        _JOBS[payload_type] = fn
        return fn

    return register


def run_eval_job(payload: Any) -> dict[str, Any]:
    """Run one evaluation job on this rank (the launch target of every evaluation command).

    Args:
        payload: one of the payload dataclasses (:class:`FeaturesJob`, :class:`KnnJob`, ...).

    Returns:
        The job's result on rank 0 (what it also writes as JSON), ``{}`` on other ranks.
    """
    from vitssl.cli._common import register_objectives
    from vitssl.distributed import init_distributed

    job = _JOBS.get(type(payload))
    if job is None:
        known = ", ".join(t.__name__ for t in _JOBS)
        raise TypeError(f"run_eval_job got a {type(payload).__name__}; evaluation payloads are {known}")
    register_objectives()  # checkpoints name their objective; the config schema needs it registered
    init_distributed()
    with user_errors():
        return job(payload)


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

    lcfg = as_launch_config(launch_cfg)
    if lcfg.backend == "local":
        from vitssl.launch import launch

        return launch(JOB_TARGET, payload, lcfg, output_dir, kind="eval")
    return run_eval_job(payload)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn library errors about user input that are not :class:`~vitssl.errors.UserError` into ConfigError."""
    try:
        yield
    except FileExistsError as err:  # an output folder the user named exists already
        raise ConfigError(f"{err}") from None


# --------------------------------------------------------------------------------------------------------------
# What the jobs share (vitssl.cli.index uses these too)
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


# --------------------------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------------------------


@eval_job(FeaturesJob)
def _job_features(job: FeaturesJob) -> dict[str, Any]:
    model = eval_model(job)
    fs = job_features(model, job, job.data, job.split, "--data")
    if not is_main():
        return {}
    how = "read from the cache" if fs.meta["cache_hit"] else f"extracted in {fs.meta['seconds']:.1f} s"
    print(f"{len(fs)} x {fs.dim} features of {job.data} ({fs.meta['key']['split']}, layer {job.layer}) {how}")
    print(f"  folder: {fs.path}")
    print(
        f"  reuse it: vitssl eval knn|linear {job.checkpoint} --train-features {fs.path} --val-features <DIR> "
        "(or --train/--val with the same data: the cache finds it)"
    )
    hit = fs.meta["cache_hit"]
    return {"task": "features", "folder": str(fs.path), "count": len(fs), "dim": fs.dim, "cache_hit": hit}


def _require_labels(fs: Any, option: str) -> None:
    if not fs.labelled:
        raise ConfigError(
            f"{option} {fs.meta.get('data_spec')!r} has no class labels; k-NN and linear probes need a labelled "
            "dataset (imagefolder, digits, shapes, cifar10, ...)"
        )


def _num_classes(train: Any, val: Any) -> int:
    """Check that both feature sets are labelled and share their classes; return the class count."""
    _require_labels(train, "--train")
    _require_labels(val, "--val")
    if train.classes and val.classes and train.classes != val.classes:
        raise ConfigError(
            f"--train and --val have different classes ({len(train.classes)} vs {len(val.classes)}: "
            f"{train.classes[:5]} vs {val.classes[:5]}); use two splits of the same dataset"
        )
    observed = int(max(train.labels.max(initial=-1), val.labels.max(initial=-1))) + 1
    return max(len(train.classes), observed)


def _stored_features(model: Any, job: ProbeJob, folder: str, option: str) -> Any:
    """An existing feature store given by ``option``, refused unless it holds this checkpoint's ``--layer``."""
    from vitssl.eval.features import FeatureSet
    from vitssl.eval.store import FeatureStore

    store = FeatureStore(folder)
    store.check({"checkpoint_sha256": model.checkpoint_hash, "layer": job.layer}, option)
    fs = FeatureSet.load(folder)
    fs.meta["cache_hit"] = True
    return fs


def _probe_features(job: ProbeJob) -> tuple[Any, Any, Any]:
    """The evaluation model and the ``--train`` / ``--val`` feature sets of a probe job: existing stores
    (``--train-features`` / ``--val-features``), or extracted on every rank (each its own shards)."""
    model = eval_model(job)
    if job.train_features:
        train = _stored_features(model, job, job.train_features, "--train-features")
    else:
        train = job_features(model, job, job.train, job.train_split, "--train")
    if job.val_features:
        return model, train, _stored_features(model, job, job.val_features, "--val-features")
    return model, train, job_features(model, job, job.val, job.val_split, "--val")


def _check_overwrite(path: str, record: dict[str, Any]) -> None:
    """Refuse to replace a result of other inputs (checkpoint, data, layer) at ``path``."""
    import json

    target = Path(path)
    if not target.is_file():
        return
    try:
        old = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # not a result of ours: an unreadable file is replaced like any output
    keys = ("checkpoint_sha256", "train", "val", "layer", "train_features", "val_features")
    differs = [k for k in keys if isinstance(old, dict) and k in old and old.get(k) != record.get(k)]
    if differs:
        raise ConfigError(
            f"--out {target} holds the result of other inputs ({', '.join(f'{k} {old.get(k)!r}' for k in differs)}); "
            "pass another --out or delete it"
        )


def _probe_record(task: str, model: Any, job: ProbeJob, train: Any, val: Any) -> dict[str, Any]:
    """The leading entries of a probe's result JSON: what was evaluated, on which data and feature folders."""
    return {
        "task": task,
        **provenance(model, job),
        "train": job.train,
        "val": job.val,
        "train_features": str(train.path),
        "val_features": str(val.path),
        "classes": train.classes,
    }


@eval_job(KnnJob)
def _job_knn(job: KnnJob) -> dict[str, Any]:
    from vitssl.eval.knn import format_knn_table, knn_evaluate

    t0 = time.perf_counter()
    model, train, val = _probe_features(job)
    if not is_main():
        return {}
    num_classes = _num_classes(train, val)
    record = _probe_record("knn", model, job, train, val)
    _check_overwrite(job.out, record)
    result = knn_evaluate(
        train.features, train.labels, val.features, val.labels, job.ks, job.temperature, num_classes, approx=job.approx
    )
    out = {
        **record,
        **result,
        "seconds": round(time.perf_counter() - t0, 3),
        "output": job.out,
    }
    write_result(out, job.out)
    print(format_knn_table(result))
    print(f"written to {job.out}")
    return out


def _sgd_options(model: Any, job: LinearJob) -> dict[str, Any]:
    """Keyword arguments the SGD linear probes (on cached and on augmented features) share."""
    return {
        "lrs": job.lrs,
        "epochs": job.epochs,
        "batch_size": job.probe_batch_size,
        "holdout_fraction": job.holdout_fraction,
        "seed": job.seed,
        "device": model.device,
    }


@eval_job(LinearJob)
def _job_linear(job: LinearJob) -> dict[str, Any]:
    from vitssl.eval import linear

    t0 = time.perf_counter()
    model, train, val = _probe_features(job)
    num_classes = _num_classes(train, val)
    if is_main():
        _check_overwrite(job.out, _probe_record("linear", model, job, train, val))
    data = (train.features, train.labels, val.features, val.labels, num_classes)
    methods = ["sgd", "logreg"] if job.method == "both" else [job.method]
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        if method == "sgd" and job.finetune_aug:  # every rank embeds its part of each augmented batch
            results["linear_sgd_aug"] = _augmented_probe(model, job, train, val, num_classes)
        elif not is_main():
            continue
        elif method == "sgd":
            results["linear_sgd"] = linear.train_linear_probe(*data, **_sgd_options(model, job))
        elif method == "sweep":
            results["linear_sweep"] = _sweep(model, job, train, val, num_classes)
        else:
            results["logistic_regression"] = linear.logistic_regression_probe(
                *data, Cs=job.cs, max_iter=job.max_iter, holdout_fraction=job.holdout_fraction, seed=job.seed
            )
    if not is_main():
        return {}
    out_path = Path(job.out)
    names = train.classes or None
    pictures = {}
    for name, r in results.items():
        png = out_path.with_name(f"{out_path.stem}-confusion-{name}.png")
        linear.save_confusion_matrix_png(r["confusion_matrix"], names, png)
        pictures[name] = str(png)
        if name == "linear_sweep":
            from vitssl.eval.sweep import format_sweep_table

            print(format_sweep_table(r))
        else:
            print(linear.format_probe_table(r))
    out = {
        **_probe_record("linear", model, job, train, val),
        "results": {name: linear.result_to_json(r) for name, r in results.items()},
        "confusion_png": pictures,
        "seconds": round(time.perf_counter() - t0, 3),
        "output": str(out_path),
    }
    write_result(out, out_path)
    print(f"written to {out_path} (confusion matrices: {', '.join(pictures.values())})")
    return out


def _sweep(model: Any, job: LinearJob, train: Any, val: Any, num_classes: int) -> dict[str, Any]:
    """lrs x wds x the layer's feature variants, in one pass over the (memory-mapped) features."""
    from vitssl.eval.linear import default_lrs
    from vitssl.eval.sweep import layer_variants, train_linear_sweep

    return train_linear_sweep(
        train.features,
        train.labels,
        val.features,
        val.labels,
        num_classes,
        lrs=job.lrs or default_lrs(job.probe_batch_size),
        wds=job.wds,
        variants=layer_variants(job.layer, train.dim),
        epochs=job.epochs,
        batch_size=job.probe_batch_size,
        holdout_fraction=job.holdout_fraction,
        seed=job.seed,
        device=model.device,
    )


def _augmented_probe(model: Any, job: LinearJob, train: Any, val: Any, num_classes: int) -> dict[str, Any]:
    from torch.utils.data import Subset

    from vitssl.eval.features import dataset_rows
    from vitssl.eval.linear_aug import AugmentThenEval, augmented_linear_probe
    from vitssl.eval.spec import build_eval_dataset

    base, _, _ = build_eval_dataset(job.train, job.train_split, absolute_root=True, option="--train")
    kept = dataset_rows(train.meta)  # rows with cached features (all of them unless corrupt ones were skipped)
    dataset = Subset(base, kept.tolist()) if len(kept) != len(base) else base
    augment = AugmentThenEval(int(model.cfg.data.img_size), model.sample_fn, (job.aug_scale_min, 1.0))
    return augmented_linear_probe(
        model.feature_fn(job.layer),
        dataset,
        train.labels,
        train.features,
        val.features,
        val.labels,
        num_classes,
        augment,
        **_sgd_options(model, job),
        num_workers=data_workers(job.num_workers),
    )


# --------------------------------------------------------------------------------------------------------------
# Commands (run where the user typed them; the long ones hand a payload to vitssl.launch)
# --------------------------------------------------------------------------------------------------------------


def checkpoint_arg(path: str) -> str:
    """The absolute path of a checkpoint argument that exists (jobs may start in another folder); a run folder
    names its ``checkpoint_last.pth``."""
    from vitssl.engine.checkpoint import resolve_checkpoint

    return str(resolve_checkpoint(path).absolute())


def launch_settings(args: argparse.Namespace) -> tuple[Any, str]:
    """The ``LaunchConfig`` and device of a command, from its ``launch=...`` / ``launch.*`` / ``device=`` overrides,
    ``--device`` and ``--dry-run``.

    Raises:
        ConfigError: an override of another key (evaluation commands take no training settings), or a bad value.
    """
    from vitssl.cli._common import load_run_config
    from vitssl.launch.common import as_launch_config

    overrides = [*(args.overrides or []), *(["launch.dry_run=true"] if getattr(args, "dry_run", False) else [])]
    wrong = [o for o in overrides if not o.startswith(("launch=", "launch.", "device="))]
    if wrong:
        raise ConfigError(
            f"evaluation commands take launch settings only as key=value overrides (launch=slurm, "
            f"launch.gpus_per_node=8, ...); got {', '.join(wrong)}"
        )
    cfg = load_run_config(None, [f"device={args.device}", *overrides])  # validates the keys and values
    return as_launch_config(cfg.launch), str(cfg.device)


def launch_job(launch_cfg: Any, payload: Any, output_dir: Path) -> Any:
    """Run ``payload`` through :func:`vitssl.launch.launch` (here, in N local processes, or on SLURM)."""
    from vitssl.launch import launch

    return launch(JOB_TARGET, payload, launch_cfg, output_dir, kind="eval")


def extraction_fields(
    args: argparse.Namespace, device: str, checkpoint: Callable[[str], str] | None = None
) -> dict[str, Any]:
    """The :class:`EvalJob` fields of a command's extraction options (``--layer``, ``--cache-dir``, ...).

    Args:
        checkpoint: resolves and checks ``args.checkpoint`` (default :func:`checkpoint_arg`; video index builds
            also take ``thumbnails``).
    """
    from vitssl.eval.spec import parse_layer

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
    if args.num_workers is not None and args.num_workers < 0:
        raise ConfigError(f"--num-workers {args.num_workers} must be 0 (load in the process itself) or more")
    return {
        "checkpoint": (checkpoint or checkpoint_arg)(args.checkpoint),
        "device": device,
        "layer": parse_layer(args.layer),
        "cache_dir": str(Path(args.cache_dir).absolute()) if args.cache_dir else None,
        "batch_size": int(args.batch_size),
        "num_workers": args.num_workers,
        "skip_corrupt": bool(args.skip_corrupt),
    }


def check_spec(spec: str, option: str) -> None:
    """Fail early, naming ``option``, on a malformed data spec."""
    from vitssl.eval.spec import parse_data_spec

    try:
        parse_data_spec(spec)
    except ConfigError as err:
        raise ConfigError(f"{option}: {err}") from None


def split_of(spec: str, default: str, split: str | None = None, option: str = "--data") -> str:
    """The split a command uses: ``--split`` if given (it must agree with the spec's), the spec's, or ``default``."""
    from vitssl.eval.spec import parse_data_spec, resolve_split

    check_spec(spec, option)
    try:
        return resolve_split(spec, parse_data_spec(spec)[1], split, default)
    except ConfigError as err:
        raise ConfigError(f"{option}: {err}") from None


def _default_out(checkpoint: str, task: str, what: dict[str, Any]) -> Path:
    """``<checkpoint folder>/eval/<task>-<train data>-<val data>-<layer>-<digest>.json``: the name says what was
    evaluated, and the digest of every input (checkpoint file, both data specs with their options and splits or
    feature stores, layer) keeps two evaluations from writing to one file."""
    import hashlib
    import json

    from vitssl.eval.spec import parse_data_spec

    def name(spec: str | None, store: str | None) -> str:
        text = Path(store).name.split("-")[0] if store else parse_data_spec(spec or "data")[0]
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:40]

    digest = hashlib.sha256(json.dumps({"checkpoint": checkpoint, **what}, sort_keys=True).encode()).hexdigest()[:10]
    train, val = name(what["train"], what["train_features"]), name(what["val"], what["val_features"])
    return Path(checkpoint).parent / "eval" / f"{task}-{train}-{val}-{what['val_split']}-{what['layer']}-{digest}.json"


def _cmd_features(args: argparse.Namespace) -> int:
    from vitssl.eval.features import default_cache_dir

    split = split_of(args.data, "val", args.split)
    launch_cfg, device = launch_settings(args)
    job = FeaturesJob(**extraction_fields(args, device), data=args.data, split=split, feature_dtype=args.feature_dtype)
    launch_job(launch_cfg, job, Path(job.cache_dir) if job.cache_dir else default_cache_dir(job.checkpoint))
    return 0


def _probe_fields(args: argparse.Namespace, task: str, device: str) -> dict[str, Any]:
    """The :class:`ProbeJob` fields of ``eval knn`` / ``eval linear``."""
    from vitssl.eval.store import DTYPES

    fields = extraction_fields(args, device)
    stores = {}
    for option, spec, folder in (("--train", args.train, args.train_features), ("--val", args.val, args.val_features)):
        if (spec is None) == (folder is None):
            raise ConfigError(f"give {option} SPEC (data to embed) or {option}-features DIR (a feature store), one")
        if folder is not None:
            if not (Path(folder) / "manifest.json").is_file():
                raise ConfigError(f"{option}-features {folder}: not a feature store (vitssl eval features makes one)")
            stores[option] = str(Path(folder).absolute())
    if args.feature_dtype not in DTYPES:
        raise ConfigError(f"--feature-dtype {args.feature_dtype}: choose {' or '.join(DTYPES)}")
    train_split = split_of(args.train, "train", option="--train") if args.train else "train"
    val_split = split_of(args.val, "val", option="--val") if args.val else "val"
    what = {
        "train": args.train,
        "val": args.val,
        "train_split": train_split,
        "val_split": val_split,
        "train_features": stores.get("--train"),
        "val_features": stores.get("--val"),
        "layer": args.layer,
    }
    out = Path(args.out) if args.out else _default_out(fields["checkpoint"], task, what)
    return {
        **fields,
        "train": args.train or "",
        "val": args.val or "",
        "train_split": train_split,
        "val_split": val_split,
        "train_features": what["train_features"],
        "val_features": what["val_features"],
        "feature_dtype": args.feature_dtype,
        "out": str(out.absolute()),
    }


def _cmd_knn(args: argparse.Namespace) -> int:
    from vitssl.eval.knn import check_temperature

    if any(k < 1 for k in args.k):
        raise ConfigError(f"--k {' '.join(map(str, args.k))}: neighbour counts must be positive")
    try:
        check_temperature(args.temperature)
    except ValueError as err:
        raise ConfigError(f"--temperature {args.temperature}: {err}") from None
    launch_cfg, device = launch_settings(args)
    fields = _probe_fields(args, "knn", device)
    job = KnnJob(
        **fields, ks=tuple(int(k) for k in args.k), temperature=float(args.temperature), approx=bool(args.approx)
    )
    launch_job(launch_cfg, job, Path(job.out).parent)
    return 0


def _check_linear_options(args: argparse.Namespace) -> None:
    """Fail before launching, naming the option, on probe settings no data can make work."""
    if args.finetune_aug and args.method == "logreg":
        raise ConfigError("--finetune-aug trains the SGD probe through the backbone; use --method sgd or both")
    if args.epochs < 1 or args.max_iter < 1:
        raise ConfigError(f"--epochs {args.epochs} and --max-iter {args.max_iter} must be at least 1")
    if args.probe_batch_size < 2:  # BatchNorm needs two rows
        raise ConfigError(f"--probe-batch-size {args.probe_batch_size} must be at least 2")
    if not 0 <= args.holdout_fraction < 1:
        raise ConfigError(f"--holdout-fraction {args.holdout_fraction} must lie in [0, 1)")
    if not 0 < args.aug_scale_min <= 1:
        raise ConfigError(f"--aug-scale-min {args.aug_scale_min} must lie in (0, 1]")
    for option, values in (("--lrs", args.lrs or []), ("--cs", args.cs)):
        if any(v <= 0 for v in values):
            raise ConfigError(f"{option} {' '.join(map(str, values))}: every value must be positive")
    sweeps_lr = args.method != "logreg" and (args.lrs is None or len(args.lrs) > 1)  # default: a 6-lr sweep
    sweeps_c = args.method != "sgd" and len(args.cs) > 1
    several = [o for o, sweeps in (("--lrs", sweeps_lr), ("--cs", sweeps_c)) if sweeps]
    if args.holdout_fraction == 0 and several:
        raise ConfigError(
            f"--holdout-fraction 0 holds out nothing to choose among the values of {' and '.join(several)}; "
            "raise it or give a single value"
        )


def _cmd_linear(args: argparse.Namespace) -> int:
    _check_linear_options(args)
    launch_cfg, device = launch_settings(args)
    job = LinearJob(
        **_probe_fields(args, "linear", device),
        method=args.method,
        wds=tuple(float(x) for x in args.wds),
        finetune_aug=bool(args.finetune_aug),
        aug_scale_min=float(args.aug_scale_min),
        epochs=int(args.epochs),
        lrs=tuple(float(x) for x in args.lrs) if args.lrs else None,
        cs=tuple(float(x) for x in args.cs),
        max_iter=int(args.max_iter),
        probe_batch_size=int(args.probe_batch_size),
        holdout_fraction=float(args.holdout_fraction),
        seed=int(args.seed),
    )
    launch_job(launch_cfg, job, Path(job.out).parent)
    return 0


def _clip_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``run_zeroshot`` / ``run_retrieval`` from the options of :func:`_add_clip_options`."""
    return {
        "output": args.output,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "device": args.device,
        "skip_corrupt": args.skip_corrupt,
        "model_name": args.model,
    }


def _clip_checkpoint_arg(path: str) -> str:
    """The absolute path of a CLIP checkpoint argument: a file, or an open_clip export folder."""
    from vitssl.engine.checkpoint import LAST_NAME, list_step_checkpoints

    p = Path(path)
    is_run = p.is_dir() and ((p / LAST_NAME).is_file() or list_step_checkpoints(p))
    return str(p.absolute()) if p.is_dir() and not is_run else checkpoint_arg(path)


def _cmd_zeroshot(args: argparse.Namespace) -> int:
    from vitssl.cli._common import register_objectives
    from vitssl.eval.zeroshot import run_zeroshot

    register_objectives()
    check_spec(args.data, "--data")
    r = run_zeroshot(
        _clip_checkpoint_arg(args.checkpoint),
        args.data,
        classnames=args.classnames,
        templates=args.templates,
        **_clip_options(args),
    )
    print(
        f"zero-shot {r['dataset']} ({r['num_samples']} images, {r['num_classes']} classes, {r['num_templates']} "
        f"templates): top-1 {r['top1']:.2f}  top-5 {r['top5']:.2f}  mean/class {r['mean_per_class_top1']:.2f}"
    )
    print(f"written to {r['output']}")
    return 0


def _cmd_retrieval(args: argparse.Namespace) -> int:
    from vitssl.cli._common import register_objectives
    from vitssl.eval.zeroshot import run_retrieval

    register_objectives()
    check_spec(args.data, "--data")
    r = run_retrieval(_clip_checkpoint_arg(args.checkpoint), args.data, **_clip_options(args))
    print(f"retrieval {r['dataset']} ({r['num_images']} images, {r['num_texts']} captions)")
    for direction in ("image_to_text", "text_to_image"):
        recalls = "  ".join(f"{k} {v:.2f}" for k, v in r[direction].items())
        print(f"  {direction.replace('_', ' ')}: {recalls}")
    print(f"written to {r['output']}")
    return 0


# --------------------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------------------


def add_extraction_options(p: argparse.ArgumentParser) -> None:
    """The checkpoint, launch overrides and extraction options of the commands that launch an :class:`EvalJob`."""
    p.add_argument("checkpoint", help="engine checkpoint (any objective), e.g. runs/moco/checkpoint_last.pth")
    p.add_argument(
        "overrides", nargs="*", help="launch overrides, anywhere on the line: launch=slurm launch.gpus_per_node=8 ..."
    )
    p.add_argument("--layer", default="pooled", help=f"feature layer: {LAYER_HELP} (default pooled)")
    p.add_argument("--cache-dir", help="feature cache folder (default <checkpoint folder>/features)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass and process (default 256)")
    p.add_argument(
        "--num-workers", type=int, help="data-loading processes per process (default: its CPUs less one, at most 8)"
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: the GPU if visible")
    p.add_argument("--skip-corrupt", action="store_true", help="leave unreadable images out instead of failing")
    p.add_argument("--dry-run", action="store_true", help="with launch=slurm: print the sbatch script only")


def add_data_options(p: argparse.ArgumentParser, what: str) -> None:
    """``--data`` / ``--split`` of the commands over one dataset."""
    p.add_argument("--data", required=True, metavar="SPEC", help=f"{what}; {SPEC_SYNTAX}")
    p.add_argument("--split", help="split (default: the spec's, else val)")


def _add_feature_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--feature-dtype", default="float16", help="precision of the feature store: float16 (default) or float32"
    )


def _add_probe_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", metavar="SPEC", help=f"training data, split train by default: {SPEC_SYNTAX}")
    p.add_argument("--val", metavar="SPEC", help="evaluation data (split val by default)")
    p.add_argument("--train-features", metavar="DIR", help="an existing feature store instead of --train")
    p.add_argument("--val-features", metavar="DIR", help="an existing feature store instead of --val")
    p.add_argument(
        "--out", metavar="FILE", help="result JSON (default <checkpoint folder>/eval/<task>-<train>-<val>-...json)"
    )
    _add_feature_dtype(p)


def _add_clip_options(p: argparse.ArgumentParser, data_help: str) -> None:
    p.add_argument(
        "checkpoint",
        help="engine checkpoint of a clip run (e.g. runs/clip_demo/checkpoint_last.pth), an open_clip folder "
        "(vitssl export open_clip), or an open_clip .pt/.safetensors state dict with --model",
    )
    p.add_argument("--data", required=True, metavar="SPEC", help=f"{data_help}; syntax {SPEC_SYNTAX}")
    p.add_argument("--model", metavar="NAME", help="open_clip model name of a state-dict checkpoint, e.g. ViT-B-16")
    p.add_argument("--output", metavar="FILE", help="JSON result path (default: next to the checkpoint)")
    p.add_argument("--batch-size", type=int, default=256, help="images / texts per forward pass (default 256)")
    p.add_argument("--num-workers", type=int, default=0, help="data-loading processes (default 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: GPU if visible")
    p.add_argument("--skip-corrupt", action="store_true", help="skip and count unreadable samples instead of failing")


def register_commands(
    subparsers: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction] | None = None
) -> None:
    """Add ``eval features|knn|linear|zeroshot|retrieval``.

    Args:
        subparsers: the top-level commands (nothing is added there).
        groups: the sub-command groups; ``groups["eval"]`` gets the commands.
    """
    if not groups or "eval" not in groups:
        raise ValueError("vitssl.cli.eval.register_commands needs the 'eval' command group")
    ev = groups["eval"]

    p = add_parser(
        ev,
        "features",
        help="extract and cache frozen features of a dataset",
        description="Extract frozen features with the checkpoint's evaluation transform into the feature cache "
        "(reused by knn, linear and index build).",
    )
    add_extraction_options(p)
    add_data_options(p, "dataset")
    _add_feature_dtype(p)
    p.set_defaults(func=_cmd_features)

    p = add_parser(
        ev,
        "knn",
        help="weighted k-NN accuracy (DINO protocol, faiss) on cached features",
        description="Weighted k-NN (cosine, votes exp(sim/T)) top-1/top-5 for several k; a table and a JSON file.",
    )
    add_extraction_options(p)
    _add_probe_data(p)
    p.add_argument(
        "--k",
        nargs="+",
        type=number_or_override(int),
        action=ListWithOverrides,
        default=list(DEFAULT_KS),
        help="neighbour counts (default 10 20 100 200)",
    )
    p.add_argument("--temperature", type=float, default=0.07, help="vote temperature T (default 0.07)")
    p.add_argument(
        "--approx", action="store_true", help="approximate search (IVF, lists and probes chosen from the bank size)"
    )
    p.set_defaults(func=_cmd_knn)

    p = add_parser(
        ev,
        "linear",
        help="linear probe (SGD lr sweep and/or logistic regression) on cached features",
        description="BatchNorm (no affine) + linear head, SGD momentum 0.9, wd 0, cosine, an lr sweep in one pass, "
        "lr picked on a held-out part of train; and/or scikit-learn logistic regression. Writes JSON and a "
        "confusion-matrix PNG per method.",
    )
    add_extraction_options(p)
    _add_probe_data(p)
    p.add_argument(
        "--method",
        choices=("sgd", "logreg", "both", "sweep"),
        default="sgd",
        help="probe(s) to train (default sgd); sweep: --lrs x --wds x the layer's feature variants in one pass "
        "(--layer last4avg gives DINOv2's four)",
    )
    p.add_argument(
        "--wds",
        nargs="+",
        type=number_or_override(float),
        action=ListWithOverrides,
        default=[0.0],
        help="with --method sweep: weight decays (default 0)",
    )
    p.add_argument("--epochs", type=int, default=90, help="SGD epochs (default 90)")
    p.add_argument(
        "--lrs",
        nargs="+",
        type=number_or_override(float),
        action=ListWithOverrides,
        help="SGD learning rates, one head each (default 0.01..3.0 x batch/256)",
    )
    p.add_argument(
        "--cs",
        nargs="+",
        type=number_or_override(float),
        action=ListWithOverrides,
        default=[0.01, 0.1, 1.0, 10.0, 100.0],
        help="logistic-regression inverse regularisation values (default 0.01 .. 100)",
    )
    p.add_argument("--max-iter", type=int, default=1000, help="logistic-regression lbfgs iterations (default 1000)")
    p.add_argument("--probe-batch-size", type=int, default=256, help="SGD rows per step (default 256)")
    p.add_argument("--holdout-fraction", type=float, default=0.1, help="share of train used to pick lr / C")
    p.add_argument("--seed", type=int, default=0, help="split, initialisation and order seed")
    p.add_argument(
        "--finetune-aug",
        action="store_true",
        help="the paper protocol: train the SGD probe through the frozen backbone on random-resized-crop + flip "
        "images, features recomputed every epoch (slow)",
    )
    p.add_argument("--aug-scale-min", type=float, default=0.08, help="with --finetune-aug: smallest crop area")
    p.set_defaults(func=_cmd_linear)

    p = ev.add_parser(
        "zeroshot",
        help="zero-shot classification with a CLIP checkpoint (top-1/top-5, JSON)",
        description="Classify a labelled dataset with prompt-template class embeddings of a CLIP checkpoint.",
    )
    _add_clip_options(p, "labelled dataset, split val by default")
    p.add_argument(
        "--classnames", metavar="FILE", help="one class name per line, in class order (default: the dataset's)"
    )
    p.add_argument(
        "--templates",
        metavar="FILE",
        help="one prompt per line with {} for the class name (default: 'a photo of a {}.'); "
        "shapes: zeroshot/shapes_templates.txt",
    )
    p.set_defaults(func=_cmd_zeroshot)

    p = ev.add_parser(
        "retrieval",
        help="image-text retrieval recall@1/5/10 with a CLIP checkpoint (JSON)",
        description="Image→text and text→image recall@1/5/10 of a CLIP checkpoint on an image-caption dataset.",
    )
    _add_clip_options(p, "image-caption dataset, split val by default")
    p.set_defaults(func=_cmd_retrieval)


__all__ = [
    "CALL_TARGET",
    "JOB_TARGET",
    "EvalJob",
    "FeaturesJob",
    "KnnJob",
    "LinearJob",
    "ProbeJob",
    "eval_job",
    "register_commands",
    "run_eval_call",
    "run_eval_job",
]
