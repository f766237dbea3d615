"""One checkpoint format: atomic writes, keep-last-K, validated loads, fallback to the last good file.

Layout of a run folder::

    checkpoint_00001200.pth   step checkpoints (the newest ``keep_last`` are kept)
    checkpoint_last.pth       the newest checkpoint (a hard link to the newest step file, or a copy)
    checkpoint_00001200.dcp/  a sharded step checkpoint (``train.strategy=fsdp``; ``vitssl.engine.sharded``), kept
                              and pruned with the step files; the newest step of either kind is resumed

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

from vitssl import distributed as dist
from vitssl.engine.sharded import (
    is_sharded_checkpoint,
    load_sharded_full,
    optimizer_by_slot,
    read_trainer_state,
    remove_checkpoint,
    save_sharded_checkpoint,
)
from vitssl.errors import UserError
from vitssl.io import atomic_open, atomic_path

_logger = logging.getLogger(__name__)

LAST_NAME = "checkpoint_last.pth"
REQUIRED_KEYS = ("model", "optimizer", "step", "epoch", "config")
_STEP_RE = re.compile(r"^checkpoint_(\d+)\.(?:pth|dcp)$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not a vitssl checkpoint.

    Attributes:
        reason: for a checkpoint that cannot be loaded, the short reason the message gives (None otherwise), so a
            caller that words the fix differently (evaluation: another file, not ``resume=auto``) keeps it.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


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


def save_sharded(
    app_state: dict[str, Any], trainer_state: dict[str, Any], output_dir: str | Path, keep_last: int = 2
) -> Path:
    """The sharded twin of :func:`save_checkpoint`, a collective: every rank writes its shards of ``app_state``.

    Args:
        app_state: ``{"model": ..., "optimizer": ...}`` by parameter name (``vitssl.engine.parallel``).
        trainer_state: the rest; must hold ``step``, ``epoch``, ``config``.
        output_dir: the run folder.
        keep_last: step checkpoints kept, of either kind; at least 1.

    Returns:
        The checkpoint folder ``checkpoint_<step>.dcp``.
    """
    missing = [k for k in REQUIRED_KEYS if k not in trainer_state and k not in app_state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    path = save_sharded_checkpoint(app_state, trainer_state, output_dir)
    if dist.get_rank() == 0:
        _prune(Path(output_dir), max(1, keep_last))
    dist.barrier()
    return path


def _prune(output_dir: Path, keep_last: int) -> None:
    steps = sorted(list_step_checkpoints(output_dir), reverse=True)
    for _, path in steps[keep_last:]:
        remove_checkpoint(path)


def list_step_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every step checkpoint in a run folder (files and complete sharded folders), unsorted."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _STEP_RE.match(path.name)
        if match and (path.is_file() or is_sharded_checkpoint(path)):
            found.append((int(match.group(1)), path))
    return found


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint file a path names: the file itself, or a run folder's ``checkpoint_last.pth`` (else its
    newest ``checkpoint_<step>.pth`` or sharded ``checkpoint_<step>.dcp``). Every command that takes a checkpoint
    resolves it here.

    Raises:
        CheckpointError: nothing exists there, or the folder holds no checkpoint.
    """
    p = Path(path)
    if p.is_file() or is_sharded_checkpoint(p):
        return p
    if p.is_dir():
        if (p / LAST_NAME).is_file():
            return p / LAST_NAME
        steps = sorted(list_step_checkpoints(p))
        if steps:
            return steps[-1][1]
        raise CheckpointError(
            f"run folder {p} holds no checkpoint ({LAST_NAME}, checkpoint_<step>.pth or checkpoint_<step>.dcp)"
        )
    raise CheckpointError(f"checkpoint {p} does not exist: give a checkpoint file or the run folder that holds it")


