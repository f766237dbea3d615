"""Retrieval-index commands: ``vitssl index build|merge|query|eval``, and the index jobs ``index build`` launches.

``index build`` embeds a corpus through the feature cache and writes a faiss index folder; like the evaluation
commands it runs through :func:`vitssl.launch.launch` (``launch=slurm``, ``launch.*`` overrides anywhere on the
line), with a typed payload per job (:class:`IndexBuildJob`, :class:`IndexTrainJob`, :class:`IndexShardJob`,
:class:`IndexMergeJob`) run by :func:`vitssl.cli.eval.run_eval_job`. ``merge``, ``query`` and ``eval`` run
here, in this process.

Sharded builds (``index build --shards n``) write into ``<out>.build/``: ``trained.faiss`` (factories that need
training: one job embeds the training sample and trains the quantizer), ``shards/shard_<i>_of_<n>`` (an array of
n jobs, one shard each) and the merge (a job that starts when every shard succeeded). Locally the same steps
run one after the other. After the merge the shards, the quantizer and the emptied work folder are removed
(``--keep-shards`` keeps them); a local build that fails or is interrupted removes what it wrote there.

Video corpora (``--data videos:...``, ``videofolder:...``, ``video_csv:...``) run through the same jobs, which hand
them to :mod:`vitssl.cli.video_index`; ``query --video`` and ``eval`` of a video index run there too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitssl.cli._args import add_parser
from vitssl.cli.eval import (
    CALL_TARGET,
    JOB_TARGET,
    EvalJob,
    add_data_options,
    add_extraction_options,
    data_workers,
    eval_job,
    extraction_fields,
    is_main,
    job_features,
    launch_job,
    launch_settings,
    split_of,
    write_result,
)
from vitssl.config import ConfigError
from vitssl.errors import UserError

_SHARD_RE = re.compile(r"^(\d+)/(\d+)$")
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
# Jobs
# --------------------------------------------------------------------------------------------------------------


def _source(model: Any, job: IndexJob) -> dict[str, Any]:
    """What ``index query`` needs to embed queries like the corpus (and draw it): recorded in the manifest."""
    return {
        "checkpoint_path": str(model.path),
        "objective": model.objective_name,
        "data": job.data,
        "split": job.split,
        "layer": job.layer,
    }


def _record_source(directory: Path, source: dict[str, Any]) -> None:
    """Add ``source`` to an index folder's manifest.json (atomically; the manifest is not under its own checksum)."""
    from vitssl.index.core import MANIFEST_FILE
    from vitssl.io import write_json

    path = directory / MANIFEST_FILE
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["source"] = source
    write_json(manifest, path, sort_keys=True)


@contextmanager
def _index_errors() -> Iterator[None]:
    """faiss-side problems a user fixes by changing the command (factory, training size, index folders)."""
    try:
        yield
    except UserError:
        raise  # says what to fix already (IndexFormatError, ConfigError, ...)
    except ValueError as err:  # faiss and the index builder reject factories and sizes with ValueError
        raise ConfigError(str(err)) from None


def _write_index(build: Callable[..., Any], model: Any, fs: Any, job: IndexJob, **options: Any) -> Path:
    """Write the index folder ``job.out`` of ``fs`` with ``build`` (``build_index_dir`` or ``build_shard``, which
    share these options) and record where its vectors came from."""
    out = Path(job.out)
    with _index_errors():
        build(
            out,
            fs.features,
            fs.sample_ids,
            factory=job.factory,
            metric=job.metric,
            normalize=job.normalize,
            checkpoint=model.checkpoint_hash,
            feature_key=model.feature_key(job.layer),
            store_vectors=job.store_vectors,
            overwrite=job.overwrite,
            **options,
        )
    _record_source(out, _source(model, job))
    return out


