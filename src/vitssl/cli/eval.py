"""Evaluation commands: ``vitssl eval features|knn|linear|zeroshot|retrieval``: parse, call the library, print.

The job bodies are library functions with typed payloads (:mod:`vitssl.eval.jobs`, :mod:`vitssl.eval.probe_jobs`,
:mod:`vitssl.eval.zeroshot`); a command checks its options, builds the payload and hands it over. The long
commands (``eval features|knn|linear`` here, ``index build`` in :mod:`vitssl.cli.index`) run through
:func:`vitssl.launch.launch` like ``vitssl pretrain``: ``launch=slurm`` and ``launch.*`` overrides may follow
anywhere on the command line, e.g.::

    vitssl eval knn runs/moco/checkpoint_last.pth --train imagefolder:root=/data/in1k,split=train \\
        --val imagefolder:root=/data/in1k,split=val launch=slurm launch.gpus_per_node=8

The launched job is :func:`vitssl.eval.jobs.run_eval_job`, which runs the payload's library function (registered
in :data:`vitssl.eval.jobs.EVAL_JOBS`) on this rank and prints its report on rank 0. The job's folder
(``jobs.jsonl``, SLURM logs under ``submitit/``) is the folder of its results.
``eval zeroshot|retrieval`` run here, in this process.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vitssl.cli._args import (
    ListWithOverrides,
    add_deprecated_spelling,
    add_device_option,
    add_parser,
    number_or_override,
)
from vitssl.config import ConfigError

# The payloads, the job registry and the launch targets live in the library; the index commands import the
# shared ones from here too.
from vitssl.eval.jobs import (
    CALL_TARGET,
    DEFAULT_KS,
    JOB_TARGET,
    EvalJob,
    FeaturesJob,
    KnnJob,
    LinearJob,
    ProbeJob,
    default_result_path,
    launch_job,
    run_eval_call,
    run_eval_job,
    write_result,
)
from vitssl.eval.spec import LAYER_HELP, SPEC_SYNTAX  # imports no torch: building the parser stays light

# Submissions made before the job registry moved to vitssl.eval.jobs pickled the targets
# "vitssl.cli.eval:run_eval_job" / "vitssl.cli.eval:run_eval_call" (requeued and pending SLURM jobs unpickle
# them again): the two names imported above stay importable from here for one release.


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
    from vitssl.config import load_config
    from vitssl.launch.common import as_launch_config

    overrides = [*(args.overrides or []), *(["launch.dry_run=true"] if getattr(args, "dry_run", False) else [])]
    wrong = [o for o in overrides if not o.startswith(("launch=", "launch.", "device="))]
    if wrong:
        raise ConfigError(
            f"evaluation commands take launch settings only as key=value overrides (launch=slurm, "
            f"launch.gpus_per_node=8, ...); got {', '.join(wrong)}"
        )
    cfg = load_config(None, [f"device={args.device}", *overrides])  # validates the keys and values
    return as_launch_config(cfg.launch), str(cfg.device)


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


def _cmd_features(args: argparse.Namespace) -> int:
    from vitssl.eval.features import default_cache_dir

    split = split_of(args.data, "val", args.split)
    launch_cfg, device = launch_settings(args)
    job = FeaturesJob(**extraction_fields(args, device), data=args.data, split=split, feature_dtype=args.feature_dtype)
    launch_job(job, launch_cfg, Path(job.cache_dir) if job.cache_dir else default_cache_dir(job.checkpoint))
    return 0


def _probe_fields(args: argparse.Namespace, task: str, device: str, options: dict[str, Any]) -> dict[str, Any]:
    """The :class:`ProbeJob` fields of ``eval knn`` / ``eval linear``, ``options`` (the task's own fields) included:
    they are part of the default result file's digest, so ``-k 10`` and ``-k 20`` write two files."""
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
        "options": options,
    }
    out = Path(args.out) if args.out else default_result_path(fields["checkpoint"], task, what)
    return {
        **fields,
        **options,
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
    launch_cfg, device = launch_settings(args)
    options = {
        "ks": tuple(int(k) for k in args.k),
        "temperature": float(args.temperature),
        "approx": bool(args.approx),
        "backend": args.knn_backend,
    }
    job = KnnJob(**_probe_fields(args, "knn", device, options))
    job.check()
    launch_job(job, launch_cfg, Path(job.out).parent)
    return 0


def _cmd_linear(args: argparse.Namespace) -> int:
    launch_cfg, device = launch_settings(args)
    options = {
        "method": args.method,
        "wds": tuple(float(x) for x in args.wds),
        "finetune_aug": bool(args.finetune_aug),
        "aug_scale_min": float(args.aug_scale_min),
        "epochs": int(args.epochs),
        "lrs": tuple(float(x) for x in args.lrs) if args.lrs else None,
        "cs": tuple(float(x) for x in args.cs),
        "max_iter": int(args.max_iter),
        "probe_batch_size": int(args.probe_batch_size),
        "holdout_fraction": float(args.holdout_fraction),
        "seed": int(args.seed),
    }
    job = LinearJob(**_probe_fields(args, "linear", device, options))
    job.check()
    launch_job(job, launch_cfg, Path(job.out).parent)
    return 0


def _clip_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``run_zeroshot`` / ``run_retrieval`` from the options of :func:`_add_clip_options`."""
    return {
        "output": args.out,
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
    from vitssl.eval.zeroshot import run_zeroshot

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
    from vitssl.eval.zeroshot import run_retrieval

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
    add_device_option(p, "where each rank embeds", launched=True)
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
    p.add_argument("--out", metavar="FILE", help="JSON result path (default: next to the checkpoint)")
    add_deprecated_spelling(p, "--output", "--out", dest="out", metavar="FILE")
    p.add_argument("--batch-size", type=int, default=256, help="images / texts per forward pass (default 256)")
    p.add_argument("--num-workers", type=int, default=0, help="data-loading processes (default 0)")
    add_device_option(p, "where the model runs")
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
        "-k",
        "--k",
        dest="k",
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
    p.add_argument(
        "--knn-backend",
        choices=("auto", "faiss", "torch"),
        default="auto",
        help="exact search: torch matmul + top-k, or faiss (default auto: faiss-gpu where installed, else torch)",
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
    "DEFAULT_KS",
    "JOB_TARGET",
    "EvalJob",
    "FeaturesJob",
    "KnnJob",
    "LinearJob",
    "ProbeJob",
    "add_data_options",
    "add_extraction_options",
    "check_spec",
    "checkpoint_arg",
    "extraction_fields",
    "launch_job",
    "launch_settings",
    "register_commands",
    "run_eval_call",
    "run_eval_job",
    "split_of",
    "write_result",
]