def why_unloadable(path: str | Path, err: BaseException) -> str:
    """A short reason ``torch.load(path, weights_only=True)`` failed with ``err``, for a one-line error.

    torch's own message for a file that is not a checkpoint at all is a paragraph about ``weights_only`` (whose
    advice, loading with ``weights_only=False``, would run arbitrary code from the file); the first bytes say more.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(max(0, f.seek(0, os.SEEK_END) - (1 << 16) - 22))
            tail = f.read()  # a whole zip ends with its end-of-central-directory record in the last 64 KiB + 22
    except OSError as os_err:
        return f"cannot read it: {os_err.strerror or os_err}"
    if not head:
        return "the file is empty"
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":
        return "not a PyTorch file: it starts like neither a zip archive nor a pickle"
    if head[:4] == b"PK\x03\x04" and b"PK\x05\x06" not in tail:
        return "its zip archive is cut short: the file was not written to the end"
    text = str(err)
    if "Weights only load failed" in text:
        return "it holds Python objects other than tensors and plain containers, so it was not written by vitssl"
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first[:200]}" if first else type(err).__name__


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", tensors: bool = True) -> dict[str, Any]:
    """Load and validate a checkpoint (``weights_only=True``): a file, or a sharded checkpoint folder.

    A sharded folder loads as a whole in this process: ``model`` holds whole tensors, ``optimizer`` the state by
    parameter name (``"state": {name: ...}``), and ``sharded`` is True.

    Args:
        path: a checkpoint file, a sharded folder, or a run folder (its ``checkpoint_last.pth``).
        map_location: where tensors go.
        tensors: False reads a sharded folder's ``trainer.pt`` only (no ``model`` / ``optimizer``): what resuming
            needs before the ranks read their own shards.

    Raises:
        CheckpointError: naming the file, when it is missing, truncated, corrupt or lacks required keys.
    """
    path = resolve_checkpoint(path)
    if path.is_dir():  # resolve_checkpoint returns folders only when they are complete sharded checkpoints
        return _load_sharded(path, map_location, tensors)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError / UnpicklingError / EOFError / zip errors
        why = why_unloadable(path, err)
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({why}); "
            "use an older checkpoint_<step>.pth from the same folder, or resume=auto to pick the newest good one",
            reason=why,
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a vitssl checkpoint dict")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: it was not written by the vitssl engine")
    return state


def _load_sharded(path: Path, map_location: str | torch.device, tensors: bool) -> dict[str, Any]:
    try:
        state = read_trainer_state(path)
        if tensors:
            state.update(load_sharded_full(path))
    except Exception as err:  # torch / DCP raise RuntimeError, CheckpointException, UnpicklingError, OSError
        why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise CheckpointError(
            f"sharded checkpoint {path} is truncated or corrupt ({why}); "
            "use an older checkpoint_<step> from the same folder, or resume=auto to pick the newest good one",
            reason=why,
        ) from None
    required = REQUIRED_KEYS if tensors else tuple(k for k in REQUIRED_KEYS if k not in ("model", "optimizer"))
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"sharded checkpoint {path} lacks {missing}: it was not written by the vitssl engine")
    if tensors and str(map_location) != "cpu":
        state["model"] = {k: v.to(map_location) for k, v in state["model"].items()}
    return state


def find_resume_checkpoint(output_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``output_dir`` that loads, trying ``checkpoint_last.pth`` first.

    Corrupt files are skipped with a warning, so a run falls back to its previous good checkpoint. A sharded
    checkpoint comes back without its tensors (``sharded`` True): each rank reads its own shards from the path.
    """
    output_dir = Path(output_dir)
    candidates = [output_dir / LAST_NAME] + [p for _, p in sorted(list_step_checkpoints(output_dir), reverse=True)]
    best: tuple[Path, dict[str, Any]] | None = None
    for path in candidates:
        if not path.exists():
            continue
        try:
            state = load_checkpoint(path, tensors=False)
        except CheckpointError as err:
            _logger.warning("skipping unusable checkpoint: %s", err)
            continue
        if best is None or int(state["step"]) > int(best[1]["step"]):
            best = (path, state)
        if path.name == LAST_NAME:
            continue  # a step file could still be newer if the last link failed; keep looking once
        break
    return best


def consolidate_checkpoint(path: str | Path, out: str | Path) -> Path:
    """Write a sharded checkpoint as one single-file checkpoint (whole tensors, optimizer by slot), atomically.

    The file is an ordinary engine checkpoint: ``resume=FILE`` continues the run from it on any number of ranks
    with either strategy, and everything that reads checkpoints (evaluation, export) takes it.

    Args:
        path: a sharded checkpoint folder (``checkpoint_<step>.dcp``).
        out: the file to write (``.pth``).

    Raises:
        CheckpointError: ``path`` is not a readable sharded checkpoint.
    """
    path, out = Path(path), Path(out)
    if not is_sharded_checkpoint(path):
        raise CheckpointError(
            f"{path} is not a sharded checkpoint folder (checkpoint_<step>.dcp with trainer.pt and .metadata); "
            "a single-file checkpoint needs no consolidation"
        )
    state = load_checkpoint(path)
    state["optimizer"] = optimizer_by_slot(state["optimizer"])
    for key in ("sharded", "world_size"):
        state.pop(key, None)
    with atomic_open(out, "wb") as f:
        torch.save(state, f)
    return out
