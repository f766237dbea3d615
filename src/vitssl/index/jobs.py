"""The ``vitssl index build`` jobs as library calls: typed payloads, the functions that run them, sharded builds.

One frozen dataclass per job (:class:`IndexBuildJob`, :class:`IndexTrainJob`, :class:`IndexShardJob`,
:class:`IndexMergeJob`), each run by its function registered in :data:`vitssl.eval.jobs.EVAL_JOBS` when this
module is imported (which unpickling one of its payloads in a spawned process or SLURM job does first). Each job
is one call of :mod:`vitssl.index.build` and the printing of its result on rank 0. A Python user builds a payload
and runs it in this process (:func:`vitssl.eval.jobs.run_eval_job`), launches it like the command line
(:func:`vitssl.eval.jobs.launch_job`), or builds n shards and merges them (:func:`launch_sharded_build`)::

    from vitssl.config import LaunchConfig
    from vitssl.eval.jobs import run_eval_job
    from vitssl.index.jobs import IndexBuildJob, launch_sharded_build

    job = IndexBuildJob(checkpoint="/runs/moco/checkpoint_last.pth", data="digits", split="val", out="/idx")
    run_eval_job(job)
    launch_sharded_build(job, 4, LaunchConfig(backend="slurm", gpus_per_node=1))
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitssl.config import ConfigError
from vitssl.errors import UserError
from vitssl.eval.jobs import CALL_TARGET, JOB_TARGET, EvalJob, data_workers, is_main, register_job

# Dimensions tried to parse a factory string before the feature width is known; training needs do not depend on
# the width, and 3840 = 2^8 x 15 is divisible by the sub-quantizer counts of PQ / OPQ factories in practice.
_PROBE_DIMS = (3840, 768, 1024, 384, 4096, 256, 96, 64, 32)


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
# What the jobs and the index commands share
# --------------------------------------------------------------------------------------------------------------


@contextmanager
def index_errors() -> Iterator[None]:
    """faiss-side problems a user fixes by changing the command (factory, training size, index folders)."""
    try:
        yield
    except UserError:
        raise  # says what to fix already (IndexFormatError, IndexSpecError, ConfigError, ...)
    except ValueError as err:  # faiss and the index builder reject factories and sizes with ValueError
        raise ConfigError(str(err)) from None


def write_summary(summary: dict[str, Any], path: str | None) -> dict[str, Any]:
    """A job's summary, also written to ``path`` (``--summary``) when given; returned as it is."""
    if path:
        from vitssl.io import write_json

        write_json(summary, Path(path), default=str)
        print(f"summary written to {path}")
    return summary


def needs_training(factory: str) -> bool:
    """Whether a faiss factory string must be trained (IVF, PQ, ...).

    Raises:
        ConfigError: faiss cannot parse ``factory`` (the message names ``--factory``).
    """
    from vitssl.index import core as retrieval

    last = ""
    for dim in _PROBE_DIMS:
        try:
            return not retrieval.new_index(factory, dim).is_trained
        except ValueError as err:
            last = str(err)
    raise ConfigError(f"--factory {factory!r}: {last}")


def merge_shard_folders(shard_dirs: tuple[str, ...] | list[str], out: Path, overwrite: bool) -> int:
    """Merge shard index folders (and their frame vectors) into ``out``; return the merged vector count."""
    from vitssl.index.build import index_merge

    with index_errors():
        return index_merge(shard_dirs, out, overwrite=overwrite)


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


def _unit(result: Any) -> str:
    return "videos" if result.corpus == "videos" else "vectors"


@register_job(IndexBuildJob)
def run_index_build(job: IndexBuildJob) -> dict[str, Any]:
    """Embed ``job.data`` and build the whole index into ``job.out``; its summary on rank 0, ``{}`` elsewhere."""
    result = _run_build(job)
    if result is None:  # not rank 0
        return {}
    print(
        f"index {job.factory!r} ({result.embedder} embedder): {result.count} {_unit(result)} x {result.dimension} "
        f"-> {result.out}"
    )
    return write_summary(result.summary(), job.json)


@register_job(IndexTrainJob)
def run_index_train(job: IndexTrainJob) -> dict[str, Any]:
    """Train the quantizer of ``job.factory`` on a sample of ``job.data`` into ``job.out``."""
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


@register_job(IndexShardJob)
def run_index_shard(job: IndexShardJob) -> dict[str, Any]:
    """Build shard ``job.shard`` (i, n) of ``job.data`` into ``job.out`` (on ``job.trained``'s quantizer)."""
    i, n = job.shard
    result = _run_build(job, shard=(i, n), trained=job.trained)
    if result is None:
        return {}
    start, stop = result.rows
    print(f"shard {i}/{n}: rows {start}..{stop - 1} ({result.count} {_unit(result)} indexed) -> {result.out}")
    return write_summary(result.summary(), job.json)


@register_job(IndexMergeJob)
def run_index_merge(job: IndexMergeJob) -> dict[str, Any]:
    """Merge ``job.shard_dirs`` into ``job.out``, then remove the shards (unless ``job.keep_shards``)."""
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


# --------------------------------------------------------------------------------------------------------------
# Sharded builds: [train job] -> array of n shard jobs -> merge job
# --------------------------------------------------------------------------------------------------------------


