"""The probe jobs of ``vitssl eval knn|linear`` as library calls: :func:`run_knn` and :func:`run_linear`.

Each takes its payload (:class:`~vitssl.eval.jobs.KnnJob`, :class:`~vitssl.eval.jobs.LinearJob`), reads or
extracts the ``--train`` / ``--val`` features (every rank its shards), probes them on rank 0 (the augmented
linear probe on every rank: each embeds its part of a batch), writes the result JSON (and, for linear, a
confusion-matrix PNG per method next to it) and returns a :class:`~vitssl.eval.jobs.JobResult` on rank 0,
None on the others.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from vitssl.config import ConfigError
from vitssl.eval.jobs import (
    JobResult,
    KnnJob,
    LinearJob,
    ProbeJob,
    data_workers,
    eval_model,
    is_main,
    job_features,
    provenance,
    register_job,
    write_result,
)


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


@register_job(KnnJob)
def run_knn(job: KnnJob) -> JobResult | None:
    """Weighted k-NN top-1 / top-5 of ``job.val`` against the bank ``job.train``, for every k of ``job.ks``.

    Args:
        job: the payload; ``job.out`` receives the result JSON.

    Returns:
        On rank 0 the result (``record`` as written to ``job.out``, ``report`` the table); None elsewhere.

    Raises:
        ConfigError: bad settings (:meth:`~vitssl.eval.jobs.KnnJob.check`), unlabelled data, different classes,
            or ``job.out`` holding the result of other inputs.
    """
    from vitssl.eval.knn import format_knn_table, knn_evaluate

    job.check()
    t0 = time.perf_counter()
    model, train, val = _probe_features(job)
    if not is_main():
        return None
    num_classes = _num_classes(train, val)
    record = _probe_record("knn", model, job, train, val)
    _check_overwrite(job.out, record)
    result = knn_evaluate(
        train.features,
        train.labels,
        val.features,
        val.labels,
        job.ks,
        job.temperature,
        num_classes,
        approx=job.approx,
        backend=job.backend,
    )
    out = {
        **record,
        **result,
        "seconds": round(time.perf_counter() - t0, 3),
        "output": job.out,
    }
    write_result(out, job.out)
    return JobResult("knn", out, f"{format_knn_table(result)}\nwritten to {job.out}", Path(job.out))


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


@register_job(LinearJob)
def run_linear(job: LinearJob) -> JobResult | None:
    """The linear probe(s) of ``job.method`` trained on ``job.train`` and scored on ``job.val``.

    ``sgd``: the SGD protocol on cached features (through the frozen backbone on augmented images with
    ``job.finetune_aug``); ``logreg``: scikit-learn logistic regression; ``both``: the two; ``sweep``: lrs x wds x
    the layer's feature variants in one pass. Each method's confusion matrix goes to
    ``<out stem>-confusion-<method>.png`` next to ``job.out``.

    Args:
        job: the payload; ``job.out`` receives the result JSON.

    Returns:
        On rank 0 the result (``record`` as written to ``job.out``, ``report`` the tables); None elsewhere.

    Raises:
        ConfigError: bad settings (:meth:`~vitssl.eval.jobs.LinearJob.check`), unlabelled data, different
            classes, or ``job.out`` holding the result of other inputs.
    """
    from vitssl.eval import linear
    from vitssl.eval.metrics import save_confusion_png

    job.check()
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
        return None
    out_path = Path(job.out)
    names = train.classes or None
    pictures, tables = {}, []
    for name, r in results.items():
        png = out_path.with_name(f"{out_path.stem}-confusion-{name}.png")
        save_confusion_png(r["confusion_matrix"], names, png)
        pictures[name] = str(png)
        if name == "linear_sweep":
            from vitssl.eval.sweep import format_sweep_table

            tables.append(format_sweep_table(r))
        else:
            tables.append(linear.format_probe_table(r))
    out = {
        **_probe_record("linear", model, job, train, val),
        "results": {name: linear.result_to_json(r) for name, r in results.items()},
        "confusion_png": pictures,
        "seconds": round(time.perf_counter() - t0, 3),
        "output": str(out_path),
    }
    write_result(out, out_path)
    tables.append(f"written to {out_path} (confusion matrices: {', '.join(pictures.values())})")
    return JobResult("linear", out, "\n".join(tables), out_path)


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


__all__ = ["run_knn", "run_linear"]
