"""One checkpoint format: atomic writes, keep-last-K, validated loads, fallback to the last good file.

Layout of a run folder::

    checkpoint_00001200.pth   step checkpoints (the newest ``keep_last`` are kept)
    checkpoint_last.pth       the newest checkpoint (a hard link to the newest step file, or a copy)

Every file is written to a temporary name, flushed and fsynced, then renamed, so a crash or a full disk
never leaves a half-written file under a real name. Files load with ``torch.load(weights_only=True)``:
a checkpoint cannot run code.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from vitssl.errors import UserError
from vitssl.io import atomic_open, atomic_path

_logger = logging.getLogger(__name__)

LAST_NAME = "checkpoint_last.pth"
REQUIRED_KEYS = ("model", "optimizer", "step", "epoch", "config")
_STEP_RE = re.compile(r"^checkpoint_(\d+)\.pth$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not a vitssl checkpoint."""


def step_checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint_{step:08d}.pth"


def save_checkpoint(state: dict[str, Any], output_dir: str | Path, keep_last: int = 2) -> Path:
    """Write ``state`` as the step checkpoint and as ``checkpoint_last.pth``; prune old step files.

    Args:
        state: must hold at least ``model``, ``optimizer``, ``step``, ``epoch``, ``config``.
        output_dir: the run folder.
        keep_last: step checkpoints kept (older ones are deleted); at least 1.

    Returns:
        The path of the step checkpoint.
    """
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    step_path = step_checkpoint_path(output_dir, int(state["step"]))
    with atomic_open(step_path, "wb") as f:
        torch.save(state, f)
    # checkpoint_last.pth: a hard link (no extra space) renamed into place; a second copy where links fail.
    last = output_dir / LAST_NAME
    try:
        with atomic_path(last) as tmp:
            tmp.unlink()
            os.link(step_path, tmp)
    except OSError:
        with atomic_open(last, "wb") as f:
            torch.save(state, f)
    _prune(output_dir, max(1, keep_last))
    return step_path


def _prune(output_dir: Path, keep_last: int) -> None:
    steps = sorted(list_step_checkpoints(output_dir), reverse=True)
    for _, path in steps[keep_last:]:
        path.unlink(missing_ok=True)


def list_step_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every step checkpoint in a run folder, unsorted."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _STEP_RE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return found


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint file a path names: the file itself, or a run folder's ``checkpoint_last.pth`` (else its
    newest ``checkpoint_<step>.pth``). Every command that takes a checkpoint resolves it here.

    Raises:
        CheckpointError: nothing exists there, or the folder holds no checkpoint.
    """
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        if (p / LAST_NAME).is_file():
            return p / LAST_NAME
        steps = sorted(list_step_checkpoints(p))
        if steps:
            return steps[-1][1]
        raise CheckpointError(f"run folder {p} holds no checkpoint ({LAST_NAME} or checkpoint_<step>.pth)")
    raise CheckpointError(f"checkpoint {p} does not exist: give a checkpoint file or the run folder that holds it")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint (``weights_only=True``).

    Args:
        path: a checkpoint file, or a run folder (its ``checkpoint_last.pth``).
        map_location: where tensors go.

    Raises:
        CheckpointError: naming the file, when it is missing, truncated, corrupt or lacks required keys.
    """
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError / UnpicklingError / EOFError / zip errors
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(err).__name__}: {err}); "
            "use an older checkpoint_<step>.pth from the same folder, or resume=auto to pick the newest good one"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a vitssl checkpoint dict")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: it was not written by the vitssl engine")
    return state


def find_resume_checkpoint(output_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``output_dir`` that loads, trying ``checkpoint_last.pth`` first.

    Corrupt files are skipped with a warning, so a run falls back to its previous good checkpoint.
    """
    output_dir = Path(output_dir)
    candidates = [output_dir / LAST_NAME] + [p for _, p in sorted(list_step_checkpoints(output_dir), reverse=True)]
    best: tuple[Path, dict[str, Any]] | None = None
    for path in candidates:
        if not path.is_file():
            continue
        try:
            state = load_checkpoint(path)
        except CheckpointError as err:
            _logger.warning("skipping unusable checkpoint: %s", err)
            continue
        if best is None or int(state["step"]) > int(best[1]["step"]):
            best = (path, state)
        if path.name == LAST_NAME:
            continue  # a step file could still be newer if the last link failed; keep looking once
        break
    return best
