"""Atomic writes shared by the evaluation modules: JSON result files and whole folders (feature sets, indexes).

A reader (another rank, a concurrent command, a crashed run being resumed) must never see half a file or half a
folder, so everything is written under a temporary sibling name and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)


def write_json(obj: Any, path: Path, *, sort_keys: bool = False, default: Callable[[Any], Any] | None = None) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically, creating its folder.

    Args:
        obj: the value to write.
        path: destination file.
        sort_keys: sort object keys (stable diffs of manifests).
        default: ``json.dumps``'s fallback for values it cannot encode (e.g. ``str``); None raises on them.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # the process id keeps ranks or concurrent commands writing the same file from sharing a temporary
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys, default=default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def make_tmp_dir(directory: Path) -> Path:
    """Create and return an empty hidden sibling of ``directory`` to fill before :func:`replace_dir`."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    return tmp


def replace_dir(tmp: Path, directory: Path) -> None:
    """Rename a finished temporary folder to ``directory``; a folder already there is removed only afterwards."""
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)
