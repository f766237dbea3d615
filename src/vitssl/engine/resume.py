"""Checkpoints of a training run and resuming from them: what a checkpoint holds besides the weights (step,
data position as a global sample count, every rank's generators, corrupt-sample counts, config), writing it
(one file, or shards under FSDP) and restoring a run from it, at the same or another world size.

A run in an ``output_dir`` that already holds checkpoints continues only with the settings it was started with,
apart from the keys of :data:`RESUMABLE_CHANGES`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

import vitssl
from vitssl import distributed as dist
from vitssl.config import ConfigError, to_container
from vitssl.engine.build import Run
from vitssl.engine.checkpoint import (
    CheckpointError,
    find_resume_checkpoint,
    list_step_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_sharded,
)

_logger = logging.getLogger(__name__)

# Keys that extend or place a run without changing what it computes: a run resumed with resume=auto may change
# them. Any other difference from the checkpoint's config is refused (it would silently reuse other weights).
RESUMABLE_CHANGES = (
    "train.epochs",
    "train.stop_after_steps",
    "train.log_every_steps",
    "train.log_grad_norm",
    "train.checkpoint_every_steps",
    "train.keep_last",
    "train.compile",
    "train.strategy",
    "train.activation_checkpointing",
    "data.num_workers",
    "data.augment_device",
    "eval.",
    "launch.",
    "device",
    "resume",
    "output_dir",
    "meta",
)


# Free-form mappings of the config: an entry added or removed there is a change (elsewhere a key on one side only
# comes from a version that had other fields, and is not compared).
_FREE_FORM = ("model.backbone_kwargs.", ".kwargs.")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(k if k.endswith(".") else k + ".") for k in RESUMABLE_CHANGES)


def config_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for settings that differ between a checkpoint's config and the current one.

    Keys of :data:`RESUMABLE_CHANGES` are not compared, nor keys that only one side has because another
    version wrote it; entries added to or removed from a free-form mapping (``backbone_kwargs``) are.
    """
    old, new = _flatten(stored), _flatten(current)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        if _may_change(key):
            continue
        if key in old and key in new:
            if old[key] != new[key]:
                changes.append(f"{key}: {old[key]!r} -> {new[key]!r}")
        elif any(part in f".{key}" for part in _FREE_FORM):
            before = repr(old[key]) if key in old else "(unset)"
            after = repr(new[key]) if key in new else "(unset)"
            changes.append(f"{key}: {before} -> {after}")
    return changes


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(state["python"]) if not isinstance(state["python"], tuple) else state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class Progress:
    """Where the run stands: what a checkpoint saves besides the weights, and the loop advances."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    skipped: int = 0  # corrupt samples this rank skipped
    skipped_by_rank: list[int] = field(default_factory=list)  # every rank's count, as of the last step
    last_checkpoint: str | None = None


def stream_position(cfg: DictConfig, run: Run, progress: Progress) -> dict[str, Any]:
    """How far each loader worker of a streamed epoch got, on every rank (it follows from the batches taken:
    the DataLoader takes them round-robin from the workers)."""
    batches = progress.step_in_epoch * cfg.train.accum_steps
    workers = max(1, cfg.data.num_workers)
    per_worker = [b * run.micro_batch for b in run.stream.worker_batches(batches, workers)]
    return {
        "epoch": progress.epoch,
        "num_workers": workers,
        "batches": batches,
        "samples_by_rank_and_worker": [per_worker] * run.world,
    }


def checkpoint_state(cfg: DictConfig, run: Run, progress: Progress, weights: bool = True) -> dict[str, Any]:
    """Everything a checkpoint holds; a collective (every rank's generators are gathered).

    Args:
        weights: include the whole ``model`` and ``optimizer`` state (single-file checkpoints); sharded ones
            write those through DCP instead.
    """
    rng = dist.all_gather_object(_rng_state())  # every rank's generators, for exact resume
    tensors = {"model": run.objective.state_dict(), "optimizer": run.optimizer.state_dict()} if weights else {}
    return {
        **tensors,
        "scaler": run.scaler.state_dict(),
        "step": progress.step,
        "epoch": progress.epoch,
        "step_in_epoch": progress.step_in_epoch,
        # the data position as a global sample count: any world size continues the same global batches
        "sampler": {
            "seed": cfg.seed,
            "world_size": run.world,
            "micro_batch": run.micro_batch,
            "samples_in_epoch": progress.step_in_epoch * cfg.train.batch_size,
        },
        "rng": rng,
        **({"data_stream": stream_position(cfg, run, progress)} if run.stream is not None else {}),
        "skipped_corrupt": sum(progress.skipped_by_rank),
        "skipped_corrupt_by_rank": list(progress.skipped_by_rank),
        "config": to_container(cfg),
        "vitssl_version": vitssl.__version__,
    }


def save(cfg: DictConfig, run: Run, progress: Progress) -> str:
    """Write a step checkpoint (a collective) and remember it in ``progress``; returns its path (rank 0's)."""
    out = Path(cfg.output_dir)
    if run.parallel.sharded_checkpoints:  # every rank writes its shards
        state = checkpoint_state(cfg, run, progress, weights=False)
        path = save_sharded(run.parallel.state_dicts(run.optimizer), state, out, cfg.train.keep_last)
        progress.last_checkpoint = str(path)
        return str(path)
    state = checkpoint_state(cfg, run, progress)
    written = None
    if run.rank == 0:
        written = str(save_checkpoint(state, out, keep_last=cfg.train.keep_last))
    dist.barrier()
    progress.last_checkpoint = written
    return written or ""


def _resume_state(cfg: DictConfig) -> tuple[str, dict[str, Any]] | None:
    """The checkpoint ``resume`` names and its non-tensor state, or None for a fresh start."""
    out = Path(cfg.output_dir)
    resume = cfg.resume
    if resume == "none":
        if list_step_checkpoints(out):
            raise ConfigError(
                f"output_dir {out} already holds checkpoints and resume=none would overwrite them; "
                "use resume=auto to continue that run, or another output_dir"
            )
        return None
    if resume == "auto":
        found = find_resume_checkpoint(out)
        if found is None:
            return None
        changes = config_changes(found[1].get("config", {}), to_container(cfg))
        if changes:
            raise ConfigError(
                f"output_dir {out} holds a run with other settings ({'; '.join(changes)}); resume=auto "
                "would continue it with its own weights. Train into another output_dir, or remove its "
                "checkpoints and use resume=none to start over"
            )
        return str(found[0]), found[1]
    return resume, load_checkpoint(resume, tensors=False)


def restore(cfg: DictConfig, run: Run, progress: Progress) -> None:
    """Load the checkpoint ``cfg.resume`` names (if any) into ``run`` and ``progress``.

    A sharded checkpoint loads at any world size (each rank reads the pieces of its own shards); a single-file
    one loads under either strategy. The data position is a global sample count, so a run saved on N ranks
    continues the same global batches on M ranks.

    Raises:
        CheckpointError: the checkpoint does not fit the configured model.
        ConfigError: ``resume=none`` over checkpoints, or ``resume=auto`` over a run with other settings.
    """
    found = _resume_state(cfg)
    if found is None:
        return
    path, state = found
    try:
        if state.get("sharded"):  # each rank reads the pieces of its own shards, at any world size
            run.parallel.load_sharded(path, run.optimizer)
        else:
            run.parallel.load_full(state["model"], state["optimizer"], run.optimizer)
    except (RuntimeError, ValueError, KeyError) as err:  # DCP's CheckpointException is a RuntimeError
        first = str(err).strip().splitlines()[0:2]
        raise CheckpointError(
            f"checkpoint {path} does not fit the configured model ({' '.join(first)}); it was written by another "
            "model.backbone/objective: use another output_dir, or resume=none in an empty one"
        ) from None
    for group in run.optimizer.param_groups:  # restore the flag the saved groups may lack
        group.setdefault("apply_wd", group.get("weight_decay", 0.0) > 0)
    if "scaler" in state:
        run.scaler.load_state_dict(state["scaler"])
    progress.step, progress.epoch = int(state["step"]), int(state["epoch"])
    progress.step_in_epoch = int(state.get("step_in_epoch", 0))
    sampler = state.get("sampler", {})
    if "samples_in_epoch" in sampler:
        progress.step_in_epoch = int(sampler["samples_in_epoch"]) // cfg.train.batch_size
    by_rank = state.get("skipped_corrupt_by_rank")
    if by_rank and len(by_rank) == run.world:
        progress.skipped_by_rank = [int(x) for x in by_rank]
        progress.skipped = progress.skipped_by_rank[run.rank]
    else:  # another world size, or an older checkpoint: the total carries on in rank 0's count
        progress.skipped = int(state.get("skipped_corrupt", 0)) if run.rank == 0 else 0
        progress.skipped_by_rank = [progress.skipped if r == 0 else 0 for r in range(run.world)]
    rngs = state.get("rng")
    same_layout = sampler.get("world_size") == run.world and sampler.get("micro_batch") == run.micro_batch
    if rngs and same_layout and len(rngs) == run.world:
        _set_rng_state(rngs[run.rank])
    elif progress.step_in_epoch:  # map-style data: ResumableSampler gives the same global batches at any world size
        _logger.warning("resuming with another world size or batch layout: model randomness (dropout, masks) "
                        "continues from other generators")  # fmt: skip
    saved_stream = state.get("data_stream")
    moved = saved_stream is not None and saved_stream.get("num_workers") != max(1, cfg.data.num_workers)
    if run.stream is not None and progress.step_in_epoch and moved:
        _logger.warning(
            "resuming a streamed epoch with data.num_workers=%d instead of %s: the loader workers read "
            "other shards, so the rest of this epoch differs from the interrupted run",
            cfg.data.num_workers, saved_stream.get("num_workers"),
        )  # fmt: skip
    if progress.step_in_epoch >= run.steps_per_epoch:  # saved exactly at an epoch end
        progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
    _logger.info("resumed from %s at step %d (epoch %d, step %d in epoch)", path, progress.step, progress.epoch,
                 progress.step_in_epoch)  # fmt: skip


__all__ = ["RESUMABLE_CHANGES", "Progress", "checkpoint_state", "config_changes", "restore", "save"]
