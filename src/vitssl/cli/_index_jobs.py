"""The payloads of the ``vitssl index build`` jobs and the functions that run them on each rank.

One frozen dataclass per job (:class:`IndexBuildJob`, :class:`IndexTrainJob`, :class:`IndexShardJob`,
:class:`IndexMergeJob`), run by :func:`vitssl.cli.eval.run_eval_job`; unpickling a payload imports this module,
which registers its job. Each job is one call of :mod:`vitssl.index.build` and the printing of its result on
rank 0. The commands that launch them are :mod:`vitssl.cli.index`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitssl.cli._index_common import index_errors, write_summary
from vitssl.cli.eval import EvalJob, data_workers, eval_job, is_main

# --------------------------------------------------------------------------------------------------------------
# Payloads
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class IndexJob(EvalJob):
    """What the jobs that embed a corpus for an index share: the corpus and how its index is built."""

    data: str  # data spec of the corpus (--data)
    split: str  # its split
    out: str  # what the job writes (absolute): the index folder, a shard folder or the trained quantizer
    factory: str = "Flat"  # faiss index factory string: Flat, IVF4096,PQ64, HNSW32, ...
    metric: str = "ip"  # ip (cosine on normalised vectors) | l2
    normalize: bool = True  # L2-normalise vectors (and later the queries)
    seed: int = 0  # training sample seed
    store_vectors: bool = True  # also write vectors.npy (exact recall, HNSW merges)
    overwrite: bool = False  # replace an existing output
    json: str | None = None  # also write the job's summary (count, skipped samples) as JSON here (absolute)
    embedder: str | None = None  # registered embedder; None: the corpus's choice for the checkpoint


@dataclass(frozen=True, kw_only=True)
class IndexBuildJob(IndexJob):
    """``vitssl index build``: the whole index in one job."""

    train_size: int | None = None  # training sample for IVF / PQ; None: every vector


@dataclass(frozen=True, kw_only=True)
class IndexTrainJob(IndexJob):
    """``vitssl index build --train-only`` (and the first step of ``--shards n``): train the quantizer into ``out``."""

    train_size: int | None = None  # training sample for IVF / PQ; None: every vector


@dataclass(frozen=True, kw_only=True)
class IndexShardJob(IndexJob):
    """``vitssl index build --shard i/n`` (and each array task of ``--shards n``): one contiguous shard."""

    shard: tuple[int, int]  # (i, n): shard i of n
    trained: str | None = None  # the trained quantizer every shard shares (factories that need training)


@dataclass(frozen=True)
class IndexMergeJob:
    """The last step of ``vitssl index build --shards n``: merge the shard folders (needs no checkpoint)."""

    shard_dirs: tuple[str, ...]  # the n shard folders, in shard order
    out: str  # the merged index folder
    overwrite: bool = False  # replace an existing out
    keep_shards: bool = False  # keep the shard folders (and the trained quantizer) after merging
    trained: str | None = None  # the trained quantizer the shards shared, removed with them
    json: str | None = None  # also write the merge's summary (count, skipped samples) as JSON here (absolute)


# --------------------------------------------------------------------------------------------------------------
# Jobs: each runs one library function of vitssl.index.build on this rank and prints its result on rank 0
# --------------------------------------------------------------------------------------------------------------


def _embed_options(job: IndexJob) -> Any:
    from vitssl.index.pipeline import EmbedOptions

    return EmbedOptions(
        layer=job.layer,
        device=job.device,
        cache_dir=job.cache_dir,
        batch_size=job.batch_size,
        num_workers=data_workers(job.num_workers),
        skip_corrupt=job.skip_corrupt,
    )


def _store_options(job: IndexJob, train_size: int | None = None) -> Any:
    from vitssl.index.pipeline import StoreOptions

    return StoreOptions(
        factory=job.factory,
        metric=job.metric,
        normalize=job.normalize,
        train_size=train_size,
        seed=job.seed,
        store_vectors=job.store_vectors,
        overwrite=job.overwrite,
    )


def _report_skipped(result: Any) -> None:
    """Name the damaged or unreadable items a build left out (``--skip-corrupt``): a count and every name."""
    if result.skipped:
        print(
            f"skipped {len(result.skipped)} damaged or unreadable videos (also in {result.out}/manifest.json, "
            "video.skipped):"
            if result.corpus == "videos"
            else f"skipped {len(result.skipped)} damaged or unreadable items:"
        )
        for sample in result.skipped:
            print(f"  {sample}")


def _run_build(job: IndexBuildJob | IndexShardJob, **kwargs: Any) -> Any:
    from vitssl.index.build import index_build

    train_size = getattr(job, "train_size", None)
    with index_errors():
        result = index_build(
            job.data, job.split, job.checkpoint, job.out, _embed_options(job), _store_options(job, train_size),
            embedder=job.embedder, **kwargs,
        )  # fmt: skip
    if result is not None:
        _report_skipped(result)
    return result


@eval_job(IndexBuildJob)
def _job_index_build(job: IndexBuildJob) -> dict[str, Any]:
    result = _run_build(job)
    if result is None:  # not rank 0
        return {}
    print(
        f"index {job.factory!r} ({result.embedder} embedder): {result.count} {_unit(result)} x {result.dimension} "
        f"-> {result.out}"
    )
    return write_summary(result.summary(), job.json)


def _unit(result: Any) -> str:
    return "videos" if result.corpus == "videos" else "vectors"


@eval_job(IndexTrainJob)
def _job_index_train(job: IndexTrainJob) -> dict[str, Any]:
    from vitssl.index.build import index_train

    with index_errors():
        result = index_train(
            job.data, job.split, job.checkpoint, job.out, _embed_options(job), _store_options(job, job.train_size),
            embedder=job.embedder,
        )  # fmt: skip
    if result is None:
        return {}
    print(f"trained {job.factory!r} on {result.train_count} vectors -> {result.trained}")
    return result.summary()


@eval_job(IndexShardJob)
def _job_index_shard(job: IndexShardJob) -> dict[str, Any]:
    i, n = job.shard
    result = _run_build(job, shard=(i, n), trained=job.trained)
    if result is None:
        return {}
    start, stop = result.rows
    print(f"shard {i}/{n}: rows {start}..{stop - 1} ({result.count} {_unit(result)} indexed) -> {result.out}")
    return write_summary(result.summary(), job.json)


@eval_job(IndexMergeJob)
def _job_index_merge(job: IndexMergeJob) -> dict[str, Any]:
    from vitssl.index.store import MANIFEST_FILE

    if not is_main():
        return {}
    out = Path(job.out)
    count = merge_shard_folders(job.shard_dirs, out, job.overwrite)
    if not job.keep_shards:
        for d in job.shard_dirs:
            shutil.rmtree(d, ignore_errors=True)
        if job.trained:
            for path in (Path(job.trained), Path(job.trained + ".json")):
                path.unlink(missing_ok=True)
        shards = Path(job.shard_dirs[0]).parent
        for folder in (shards, shards.parent):  # shards/, then the work folder, when nothing else is in them
            with contextlib.suppress(OSError):
                folder.rmdir()
    print(f"merged {len(job.shard_dirs)} shards: {count} vectors -> {out}")
    summary: dict[str, Any] = {"task": "index_merge", "out": str(out), "count": count}
    skipped = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8")).get("video", {}).get("skipped")
    if skipped is not None:  # a video index: the videos every shard left out
        summary.update(skipped=skipped, num_skipped=len(skipped))
    return write_summary(summary, job.json)


def merge_shard_folders(shard_dirs: tuple[str, ...] | list[str], out: Path, overwrite: bool) -> int:
    """Merge shard index folders (and their frame vectors) into ``out``; return the merged vector count."""
    from vitssl.index.build import index_merge

    with index_errors():
        return index_merge(shard_dirs, out, overwrite=overwrite)


__all__ = ["IndexBuildJob", "IndexJob", "IndexMergeJob", "IndexShardJob", "IndexTrainJob", "merge_shard_folders"]