@eval_job(IndexBuildJob)
def _job_index_build(job: IndexBuildJob) -> dict[str, Any]:
    from vitssl.cli import video_index
    from vitssl.index import core as retrieval
    from vitssl.index.image import load_image_model

    if video_index.is_video_data(job.data):
        return video_index.run_build(job)

    model = load_image_model(job.checkpoint, job.device)
    fs = job_features(model, job, job.data, job.split, "--data")
    if not is_main():
        return {}
    out = _write_index(retrieval.build_index_dir, model, fs, job, train_size=job.train_size, seed=job.seed)
    manifest = json.loads((out / retrieval.MANIFEST_FILE).read_text())
    print(f"index {job.factory!r}: {manifest['count']} x {manifest['dimension']} vectors -> {out}")
    summary = {"task": "index_build", "out": str(out), "count": manifest["count"], "dimension": manifest["dimension"]}
    return write_summary({**summary, "num_skipped": int(fs.meta.get("skipped", 0))}, job.json)


@eval_job(IndexTrainJob)
def _job_index_train(job: IndexTrainJob) -> dict[str, Any]:
    from vitssl.cli import video_index
    from vitssl.eval.features import extract_rows
    from vitssl.eval.spec import build_eval_dataset
    from vitssl.index import core as retrieval
    from vitssl.index.image import load_image_model

    if video_index.is_video_data(job.data):
        return video_index.run_train(job)
    model = load_image_model(job.checkpoint, job.device)
    dataset, _, _ = build_eval_dataset(job.data, job.split, absolute_root=True)
    sample = retrieval.training_sample_indices(len(dataset), job.train_size, job.seed)
    feats, _ = extract_rows(
        model.feature_fn(job.layer),
        dataset,
        model.sample_fn,
        sample,
        job.batch_size,
        model.device,
        data_workers(job.num_workers),
        job.skip_corrupt,
        desc=f"training sample of {job.data} ({job.split}, {job.layer})",
    )
    if not is_main():
        return {}
    with _index_errors():
        index = retrieval.train_index(feats, job.factory, job.metric, job.normalize)
        path = retrieval.write_trained_index(
            job.out, index, job.factory, job.metric, job.normalize, len(feats), job.seed
        )
    print(f"trained {job.factory!r} on {len(feats)} vectors -> {path}")
    return {"task": "index_train", "trained": str(path), "train_count": len(feats)}


@eval_job(IndexShardJob)
def _job_index_shard(job: IndexShardJob) -> dict[str, Any]:
    from vitssl.cli import video_index
    from vitssl.eval.spec import build_eval_dataset
    from vitssl.index import core as retrieval
    from vitssl.index.image import load_image_model

    if video_index.is_video_data(job.data):
        return video_index.run_shard(job)
    i, n = job.shard
    model = load_image_model(job.checkpoint, job.device)
    dataset, _, _ = build_eval_dataset(job.data, job.split, absolute_root=True)
    start, stop = retrieval.shard_range(len(dataset), i, n)
    fs = job_features(model, job, job.data, job.split, "--data", rows=(start, stop))
    if not is_main():
        return {}
    out = _write_index(retrieval.build_shard, model, fs, job, shard=(i, n), first_id=start, trained=job.trained)
    print(f"shard {i}/{n}: rows {start}..{stop - 1} ({len(fs)} vectors) -> {out}")
    summary = {"task": "index_shard", "out": str(out), "shard": [i, n], "count": len(fs)}
    return write_summary({**summary, "num_skipped": int(fs.meta.get("skipped", 0))}, job.json)


@eval_job(IndexMergeJob)
def _job_index_merge(job: IndexMergeJob) -> dict[str, Any]:
    from vitssl.index.core import MANIFEST_FILE

    if not is_main():
        return {}
    out = Path(job.out)
    count = _merge_shards(job.shard_dirs, out, job.overwrite)
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


def write_summary(summary: dict[str, Any], path: str | None) -> dict[str, Any]:
    """A job's summary, also written to ``path`` (``--json``) when given; returned as it is."""
    if path:
        write_result(summary, path)
        print(f"summary written to {path}")
    return summary


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


