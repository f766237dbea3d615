"""What a feature store is on disk: its file names, dtypes, shard plan and manifest (see :mod:`vitssl.eval.store`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from vitssl.errors import UserError

STORE_FORMAT = 1  # bump when the layout or the meaning of a manifest entry changes
MANIFEST_FILE = "manifest.json"
SHARD_INFO_FILE = "shard.json"
FEATURES_FILE = "features.npy"
LABELS_FILE = "labels.npy"
ROWS_FILE = "rows.npy"
IDS_FILE = "ids.json"
PARTIAL_SUFFIX = ".partial"
DTYPES = ("float16", "float32")
DEFAULT_DTYPE = "float16"
# Rows per shard at most: the unit of resumption (65536 x 1024 fp16 = 128 MiB).
DEFAULT_SHARD_ROWS = 65536


class FeatureStoreError(UserError, ValueError):
    """A feature store is incomplete, damaged, or holds other features than the ones asked for."""


# --------------------------------------------------------------------------------------------------------------
# Plan and manifest
# --------------------------------------------------------------------------------------------------------------


def plan_shards(start: int, stop: int, world_size: int, shard_rows: int = DEFAULT_SHARD_ROWS) -> list[list[int]]:
    """Contiguous ``[start, stop)`` row ranges: a multiple of ``world_size`` shards of at most ``shard_rows`` rows.

    Args:
        start: first dataset row.
        stop: one past the last.
        world_size: ranks that will write (each gets the same number of shards).
        shard_rows: rows per shard at most.
    """
    n = max(0, stop - start)
    per_rank = max(1, math.ceil(n / (world_size * max(1, shard_rows))))
    count = world_size * per_rank
    bounds = [start + (n * i) // count for i in range(count + 1)]
    return [[bounds[i], bounds[i + 1]] for i in range(count)]


def _describe(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def manifest_difference(found: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """What differs between two cache keys, as one phrase (the first differing entries), or None when equal."""
    parts = []
    for name in sorted(set(found) | set(wanted)):
        if found.get(name) != wanted.get(name):
            parts.append(f"{name} {_describe(found.get(name))} (wanted {_describe(wanted.get(name))})")
    return "; ".join(parts[:3]) + ("; ..." if len(parts) > 3 else "") if parts else None


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a store folder.

    Raises:
        FeatureStoreError: the folder or its manifest is missing or unreadable.
    """
    path = Path(folder) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise FeatureStoreError(f"feature store {folder}: cannot read {MANIFEST_FILE} ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("store_format") != STORE_FORMAT or "key" not in manifest:
        raise FeatureStoreError(
            f"feature store {folder}: {MANIFEST_FILE} is not a vitssl feature-store manifest of format "
            f"{STORE_FORMAT}; extract the features again (vitssl eval features)"
        )
    return manifest


def is_store(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a feature-store manifest (complete or not)."""
    return (Path(folder) / MANIFEST_FILE).is_file()


__all__ = [
    "DEFAULT_DTYPE",
    "DEFAULT_SHARD_ROWS",
    "DTYPES",
    "FEATURES_FILE",
    "IDS_FILE",
    "LABELS_FILE",
    "MANIFEST_FILE",
    "PARTIAL_SUFFIX",
    "ROWS_FILE",
    "SHARD_INFO_FILE",
    "STORE_FORMAT",
    "FeatureStoreError",
    "is_store",
    "manifest_difference",
    "plan_shards",
    "read_manifest",
]
