"""Retrieval-index commands: ``vitssl index build|merge|query|eval``, and the index jobs ``index build`` launches.

``index build`` runs the index pipeline of :mod:`vitssl.index.build` (Corpus -> Embedder -> Store: every corpus
kind and embedder registered in :mod:`vitssl.index.pipeline`) and writes a faiss index folder; like the evaluation
commands it runs through :func:`vitssl.launch.launch` (``launch=slurm``, ``launch.*`` overrides anywhere on the
line), with a typed payload per job (:class:`~vitssl.index.jobs.IndexBuildJob`, ``IndexTrainJob``,
``IndexShardJob``, ``IndexMergeJob``, in :mod:`vitssl.index.jobs`) run by :func:`vitssl.eval.jobs.run_eval_job`;
``--shards n`` is :func:`vitssl.index.jobs.launch_sharded_build` (train, an array of shards, merge: on SLURM, or
locally in sequence). ``merge``, ``query`` and ``eval`` run here, in this process.

Video corpora (``--data videos:...``, ``videofolder:...``, ``video_csv:...``) run through the same jobs and library
functions; ``query --video`` and ``eval`` of a video index, and the video options, are :mod:`vitssl.cli.video_index`.
Each job here and each command is: parse, one library call, print.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from vitssl.cli import video_index
from vitssl.cli._args import add_deprecated_spelling, add_device_option, add_parser
from vitssl.cli._index_common import add_k_option, gt_options
from vitssl.cli.eval import (
    add_data_options,
    add_extraction_options,
    extraction_fields,
    launch_job,
    launch_settings,
    split_of,
    write_result,
)
from vitssl.config import ConfigError

# The payloads stay importable from here for one release: submissions made before they moved to vitssl.index.jobs
# pickled them as vitssl.cli.index.IndexBuildJob, ... (requeued and pending SLURM jobs unpickle them again).
from vitssl.index.jobs import (
    IndexBuildJob,
    IndexJob,
    IndexMergeJob,
    IndexShardJob,
    IndexTrainJob,
    index_errors,
    launch_sharded_build,
    merge_shard_folders,
    needs_training,
    write_summary,
)

_SHARD_RE = re.compile(r"^(\d+)/(\d+)$")


# --------------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------------


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
        "json": str(Path(args.summary).absolute()) if args.summary else None,
        "embedder": args.embedder,
    }
    trains = needs_training(args.factory)
    _check_new_out(out, args.overwrite)
    if args.train_only:
        if not trains:
            raise ConfigError(f"--factory {args.factory!r} needs no training; build it directly")
        launch_job(IndexTrainJob(**fields, train_size=args.train_size), launch_cfg, out.parent)
        return 0
    if args.shard is not None:
        if trains and not args.trained:
            raise ConfigError(
                f"--factory {args.factory!r} needs a trained quantizer shared by every shard: build it once with "
                f"`vitssl index build CKPT --data SPEC --factory {args.factory!r} --train-only --out trained.faiss` "
                "and pass --trained trained.faiss to each shard (or use --shards n, which does all of it)"
            )
        trained = str(Path(args.trained).absolute()) if args.trained else None
        job = IndexShardJob(**fields, shard=_parse_shard(args.shard), trained=trained)
        launch_job(job, launch_cfg, Path(f"{out}.build"))
        return 0
    job = IndexBuildJob(**fields, train_size=args.train_size)
    if args.shards is not None:
        launch_sharded_build(job, args.shards, launch_cfg, keep_shards=args.keep_shards)
    else:
        launch_job(job, launch_cfg, Path(f"{out}.build"))
    return 0


def _cmd_index_merge(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _check_new_out(out, args.overwrite)
    count = merge_shard_folders(args.shard_dirs, out, args.overwrite)
    print(f"merged {len(args.shard_dirs)} shards: {count} vectors -> {out}")
    write_summary({"task": "index_merge", "out": str(out), "count": count}, args.summary)
    return 0


def _cmd_index_query(args: argparse.Namespace) -> int:
    from vitssl.index.grid import Neighbour, save_query_grid
    from vitssl.index.query import format_meta, query_images

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
            print(f"  {h['rank']:>3}  {h['score']:.4f}  {h['sample']}{format_meta(h.get('meta'))}")
    if args.out:
        write_result({"index": str(args.dir), "k": args.k, "layer": layer, "queries": results}, args.out)
        print(f"written to {args.out}")
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
    if args.out:
        write_result({"index": str(args.dir), **result}, args.out)
        print(f"written to {args.out}")
    return 0


# --------------------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------------------


def _add_search_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="embed queries with this checkpoint (default: the one the index records)")
    p.add_argument("--nprobe", type=int, help="IVF lists to visit (default: the index's)")
    p.add_argument("--ef-search", type=int, help="HNSW search breadth (default: the index's)")
    add_device_option(p, "where queries are embedded")
    p.add_argument("--out", metavar="FILE", help="also write the result as JSON")
    add_deprecated_spelling(p, "--json", "--out", dest="out", metavar="FILE")


def _add_summary_option(p: argparse.ArgumentParser, help: str) -> None:
    """``--summary FILE`` of ``index build|merge``, whose ``--out`` is the index folder."""
    p.add_argument("--summary", metavar="FILE", help=help)
    add_deprecated_spelling(p, "--json", "--summary", dest="summary", metavar="FILE")


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
    _add_summary_option(p, "also write the build summary (count, skipped samples) as JSON")
    p.add_argument(
        "--embedder", metavar="NAME", help="registered embedder (default: the corpus's choice for the model given)"
    )
    p.set_defaults(func=_cmd_index_build)

    p = add_parser(ix, "merge", help="merge shard index folders into one")
    p.add_argument("shard_dirs", nargs="+", help="the shard folders (all n of them)")
    p.add_argument("--out", required=True, metavar="DIR", help="merged index folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_summary_option(p, "also write the merge summary (count) as JSON")
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
