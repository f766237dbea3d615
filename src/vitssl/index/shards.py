"""Sharded builds: the shared trained quantizer, one shard per job, and the merge of the shard folders.

Sharded build of a corpus of N items in n shards (``--shard i/n``; each shard can be a SLURM array task):

1. Train (only factories that need it: IVF, PQ, ...): ``rows = training_sample_indices(N, train_size, seed)``,
   embed those items, ``write_trained_index(work / "trained.faiss", train_index(embeddings, factory, ...))``.
   The sample depends on (N, train_size, seed) only, so every shard - and a single-process build with the
   same arguments - uses the same trained quantizer.
2. Shard i: ``start, stop = shard_range(N, i, n)``; embed rows [start, stop);
   ``build_shard(dir_i, embeddings, samples, shard=(i, n), first_id=start, trained=work / "trained.faiss")``.
   Faiss ids are global row numbers, so they stay unique across shards.
3. ``merge_shards([dir_0, ..., dir_{n-1}], out)``: IVF shards are merged list by list (``faiss.merge_into``;
   same trained quantizer required and checked through its hash), IDMap'd flat-code indexes (Flat, PQ, SQ)
   with ``merge_from``, other indexes (HNSW) by adding the stored vectors of shards 1..n-1 to shard 0 in order.
   For Flat and IVF the merged index equals a single build of the whole corpus; an HNSW graph built in pieces
   differs from one built at once (it is approximate either way).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitssl._faiss import faiss
from vitssl.index import _gpu
from vitssl.index.factory import (
    Metric,
    _add,
    _add_on_device,
    _faiss_message,
    _native_ids,
    _prepare,
    default_search_params,
    new_index,
    set_search_params,
)
from vitssl.index.store import (
    IDS_FILE,
    INDEX_FILE,
    VECTORS_FILE,
    IndexFormatError,
    LoadedIndex,
    _check_overwrite,
    _sha256,
    _write_ids,
    _write_manifest,
    load_index_dir,
    write_index_dir,
)
from vitssl.io import atomic_dir, atomic_path, write_json


def shard_range(num_items: int, shard_index: int, num_shards: int) -> tuple[int, int]:
    """Rows [start, stop) of shard ``shard_index`` of ``num_shards`` contiguous, near-equal shards."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard must be i/n with 0 <= i < n, got {shard_index}/{num_shards}")
    return num_items * shard_index // num_shards, num_items * (shard_index + 1) // num_shards


def write_trained_index(
    path: str | Path, index: Any, factory: str, metric: Metric, normalize: bool, train_count: int, seed: int
) -> Path:
    """Write a trained, empty index (``trained.faiss``) and its description (``trained.faiss.json``).

    Args:
        path: file to write, conventionally ``<work dir>/trained.faiss``.
        index: the trained empty index from :func:`train_index`.
        factory: its factory string.
        metric: "ip" or "l2".
        normalize: whether its training vectors were normalised.
        train_count: number of training vectors.
        seed: training sample seed.

    Returns:
        The path.
    """
    path = Path(path)
    if index.ntotal != 0:
        raise ValueError(f"a trained index to share between shards must be empty, this one holds {index.ntotal}")
    if _gpu.is_gpu_index(index):
        index = _gpu.index_gpu_to_cpu(index)
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
        sha256 = _sha256(tmp)
    info = {
        "factory": factory,
        "metric": metric,
        "normalize": normalize,
        "dimension": int(index.d),
        "train_count": int(train_count),
        "seed": seed,
        "sha256": sha256,
    }
    write_json(info, path.with_name(path.name + ".json"))
    return path