def launch_sharded_build(job: IndexBuildJob, shards: int, launch_cfg: Any, keep_shards: bool = False) -> None:
    """Build ``job``'s index as ``shards`` shards and merge them into ``job.out``.

    The work goes into ``<out>.build/``: ``trained.faiss`` (factories that need training: one job embeds the
    training sample and trains the quantizer), ``shards/shard_<i>_of_<n>`` (an array of n jobs, one shard each)
    and the merge (a job that starts when every shard succeeded). Locally the same steps run one after the other,
    and a build that fails or is interrupted removes what it wrote there. After the merge the shards, the
    quantizer and the emptied work folder are removed unless ``keep_shards``.

    Args:
        job: the whole build (its ``train_size`` samples the quantizer's training vectors).
        shards: n, at least 1.
        launch_cfg: a ``LaunchConfig`` (``backend=slurm``: a SLURM array and a dependent merge job).
        keep_shards: keep the shard folders and the trained quantizer after merging.

    Raises:
        ConfigError: ``shards`` below 1, a factory faiss cannot parse, or bad launch settings.
    """
    from vitssl.launch import launch, submit, submit_array_then
    from vitssl.launch.common import append_job_record, as_launch_config, tasks_per_node
    from vitssl.launch.slurm import dry_run_script

    if shards < 1:
        raise ConfigError(f"--shards {shards} must be at least 1")
    lcfg, n = as_launch_config(launch_cfg), shards
    out = Path(job.out)
    work = Path(f"{out}.build")
    shard_dirs = [work / "shards" / f"shard_{i:03d}_of_{n:03d}" for i in range(n)]
    trained = work / "trained.faiss" if needs_training(job.factory) else None
    parts = {f.name: getattr(job, f.name) for f in dataclasses.fields(IndexJob)} | {"json": None}  # merge: summary
    train_job = IndexTrainJob(**{**parts, "out": str(trained)}, train_size=job.train_size) if trained else None
    shard_jobs = [
        IndexShardJob(**{**parts, "out": str(d)}, shard=(i, n), trained=str(trained) if trained else None)
        for i, d in enumerate(shard_dirs)
    ]
    merge_job = IndexMergeJob(
        shard_dirs=tuple(map(str, shard_dirs)),
        out=str(out),
        overwrite=job.overwrite,
        keep_shards=keep_shards,
        trained=str(trained) if trained else None,
        json=job.json,
    )
    if lcfg.backend == "local":
        if lcfg.dry_run:
            print(f"dry run: would build {n} shards of {job.data} in sequence and merge them into {out}")
            return
        quantizer = [trained, trained.with_name(trained.name + ".json")] if trained else []
        with _cleanup_on_failure(work, [*shard_dirs, *quantizer]):
            if train_job is not None:
                launch(JOB_TARGET, train_job, lcfg, work, kind="eval")
            merge_launch = dataclasses.replace(lcfg, tasks_per_node=1)  # merging is one process's work
            calls = [(CALL_TARGET, (shard, lcfg, str(work))) for shard in shard_jobs]
            then = (CALL_TARGET, (merge_job, merge_launch, str(work)))
            submit_array_then(calls, then, lcfg, work / "submitit")
        return
    if lcfg.dry_run:
        print(dry_run_script(lcfg, work, "eval", array_size=n))
        return
    folder = Path(os.path.expanduser(lcfg.folder)).absolute() if lcfg.folder else work / "submitit"
    array_launch = lcfg
    if train_job is not None:
        trainer = submit(JOB_TARGET, train_job, lcfg, work, kind="eval")
        print(f"Submitted SLURM job {trainer.job_id}: train {job.factory!r} on a sample of {job.data}")
        # the shards add vectors to the trained quantizer, so they wait for it
        extra = {**dict(lcfg.sbatch_extra), "dependency": f"afterok:{trainer.job_id}", "kill-on-invalid-dep": "yes"}
        array_launch = dataclasses.replace(lcfg, sbatch_extra=extra)
    # merging needs no GPU and one process
    merge_launch = dataclasses.replace(lcfg, gpus_per_node=0, tasks_per_node=1)
    calls = [(CALL_TARGET, (shard, array_launch, str(work))) for shard in shard_jobs]
    then = (CALL_TARGET, (merge_job, merge_launch, str(work)))
    jobs, merger = submit_array_then(
        calls, then, array_launch, folder, f"vitssl-index-{out.name}", then_launch_cfg=merge_launch
    )
    for submitted, kind in [*((j, "index_shard") for j in jobs), (merger, "index_merge")]:
        append_job_record(
            work,
            {
                "backend": "slurm",
                "job_id": submitted.job_id,
                "folder": str(submitted.paths.folder),
                "kind": kind,
                "target": CALL_TARGET,
                "tasks": 1 if kind == "index_merge" else lcfg.nodes * tasks_per_node(lcfg),
            },
        )
    print(f"Submitted SLURM array {str(jobs[0].job_id).split('_')[0]}: {n} shards of {job.data}")
    print(f"Submitted SLURM job {merger.job_id}: merge into {out} once every shard succeeded")
    print(f"  follow: vitssl jobs {work}   |   vitssl logs {work}")


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


__all__ = [
    "IndexBuildJob",
    "IndexJob",
    "IndexMergeJob",
    "IndexShardJob",
    "IndexTrainJob",
    "index_errors",
    "launch_sharded_build",
    "merge_shard_folders",
    "needs_training",
    "run_index_build",
    "run_index_merge",
    "run_index_shard",
    "run_index_train",
    "write_summary",
]
