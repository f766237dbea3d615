"""Retrieval ground truth and its metrics: the one reader of ground-truth files (image and video indexes, TCA's
groups, the benchmarks) and the one AP / mAP / recall@k.

Every reader returns a :class:`GroundTruth`: the queries, per query the positive ids, optionally per query the
ids to leave out of its ranking, and the benchmark's own database list when the file names one. Ids are what the
file names: paths or sample ids (``digits/val/17``), integers (faiss ids: rows of an index) in vitssl's own format,
YouTube / dataset ids (file stems) in the pickles; :func:`match_ids` maps them onto the sample ids of an index.

Formats read (the files the public ViSiL and TCA evaluation code loads with ``pickle.load``):

- **vitssl** (:func:`read_vitssl`, written by :func:`write_vitssl`, e.g. for the generated near-duplicate
  benchmark): JSON lines ``{"query": <id>, "relevant": [<id>, ...]}``, one query a line, ids strings (an image or
  video path, or a sample id) or integers (faiss ids); relative paths are relative to the file's folder (the
  path as written is kept too, in :attr:`GroundTruth.as_written`, so sample ids such as ``digits/val/17`` and
  paths relative to the working folder still match).
- **CC_WEB_VIDEO** (:func:`read_cc_web_video`, ``cc_web_video.pickle``): a dict with ``index`` (``{video id:
  video name}``, the database), ``queries`` (one query video id per query set), ``ground_truth`` (per query set a
  dict ``{video name: label}``, labels ``E`` exact, ``S`` similar, ``V`` different version, ``M`` major change,
  ``L`` long version, ``X`` dissimilar, ``-1`` unrelated) and ``excluded`` (per query set the videos the "clean"
  protocol leaves out). Positives are the videos labelled ``E S L M V``. The whole index is ranked, so the mAP
  here is what that code calls CC_WEB mAP* (its plain mAP ranks the labelled videos only).
- **FIVR-200K / FIVR-5K** (:func:`read_fivr`, ``fivr.pickle``): a dict with ``annotation`` (``{query id: {label:
  [video ids]}}``, labels ``ND`` near-duplicate, ``DS`` duplicate scene, ``CS`` complementary scene, ``IS``
  incident scene) and ``200k`` / ``5k`` (each ``{"queries": [...], "database": [...]}``). The tasks take labels
  DSVR = ND + DS, CSVR = ND + DS + CS, ISVR = all four; positives outside the database are dropped.
- **EVVE** (:func:`read_evve`, ``evve.pickle``): a dict with ``annotation`` (``{event name: (query ids, positive
  ids, null ids)}``, three sets), ``queries`` and ``database``. Positives of a query are those of its event.

AP (:func:`average_precision`) of a ranking of the whole database is what FIVR-200K, CC_WEB_VIDEO and
scikit-learn's ``average_precision_score`` compute: the sum of precision@r at the ranks r of the positives,
divided by the number of positives (positives never retrieved count as precision 0). AP@k of a top-k list divides
that sum over r <= k by min(k, positives) instead, so that a perfect top-k list scores 1. EVVE's own script
integrates precision by trapezoids; its figures differ slightly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitssl.errors import DataError, MissingFileError

_logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("vitssl", "cc_web_video", "fivr", "evve")
FIVR_TASKS: dict[str, tuple[str, ...]] = {
    "DSVR": ("ND", "DS"),
    "CSVR": ("ND", "DS", "CS"),
    "ISVR": ("ND", "DS", "CS", "IS"),
}
CC_WEB_POSITIVE_LABELS = "ESLMV"
Id = str | int  # a ground-truth id: a path / sample id / dataset id, or a faiss id


class GroundTruthError(DataError):
    """A ground-truth file that cannot be read or does not describe queries and positives."""


@dataclass
class GroundTruth:
    """Queries and their positives.

    Attributes:
        queries: query ids, in file order.
        positives: per query, the ids of its positives.
        excluded: per query, ids left out of its ranking altogether (CC_WEB_VIDEO's clean protocol).
        database: the benchmark's database ids when the file lists them, else None (the index is the database).
        name: the format read.
        as_written: for ids resolved against the file's folder, the id as the file wrote it.
    """

    queries: list[Id]
    positives: dict[Id, set[Id]]
    excluded: dict[Id, set[Id]] = field(default_factory=dict)
    database: list[str] | None = None
    name: str = "vitssl"
    as_written: dict[Id, Id] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.queries)


def _load_pickle(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise MissingFileError(f"ground-truth file {path} not found; pass the {what} annotation file")
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as err:
        raise GroundTruthError(f"{path} is not a readable {what} pickle ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise GroundTruthError(f"{path} holds a {type(data).__name__}, not the {what} annotation dict")
    return data


def _need(data: Mapping[str, Any], keys: Sequence[str], path: Path, what: str) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise GroundTruthError(f"{path} lacks the keys {missing} of a {what} annotation file (it has {sorted(data)})")


def read_vitssl(path: str | os.PathLike) -> GroundTruth:
    """Read vitssl's JSON-lines ground truth (see the module doc): string ids that are relative paths resolve
    against the file's folder, integer ids (faiss ids) stay integers."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"ground-truth file {path} not found; pass a JSON-lines file of query/relevant pairs")
    base = path.absolute().parent
    as_written: dict[Id, Id] = {}

    def resolve(p: Any) -> Id:
        if isinstance(p, bool) or not isinstance(p, (str, int)):
            raise TypeError(f"an id is a string (path, sample id) or an integer (faiss id), not {p!r}")
        if isinstance(p, int) or os.path.isabs(p):
            return p
        resolved = str(base / p)
        as_written[resolved] = p
        return resolved

    queries: list[Id] = []
    positives: dict[Id, set[Id]] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                if isinstance(entry["relevant"], (str, int)):
                    raise TypeError("'relevant' is a list of ids")
                query, relevant = resolve(entry["query"]), [resolve(r) for r in entry["relevant"]]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise GroundTruthError(
                    f'{path} line {line_no}: expected {{"query": id, "relevant": [ids]}}, ids paths, sample ids or '
                    f"faiss ids ({type(err).__name__}: {err})"
                ) from None
            if query not in positives:
                queries.append(query)
                positives[query] = set()
            positives[query].update(relevant)
    return GroundTruth(queries, positives, name="vitssl", as_written=as_written)


def read_cc_web_video(path: str | os.PathLike, clean: bool = False) -> GroundTruth:
    """Read ViSiL's ``cc_web_video.pickle`` (see the module doc).

    Args:
        path: the pickle.
        clean: the "clean" protocol: each query set's ``excluded`` videos are left out of its ranking.
    """
    path = Path(path)
    data = _load_pickle(path, "CC_WEB_VIDEO")
    _need(data, ("index", "queries", "ground_truth"), path, "CC_WEB_VIDEO")
    index = data["index"] if isinstance(data["index"], Mapping) else {}
    queries: list[Id] = [str(index.get(q, q)) for q in data["queries"]]  # a query by its index key: its video name
    if len(data["ground_truth"]) != len(queries):
        raise GroundTruthError(f"{path}: {len(queries)} queries but {len(data['ground_truth'])} ground-truth sets")
    excluded_sets = data.get("excluded") or [set() for _ in queries]
    positives: dict[Id, set[Id]] = {}
    excluded: dict[Id, set[Id]] = {}
    for query, labels, gone in zip(queries, data["ground_truth"], excluded_sets):
        positives[query] = {str(v) for v, label in labels.items() if str(label) in CC_WEB_POSITIVE_LABELS}
        if clean:
            excluded[query] = {str(v) for v in gone}
            positives[query] -= excluded[query]
    database = [str(v) for v in index.values()] if index else None
    return GroundTruth(queries, positives, excluded, database, name="cc_web_video")


def read_fivr(path: str | os.PathLike, version: str = "200k", task: str = "DSVR") -> GroundTruth:
    """Read ViSiL's ``fivr.pickle`` (see the module doc).

    Args:
        path: the pickle.
        version: ``200k`` or ``5k``: which query and database lists to use.
        task: ``DSVR``, ``CSVR`` or ``ISVR``: which labels are positives.
    """
    if task not in FIVR_TASKS:
        raise GroundTruthError(f"FIVR task {task!r} is not one of {', '.join(FIVR_TASKS)}")
    path = Path(path)
    data = _load_pickle(path, "FIVR")
    _need(data, ("annotation", version), path, "FIVR")
    annotation = {str(q): sets for q, sets in data["annotation"].items()}  # integer ids key it as they are listed
    queries: list[Id] = [str(q) for q in data[version]["queries"]]
    database = [str(v) for v in data[version]["database"]]
    in_db = set(database)
    positives: dict[Id, set[Id]] = {}
    for query in queries:
        sets = annotation.get(str(query), {})
        positives[query] = {str(v) for label in FIVR_TASKS[task] for v in sets.get(label, [])} & in_db
    return GroundTruth(queries, positives, database=database, name=f"fivr-{version}-{task}")


def read_evve(path: str | os.PathLike) -> GroundTruth:
    """Read ViSiL's ``evve.pickle`` (see the module doc): positives of a query are its event's positives."""
    path = Path(path)
    data = _load_pickle(path, "EVVE")
    _need(data, ("annotation", "queries", "database"), path, "EVVE")
    event_of = {str(q): ev for ev, (qs, _, _) in data["annotation"].items() for q in qs}
    queries: list[Id] = [str(q) for q in data["queries"]]
    positives: dict[Id, set[Id]] = {}
    for query in queries:
        if query not in event_of:
            raise GroundTruthError(f"{path}: query {query!r} belongs to no event of the annotation")
        positives[query] = {str(v) for v in data["annotation"][event_of[query]][1]}
    return GroundTruth(queries, positives, database=[str(v) for v in data["database"]], name="evve")


def read_ground_truth(path: str | os.PathLike, fmt: str | None = None, **options: Any) -> GroundTruth:
    """Read a ground-truth file of any supported format.

    Args:
        path: the file.
        fmt: one of :data:`FORMATS`; None: ``vitssl`` for text files, and for a pickle the format its keys tell
            (``index`` + ``ground_truth``: CC_WEB_VIDEO, ``200k``: FIVR, ``annotation`` + ``database``: EVVE).
        **options: the reader's options (``clean``; ``version``, ``task``).
    """
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise GroundTruthError(f"ground-truth format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt is None:
        if not path.is_file():
            raise MissingFileError(f"ground-truth file {path} not found")
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] != b"\x80":  # pickles of protocol 2+ start with PROTO (0x80); the rest is JSON lines
            fmt = "vitssl"
        else:
            keys = set(_load_pickle(path, "annotation"))
            if {"index", "ground_truth"} <= keys:
                fmt = "cc_web_video"
            elif "200k" in keys or "5k" in keys:
                fmt = "fivr"
            elif {"annotation", "database"} <= keys:
                fmt = "evve"
            else:
                raise GroundTruthError(
                    f"{path}: a pickle with keys {sorted(keys)} is none of CC_WEB_VIDEO, FIVR, EVVE; name the format"
                )
    readers = {"vitssl": read_vitssl, "cc_web_video": read_cc_web_video, "fivr": read_fivr, "evve": read_evve}
    try:
        return readers[fmt](path, **options)
    except TypeError as err:
        raise GroundTruthError(f"ground-truth format {fmt!r} does not take the options {sorted(options)}") from err


def write_vitssl(path: str | os.PathLike, pairs: Iterable[tuple[Id, Iterable[Id]]], relative_to: Path | None) -> Path:
    """Write vitssl's JSON-lines ground truth atomically; paths are written relative to ``relative_to`` if given,
    integer ids (faiss ids) as integers."""
    from vitssl.io import atomic_write

    def rel(p: Id) -> Id:
        if isinstance(p, int):
            return p
        return os.path.relpath(p, relative_to) if relative_to is not None else str(p)

    lines = [json.dumps({"query": rel(q), "relevant": [rel(r) for r in rs]}) for q, rs in pairs]
    return atomic_write(Path(path), "\n".join(lines) + "\n")


def match_ids(
    ids: Iterable[Id],
    samples: Sequence[str],
    *,
    faiss_ids: Sequence[int] | None = None,
    as_written: Mapping[Id, Id] | None = None,
) -> dict[Id, str]:
    """Map ground-truth ids onto index sample ids.

    A string id matches the sample id it equals; else a path matches by absolute path, a bare id by file name
    without extension (``abc`` matches ``/data/abc.mp4``); an id resolved against the ground-truth file's folder
    is tried as written too (``as_written``). An integer id is a faiss id (``faiss_ids``: the index's, row order
    of ``samples``).

    Args:
        ids: ground-truth ids.
        samples: the index's sample ids (paths, or dataset sample ids such as ``digits/val/17``).
        faiss_ids: the faiss id of each sample; None: integer ids match nothing.
        as_written: :attr:`GroundTruth.as_written`.

    Returns:
        ``{ground-truth id: sample id}`` for the ids found; ids without a sample in the index are left out.
    """
    exact = set(samples)
    by_path = {os.path.abspath(s): s for s in samples}
    by_stem: dict[str, str] = {}
    for s in samples:
        by_stem.setdefault(Path(s).stem, s)
    by_faiss_id = dict(zip((int(i) for i in faiss_ids), samples)) if faiss_ids is not None else {}
    as_written = as_written or {}
    out: dict[Id, str] = {}
    for i in ids:
        if isinstance(i, int):
            hit = by_faiss_id.get(i)
        else:
            hit = None
            for form in (i, as_written.get(i)):
                if not isinstance(form, str):
                    continue
                if form in exact:
                    hit = form
                # a path names one file: it never falls back to another folder's file of the same name
                elif os.sep in form or "/" in form:
                    hit = by_path.get(os.path.abspath(form))
                else:
                    hit = by_stem.get(form)
                if hit is not None:
                    break
        if hit is not None:
            out[i] = hit
    return out


def average_precision(ranked_ids: Sequence[Any] | np.ndarray, positives: Iterable[Any], k: int | None = None) -> float:
    """AP of one ranking (``k=None``: of the whole database) or AP@k of a top-k list (see the module doc).

    ``sum over the ranks r <= k holding a positive of precision@r``, divided by the number of positives
    (``k=None``) or by ``min(k, positives)``; ids that are not positives (-1 padding included) are misses, and
    positives missing from the ranking add nothing.

    Args:
        ranked_ids: ids best first (the query itself left out); a ranking longer than ``k`` is cut at ``k``.
        positives: the query's positive ids.
        k: the cut-off of a top-k list, or None for a ranking of the whole database.

    Returns:
        AP in [0, 1]; NaN when there are no positives.
    """
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1 or None (full rankings), got {k}")
    relevant = set(positives.tolist() if isinstance(positives, np.ndarray) else positives)
    if not relevant:
        return float("nan")
    ranked = ranked_ids.tolist() if isinstance(ranked_ids, np.ndarray) else ranked_ids
    hits, total = 0, 0.0
    for rank, item in enumerate(ranked[:k] if k is not None else ranked, 1):
        if item in relevant:
            hits += 1
            total += hits / rank
            if hits == len(relevant):
                break
    return total / (len(relevant) if k is None else min(k, len(relevant)))


def mean_average_precision(
    rankings: Sequence[Sequence[Any]] | np.ndarray, positives: Sequence[Iterable[Any]], k: int | None = None
) -> float:
    """Mean over queries of :func:`average_precision`: mAP of full rankings (``k=None``) or mAP@k of top-k lists.

    Queries without positives are skipped (with a warning).

    Args:
        rankings: per query, ids best first (a (Q, n) array or lists).
        positives: per query, its positive ids.
        k: the cut-off the rankings were made with, or None for rankings of the whole database.

    Raises:
        GroundTruthError: no query has positives.
    """
    if len(rankings) != len(positives):
        raise ValueError(f"{len(rankings)} rankings but positives for {len(positives)} queries")
    aps = [average_precision(r, p, k) for r, p in zip(rankings, positives)]
    kept = [ap for ap in aps if not math.isnan(ap)]
    if len(kept) < len(aps):
        _logger.warning("mAP: skipped %d queries without relevant items", len(aps) - len(kept))
    if not kept:
        raise GroundTruthError("no query has relevant items in the ground truth; mAP is undefined")
    return float(np.mean(kept))


def evaluate_ranking(
    results: Mapping[Any, Sequence[Any]],
    ground_truth: GroundTruth | Mapping[Any, Iterable[Any]],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, Any]:
    """mAP and recall@k of ranked results against ground truth.

    Args:
        results: per query id, the database ids ranked best first (the query itself left out).
        ground_truth: a :class:`GroundTruth` or ``{query: positives}``; queries absent from ``results`` or without
            positives are skipped (and counted).
        ks: recall cut-offs: recall@k is the share of a query's positives in its top k, averaged over queries.

    Returns:
        ``{"mAP": .., "recall@1": .., ..., "num_queries": .., "skipped_queries": ..}``.
    """
    positives = ground_truth.positives if isinstance(ground_truth, GroundTruth) else ground_truth
    aps: list[float] = []
    recalls: dict[int, list[float]] = {k: [] for k in ks}
    skipped = 0
    for query, pos in positives.items():
        pos = set(pos)
        if query not in results or not pos:
            skipped += 1
            continue
        ranking = list(results[query])
        aps.append(average_precision(ranking, pos))
        for k in ks:
            recalls[k].append(len(pos.intersection(ranking[:k])) / len(pos))
    if not aps:
        raise GroundTruthError(
            "no query of the ground truth has both results and positives; check that the index holds its videos"
        )
    out: dict[str, Any] = {"mAP": float(np.mean(aps))}
    out.update({f"recall@{k}": float(np.mean(v)) for k, v in recalls.items()})
    out.update(num_queries=len(aps), skipped_queries=skipped)
    return out


__all__ = [
    "CC_WEB_POSITIVE_LABELS",
    "FIVR_TASKS",
    "FORMATS",
    "GroundTruth",
    "GroundTruthError",
    "Id",
    "average_precision",
    "evaluate_ranking",
    "match_ids",
    "mean_average_precision",
    "read_cc_web_video",
    "read_evve",
    "read_fivr",
    "read_ground_truth",
    "read_vitssl",
    "write_vitssl",
]
