"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP): every rank writes its own shards.

A sharded checkpoint is a folder next to the single-file ones, in the same run folder::

    checkpoint_00001200.dcp/
        __0_0.distcp, __1_0.distcp, ...   the model and optimizer tensors, one file per rank that wrote them
        .metadata                         DCP's index: every tensor's global shape and where its pieces are
        trainer.pt                        the rest of the state (step, epoch, data position, RNG, config), rank 0

The model and optimizer state are keyed by parameter name (DCP's ``get_state_dict`` form), not by optimizer
slot, and each tensor is stored with its global shape. Loading therefore reshards: a run saved on 2 ranks loads
on 1 rank (whole tensors), on 2 or on 4 (other shards). The folder is written under a hidden temporary name and
renamed once every rank has written and rank 0 has added ``trainer.pt``, so a crash never leaves a half-written
checkpoint under a real name.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from vitssl import distributed as dist
from vitssl.io import atomic_open

_logger = logging.getLogger(__name__)

SHARDED_SUFFIX = ".dcp"
TRAINER_FILE = "trainer.pt"  # the non-tensor state, written by rank 0
# what the DCP part of a checkpoint holds: the objective's and the optimizer's state, by parameter name
APP_KEYS = ("model", "optimizer")


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every save and load without a process group; one process is a layout it supports."""
    with warnings.catch_warnings():
        if not dist.is_distributed():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def sharded_checkpoint_path(output_dir: str | Path, step: int) -> Path:
    """``<output_dir>/checkpoint_<step>.dcp``."""
    return Path(output_dir) / f"checkpoint_{step:08d}{SHARDED_SUFFIX}"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a sharded checkpoint folder (it holds ``trainer.pt`` and DCP's ``.metadata``)."""
    path = Path(path)
    return path.is_dir() and (path / TRAINER_FILE).is_file() and (path / ".metadata").is_file()


def save_sharded_checkpoint(app_state: dict[str, Any], trainer_state: dict[str, Any], output_dir: str | Path) -> Path:
    """Write one sharded checkpoint; a collective: every rank calls it with its own shards.

    Args:
        app_state: ``{"model": ..., "optimizer": ...}`` from ``get_state_dict`` (DTensor shards under FSDP).
        trainer_state: everything else (``step``, ``epoch``, ``config``, ...); only rank 0's copy is written.
        output_dir: the run folder.

    Returns:
        The checkpoint folder (the same path on every rank).
    """
    output_dir = Path(output_dir)
    final = sharded_checkpoint_path(output_dir, int(trainer_state["step"]))
    partial = output_dir / f".{final.name}.partial"
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run that died while saving
        partial.mkdir(parents=True)
    dist.barrier()
    with _quiet_single_process():
        dcp.save(app_state, checkpoint_id=partial)
    if dist.get_rank() == 0:
        with atomic_open(partial / TRAINER_FILE, "wb") as f:
            torch.save({**trainer_state, "sharded": True, "world_size": dist.get_world_size()}, f)
        if final.exists():  # the same step saved again (a stop right after a periodic checkpoint)
            stale = output_dir / f".{final.name}.stale"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(partial, final)
    dist.barrier()
    return final


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The non-tensor part (``trainer.pt``) of a sharded checkpoint, without loading any shard.

    Raises:
        OSError / RuntimeError: the file is unreadable (the caller turns it into a CheckpointError).
    """
    return torch.load(Path(path) / TRAINER_FILE, map_location="cpu", weights_only=True)


def load_sharded_into(path: str | Path, app_state: dict[str, Any]) -> None:
    """Fill ``app_state`` (``get_state_dict`` output: shards or whole tensors) from a checkpoint, in place.

    A collective under a process group (every rank reads the pieces of its own shards); in a single process it
    reads whole tensors. The layout the checkpoint was saved with does not matter: DCP reshards.

    Args:
        path: the checkpoint folder.
        app_state: the state to fill, keyed like :data:`APP_KEYS`.
    """
    with _quiet_single_process():
        dcp.load(app_state, checkpoint_id=Path(path))


def load_sharded_full(path: str | Path, keys: tuple[str, ...] = APP_KEYS) -> dict[str, Any]:
    """Every tensor of a sharded checkpoint as a whole tensor on the CPU, in this process only (no collective).

    For evaluation and export, which need the whole model in one process: ``{"model": {name: tensor},
    "optimizer": {"state": {name: {...}}, "param_groups": [...]}}``.

    Args:
        path: the checkpoint folder.
        keys: the top-level entries to read.
    """
    # DCP's own offline conversion (format_utils.dcp_to_torch_save) reads a checkpoint this way: the empty planner
    # builds the state from the metadata instead of from a model.
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(
        state,
        storage_reader=dcp.FileSystemReader(str(path)),
        planner=_EmptyStateDictLoadPlanner(keys=set(keys)),
        no_dist=True,
    )
    return state


def optimizer_by_slot(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (DCP's form) in ``torch.optim.Optimizer.state_dict()``'s form.

    The optimizer numbers its parameters in group order, so the names listed in ``param_groups`` give the slots:
    the result loads with ``optimizer.load_state_dict`` into an optimizer built as the saved one was.

    Args:
        state: ``{"state": {name: {...}}, "param_groups": [{..., "params": [name, ...]}]}``.
    """
    slots: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        ids = [slots.setdefault(name, len(slots)) for name in group["params"]]
        groups.append({**group, "params": ids})
    return {"state": {slots[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def remove_checkpoint(path: Path) -> None:
    """Delete a step checkpoint, a file or a sharded folder."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


__all__ = [
    "APP_KEYS",
    "SHARDED_SUFFIX",
    "is_sharded_checkpoint",
    "load_sharded_full",
    "load_sharded_into",
    "optimizer_by_slot",
    "read_trainer_state",
    "remove_checkpoint",
    "save_sharded_checkpoint",
    "sharded_checkpoint_path",
]
