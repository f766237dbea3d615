"""Querying and evaluating image indexes the way ``vitssl index query|eval`` does: queries embedded with the
embedder the index's spec records, checked against it, searched; ground-truth files turned into query vectors
and positives.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vitssl.config import ConfigError
from vitssl.index.pipeline import EmbedOptions, IndexSpec
from vitssl.index.search import search
from vitssl.index.store import MANIFEST_FILE, LoadedIndex, load_index_dir


def open_image_index(
    directory: str | Path, checkpoint: str | None = None, device: str = "auto"
) -> tuple[Any, LoadedIndex]:
    """The image embedder of an index (its recorded checkpoint, or ``checkpoint``) and the index, checked against it.

    Raises:
        ConfigError: the index records no model (built from precomputed embeddings) and none is given.
        IndexSpecError: ``checkpoint`` embeds otherwise than the index's vectors.
    """
    from vitssl.index.embedders import ImageEmbedder

    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        load_index_dir(directory)  # raises its own clear error about the folder
    source = json.loads(manifest_path.read_text(encoding="utf-8")).get("source")
    if not source and checkpoint is None:
        raise ConfigError(
            f"index {directory} was built from precomputed embeddings (its manifest has no 'source'); "
            "embed queries with their producer and search with vitssl.index.core.search"
        )
    source = source or {}
    options = EmbedOptions(layer=source.get("layer", "pooled"), device=device)
    embedder = ImageEmbedder.open(checkpoint or source["checkpoint_path"], None, options)
    loaded = load_index_dir(directory)
    IndexSpec.from_manifest(loaded.manifest).check_query(
        directory, embedder=embedder.name, checkpoint=embedder.checkpoint_hash, feature_key=embedder.feature_key
    )
    return embedder, loaded


def query_images(
    directory: str | Path,
    images: Sequence[str],
    k: int = 10,
    *,
    checkpoint: str | None = None,
    device: str = "auto",
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> tuple[LoadedIndex, list[dict[str, Any]], str]:
    """The top ``k`` neighbours of each query image.

    Returns:
        ``(index, results, layer)``: per query ``{"query", "neighbours": [{"rank", "sample", "id", "score"}]}``,
        in the order given; a neighbour whose row has metadata also has ``"meta"`` (see :func:`neighbour`).
    """
    embedder, loaded = open_image_index(directory, checkpoint, device)
    queries = embedder.embed_queries(list(images))
    scores, ids = search(loaded, queries, k, nprobe=nprobe, ef_search=ef_search)
    results = []
    for q, row_scores, row_ids, row_samples in zip(images, scores, ids, loaded.lookup(ids)):
        hits = [
            neighbour(loaded, r + 1, s, int(i), float(sc))
            for r, (s, i, sc) in enumerate(zip(row_samples, row_ids, row_scores))
            if i >= 0
        ]
        results.append({"query": str(q), "neighbours": hits})
    return loaded, results, embedder.options.layer


def neighbour(loaded: LoadedIndex, rank: int, sample: str, faiss_id: int, score: float) -> dict[str, Any]:
    """One neighbour of a query result: ``{"rank", "sample", "id", "score"}``, and ``"meta"`` when its row has any
    (rows without metadata get no key, so results of an index without metadata read as before)."""
    hit: dict[str, Any] = {"rank": rank, "sample": sample, "id": faiss_id, "score": score}
    meta = loaded.meta_of(faiss_id)
    if meta:
        hit["meta"] = meta
    return hit


def format_meta(meta: dict[str, Any] | None) -> str:
    """A neighbour's metadata for a printed line: ``"  label=cat bytes=1024"``; ``""`` for none. A string value
    that is empty or holds a space or ``=`` is printed quoted (``label="tabby cat"``), so the line splits one way."""
    if not meta:
        return ""

    def show(v: Any) -> str:
        plain = isinstance(v, str) and v and not any(c.isspace() or c in '="' for c in v)
        return v if plain else json.dumps(v)

    return "  " + " ".join(f"{k}={show(v)}" for k, v in meta.items())


def _query_file(query: str, as_written: Any, ground_truth: str) -> str:
    """A query image of a ground-truth file: relative to the file's folder, else (as written) to the working one."""
    for candidate in (query, as_written):
        if isinstance(candidate, str) and Path(candidate).is_file():
            return candidate
    raise ConfigError(f"--ground-truth {ground_truth}: query image {as_written or query} does not exist")


def ground_truth_inputs(
    directory: str | Path,
    ground_truth: str,
    gt_format: str | None = None,
    *,
    checkpoint: str | None = None,
    device: str = "auto",
    **gt_options: Any,
) -> tuple[LoadedIndex, np.ndarray, list[set[str]]]:
    """The loaded index, the query vectors (Q, D) and per query its positives (sample ids) of a ground-truth file.

    Queries are image files (embedded with the index's checkpoint; a relative path is read against the file's
    folder, else the working folder) or faiss ids (their stored vectors); positives are sample ids, paths or faiss
    ids (:func:`vitssl.eval.retrieval_metrics.match_ids`), and one the index lacks is refused by name.
    """
    from vitssl.eval.retrieval_metrics import match_ids, read_ground_truth

    truth = read_ground_truth(ground_truth, gt_format, **gt_options)
    loaded = load_index_dir(directory)
    if not truth.queries:
        raise ConfigError(f"--ground-truth {ground_truth} holds no queries")
    faiss_ids = loaded.faiss_ids.tolist()
    wanted = {p for q in truth.queries for p in truth.positives[q]}
    matched = match_ids(wanted, loaded.samples, faiss_ids=faiss_ids, as_written=truth.as_written)
    missing = sorted((truth.as_written.get(p, p) for p in wanted - set(matched)), key=str)
    if missing:
        raise ConfigError(
            f"--ground-truth {ground_truth}: {len(missing)} relevant ids are not in the index at {directory} "
            f"({', '.join(map(str, missing[:3]))}{', ...' if len(missing) > 3 else ''}); name its sample ids "
            "(ids.jsonl), paths or faiss ids"
        )
    images = [q for q in truth.queries if not isinstance(q, int)]
    by_image: dict[Any, Any] = {}
    if images:
        files = [_query_file(q, truth.as_written.get(q), ground_truth) for q in images]
        embedder, loaded = open_image_index(directory, checkpoint, device)
        by_image = dict(zip(images, embedder.embed_queries(files)))
    vectors, known = [], set(faiss_ids)
    for q in truth.queries:
        if isinstance(q, int):
            if q not in known:
                raise ConfigError(f"--ground-truth {ground_truth}: query faiss id {q} is not in the index")
            if not loaded.manifest.get("has_vectors"):
                raise ConfigError(
                    f"--ground-truth {ground_truth}: query {q} is a faiss id, but {directory} stores no vectors "
                    "(built with --no-vectors); name the query image instead"
                )
            vectors.append(np.asarray(loaded.vectors()[loaded.row_of(q)], dtype=np.float32))
        else:
            vectors.append(by_image[q])
    positives = [{matched[p] for p in truth.positives[q]} for q in truth.queries]
    return loaded, np.stack(vectors), positives


__all__ = ["format_meta", "ground_truth_inputs", "neighbour", "open_image_index", "query_images"]