def _cmd_index_build(args: argparse.Namespace) -> int:
    out = Path(args.out).absolute()
    chosen = (("--shard", args.shard), ("--shards", args.shards), ("--train-only", args.train_only))
    modes = [option for option, value in chosen if value]
    if len(modes) > 1:
        raise ConfigError(f"{' and '.join(modes)} exclude each other; pick one")
    from vitssl.cli import video_index

    split = split_of(args.data, "val", args.split)
    launch_cfg, device = launch_settings(args)
    video = video_index.is_video_data(args.data)
    fields = {
        **(video_index.video_fields(args, device) if video else extraction_fields(args, device)),
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


def _merge_shards(shard_dirs: tuple[str, ...] | list[str], out: Path, overwrite: bool) -> int:
    """Merge shard index folders into ``out``; return the merged vector count."""
    from vitssl.cli.video_index import merge_frames_if_video
    from vitssl.index import core as retrieval

    with _index_errors():
        retrieval.merge_shards([Path(d) for d in shard_dirs], out, overwrite=overwrite)
        merge_frames_if_video([Path(d) for d in shard_dirs], out)
    return int(json.loads((out / retrieval.MANIFEST_FILE).read_text())["count"])


def _cmd_index_merge(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _check_new_out(out, args.overwrite)
    count = _merge_shards(args.shard_dirs, out, args.overwrite)
    print(f"merged {len(args.shard_dirs)} shards: {count} vectors -> {out}")
    return 0


def _query_model(directory: Path, checkpoint: str | None, device: str) -> tuple[Any, Any, str]:
    """The checkpoint the index was built from (or ``--checkpoint``), the loaded index (checked against it), layer."""
    from vitssl.cli._common import register_objectives
    from vitssl.index import core as retrieval
    from vitssl.index.image import load_image_model

    register_objectives()
    with _index_errors():
        manifest_path = directory / retrieval.MANIFEST_FILE
        if not manifest_path.is_file():
            retrieval.load_index_dir(directory)  # raises its own clear error about the folder
        source = json.loads(manifest_path.read_text(encoding="utf-8")).get("source")
        if not source and checkpoint is None:
            raise ConfigError(
                f"index {directory} was built from precomputed embeddings (its manifest has no 'source'); "
                "embed queries with their producer and search with vitssl.index.core.search"
            )
        source = source or {}
        layer = source.get("layer", "pooled")
        model = load_image_model(checkpoint or source["checkpoint_path"], device)
        loaded = retrieval.load_index_dir(
            directory, expect_checkpoint=model.checkpoint_hash, expect_feature_key=model.feature_key(layer)
        )
    return model, loaded, layer


def _cmd_index_query(args: argparse.Namespace) -> int:
    from vitssl.cli import video_index
    from vitssl.index import core as retrieval
    from vitssl.index.grid import Neighbour, save_query_grid

    if args.video:
        return video_index.cmd_query(args)
    if not args.image:
        raise ConfigError("name the query: --image FILE (an image index) or --video FILE (a video index)")
    video_index.refuse_image_query(Path(args.dir))
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
        write_result({"index": str(args.dir), "k": args.k, "layer": layer, "queries": results}, args.json)
        print(f"written to {args.json}")
    if args.grid:
        neighbours = [[Neighbour(h["id"], h["sample"], h["score"]) for h in r["neighbours"]] for r in results]
        save_query_grid([r["query"] for r in results], neighbours, loaded.manifest.get("source"), args.grid)
        print(f"query grid: {args.grid}")
    return 0


def _ground_truth_inputs(args: argparse.Namespace) -> tuple[Any, Any, list[set[str]]]:
    """The loaded index, the query vectors (Q, D) and per query its positives (sample ids) of ``--ground-truth``.

    Queries are image files (embedded with the index's checkpoint; a relative path is read against the file's
    folder, else the working folder) or faiss ids (their stored vectors); positives are sample ids, paths or faiss
    ids (:func:`vitssl.eval.retrieval_metrics.match_ids`), and one the index lacks is refused by name.
    """
    import numpy as np

    from vitssl.eval.retrieval_metrics import match_ids, read_ground_truth
    from vitssl.index import core as retrieval

    with _index_errors():
        truth = read_ground_truth(args.ground_truth, args.gt_format, **_gt_options(args))
        loaded = retrieval.load_index_dir(args.dir)
    if not truth.queries:
        raise ConfigError(f"--ground-truth {args.ground_truth} holds no queries")
    faiss_ids = loaded.faiss_ids.tolist()
    wanted = {p for q in truth.queries for p in truth.positives[q]}
    matched = match_ids(wanted, loaded.samples, faiss_ids=faiss_ids, as_written=truth.as_written)
    missing = sorted((truth.as_written.get(p, p) for p in wanted - set(matched)), key=str)
    if missing:
        raise ConfigError(
            f"--ground-truth {args.ground_truth}: {len(missing)} relevant ids are not in the index at {args.dir} "
            f"({', '.join(map(str, missing[:3]))}{', ...' if len(missing) > 3 else ''}); name its sample ids "
            "(ids.jsonl), paths or faiss ids"
        )
    images = [q for q in truth.queries if not isinstance(q, int)]
    by_image: dict[Any, Any] = {}
    if images:
        files = [_query_file(q, truth.as_written.get(q), args.ground_truth) for q in images]
        model, loaded, layer = _query_model(Path(args.dir), args.checkpoint, args.device)
        by_image = dict(zip(images, model.embed_images(files, layer)))
    vectors, known = [], set(faiss_ids)
    for q in truth.queries:
        if isinstance(q, int):
            if q not in known:
                raise ConfigError(f"--ground-truth {args.ground_truth}: query faiss id {q} is not in the index")
            if not loaded.manifest.get("has_vectors"):
                raise ConfigError(
                    f"--ground-truth {args.ground_truth}: query {q} is a faiss id, but {args.dir} stores no vectors "
                    "(built with --no-vectors); name the query image instead"
                )
            vectors.append(np.asarray(loaded.vectors()[loaded.row_of(q)], dtype=np.float32))
        else:
            vectors.append(by_image[q])
    positives = [{matched[p] for p in truth.positives[q]} for q in truth.queries]
    return loaded, np.stack(vectors), positives


def _query_file(query: str, as_written: Any, ground_truth: str) -> str:
    """A query image of a ground-truth file: relative to the file's folder, else (as written) to the working one."""
    for candidate in (query, as_written):
        if isinstance(candidate, str) and Path(candidate).is_file():
            return candidate
    raise ConfigError(f"--ground-truth {ground_truth}: query image {as_written or query} does not exist")


def _gt_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ground-truth reader's options of ``index eval`` (FIVR task / version, CC_WEB_VIDEO's clean protocol)."""
    options: dict[str, Any] = {}
    if args.fivr_task:
        options["task"] = args.fivr_task
    if args.fivr_version:
        options["version"] = args.fivr_version
    if args.cc_web_clean:
        options["clean"] = True
    return options


def _cmd_index_eval(args: argparse.Namespace) -> int:
    from vitssl.cli import video_index
    from vitssl.index import core as retrieval
    from vitssl.index.video import is_video_index

    if args.ground_truth and is_video_index(args.dir):
        return video_index.cmd_eval(args)
    queries = truth = None
    if args.ground_truth:
        loaded, queries, truth = _ground_truth_inputs(args)
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
    from vitssl.cli import video_index  # the video options of query and eval

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
    p.set_defaults(func=_cmd_index_build)

    p = add_parser(ix, "merge", help="merge shard index folders into one")
    p.add_argument("shard_dirs", nargs="+", help="the shard folders (all n of them)")
    p.add_argument("--out", required=True, help="merged index folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
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
    p.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
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
    p.add_argument("-k", type=int, default=10, help="cut-off (default 10)")
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
