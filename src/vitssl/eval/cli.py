"""Evaluation commands: ``vitssl eval features|knn|linear`` and ``vitssl index build|merge|query|eval``.

Every probe reads frozen features through the cache of :mod:`vitssl.eval.features`, so re-running a command on
the same checkpoint and data costs no backbone forward. The long commands (``eval features|knn|linear``,
``index build``) run through :func:`vitssl.launch.launch` like ``vitssl pretrain``: ``launch=slurm`` and
``launch.*`` overrides may follow anywhere on the command line, e.g.::

    vitssl eval knn runs/moco/checkpoint_last.pth --train imagefolder:root=/data/in1k,split=train \\
        --val imagefolder:root=/data/in1k,split=val launch=slurm launch.gpus_per_node=8

A job is :func:`run_eval_job` with a config of the main schema: the command's arguments sit in
``cfg.meta["eval_args"]``, ``output_dir`` is the folder of its results (SLURM logs go to ``<output_dir>/submitit``),
``device`` and ``launch`` come from the command line. Extraction runs on every rank (a shard each); the probes,
the index writing and the printing run on rank 0.

Sharded index builds (``index build --shards n``) write into ``<out>.build/``: ``trained.faiss`` (factories that
need training: one job embeds the training sample and trains the quantizer), ``shards/shard_<i>_of_<n>`` (an
array of n jobs, one shard each) and the merge (a job that starts when every shard succeeded). Locally the same
steps run one after the other.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vitssl.config import ConfigError

_logger = logging.getLogger(__name__)

JOB_TARGET = "vitssl.eval.cli:run_eval_job"
CALL_TARGET = "vitssl.eval.cli:run_eval_call"
DEFAULT_KS = (10, 20, 100, 200)
_OVERRIDE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")
_SHARD_RE = re.compile(r"^(\d+)/(\d+)$")
# Dimensions tried to parse a factory string before the feature width is known; training needs do not depend on
# the width, and 3840 = 2^8 x 15 is divisible by the sub-quantizer counts of PQ / OPQ factories in practice.
_PROBE_DIMS = (3840, 768, 1024, 384, 4096, 256, 96, 64, 32)


# --------------------------------------------------------------------------------------------------------------
# Command-line parsing: key=value overrides anywhere on the line
# --------------------------------------------------------------------------------------------------------------


class _OverridesParser(argparse.ArgumentParser):
    """Collects ``key=value`` tokens that follow options into ``overrides``.

    argparse fills positionals from the first run of positional tokens only, so ``CKPT --train X launch=slurm``
    would leave ``launch=slurm`` unrecognised; overrides are always ``key=value`` and never a value of an option
    here, so they can be picked out of the leftovers.
    """

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        moved = [a for a in extras if _OVERRIDE_RE.match(a)]
        if moved:
            namespace.overrides = [*(getattr(namespace, "overrides", None) or []), *moved]
        return namespace, [a for a in extras if not _OVERRIDE_RE.match(a)]


class _Override(str):
    """A ``key=value`` token met inside a list option (``--k 10 20 launch=slurm``)."""


def _number_or_override(convert: type) -> Any:
    def parse(text: str) -> Any:
        if _OVERRIDE_RE.match(text):
            return _Override(text)
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {convert.__name__}") from None

    parse.__name__ = convert.__name__
    return parse


class _ListWithOverrides(argparse.Action):
    """``nargs='+'`` list option whose trailing ``key=value`` tokens go to ``overrides``."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        overrides = [v for v in values if isinstance(v, _Override)]
        items = [v for v in values if not isinstance(v, _Override)]
        if not items:
            parser.error(f"{option_string} needs at least one value")
        setattr(namespace, self.dest, items)
        if overrides:
            namespace.overrides = [*(getattr(namespace, "overrides", None) or []), *map(str, overrides)]