def read_trained_index(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """Read ``trained.faiss`` and its description, verifying the checksum."""
    path = Path(path)
    info_path = path.with_name(path.name + ".json")
    if not path.is_file() or not info_path.is_file():
        raise IndexFormatError(
            f"trained index {path} or its description {info_path.name} is missing; run the train step first"
        )
    info = json.loads(info_path.read_text(encoding="utf-8"))
    if _sha256(path) != info.get("sha256"):
        raise IndexFormatError(f"trained index {path} does not match its checksum (corrupt); rerun the train step")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as err:
        raise IndexFormatError(
            f"trained index {path} cannot be read ({_faiss_message(err)}); rerun the train step"
        ) from None
    return index, info


def build_shard(
    directory: str | Path,
    embeddings: np.ndarray | torch.Tensor,
    samples: Sequence[str],
    shard: tuple[int, int],
    first_id: int,
    factory: str = "Flat",
    metric: Metric = "ip",
    normalize: bool = True,
    trained: str | Path | None = None,
    checkpoint: str | None = None,
    feature_key: str | None = None,
    store_vectors: bool = True,
    overwrite: bool = False,
    use_gpu: bool | None = None,
    metadata: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Build shard ``i/n`` of a corpus as its own index directory (see the module doc for the flow).

    Args:
        directory: output directory of this shard.
        embeddings: (N_shard, D) vectors of rows [first_id, first_id + N_shard) of the corpus.
        samples: their sample ids.
        shard: ``(i, n)``.
        first_id: corpus row of the shard's first vector (``shard_range(N, i, n)[0]``); faiss ids are rows.
        factory: faiss index factory string.
        metric: "ip" or "l2".
        normalize: L2-normalise vectors.
        trained: ``trained.faiss`` from the train step; required for factories that need training.
        checkpoint: checkpoint content hash.
        feature_key: feature layer / transform key.
        store_vectors: also write vectors.npy (needed to merge HNSW shards).
        overwrite: replace an existing directory.
        use_gpu: assign vectors to IVF lists on a GPU; None = when faiss has one, False = never.
        metadata: optional JSON object per vector (``{}`` for none), in the order of ``samples``; the merge keeps it.

    Returns:
        The shard directory.
    """
    t0 = time.perf_counter()
    _check_overwrite(Path(directory), overwrite)
    x = _prepare(embeddings, normalize)
    index = new_index(factory, x.shape[1], metric)
    trained_sha = None
    if trained is not None:
        index, info = read_trained_index(trained)
        expected = {"factory": factory, "metric": metric, "normalize": normalize, "dimension": x.shape[1]}
        wrong = {k: info.get(k) for k, v in expected.items() if info.get(k) != v}
        if wrong:
            raise IndexFormatError(
                f"trained index {trained} was made with {wrong}, but this shard uses "
                f"{ {k: expected[k] for k in wrong} }; rerun the train step with the shard's settings"
            )
        if index.ntotal != 0:
            raise IndexFormatError(f"trained index {trained} is not empty ({index.ntotal} vectors)")
        trained_sha = info["sha256"]
    elif not index.is_trained:
        raise ValueError(
            f"index factory {factory!r} needs training: run the train step (train_index + write_trained_index on "
            "training_sample_indices of the whole corpus) and pass trained=<trained.faiss> to every shard"
        )
    index = _add_on_device(index, x, np.arange(first_id, first_id + x.shape[0], dtype=np.int64), use_gpu)
    params = default_search_params(index)
    set_search_params(index, params.get("nprobe"), params.get("efSearch"))
    i, n = shard
    manifest = {
        "factory": factory,
        "metric": metric,
        "normalize": normalize,
        "checkpoint": checkpoint,
        "feature_key": feature_key,
        "shard": {"index": int(i), "count": int(n), "first_id": int(first_id)},
        "trained_sha256": trained_sha,
        "search_params": params,
        "build_seconds": time.perf_counter() - t0,
    }
    ids = {first_id + r: s for r, s in enumerate(samples)}
    return write_index_dir(directory, index, ids, manifest, x if store_vectors else None, overwrite, metadata)


_MERGE_KEYS = ("factory", "metric", "normalize", "dimension", "checkpoint", "feature_key", "trained_sha256")


def merge_shards(shard_dirs: Sequence[str | Path], out_dir: str | Path, overwrite: bool = False) -> Path:
    """Merge shard index directories into one index directory (see the module doc for how and when it equals a
    single build).

    Args:
        shard_dirs: the directories of all n shards, in any order.
        out_dir: output directory.
        overwrite: replace an existing output directory.

    Returns:
        The output directory.

    Raises:
        IndexFormatError: shards are missing, duplicated or built with different settings.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    _check_overwrite(out_dir, overwrite)
    if not shard_dirs:
        raise ValueError("merge_shards needs at least one shard directory")
    shards = [load_index_dir(d) for d in shard_dirs]
    for s in shards:
        if not s.manifest.get("shard"):
            raise IndexFormatError(f"{s.directory} is not a shard (its manifest has no shard entry)")
    shards.sort(key=lambda s: s.manifest["shard"]["index"])
    n = shards[0].manifest["shard"]["count"]
    seen = [s.manifest["shard"]["index"] for s in shards]
    if any(s.manifest["shard"]["count"] != n for s in shards) or seen != list(range(n)):
        raise IndexFormatError(
            f"merge needs each of the {n} shards exactly once; got shard indices {seen} "
            f"(missing {sorted(set(range(n)) - set(seen))})"
        )
    ref = shards[0].manifest
    for s in shards[1:]:
        diff = {k: (ref.get(k), s.manifest.get(k)) for k in _MERGE_KEYS if ref.get(k) != s.manifest.get(k)}
        if diff:
            raise IndexFormatError(
                f"shard {s.directory} was built differently from {shards[0].directory}: {diff} "
                "(first shard's value, this shard's value); rebuild the shards with the same settings"
            )
    faiss_ids = np.concatenate([s.faiss_ids for s in shards])
    if len(np.unique(faiss_ids)) != len(faiss_ids):
        raise IndexFormatError("shards share faiss ids; build each shard with first_id = its first corpus row")

    base = shards[0].index
    for s in shards[1:]:
        if _native_ids(base):
            faiss.merge_into(base, s.index, False)
        else:
            _merge_non_ivf(base, s)
    has_vectors = all(s.manifest.get("has_vectors") for s in shards)
    samples = [x for s in shards for x in s.samples]
    # Shard by shard as the ids; a shard without metadata (its rows had none) contributes empty rows.
    metadata = None
    if any(s.metadata is not None for s in shards):
        metadata = [m for s in shards for m in (s.metadata if s.metadata is not None else [{}] * len(s.samples))]
    manifest = {k: v for k, v in ref.items() if k not in ("files", "count", "dimension", "has_vectors", "created")}
    manifest.update(
        shard=None,
        merged_from=n,
        build_seconds=sum(s.manifest.get("build_seconds", 0.0) for s in shards) + time.perf_counter() - t0,
    )
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        faiss.write_index(base, str(tmp / INDEX_FILE))
        _write_ids(tmp / IDS_FILE, faiss_ids, samples, metadata)
        if has_vectors:
            # Streamed shard by shard, so the merged vectors never need to fit in memory.
            out = np.lib.format.open_memmap(
                tmp / VECTORS_FILE, mode="w+", dtype=np.float32, shape=(len(samples), int(ref["dimension"]))
            )
            row = 0
            for s in shards:
                v = s.vectors()
                out[row : row + len(v)] = v
                row += len(v)
            out.flush()
            del out
        _write_manifest(tmp, manifest, int(base.ntotal), int(base.d))
    return out_dir


def _merge_non_ivf(base: Any, shard: LoadedIndex) -> None:
    """Append a shard to an IDMap'd non-IVF index: flat-code indexes merge codes, others re-add vectors."""
    try:
        base.merge_from(shard.index)
        return
    except RuntimeError:
        pass  # e.g. HNSW graphs cannot be concatenated
    if not shard.manifest.get("has_vectors"):
        raise IndexFormatError(
            f"shard {shard.directory} ({shard.manifest['factory']!r}) can only be merged by re-adding its vectors, "
            f"but it has no {VECTORS_FILE}; rebuild the shards with store_vectors=True"
        )
    _add(base, np.ascontiguousarray(shard.vectors()), shard.faiss_ids)


__all__ = ["build_shard", "merge_shards", "read_trained_index", "shard_range", "write_trained_index"]
