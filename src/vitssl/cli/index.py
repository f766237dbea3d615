"""Retrieval-index commands: ``vitssl index build|merge|query|eval``, and the index jobs ``index build`` launches.

``index build`` runs the index pipeline of :mod:`vitssl.index.build` (Corpus -> Embedder -> Store: every corpus
kind and embedder registered in :mod:`vitssl.index.pipeline`) and writes a faiss index folder; like the evaluation
commands it runs through :func:`vitssl.launch.launch` (``launch=slurm``, ``launch.*`` overrides anywhere on the
line), with a typed payload per job (:class:`IndexBuildJob`, :class:`IndexTrainJob`, :class:`IndexShardJob`,
:class:`IndexMergeJob`, in :mod:`vitssl.cli._index_jobs`) run by :func:`vitssl.cli.eval.run_eval_job`.
``merge``, ``query`` and ``eval`` run here, in this process.

Sharded builds (``index build --shards n``) write into ``<out>.build/``: ``trained.faiss`` (factories that need
training: one job embeds the training sample and trains the quantizer), ``shards/shard_<i>_of_<n>`` (an array of
n jobs, one shard each) and the merge (a job that starts when every shard succeeded). Locally the same steps
run one after the other. After the merge the shards, the quantizer and the emptied work folder are removed
(``--keep-shards`` keeps them); a local build that fails or is interrupted removes what it wrote there.

Video corpora (``--data videos:...``, ``videofolder:...``, ``video_csv:...``) run through the same jobs and library
functions; ``query --video`` and ``eval`` of a video index, and the video options, are :mod:`vitssl.cli.video_index`.
Each job here and each command is: parse, one library call, print.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vitssl.cli import video_index
from vitssl.cli._args import add_parser
from vitssl.cli._index_common import add_k_option, gt_options, index_errors, write_summary
from vitssl.cli._index_jobs import (
    IndexBuildJob,
    IndexJob,
    IndexMergeJob,
    IndexShardJob,
    IndexTrainJob,
    merge_shard_folders,
)
from vitssl.cli.eval import (
    CALL_TARGET,
    JOB_TARGET,
    add_data_options,
    add_extraction_options,
    extraction_fields,
    launch_job,
    launch_settings,
    split_of,
    write_result,
)
from vitssl.config import ConfigError

_SHARD_RE = re.compile(r"^(\d+)/(\d+)$")
# Dimensions tried to parse a factory string before the feature width is known; training needs do not depend on
# the width, and 3840 = 2^8 x 15 is divisible by the sub-quantizer counts of PQ / OPQ factories in practice.
_PROBE_DIMS = (3840, 768, 1024, 384, 4096, 256, 96, 64, 32)


# --------------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------------


def _needs_training(factory: str) -> bool:
    """Whether a faiss factory string must be trained (IVF, PQ, ...); ConfigError when faiss cannot parse it."""
    from vitssl.index import core as retrieval

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


def _check_new_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it")


def _model_fields(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """The extraction fields of ``index build``, its model argument resolved for the corpus kind: an image
    checkpoint (or run folder), a video model (``thumbnails`` too), or for other kinds a path made absolute when it
    exists and the argument as given otherwise (an embedder of a registered kind reads it)."""
    from vitssl.index.pipeline import corpus_kind_of

    kind = corpus_kind_of(args.data)
    if kind == "videos":
        return video_index.video_fields(args, device)
    if kind == "images" and not args.embedder:
        return extraction_fields(args, device)
    return extraction_fields(args, device, checkpoint=lambda m: str(Path(m).absolute()) if Path(m).exists() else m)


def _cmd_index_build(args: argparse.Namespace) -> int:
    out = Path(args.out).absolute()
    chosen = (("--shard", args.shard), ("--shards", args.shards), ("--train-only", args.train_only))
    modes = [option for option, value in chosen if value]
    if len(modes) > 1:
        raise ConfigError(f"{' and '.join(modes)} exclude each other; pick one")
    split = split_of(args.data, "val", args.split)
    launch_cfg, device = launch_settings(args)
    fields = {
        **_model_fields(args, device),
        "data": args.data,
        "split": split,
        "out": str(out),
        "factory": args.factory,
        "metric": args.metric,
        "normalize": not args.no_normalize,
        "seed": int(args.seed),
        "store_vectors": not args.no_vectors,
        "overwrite": bool(args.overwrite),
        "json": str(Path(args.json).absolute()) if args.json else None,
        "embedder": args.embedder,
    }
    needs_training = _needs_training(args.factory)
    _check_new_out(out, args.overwrite)
    if args.train_only:
        if not needs_training:
            raise ConfigError(f"--factory {args.factory!r} needs no training; build it directly")
        launch_job(launch_cfg, IndexTrainJob(**fields, train_size=args.train_size), out.parent)
        return 0
    if args.shard is not None:
        if needs_training and not args.trained:
            raise ConfigError(
                f"--factory {args.factory!r} needs a trained quantizer shared by every shard: build it once with "
                f"`vitssl index build CKPT --data SPEC --factory {args.factory!r} --train-only --out trained.faiss` "
                "and pass --trained trained.faiss to each shard (or use --shards n, which does all of it)"
            )
        trained = str(Path(args.trained).absolute()) if args.trained else None
        job = IndexShardJob(**fields, shard=_parse_shard(args.shard), trained=trained)
        launch_job(launch_cfg, job, Path(f"{out}.build"))
        return 0
    if args.shards is not None:
        if args.shards < 1:
            raise ConfigError(f"--shards {args.shards} must be at least 1")
        return _sharded_build(launch_cfg, fields, args, args.shards, needs_training)
    launch_job(launch_cfg, IndexBuildJob(**fields, train_size=args.train_size), Path(f"{out}.build"))
    return 0


def _sharded_build(
    launch_cfg: Any, fields: dict[str, Any], args: argparse.Namespace, n: int, needs_training: bool
) -> int:
    """``--shards n``: [train job] -> array of n shard jobs -> merge job (locally: the same, in sequence)."""
    from vitssl.launch import launch, submit, submit_array_then
    from vitssl.launch.common import append_job_record, tasks_per_node
    from vitssl.launch.slurm import dry_run_script

    out = Path(fields["out"])
    work = Path(f"{out}.build")
    shard_dirs = [work / "shards" / f"shard_{i:03d}_of_{n:03d}" for i in range(n)]
    trained = work / "trained.faiss" if needs_training else None
    parts = {**fields, "json": None}  # the merge writes the summary of the whole build
    train_job = IndexTrainJob(**{**parts, "out": str(trained)}, train_size=args.train_size) if trained else None
    shard_jobs = [
        IndexShardJob(**{**parts, "out": str(d)}, shard=(i, n), trained=str(trained) if trained else None)
        for i, d in enumerate(shard_dirs)
    ]
    merge_job = IndexMergeJob(
        shard_dirs=tuple(map(str, shard_dirs)),
        out=str(out),
        overwrite=fields["overwrite"],
        keep_shards=args.keep_shards,
        trained=str(trained) if trained else None,
        json=fields["json"],
    )
    if launch_cfg.backend == "local":
        if launch_cfg.dry_run:
            print(f"dry run: would build {n} shards of {args.data} in sequence and merge them into {out}")
            return 0
        quantizer = [trained, trained.with_name(trained.name + ".json")] if trained else []
        with _cleanup_on_failure(work, [*shard_dirs, *quantizer]):
            if train_job is not None:
                launch(JOB_TARGET, train_job, launch_cfg, work, kind="eval")
            merge_launch = dataclasses.replace(launch_cfg, tasks_per_node=1)  # merging is one process's work
            calls = [(CALL_TARGET, (job, launch_cfg, str(work))) for job in shard_jobs]
            then = (CALL_TARGET, (merge_job, merge_launch, str(work)))
            submit_array_then(calls, then, launch_cfg, work / "submitit")
        return 0
    if launch_cfg.dry_run:
        print(dry_run_script(launch_cfg, work, "eval", array_size=n))
        return 0
    folder = Path(os.path.expanduser(launch_cfg.folder)).absolute() if launch_cfg.folder else work / "submitit"
    array_launch = launch_cfg
    if train_job is not None:
        trainer = submit(JOB_TARGET, train_job, launch_cfg, work, kind="eval")
        print(f"Submitted SLURM job {trainer.job_id}: train {args.factory!r} on a sample of {args.data}")
        # the shards add vectors to the trained quantizer, so they wait for it
        extra = {
            **dict(launch_cfg.sbatch_extra),
            "dependency": f"afterok:{trainer.job_id}",
            "kill-on-invalid-dep": "yes",
        }
        array_launch = dataclasses.replace(launch_cfg, sbatch_extra=extra)
    # merging needs no GPU and one process
    merge_launch = dataclasses.replace(launch_cfg, gpus_per_node=0, tasks_per_node=1)
    calls = [(CALL_TARGET, (job, array_launch, str(work))) for job in shard_jobs]
    then = (CALL_TARGET, (merge_job, merge_launch, str(work)))
    jobs, merger = submit_array_then(
        calls, then, array_launch, folder, f"vitssl-index-{out.name}", then_launch_cfg=merge_launch
    )
    for job, kind in [*((j, "index_shard") for j in jobs), (merger, "index_merge")]:
        append_job_record(
            work,
            {
                "backend": "slurm",
                "job_id": job.job_id,
                "folder": str(job.paths.folder),
                "kind": kind,
                "target": CALL_TARGET,
                "tasks": 1 if kind == "index_merge" else launch_cfg.nodes * tasks_per_node(launch_cfg),
            },
        )
    print(f"Submitted SLURM array {str(jobs[0].job_id).split('_')[0]}: {n} shards of {args.data}")
    print(f"Submitted SLURM job {merger.job_id}: merge into {out} once every shard succeeded")
    print(f"  follow: vitssl jobs {work}   |   vitssl logs {work}")
    return 0


@contextmanager
def _cleanup_on_failure(work: Path, outputs: list[Path]) -> Iterator[None]:
    """A local sharded build that fails (or is interrupted) leaves nothing behind in its work folder ``work``:
    the folder goes when this build made it, else only those of ``outputs`` (the shards and quantizer it writes)
    that were not there before, and the folders they leave empty. The index itself is only ever written by the
    merge, in one atomic rename, so a finished index at the destination is never touched."""
    existed = work.exists()
    new = [path for path in outputs if not path.exists()]
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for path in new:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            for folder in {path.parent for path in new}:
                with contextlib.suppress(OSError):  # only when empty
                    folder.rmdir()
        raise


def _cmd_index_merge(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _check_new_out(out, args.overwrite)
    count = merge_shard_folders(args.shard_dirs, out, args.overwrite)
    print(f"merged {len(args.shard_dirs)} shards: {count} vectors -> {out}")
    write_summary({"task": "index_merge", "out": str(out), "count": count}, args.json)
    return 0


def _cmd_index_query(args: argparse.Namespace) -> int:
    from vitssl.index.grid import Neighbour, save_query_grid
    from vitssl.index.query import query_images

    if args.video:
        return video_index.cmd_query(args)
    if not args.image:
        raise ConfigError("name the query: --image FILE (an image index) or --video FILE (a video index)")
    video_index.refuse_image_query(Path(args.dir))
    with index_errors():
        loaded, results, layer = query_images(
            args.dir, args.image, args.k, checkpoint=args.checkpoint, device=args.device, nprobe=args.nprobe,
            ef_search=args.ef_search,
        )  # fmt: skip
    for r in results:
        print(f"{r['query']}:")
        for h in r["neighbours"]:
            print(f"  {h['rank']:>3}  {h['score']:.4f}  {h['sample']}")
    if args.json:
        write_result({"index": str(args.dir), "k": args.k, "layer": layer, "queries": results}, args.json)
        print(f"written to {args.json}")
    if args.grid:
        neighbours = [[Neighbour(h["id"], h["sample"], h["score"]) for h in r["neighbours"]] for r in results]
        save_query_grid([r["query"] for r in results], neighbours, loaded.manifest.get("source"), args.grid)
        print(f"query grid: {args.grid}")
    return 0


def _cmd_index_eval(args: argparse.Namespace) -> int:
    from vitssl.index import core as retrieval
    from vitssl.index.query import ground_truth_inputs
    from vitssl.index.video import is_video_index

    if args.ground_truth and is_video_index(args.dir):
        return video_index.cmd_eval(args)
    queries = truth = None
    with index_errors():
        if args.ground_truth:
            loaded, queries, truth = ground_truth_inputs(
                args.dir, args.ground_truth, args.gt_format, checkpoint=args.checkpoint, device=args.device,
                **gt_options(args),
            )  # fmt: skip
        else:
            loaded = retrieval.load_index_dir(args.dir)
        result = retrieval.evaluate_index(
            loaded, queries, truth, args.k, args.num_queries, args.seed, args.nprobe, args.ef_search
        )
    recalls = "  ".join(f"R@{c} {v:.4f}" for c, v in result["recall"].items())
    line = f"{result['factory']} ({result['num_queries']} queries, {result['search_params'] or 'exact'}): {recalls}"
    if "map" in result:
        line += f"  {result['map_name']} {result['map']:.4f} (exact search {result['map_exact']:.4f})"
    print(line)
    print(f"{result['queries_per_second']:.0f} queries/s")
    if args.json:
        write_result({"index": str(args.dir), **result}, args.json)
        print(f"written to {args.json}")
    return 0


# --------------------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------------------


def _add_search_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="embed queries with this checkpoint (default: the one the index records)")
    p.add_argument("--nprobe", type=int, help="IVF lists to visit (default: the index's)")
    p.add_argument("--ef-search", type=int, help="HNSW search breadth (default: the index's)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where queries are embedded")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")


def register_commands(
    subparsers: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction] | None = None
) -> None:
    """Add ``index build|merge|query|eval``.

    Args:
        subparsers: the top-level commands (nothing is added there).
        groups: the sub-command groups; ``groups["index"]`` gets the commands.
    """
    if not groups or "index" not in groups:
        raise ValueError("vitssl.cli.index.register_commands needs the 'index' command group")
    ix = groups["index"]
    p = add_parser(
        ix,
        "build",
        help="embed a dataset and build a faiss index folder (one job, a shard, or n shards + merge)",
        description="Extract embeddings (cached), train and fill a faiss index, write it with an id map and a "
        "manifest. --shards n builds n shards (a SLURM array with launch=slurm) and merges them.",
    )
    add_extraction_options(p)
    add_data_options(p, "corpus")
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
    p.add_argument("--json", metavar="FILE", help="also write the build summary (count, skipped samples) as JSON")
    p.add_argument(
        "--embedder", metavar="NAME", help="registered embedder (default: the corpus's choice for the model given)"
    )
    p.set_defaults(func=_cmd_index_build)

    p = add_parser(ix, "merge", help="merge shard index folders into one")
    p.add_argument("shard_dirs", nargs="+", help="the shard folders (all n of them)")
    p.add_argument("--out", required=True, help="merged index folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--json", metavar="FILE", help="also write the merge summary (count) as JSON")
    p.set_defaults(func=_cmd_index_merge)

    p = add_parser(
        ix,
        "query",
        help="top-k neighbours of query images (printed, JSON, picture grid)",
        description="Embeds the images with the checkpoint, layer and transform the index was built with. The "
        "grid draws each neighbour from the corpus dataset itself (digits, CIFAR, ... as well as image files).",
    )
    p.add_argument("dir", help="index folder")
    p.add_argument("--image", action="append", help="query image file (repeat for several)")
    add_k_option(p, "neighbours per query (default 10)")
    p.add_argument("--grid", metavar="PNG", help="draw each query with its neighbours (id, label, score) into a PNG")
    _add_search_options(p)
    video_index.add_query_options(p)
    p.set_defaults(func=_cmd_index_query)

    p = add_parser(
        ix,
        "eval",
        help="recall@k against exact search (and mAP with --ground-truth)",
        description="Without ground truth: stored vectors as queries, recall@1/10/k of the index against exact "
        'search. With --ground-truth FILE (JSON lines {"query": image path or faiss id, "relevant": [sample ids, '
        "paths or faiss ids]}, relative paths against the file's folder; or a benchmark pickle): the query images "
        "are embedded (a faiss id's stored vector is used) and mAP@k is reported too.",
    )
    p.add_argument("dir", help="index folder")
    p.add_argument("--ground-truth", metavar="FILE", help="ground truth (see the description)")
    add_k_option(p, "cut-off (default 10)")
    p.add_argument("--num-queries", type=int, default=1000, help="stored vectors used as queries without ground truth")
    p.add_argument("--seed", type=int, default=0, help="query sample seed")
    _add_search_options(p)
    video_index.add_eval_options(p)
    p.set_defaults(func=_cmd_index_eval)


__all__ = [
    "IndexBuildJob",
    "IndexJob",
    "IndexMergeJob",
    "IndexShardJob",
    "IndexTrainJob",
    "register_commands",
]
