"""Near-duplicate video retrieval ground truth: readers for the public benchmarks' annotation files, AP and mAP.

Every reader returns a :class:`GroundTruth`: the queries, per query the positive video ids, optionally per query
the ids to leave out of its ranking, and the benchmark's own database list when the file names one. Video ids are
what the annotation names: file paths for vitssl's own format, YouTube / dataset ids (file stems) otherwise;
:func:`match_ids` maps them onto the sample ids (file paths) of an index.

Formats read (the files the public ViSiL and TCA evaluation code loads with ``pickle.load``):

- **vitssl** (:func:`read_vitssl`, written by :func:`vitssl.video.neardup.make_neardup_benchmark`): JSON lines
  ``{"query": "<video path>", "relevant": ["<video path>", ...]}``, one query a line; relative paths are relative
  to the file's folder.
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

AP (:func:`average_precision`) is computed over the ranked database as FIVR-200K and CC_WEB_VIDEO do: the sum of
precision@r at the ranks r of the positives, divided by the number of positives (positives never retrieved count
as precision 0). EVVE's own script integrates precision by trapezoids instead; its figures differ slightly.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitssl.errors import DataError, MissingFileError

FORMATS: tuple[str, ...] = ("vitssl", "cc_web_video", "fivr", "evve")
FIVR_TASKS: dict[str, tuple[str, ...]] = {
    "DSVR": ("ND", "DS"),
    "CSVR": ("ND", "DS", "CS"),
    "ISVR": ("ND", "DS", "CS", "IS"),
}
CC_WEB_POSITIVE_LABELS = "ESLMV"


class GroundTruthError(DataError):
    """A ground-truth file that cannot be read or does not describe queries and positives."""


@dataclass
class GroundTruth:
    """Queries and their positives.

    Attributes:
        queries: query video ids, in file order.
        positives: per query, the ids of its positives.
        excluded: per query, ids left out of its ranking altogether (CC_WEB_VIDEO's clean protocol).
        database: the benchmark's database ids when the file lists them, else None (the index is the database).
        name: the format read.
    """

    queries: list[str]
    positives: dict[str, set[str]]
    excluded: dict[str, set[str]] = field(default_factory=dict)
    database: list[str] | None = None
    name: str = "vitssl"

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
    """Read vitssl's JSON-lines ground truth (see the module doc); relative paths resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"ground-truth file {path} not found; pass a JSON-lines file of query/relevant pairs")
    base = path.absolute().parent

    def resolve(p: str) -> str:
        return str(Path(p) if os.path.isabs(p) else base / p)

    queries: list[str] = []
    positives: dict[str, set[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                query, relevant = resolve(str(entry["query"])), [resolve(str(r)) for r in entry["relevant"]]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise GroundTruthError(
                    f'{path} line {line_no}: expected {{"query": path, "relevant": [paths]}} ({err})'
                ) from None
            if query not in positives:
                queries.append(query)
                positives[query] = set()
            positives[query].update(relevant)
    return GroundTruth(queries, positives, name="vitssl")


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
    queries = [str(index.get(q, q)) for q in data["queries"]]  # a query given by its index key: its video name
    if len(data["ground_truth"]) != len(queries):
        raise GroundTruthError(f"{path}: {len(queries)} queries but {len(data['ground_truth'])} ground-truth sets")
    excluded_sets = data.get("excluded") or [set() for _ in queries]
    positives: dict[str, set[str]] = {}
    excluded: dict[str, set[str]] = {}
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
    queries = [str(q) for q in data[version]["queries"]]
    database = [str(v) for v in data[version]["database"]]
    in_db = set(database)
    positives = {}
    for query in queries:
        sets = data["annotation"].get(query, {})
        positives[query] = {str(v) for label in FIVR_TASKS[task] for v in sets.get(label, [])} & in_db
    return GroundTruth(queries, positives, database=database, name=f"fivr-{version}-{task}")


def read_evve(path: str | os.PathLike) -> GroundTruth:
    """Read ViSiL's ``evve.pickle`` (see the module doc): positives of a query are its event's positives."""
    path = Path(path)
    data = _load_pickle(path, "EVVE")
    _need(data, ("annotation", "queries", "database"), path, "EVVE")
    event_of = {str(q): ev for ev, (qs, _, _) in data["annotation"].items() for q in qs}
    queries = [str(q) for q in data["queries"]]
    positives = {}
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


def write_vitssl(path: str | os.PathLike, pairs: Iterable[tuple[str, Iterable[str]]], relative_to: Path | None) -> Path:
    """Write vitssl's JSON-lines ground truth atomically; paths are written relative to ``relative_to`` if given."""
    from vitssl.io import atomic_write

    def rel(p: str) -> str:
        return os.path.relpath(p, relative_to) if relative_to is not None else str(p)

    lines = [json.dumps({"query": rel(q), "relevant": [rel(r) for r in rs]}) for q, rs in pairs]
    return atomic_write(Path(path), "\n".join(lines) + "\n")


def match_ids(ids: Iterable[str], samples: Sequence[str]) -> dict[str, str]:
    """Map ground-truth ids onto index sample ids: paths by absolute path, bare ids by file name without extension.

    Args:
        ids: ground-truth video ids: paths, or dataset ids such as YouTube ids that name the files (``abc`` matches
            ``/data/abc.mp4``).
        samples: the index's sample ids (video paths).

    Returns:
        ``{ground-truth id: sample id}`` for the ids found; ids without a file in the index are left out.
    """
    by_path = {os.path.abspath(s): s for s in samples}
    by_stem: dict[str, str] = {}
    for s in samples:
        by_stem.setdefault(Path(s).stem, s)
    out = {}
    for i in ids:
        # a path names one file: it never falls back to another folder's file of the same name
        hit = by_path.get(os.path.abspath(i)) if (os.sep in i or "/" in i) else by_stem.get(i)
        if hit is not None:
            out[i] = hit
    return out


def average_precision(ranked_ids: Sequence[Any], positives: Iterable[Any]) -> float:
    """AP of one ranking of the database, as FIVR-200K and CC_WEB_VIDEO compute it.

    ``sum over the ranks r holding a positive of precision@r``, divided by the number of positives; positives
    missing from the ranking add nothing (precision 0).

    Args:
        ranked_ids: the database ids, best first (the query itself left out).
        positives: the query's positive ids.

    Returns:
        AP in [0, 1]; NaN when there are no positives.
    """
    relevant = set(positives)
    if not relevant:
        return float("nan")
    hits, total = 0, 0.0
    for rank, item in enumerate(ranked_ids, 1):
        if item in relevant:
            hits += 1
            total += hits / rank
            if hits == len(relevant):
                break
    return total / len(relevant)


def evaluate_ranking(
    results: Mapping[str, Sequence[Any]],
    ground_truth: GroundTruth | Mapping[str, Iterable[Any]],
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
    "average_precision",
    "evaluate_ranking",
    "match_ids",
    "read_cc_web_video",
    "read_evve",
    "read_fivr",
    "read_ground_truth",
    "read_vitssl",
    "write_vitssl",
]