def _add_parser(group: argparse._SubParsersAction, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    parser = group.add_parser(name, **kwargs)
    # The group creates plain ArgumentParsers; this one only adds the override collection above.
    parser.__class__ = _OverridesParser
    return parser


# --------------------------------------------------------------------------------------------------------------
# Job configs and the job entry points
# --------------------------------------------------------------------------------------------------------------


def _job_config(overrides: list[str], device: str, output_dir: Path, eval_args: dict[str, Any]) -> Any:
    """A config of the main schema for an evaluation job: launch overrides, device, output folder, arguments."""
    from vitssl.config import load_config

    wrong = [o for o in overrides if not (o.startswith(("launch=", "launch.", "device=")))]
    if wrong:
        raise ConfigError(
            f"evaluation commands take launch settings only as key=value overrides (launch=slurm, "
            f"launch.gpus_per_node=8, ...); got {', '.join(wrong)}"
        )
    cfg = load_config(None, [f"device={device}", *overrides])
    cfg.output_dir = str(Path(output_dir).absolute())
    cfg.meta = {"eval_args": eval_args}
    return cfg


def run_eval_job(cfg: Any) -> dict[str, Any]:
    """Run the evaluation command described by ``cfg.meta["eval_args"]`` on this rank (a launch target).

    Args:
        cfg: a config from ``vitssl eval`` / ``vitssl index`` (see the module doc).

    Returns:
        The command's result on rank 0 (what it also writes as JSON), ``{}`` on other ranks.
    """
    from omegaconf import OmegaConf

    from vitssl.engine.distributed import init_distributed

    args = OmegaConf.to_container(cfg.meta, resolve=True)["eval_args"]  # plain lists and dicts, JSON-ready
    job = _JOBS.get(args.get("command", ""))
    if job is None:
        raise ConfigError(f"meta.eval_args.command={args.get('command')!r}; valid commands: {', '.join(_JOBS)}")
    init_distributed()
    with _user_errors():
        return job(args, cfg)


def run_eval_call(cfg_dict: dict[str, Any]) -> Any:
    """Array-task / dependent-job entry (``submit_array_then`` calls ``target(*args)``): one evaluation job.

    Locally it goes through :func:`vitssl.launch.launch`, so ``launch.tasks_per_node`` processes still apply;
    inside a SLURM job it runs on this task directly.
    """
    from vitssl.config import from_container

    cfg = from_container(cfg_dict)
    if cfg.launch.backend == "local":
        from vitssl.launch import launch

        return launch(JOB_TARGET, cfg, kind="eval")
    return run_eval_job(cfg)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the library's errors about user input (index folders, feature folders) into ConfigError."""
    from vitssl.eval.features import FeatureCacheError

    try:
        yield
    except FeatureCacheError as err:
        raise ConfigError(str(err)) from None
    except FileExistsError as err:
        raise ConfigError(f"{err}") from None


def _is_main() -> bool:
    from vitssl.engine.distributed import is_main_process

    return is_main_process()


def _write_json(obj: dict[str, Any], path: Path) -> None:
    from vitssl.eval._io import write_json

    write_json(obj, path, default=str)


def _data_workers(requested: int | None) -> int:
    """``--num-workers``, or by default the CPUs this process may use, shared by the processes on this node, less
    one for the process itself (at most 8)."""
    if requested is not None:
        return int(requested)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_procs = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, cpus // local_procs - 1))


def _model(a: dict[str, Any], cfg: Any) -> Any:
    from vitssl.eval.features import EvalModel

    return EvalModel(a["checkpoint"], cfg.device)


def _features(model: Any, a: dict[str, Any], spec: str, split: str | None, rows: tuple[int, int] | None = None) -> Any:
    from vitssl.eval.features import extract_cached

    return extract_cached(
        model,
        spec,
        split,
        a["layer"],
        a.get("cache_dir"),
        a["batch_size"],
        num_workers=_data_workers(a["num_workers"]),
        skip_corrupt=a["skip_corrupt"],
        rows=rows,
    )


def _split_of(spec: str, default: str, split: str | None = None) -> str:
    """The split a command uses: ``--split`` if given (it must agree with the spec's), the spec's, or ``default``."""
    from vitssl.eval.spec import parse_data_spec, resolve_split

    return resolve_split(spec, parse_data_spec(spec)[1], split, default)


def _provenance(model: Any, a: dict[str, Any]) -> dict[str, Any]:
    import vitssl

    return {
        "checkpoint": str(model.path),
        "checkpoint_sha256": model.checkpoint_hash,
        "objective": model.objective_name,
        "layer": a["layer"],
        "transform": model.transform,
        "vitssl_version": vitssl.__version__,
    }


def _require_labels(fs: Any, option: str) -> None:
    if not fs.labelled:
        raise ConfigError(
            f"{option} {fs.meta.get('data_spec')!r} has no class labels; k-NN and linear probes need a labelled "
            "dataset (imagefolder, digits, shapes, cifar10, ...)"
        )


def _probe_features(a: dict[str, Any], cfg: Any) -> tuple[Any, Any, Any]:
    """The evaluation model and the ``--train`` / ``--val`` feature sets of a probe job (extracted on every rank)."""
    model = _model(a, cfg)
    return model, _features(model, a, a["train"], a["train_split"]), _features(model, a, a["val"], a["val_split"])


def _labelled_num_classes(train: Any, val: Any) -> int:
    """Check that both feature sets are labelled and share their classes; return the class count."""
    _require_labels(train, "--train")
    _require_labels(val, "--val")
    return _num_classes(train, val)


def _probe_record(task: str, model: Any, a: dict[str, Any], train: Any, val: Any) -> dict[str, Any]:
    """The leading entries of a probe's result JSON: what was evaluated, on which data and feature folders."""
    return {
        "task": task,
        **_provenance(model, a),
        "train": a["train"],
        "val": a["val"],
        "train_features": str(train.path),
        "val_features": str(val.path),
        "classes": train.classes,
    }


def _sgd_options(model: Any, a: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments the SGD linear probes (on cached and on augmented features) share."""
    return {
        "lrs": a["lrs"],
        "epochs": a["epochs"],
        "batch_size": a["probe_batch_size"],
        "holdout_fraction": a["holdout_fraction"],
        "seed": a["seed"],
        "device": model.device,
    }


def _num_classes(train: Any, val: Any) -> int:
    if train.classes and val.classes and train.classes != val.classes:
        raise ConfigError(
            f"--train and --val have different classes ({len(train.classes)} vs {len(val.classes)}: "
            f"{train.classes[:5]} vs {val.classes[:5]}); use two splits of the same dataset"
        )
    observed = int(max(train.labels.max(initial=-1), val.labels.max(initial=-1))) + 1
    return max(len(train.classes), observed)


# --------------------------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------------------------


def _job_features(a: dict[str, Any], cfg: Any) -> dict[str, Any]:
    model = _model(a, cfg)
    fs = _features(model, a, a["data"], a["split"])
    if not _is_main():
        return {}
    how = "read from the cache" if fs.meta["cache_hit"] else f"extracted in {fs.meta['seconds']:.1f} s"
    print(f"{len(fs)} x {fs.dim} features of {a['data']} ({fs.meta['key']['split']}, layer {a['layer']}) {how}")
    print(f"  folder: {fs.path}")
    hit = fs.meta["cache_hit"]
    return {"task": "features", "folder": str(fs.path), "count": len(fs), "dim": fs.dim, "cache_hit": hit}


def _job_knn(a: dict[str, Any], cfg: Any) -> dict[str, Any]:
    from vitssl.eval.knn import format_knn_table, knn_evaluate

    t0 = time.perf_counter()
    model, train, val = _probe_features(a, cfg)
    if not _is_main():
        return {}
    num_classes = _labelled_num_classes(train, val)
    result = knn_evaluate(
        train.features, train.labels, val.features, val.labels, a["ks"], a["temperature"], num_classes
    )
    out = {
        **_probe_record("knn", model, a, train, val),
        **result,
        "seconds": round(time.perf_counter() - t0, 3),
        "output": a["out"],
    }
    _write_json(out, Path(a["out"]))
    print(format_knn_table(result))
    print(f"written to {a['out']}")
    return out


def _job_linear(a: dict[str, Any], cfg: Any) -> dict[str, Any]:
    from vitssl.eval import linear

    t0 = time.perf_counter()
    model, train, val = _probe_features(a, cfg)
    num_classes = _labelled_num_classes(train, val)
    data = (train.features, train.labels, val.features, val.labels, num_classes)
    methods = ["sgd", "logreg"] if a["method"] == "both" else [a["method"]]
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        if method == "sgd" and a["finetune_aug"]:  # every rank embeds its part of each augmented batch
            results["linear_sgd_aug"] = _augmented_probe(model, a, train, val, num_classes)
        elif not _is_main():
            continue
        elif method == "sgd":
            results["linear_sgd"] = linear.train_linear_probe(*data, **_sgd_options(model, a))
        else:
            results["logistic_regression"] = linear.logistic_regression_probe(
                *data,
                Cs=a["cs"],
                max_iter=a["max_iter"],
                holdout_fraction=a["holdout_fraction"],
                seed=a["seed"],
            )
    if not _is_main():
        return {}
    out_path = Path(a["out"])
    names = train.classes or None
    pictures = {}
    for name, r in results.items():
        png = out_path.with_name(f"{out_path.stem}-confusion-{name}.png")
        linear.save_confusion_matrix_png(r["confusion_matrix"], names, png)
        pictures[name] = str(png)
        print(linear.format_probe_table(r))
    out = {
        **_probe_record("linear", model, a, train, val),
        "results": {name: linear.result_to_json(r) for name, r in results.items()},
        "confusion_png": pictures,
        "seconds": round(time.perf_counter() - t0, 3),
        "output": str(out_path),
    }
    _write_json(out, out_path)
    print(f"written to {out_path} (confusion matrices: {', '.join(pictures.values())})")
    return out


def _augmented_probe(model: Any, a: dict[str, Any], train: Any, val: Any, num_classes: int) -> dict[str, Any]:
    from torch.utils.data import Subset

    from vitssl.eval.features import dataset_rows
    from vitssl.eval.linear_aug import AugmentThenEval, augmented_linear_probe
    from vitssl.eval.spec import build_eval_dataset

    base, _, _ = build_eval_dataset(a["train"], a["train_split"], absolute_root=True)
    kept = dataset_rows(train.meta)  # rows with cached features (all of them unless corrupt ones were skipped)
    dataset = Subset(base, kept.tolist()) if len(kept) != len(base) else base
    augment = AugmentThenEval(int(model.cfg.data.img_size), model.sample_fn, (a["aug_scale_min"], 1.0))
    return augmented_linear_probe(
        model.feature_fn(a["layer"]),
        dataset,
        train.labels,
        train.features,
        val.features,
        val.labels,
        num_classes,
        augment,
        **_sgd_options(model, a),
        num_workers=_data_workers(a["num_workers"]),
    )


def _source(model: Any, a: dict[str, Any]) -> dict[str, Any]:
    """What ``index query`` needs to embed queries like the corpus: recorded in the index manifest."""
    return {
        "checkpoint_path": str(model.path),
        "objective": model.objective_name,
        "data": a["data"],
        "split": a["split"],
        "layer": a["layer"],
    }


def _write_index(build: Callable[..., Any], model: Any, fs: Any, a: dict[str, Any], **options: Any) -> Path:
    """Write the index folder ``a["out"]`` of ``fs`` with ``build`` (``retrieval.build_index_dir`` or
    ``retrieval.build_shard``, which share these options) and record where its vectors came from."""
    out = Path(a["out"])
    with _index_errors():
        build(
            out,
            fs.features,
            fs.sample_ids,
            factory=a["factory"],
            metric=a["metric"],
            normalize=a["normalize"],
            checkpoint=model.checkpoint_hash,
            feature_key=model.feature_key(a["layer"]),
            store_vectors=a["store_vectors"],
            overwrite=a["overwrite"],
            **options,
        )
    _record_source(out, _source(model, a))
    return out


def _record_source(directory: Path, source: dict[str, Any]) -> None:
    """Add ``source`` to an index folder's manifest.json (atomically; the manifest is not under its own checksum)."""
    from vitssl.eval._io import write_json
    from vitssl.eval.retrieval import MANIFEST_FILE

    path = directory / MANIFEST_FILE
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["source"] = source
    write_json(manifest, path, sort_keys=True)


@contextmanager
def _index_errors() -> Iterator[None]:
    """faiss-side problems a user fixes by changing the command (factory, training size, index folders)."""
    from vitssl.eval.retrieval import IndexFormatError

    try:
        yield
    except (IndexFormatError, ValueError) as err:
        raise ConfigError(str(err)) from None


def _job_index_build(a: dict[str, Any], cfg: Any) -> dict[str, Any]:
    from vitssl.eval import retrieval

    model = _model(a, cfg)
    fs = _features(model, a, a["data"], a["split"])
    if not _is_main():
        return {}
    out = _write_index(retrieval.build_index_dir, model, fs, a, train_size=a["train_size"], seed=a["seed"])
    manifest = json.loads((out / retrieval.MANIFEST_FILE).read_text())
    print(f"index {a['factory']!r}: {manifest['count']} x {manifest['dimension']} vectors -> {out}")
    return {"task": "index_build", "out": str(out), "count": manifest["count"], "dimension": manifest["dimension"]}


def _job_index_train(a: dict[str, Any], cfg: Any) -> dict[str, Any]:
    from vitssl.eval import retrieval
    from vitssl.eval.features import extract_rows
    from vitssl.eval.spec import build_eval_dataset

    model = _model(a, cfg)
    dataset, _, _ = build_eval_dataset(a["data"], a["split"], absolute_root=True)
    sample = retrieval.training_sample_indices(len(dataset), a["train_size"], a["seed"])
    feats, _ = extract_rows(
        model.feature_fn(a["layer"]),
        dataset,
        model.sample_fn,
        sample,
        a["batch_size"],
        model.device,
        _data_workers(a["num_workers"]),
        a["skip_corrupt"],
    )
    if not _is_main():
        return {}
    with _index_errors():
        index = retrieval.train_index(feats, a["factory"], a["metric"], a["normalize"])
        path = retrieval.write_trained_index(
            a["trained"], index, a["factory"], a["metric"], a["normalize"], len(feats), a["seed"]
        )
    print(f"trained {a['factory']!r} on {len(feats)} vectors -> {path}")
    return {"task": "index_train", "trained": str(path), "train_count": len(feats)}


def _job_index_shard(a: dict[str, Any], cfg: Any) -> dict[str, Any]:
    from vitssl.eval import retrieval
    from vitssl.eval.spec import build_eval_dataset

    i, n = a["shard"]
    model = _model(a, cfg)
    dataset, _, _ = build_eval_dataset(a["data"], a["split"], absolute_root=True)
    start, stop = retrieval.shard_range(len(dataset), i, n)
    fs = _features(model, a, a["data"], a["split"], rows=(start, stop))
    if not _is_main():
        return {}
    out = _write_index(retrieval.build_shard, model, fs, a, shard=(i, n), first_id=start, trained=a.get("trained"))
    print(f"shard {i}/{n}: rows {start}..{stop - 1} ({len(fs)} vectors) -> {out}")
    return {"task": "index_shard", "out": str(out), "shard": [i, n], "count": len(fs)}


def _job_index_merge(a: dict[str, Any], cfg: Any) -> dict[str, Any]:
    if not _is_main():
        return {}
    out = Path(a["out"])
    count = _merge_shards(a["shard_dirs"], out, a["overwrite"])
    if not a.get("keep_shards", True):
        for d in a["shard_dirs"]:
            shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(OSError):  # the shards' folder, when nothing else is in it
            Path(a["shard_dirs"][0]).parent.rmdir()
    print(f"merged {len(a['shard_dirs'])} shards: {count} vectors -> {out}")
    return {"task": "index_merge", "out": str(out), "count": count}


_JOBS = {
    "features": _job_features,
    "knn": _job_knn,
    "linear": _job_linear,
    "index_build": _job_index_build,
    "index_train": _job_index_train,
    "index_shard": _job_index_shard,
    "index_merge": _job_index_merge,
}


# --------------------------------------------------------------------------------------------------------------
# Commands (run where the user typed them; long ones hand a job to vitssl.launch)
# --------------------------------------------------------------------------------------------------------------


def _checkpoint_arg(path: str) -> str:
    from vitssl.engine.checkpoint import CheckpointError

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    return str(p.absolute())


def _common_args(args: argparse.Namespace, command: str) -> dict[str, Any]:
    from vitssl.eval.features import parse_layer

    return {
        "command": command,
        "checkpoint": _checkpoint_arg(args.checkpoint),
        "layer": parse_layer(args.layer),
        "cache_dir": str(Path(args.cache_dir).absolute()) if args.cache_dir else None,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "skip_corrupt": args.skip_corrupt,
    }


def _overrides(args: argparse.Namespace) -> list[str]:
    return [*(args.overrides or []), *(["launch.dry_run=true"] if getattr(args, "dry_run", False) else [])]


def _launch(args: argparse.Namespace, output_dir: Path, eval_args: dict[str, Any]) -> Any:
    from vitssl.launch import launch

    cfg = _job_config(_overrides(args), args.device, output_dir, eval_args)
    return launch(JOB_TARGET, cfg, kind="eval")


def _check_spec(spec: str, option: str) -> None:
    from vitssl.eval.spec import parse_data_spec

    try:
        parse_data_spec(spec)
    except ConfigError as err:
        raise ConfigError(f"{option}: {err}") from None


def _default_out(checkpoint: str, task: str, spec: str, split: str, layer: str, suffix: str = ".json") -> Path:
    from vitssl.eval.spec import parse_data_spec

    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", parse_data_spec(spec)[0])
    return Path(checkpoint).parent / "eval" / f"{task}-{name}-{split}-{layer}{suffix}"


def _data_args(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The arguments of a command over one dataset (``--data``, ``--split``)."""
    _check_spec(args.data, "--data")
    return {**_common_args(args, command), "data": args.data, "split": _split_of(args.data, "val", args.split)}


def _cmd_features(args: argparse.Namespace) -> int:
    from vitssl.eval.features import default_cache_dir

    a = _data_args(args, "features")
    output_dir = Path(a["cache_dir"]) if a["cache_dir"] else default_cache_dir(a["checkpoint"])
    _launch(args, output_dir, a)
    return 0


def _probe_args(args: argparse.Namespace, command: str) -> dict[str, Any]:
    _check_spec(args.train, "--train")
    _check_spec(args.val, "--val")
    a = {
        **_common_args(args, command),
        "train": args.train,
        "val": args.val,
        "train_split": _split_of(args.train, "train"),
        "val_split": _split_of(args.val, "val"),
    }
    out = Path(args.out) if args.out else _default_out(a["checkpoint"], command, args.val, a["val_split"], args.layer)
    a["out"] = str(out.absolute())
    return a


def _cmd_knn(args: argparse.Namespace) -> int:
    a = _probe_args(args, "knn")
    if any(k < 1 for k in args.k):
        raise ConfigError(f"--k {' '.join(map(str, args.k))}: neighbour counts must be positive")
    a.update(ks=[int(k) for k in args.k], temperature=float(args.temperature))
    _launch(args, Path(a["out"]).parent, a)
    return 0


def _cmd_linear(args: argparse.Namespace) -> int:
    a = _probe_args(args, "linear")
    if args.finetune_aug and args.method == "logreg":
        raise ConfigError("--finetune-aug trains the SGD probe through the backbone; use --method sgd or both")
    a.update(
        method=args.method,
        finetune_aug=bool(args.finetune_aug),
        aug_scale_min=float(args.aug_scale_min),
        epochs=int(args.epochs),
        lrs=[float(x) for x in args.lrs] if args.lrs else None,
        cs=[float(x) for x in args.cs],
        max_iter=int(args.max_iter),
        probe_batch_size=int(args.probe_batch_size),
        holdout_fraction=float(args.holdout_fraction),
        seed=int(args.seed),
    )
    _launch(args, Path(a["out"]).parent, a)
    return 0


def _needs_training(factory: str) -> bool:
    """Whether a faiss factory string must be trained (IVF, PQ, ...); ConfigError when faiss cannot parse it."""
    from vitssl.eval import retrieval

    last = ""
    for dim in _PROBE_DIMS:
        try:
            return not retrieval.new_index(factory, dim).is_trained
        except ValueError as err:
            last = str(err)
    raise ConfigError(f"--factory {factory!r}: {last}")


def _parse_shard(text: str) -> tuple[int, int]:
    match = _SHARD_RE.match(text)
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise ConfigError(f"--shard {text!r} must be i/n with 0 <= i < n, e.g. --shard 0/4")
    return int(match.group(1)), int(match.group(2))


def _cmd_index_build(args: argparse.Namespace) -> int:
    out = Path(args.out).absolute()
    a = {
        **_data_args(args, "index_build"),
        "out": str(out),
        "factory": args.factory,
        "metric": args.metric,
        "normalize": not args.no_normalize,
        "train_size": args.train_size,
        "seed": args.seed,
        "store_vectors": not args.no_vectors,
        "overwrite": bool(args.overwrite),
    }
    chosen = (("--shard", args.shard), ("--shards", args.shards), ("--train-only", args.train_only))
    modes = [option for option, value in chosen if value]
    if len(modes) > 1:
        raise ConfigError(f"{' and '.join(modes)} exclude each other; pick one")
    needs_training = _needs_training(args.factory)
    _check_new_out(out, args.overwrite)
    if args.train_only:
        if not needs_training:
            raise ConfigError(f"--factory {args.factory!r} needs no training; build it directly")
        a.update(command="index_train", trained=str(out))
        _launch(args, out.parent, a)
        return 0
    if args.shard is not None:
        if needs_training and not args.trained:
            raise ConfigError(
                f"--factory {args.factory!r} needs a trained quantizer shared by every shard: build it once with "
                f"`vitssl index build CKPT --data SPEC --factory {args.factory!r} --train-only --out trained.faiss` "
                "and pass --trained trained.faiss to each shard (or use --shards n, which does all of it)"
            )
        a.update(
            command="index_shard",
            shard=list(_parse_shard(args.shard)),
            trained=str(Path(args.trained).absolute()) if args.trained else None,
        )
        _launch(args, Path(f"{out}.build"), a)
        return 0
    if args.shards is not None:
        if args.shards < 1:
            raise ConfigError(f"--shards {args.shards} must be at least 1")
        return _sharded_build(args, a, out, args.shards, needs_training)
    _launch(args, Path(f"{out}.build"), a)
    return 0


def _sharded_build(args: argparse.Namespace, a: dict[str, Any], out: Path, n: int, needs_training: bool) -> int:
    """``--shards n``: [train job] -> array of n shard jobs -> merge job (locally: the same, in sequence)."""
    from vitssl.config import to_container
    from vitssl.launch import launch, submit, submit_array_then
    from vitssl.launch.common import append_job_record, tasks_per_node

    work = Path(f"{out}.build")
    shard_dirs = [work / "shards" / f"shard_{i:03d}_of_{n:03d}" for i in range(n)]
    trained = work / "trained.faiss" if needs_training else None
    overrides, device = _overrides(args), args.device

    def job_cfg(**changes: Any) -> Any:
        return _job_config(overrides, device, work, {**a, **changes})

    base = job_cfg()
    shard_cfgs = [
        job_cfg(command="index_shard", shard=[i, n], out=str(d), trained=str(trained) if trained else None)
        for i, d in enumerate(shard_dirs)
    ]
    merge_cfg = job_cfg(
        command="index_merge", shard_dirs=[str(d) for d in shard_dirs], keep_shards=bool(args.keep_shards)
    )
    train_cfg = job_cfg(command="index_train", trained=str(trained)) if trained else None
    calls = [(CALL_TARGET, (to_container(c),)) for c in shard_cfgs]
    then = (CALL_TARGET, (to_container(merge_cfg),))
    lcfg = base.launch
    if lcfg.backend == "local":
        if lcfg.dry_run:
            print(f"dry run: would build {n} shards of {args.data} in sequence and merge them into {out}")
            return 0
        if train_cfg is not None:
            launch(JOB_TARGET, train_cfg, kind="eval")
        submit_array_then(calls, then, lcfg, work / "submitit")
        return 0
    if lcfg.dry_run:
        from vitssl.launch.slurm import dry_run_script

        print(dry_run_script(base, "eval", array_size=n))
        return 0
    array_launch = copy.deepcopy(lcfg)
    if train_cfg is not None:
        train_job = submit(JOB_TARGET, train_cfg, kind="eval")
        print(f"Submitted SLURM job {train_job.job_id}: train {args.factory!r} on a sample of {args.data}")
        # the shards add vectors to the trained quantizer, so they wait for it
        array_launch.sbatch_extra = {
            **dict(lcfg.sbatch_extra),
            "dependency": f"afterok:{train_job.job_id}",
            "kill-on-invalid-dep": "yes",
        }
    merge_launch = copy.deepcopy(lcfg)
    merge_launch.gpus_per_node, merge_launch.tasks_per_node = 0, 1  # merging needs no GPU and one process
    jobs, merge_job = submit_array_then(
        calls, then, array_launch, work / "submitit", f"vitssl-index-{out.name}", then_launch_cfg=merge_launch
    )
    for job, kind in [*((j, "index_shard") for j in jobs), (merge_job, "index_merge")]:
        append_job_record(
            work,
            {
                "backend": "slurm",
                "job_id": job.job_id,
                "folder": str(job.paths.folder),
                "kind": kind,
                "target": CALL_TARGET,
                "tasks": 1 if kind == "index_merge" else lcfg.nodes * tasks_per_node(lcfg),
            },
        )
    print(f"Submitted SLURM array {str(jobs[0].job_id).split('_')[0]}: {n} shards of {args.data}")
    print(f"Submitted SLURM job {merge_job.job_id}: merge into {out} once every shard succeeded")
    print(f"  follow: vitssl jobs {work}   |   vitssl logs {work}")
    return 0


def _merge_shards(shard_dirs: list[str], out: Path, overwrite: bool) -> int:
    """Merge shard index folders into ``out``; return the merged vector count."""
    from vitssl.eval import retrieval

    with _index_errors():
        retrieval.merge_shards([Path(d) for d in shard_dirs], out, overwrite=overwrite)
    return int(json.loads((out / retrieval.MANIFEST_FILE).read_text())["count"])


def _check_new_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it")


def _cmd_index_merge(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _check_new_out(out, args.overwrite)
    count = _merge_shards(args.shard_dirs, out, args.overwrite)
    print(f"merged {len(args.shard_dirs)} shards: {count} vectors -> {out}")
    return 0


def _query_model(directory: Path, checkpoint: str | None, device: str) -> tuple[Any, Any, str]:
    """The checkpoint the index was built from (or ``--checkpoint``), the loaded index (checked against it), layer."""
    from vitssl.eval import retrieval
    from vitssl.eval.features import EvalModel

    with _index_errors():
        manifest_path = directory / retrieval.MANIFEST_FILE
        if not manifest_path.is_file():
            retrieval.load_index_dir(directory)  # raises its own clear error about the folder
        source = json.loads(manifest_path.read_text(encoding="utf-8")).get("source")
        if not source and checkpoint is None:
            raise ConfigError(
                f"index {directory} was built from precomputed embeddings (its manifest has no 'source'); "
                "embed queries with their producer and search with vitssl.eval.retrieval.search"
            )
        source = source or {}
        layer = source.get("layer", "pooled")
        model = EvalModel(checkpoint or source["checkpoint_path"], device)
        loaded = retrieval.load_index_dir(
            directory, expect_checkpoint=model.checkpoint_hash, expect_feature_key=model.feature_key(layer)
        )
    return model, loaded, layer


def _cmd_index_query(args: argparse.Namespace) -> int:
    from vitssl.eval import retrieval

    model, loaded, layer = _query_model(Path(args.dir), args.checkpoint, args.device)
    queries = model.embed_images(args.image, layer)
    with _index_errors():
        scores, ids = retrieval.search(loaded, queries, args.k, nprobe=args.nprobe, ef_search=args.ef_search)
    samples = loaded.lookup(ids)
    results = []
    for q, row_scores, row_ids, row_samples in zip(args.image, scores, ids, samples):
        hits = [
            {"rank": r + 1, "sample": s, "id": int(i), "score": float(sc)}
            for r, (s, i, sc) in enumerate(zip(row_samples, row_ids, row_scores))
            if i >= 0
        ]
        results.append({"query": str(q), "neighbours": hits})
        print(f"{q}:")
        for h in hits:
            print(f"  {h['rank']:>3}  {h['score']:.4f}  {h['sample']}")
    if args.json:
        _write_json({"index": str(args.dir), "k": args.k, "layer": layer, "queries": results}, Path(args.json))
        print(f"written to {args.json}")
    if args.grid:
        retrieval.save_query_grid_png(list(map(str, args.image)), samples, scores, args.grid)
        print(f"query grid: {args.grid}")
    return 0


def _cmd_index_eval(args: argparse.Namespace) -> int:
    from vitssl.eval import retrieval

    queries = truth = None
    if args.ground_truth:
        model, loaded, layer = _query_model(Path(args.dir), args.checkpoint, args.device)
        with _index_errors():
            pairs = retrieval.read_ground_truth(args.ground_truth)
        if not pairs:
            raise ConfigError(f"--ground-truth {args.ground_truth} holds no queries")
        queries = model.embed_images([q for q, _ in pairs], layer)
        truth = [relevant for _, relevant in pairs]
    else:
        with _index_errors():
            loaded = retrieval.load_index_dir(args.dir)
    with _index_errors():
        result = retrieval.evaluate_index(
            loaded, queries, truth, args.k, args.num_queries, args.seed, args.nprobe, args.ef_search
        )
    recalls = "  ".join(f"R@{c} {v:.4f}" for c, v in result["recall"].items())
    line = f"{result['factory']} ({result['num_queries']} queries, {result['search_params'] or 'exact'}): {recalls}"
    if "map" in result:
        line += f"  mAP@{args.k} {result['map']:.4f} (exact search {result['map_exact']:.4f})"
    print(line)
    print(f"{result['queries_per_second']:.0f} queries/s")
    if args.json:
        _write_json({"index": str(args.dir), **result}, Path(args.json))
        print(f"written to {args.json}")
    return 0


# --------------------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------------------


def _add_extraction_options(p: argparse.ArgumentParser) -> None:
    from vitssl.eval.features import LAYER_HELP

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


def _add_data_options(p: argparse.ArgumentParser, what: str) -> None:
    """``--data`` / ``--split`` of the commands over one dataset (read back by :func:`_data_args`)."""
    from vitssl.eval.spec import SPEC_SYNTAX

    p.add_argument("--data", required=True, metavar="SPEC", help=f"{what}; {SPEC_SYNTAX}")
    p.add_argument("--split", help="split (default: the spec's, else val)")


def _add_probe_data(p: argparse.ArgumentParser) -> None:
    from vitssl.eval.spec import SPEC_SYNTAX

    p.add_argument(
        "--train", required=True, metavar="SPEC", help=f"training data, split train by default: {SPEC_SYNTAX}"
    )
    p.add_argument("--val", required=True, metavar="SPEC", help="evaluation data (split val by default)")
    p.add_argument("--out", metavar="FILE", help="result JSON (default <checkpoint folder>/eval/<task>-...json)")


def _add_search_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="embed queries with this checkpoint (default: the one the index records)")
    p.add_argument("--nprobe", type=int, help="IVF lists to visit (default: the index's)")
    p.add_argument("--ef-search", type=int, help="HNSW search breadth (default: the index's)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where queries are embedded")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")


def register_commands(
    subparsers: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction] | None = None
) -> None:
    """Add ``eval features|knn|linear`` (+ zeroshot, retrieval) and ``index build|merge|query|eval``.

    Args:
        subparsers: the top-level commands (nothing is added there).
        groups: the sub-command groups; ``groups["eval"]`` and ``groups["index"]`` get the commands.
    """
    if not groups or "eval" not in groups or "index" not in groups:
        raise ValueError("vitssl.eval.cli.register_commands needs the 'eval' and 'index' command groups")
    ev, ix = groups["eval"], groups["index"]

    p = _add_parser(
        ev,
        "features",
        help="extract and cache frozen features of a dataset",
        description="Extract frozen features with the checkpoint's evaluation transform into the feature cache "
        "(reused by knn, linear and index build).",
    )
    _add_extraction_options(p)
    _add_data_options(p, "dataset")
    p.set_defaults(func=_cmd_features)

    p = _add_parser(
        ev,
        "knn",
        help="weighted k-NN accuracy (DINO protocol, faiss) on cached features",
        description="Weighted k-NN (cosine, votes exp(sim/T)) top-1/top-5 for several k; a table and a JSON file.",
    )
    _add_extraction_options(p)
    _add_probe_data(p)
    p.add_argument(
        "--k",
        nargs="+",
        type=_number_or_override(int),
        action=_ListWithOverrides,
        default=list(DEFAULT_KS),
        help="neighbour counts (default 10 20 100 200)",
    )
    p.add_argument("--temperature", type=float, default=0.07, help="vote temperature T (default 0.07)")
    p.set_defaults(func=_cmd_knn)

    p = _add_parser(
        ev,
        "linear",
        help="linear probe (SGD lr sweep and/or logistic regression) on cached features",
        description="BatchNorm (no affine) + linear head, SGD momentum 0.9, wd 0, cosine, an lr sweep in one pass, "
        "lr picked on a held-out part of train; and/or scikit-learn logistic regression. Writes JSON and a "
        "confusion-matrix PNG per method.",
    )
    _add_extraction_options(p)
    _add_probe_data(p)
    p.add_argument("--method", choices=("sgd", "logreg", "both"), default="sgd", help="probe(s) to train (default sgd)")
    p.add_argument("--epochs", type=int, default=90, help="SGD epochs (default 90)")
    p.add_argument(
        "--lrs",
        nargs="+",
        type=_number_or_override(float),
        action=_ListWithOverrides,
        help="SGD learning rates, one head each (default 0.01..3.0 x batch/256)",
    )
    p.add_argument(
        "--cs",
        nargs="+",
        type=_number_or_override(float),
        action=_ListWithOverrides,
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

    from vitssl.eval.zeroshot import register_eval_commands  # zero-shot and image-text retrieval (CLIP)

    register_eval_commands(ev)

    p = _add_parser(
        ix,
        "build",
        help="embed a dataset and build a faiss index folder (one job, a shard, or n shards + merge)",
        description="Extract embeddings (cached), train and fill a faiss index, write it with an id map and a "
        "manifest. --shards n builds n shards (a SLURM array with launch=slurm) and merges them.",
    )
    _add_extraction_options(p)
    _add_data_options(p, "corpus")
    p.add_argument("--out", required=True, help="index folder to write")
    p.add_argument("--factory", default="Flat", help="faiss index factory: Flat (default), IVF4096,PQ64, HNSW32, ...")
    p.add_argument("--metric", choices=("ip", "l2"), default="ip", help="ip (cosine on normalised vectors) or l2")
    p.add_argument("--no-normalize", action="store_true", help="do not L2-normalise vectors and queries")
    p.add_argument("--train-size", type=int, help="training sample for IVF / PQ (default: every vector)")
    p.add_argument("--seed", type=int, default=0, help="training sample seed")
    p.add_argument("--no-vectors", action="store_true", help="do not store vectors.npy (no exact recall or HNSW merge)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--shard", metavar="I/N", help="build only shard I of N into --out (merge them with index merge)")
    p.add_argument("--shards", type=int, help="build N shards (SLURM: an array) and merge them into --out")
    p.add_argument("--keep-shards", action="store_true", help="with --shards: keep the shard folders after merging")
    p.add_argument("--trained", metavar="FILE", help="with --shard: the trained quantizer every shard shares")
    p.add_argument("--train-only", action="store_true", help="only train the quantizer of --factory into --out FILE")
    p.set_defaults(func=_cmd_index_build)

    p = _add_parser(ix, "merge", help="merge shard index folders into one")
    p.add_argument("shard_dirs", nargs="+", help="the shard folders (all n of them)")
    p.add_argument("--out", required=True, help="merged index folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_cmd_index_merge)

    p = _add_parser(
        ix,
        "query",
        help="top-k neighbours of query images (printed, JSON, picture grid)",
        description="Embeds the images with the checkpoint, layer and transform the index was built with.",
    )
    p.add_argument("dir", help="index folder")
    p.add_argument("--image", action="append", required=True, help="query image file (repeat for several)")
    p.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--grid", metavar="PNG", help="draw each query with its neighbours into this PNG")
    _add_search_options(p)
    p.set_defaults(func=_cmd_index_query)

    p = _add_parser(
        ix,
        "eval",
        help="recall@k against exact search (and mAP with --ground-truth)",
        description="Without ground truth: stored vectors as queries, recall@1/10/k of the index against exact "
        'search. With --ground-truth FILE (JSON lines {"query": image path, "relevant": [sample ids]}): the query '
        "images are embedded and mAP@k is reported too.",
    )
    p.add_argument("dir", help="index folder")
    p.add_argument("--ground-truth", metavar="FILE", help="JSON-lines ground truth (see the description)")
    p.add_argument("-k", type=int, default=10, help="cut-off (default 10)")
    p.add_argument("--num-queries", type=int, default=1000, help="stored vectors used as queries without ground truth")
    p.add_argument("--seed", type=int, default=0, help="query sample seed")
    _add_search_options(p)
    p.set_defaults(func=_cmd_index_eval)


__all__ = ["register_commands", "run_eval_call", "run_eval_job"]
