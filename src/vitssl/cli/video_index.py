"""The video side of ``vitssl index build|query|eval`` (the image side and the launch machinery: ``cli/index.py``).

``index build MODEL --data videos:root=DIR`` (or ``videofolder:...`` / ``video_csv:...``, each with optional
``fps=`` / ``num_frames=``) runs the same jobs and library functions as an image build - one job, ``--shard i/n``,
``--shards n`` (train, array of shards, merge), locally or on SLURM; this module resolves its model argument and
holds ``query --video``, ``eval`` of a video index and their options.
MODEL is an image checkpoint or ``backbone.safetensors`` (mean of frame features), a ``video_tca`` checkpoint
(TCA embeddings) or ``thumbnails[:size=N]`` (raw thumbnails, no network). In a job of several processes every
process embeds a share of the videos; rank 0 writes the index.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vitssl.cli._index_common import gt_options
from vitssl.config import ConfigError
from vitssl.index.jobs import index_errors

THUMBNAIL_PREFIX = "thumbnails"
# The parser is built without importing numpy, torch or faiss: these mirror vitssl.eval.retrieval_metrics.FORMATS /
# FIVR_TASKS and vitssl.index.video.RERANKS / DEFAULT_RERANK_K (a test keeps them equal).
GT_FORMATS = ("vitssl", "cc_web_video", "fivr", "evve")
FIVR_TASK_NAMES = ("DSVR", "CSVR", "ISVR")
RERANKS = ("chamfer",)
DEFAULT_RERANK_K = 100


def video_model_arg(model: str) -> str:
    """``thumbnails[:size=N]`` as it is; a checkpoint / backbone file as an absolute path that exists."""
    from vitssl.engine.checkpoint import CheckpointError

    if model == THUMBNAIL_PREFIX or model.startswith(THUMBNAIL_PREFIX + ":"):
        return model
    p = Path(model)
    if not p.is_file():
        raise CheckpointError(
            f"{p} does not exist; pass a checkpoint, a backbone.safetensors or thumbnails[:size=N] for a video index"
        )
    return str(p.absolute())


def video_fields(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """The job fields of ``index build`` over videos (as ``extraction_fields``, the model may be thumbnails)."""
    from vitssl.cli.eval import extraction_fields

    return extraction_fields(args, device, checkpoint=video_model_arg)


# --------------------------------------------------------------------------------------------------------------
# query and eval
# --------------------------------------------------------------------------------------------------------------


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from vitssl.index.video import load_video_index

    with index_errors():
        return load_video_index(args.dir, args.checkpoint, args.device if args.device != "auto" else "cpu")


def refuse_image_query(directory: Path) -> None:
    """A video index is queried with --video: say so instead of embedding an image with its frame model."""
    from vitssl.index.video import is_video_index

    if is_video_index(directory):
        raise ConfigError(f"{directory} is a video index; query it with --video FILE, not --image")


def cmd_query(args: argparse.Namespace) -> int:
    """``index query IDX --video FILE [--video FILE ...]``: the k most similar videos of each query, printed, as
    JSON (one entry per query, in the order given) and as contact sheets."""
    from vitssl.data.common import CorruptImageError
    from vitssl.eval.features import corrupt_sample_error
    from vitssl.eval.jobs import write_result
    from vitssl.index.query import format_meta
    from vitssl.index.video import rank, save_video_grid

    if args.image:
        raise ConfigError("--image and --video exclude each other; query a video index with --video")
    index, embedder = _load(args)
    videos = [str(v) for v in args.video]
    try:
        embedded = embedder.embed(videos, desc="the queries")
    except CorruptImageError as err:
        raise corrupt_sample_error(err, hint="") from None
    results = []
    for video, vector, frames in zip(videos, embedded.vectors, embedded.frames):
        hits = rank(
            index,
            vector,
            frames,
            args.k,
            rerank=args.rerank,
            rerank_k=args.rerank_k,
            nprobe=args.nprobe,
            ef_search=args.ef_search,
        )
        neighbours = []
        for r, (p, s) in enumerate(hits, 1):
            meta = index.meta_of_sample(p)
            neighbours.append({"rank": r, "sample": p, "score": s, **({"meta": meta} if meta else {})})
        results.append({"query": video, "neighbours": neighbours})
        print(f"{video}:" + (f" (re-ranked by {args.rerank})" if args.rerank else ""))
        for h in neighbours:
            print(f"  {h['rank']:>3}  {h['score']:.4f}  {h['sample']}{format_meta(h.get('meta'))}")
    if args.out:
        write_result({"index": str(args.dir), "k": args.k, "rerank": args.rerank, "queries": results}, args.out)
        print(f"written to {args.out}")
    if args.grid:
        for path, result in zip(_grid_paths(Path(args.grid), len(results)), results):
            hits = [(h["sample"], h["score"]) for h in result["neighbours"]]
            save_video_grid(result["query"], hits, path, fps=embedder.fps, num_frames=embedder.num_frames)
            print(f"contact sheet: {path}")
    return 0


def _grid_paths(grid: Path, count: int) -> list[Path]:
    """``--grid sheet.png`` for one query; ``sheet_1.png``, ``sheet_2.png``, ... (query order) for several."""
    if count == 1:
        return [grid]
    return [grid.with_name(f"{grid.stem}_{i}{grid.suffix}") for i in range(1, count + 1)]


def cmd_eval(args: argparse.Namespace) -> int:
    """``index eval IDX --ground-truth FILE`` on a video index: mAP and recall@k (video level or chamfer)."""
    from vitssl.eval.jobs import write_result
    from vitssl.eval.retrieval_metrics import read_ground_truth
    from vitssl.index.video import evaluate_video_index

    index, embedder = _load(args)
    with index_errors():
        truth = read_ground_truth(args.ground_truth, args.gt_format, **gt_options(args))
        ks = tuple(sorted({1, 5, 10, args.k}))
        result = evaluate_video_index(
            index,
            embedder,
            truth,
            rerank=args.rerank,
            rerank_k=args.rerank_k,
            ks=ks,
            nprobe=args.nprobe,
            ef_search=args.ef_search,
        )
    recalls = "  ".join(f"R@{k} {result[f'recall@{k}']:.4f}" for k in ks)
    how = f"chamfer re-ranking of the top {args.rerank_k}" if args.rerank else "video level"
    print(
        f"{truth.name}: mAP {result['mAP']:.4f}  {recalls}  ({result['num_queries']} queries, "
        f"{result['database']} videos, {how})"
    )
    if args.out:
        write_result({"index": str(args.dir), **result}, args.out)
        print(f"written to {args.out}")
    return 0


def add_query_options(p: argparse.ArgumentParser) -> None:
    """``index query``'s video options."""
    p.add_argument("--video", action="append", help="query video file of a video index (repeat for several)")
    _add_rerank(p)


def add_eval_options(p: argparse.ArgumentParser) -> None:
    """``index eval``'s video options (ground-truth formats and re-ranking)."""
    p.add_argument("--gt-format", choices=GT_FORMATS, help="ground-truth format (default: told from the file)")
    p.add_argument("--fivr-task", choices=FIVR_TASK_NAMES, help="FIVR task: which labels are positives (DSVR)")
    p.add_argument("--fivr-version", choices=("200k", "5k"), help="FIVR query / database lists (200k)")
    p.add_argument("--cc-web-clean", action="store_true", help="CC_WEB_VIDEO's clean protocol")
    _add_rerank(p)


def _add_rerank(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rerank", choices=RERANKS, help="video index: re-score the top --rerank-k by chamfer similarity")
    p.add_argument(
        "--rerank-k", type=int, default=DEFAULT_RERANK_K, help=f"videos re-scored per query ({DEFAULT_RERANK_K})"
    )


__all__ = [
    "add_eval_options",
    "add_query_options",
    "cmd_eval",
    "cmd_query",
    "refuse_image_query",
    "video_fields",
    "video_model_arg",
]
