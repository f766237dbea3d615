"""The one training loop. It knows the objective contract and nothing about any particular objective."""

from __future__ import annotations

import logging
import math
import random
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Sampler

import vitssl
from vitssl import distributed as dist
from vitssl.config import ConfigError, save_config, to_container
from vitssl.engine.checkpoint import (
    CheckpointError,
    find_resume_checkpoint,
    list_step_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_sharded,
)
from vitssl.engine.logger import MetricLogger, run_log
from vitssl.engine.optim import build_optimizer, cosine_schedule, peak_lr
from vitssl.engine.parallel import parallelize
from vitssl.engine.telemetry import Telemetry, forward_flops, peak_flops
from vitssl.errors import UserError

_logger = logging.getLogger(__name__)

_STOP = threading.Event()


def request_stop() -> None:
    """Ask the running loop to stop at the next step boundary, checkpoint, and return ``status="stopped"``.

    Safe to call from a signal handler; under DDP the ranks agree on the step through an all-reduce.
    """
    _STOP.set()


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or infinite; the run stops and its last good checkpoint stays."""


@dataclass
class TrainResult:
    status: str  # "finished" | "stopped"
    step: int  # optimizer steps completed
    epoch: int  # epoch the run stopped in (== epochs when finished)
    output_dir: str
    checkpoint_path: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # last logged metrics
    stop_requested: bool = False  # stopped by request_stop() on some rank (a preemption), not stop_after_steps


class Callback:
    """Extension point of the engine: code from higher floors (e.g. evaluation) runs inside the loop.

    The engine calls the hooks on every rank; a callback that works on one rank only checks the rank itself.
    """

    def on_train_start(self, objective: torch.nn.Module, device: torch.device) -> None:
        """Called once, after the objective is built and resumed, before the first step."""

    def on_epoch_end(self, epoch: int, step: int) -> dict[str, float]:
        """Called after each epoch's last step; returns metrics to log (empty: nothing)."""
        return {}


class ResumableSampler(Sampler[int]):
    """Shuffled, rank-sharded indices from ``(seed, epoch)``, restartable at a position inside the epoch.

    All ranks draw the same permutation and rank ``r`` takes every ``world``-th index, so the union of the
    ranks' first ``b`` indices is the permutation's first ``world * b``: a 2-rank run sees exactly the
    global batches a 1-rank run sees.

    Args:
        num_samples: dataset length.
        world_size: number of ranks.
        rank: this rank.
        seed: base seed of the permutation.
        shuffle: False keeps dataset order.
    """

    def __init__(self, num_samples: int, world_size: int, rank: int, seed: int, shuffle: bool = True) -> None:
        self.num_samples, self.world_size, self.rank = num_samples, world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.per_rank = num_samples // world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` indices of this rank's list (resuming mid-epoch)."""
        self.start = start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        mine = order[: self.per_rank * self.world_size][self.rank :: self.world_size]
        return iter(mine[self.start :].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _worker_error(err: UserError) -> UserError:
    """A user error a DataLoader worker raised, as the one line of its own message (the loader re-raises it with
    the worker's traceback as its message)."""
    text = str(err).strip()
    if "Original Traceback" not in text:
        return err
    last = [line for line in text.splitlines() if line.strip()][-1]
    message = last.split(": ", 1)[1].strip() if ": " in last else last.strip()
    try:
        return type(err)(message)
    except TypeError:  # an error class with another constructor: keep it as it came
        return err


def _worker_context(num_workers: int) -> str | None:
    """``fork`` for DataLoader workers where the platform has it (what torchrun and SLURM ranks get by default)."""
    import multiprocessing

    return "fork" if num_workers > 0 and "fork" in multiprocessing.get_all_start_methods() else None


def _git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(vitssl.__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Keys that extend or place a run without changing what it computes: a run resumed with resume=auto may change
# them. Any other difference from the checkpoint's config is refused (it would silently reuse other weights).
RESUMABLE_CHANGES = (
    "train.epochs",
    "train.stop_after_steps",
    "train.log_every_steps",
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


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def build_objective(cfg: DictConfig) -> torch.nn.Module:
    """Build the configured objective, giving it a factory for fresh backbones."""
    from vitssl.backbones import create_backbone
    from vitssl.registry import OBJECTIVES

    def backbone_factory(**overrides: Any) -> torch.nn.Module:
        # plain containers: list options (PVT v2 embed_dims, Swin depths) must not reach timm as ListConfig
        kwargs = {"img_size": cfg.data.img_size, **to_container(cfg.model.backbone_kwargs), **overrides}
        return create_backbone(cfg.model.backbone, **kwargs)

    return OBJECTIVES.get(cfg.objective.name)(cfg.objective, backbone_factory)


def load_objective(
    path: str | Path, device: torch.device | str = "cpu", check: Callable[[DictConfig], None] | None = None
) -> tuple[Any, DictConfig, dict[str, Any]]:
    """Rebuild a checkpoint's objective from the config stored in it, weights loaded, in eval mode.

    Args:
        path: an engine checkpoint (any objective).
        device: where the objective goes.
        check: called with the checkpoint's config before anything is built (e.g. to refuse other objectives
            with a message of the caller's own).

    Returns:
        ``(objective, cfg, state)``: the objective, the run's validated config and the checkpoint dict.

    Raises:
        CheckpointError: the file is missing, truncated or not a vitssl checkpoint.
    """
    from vitssl.config import from_container

    state = load_checkpoint(path)
    cfg = from_container(state["config"])
    if check is not None:
        check(cfg)
    objective = build_objective(cfg)
    objective.load_state_dict(state["model"])
    return objective.to(device).eval(), cfg, state


class _Trainer:
    def __init__(self, cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> None:
        from vitssl.data import TransformedDataset, build_dataset_config, collate_skip_none, is_stream
        from vitssl.data.transforms import resolve_augment_device

        self.cfg = cfg
        dist.init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = dist.resolve_device(cfg.device)
        self.out = Path(cfg.output_dir)
        tcfg = cfg.train

        micro, rest = divmod(tcfg.batch_size, self.world * tcfg.accum_steps)
        if rest or micro == 0:
            raise ConfigError(
                f"train.batch_size={tcfg.batch_size} must be a positive multiple of "
                f"world_size × train.accum_steps = {self.world} × {tcfg.accum_steps}"
            )
        self.micro_batch = micro
        self.callbacks = list(callbacks)

        # Model init is identical on every rank (DDP would broadcast rank 0's weights anyway).
        _seed_all(cfg.seed)
        self.objective = build_objective(cfg).to(self.device)
        if tcfg.accum_steps > 1 and not getattr(self.objective, "supports_accumulation", True):
            raise ConfigError(
                f"train.accum_steps={tcfg.accum_steps}: objective {cfg.objective.name} contrasts each sample with "
                "the rest of its batch, so accumulating would shrink its negatives to batch/accum_steps; reach "
                "the batch with more processes (launch.*) or lower train.batch_size, and set train.accum_steps=1"
            )
        self.objective.setup(cfg)  # run-level preparation (e.g. iGPT's palette), before any data is read
        # activation checkpointing, then DDP or FSDP (which shards the parameters: before the optimizer sees them)
        self.parallel = parallelize(self.objective, tcfg.strategy, tcfg.activation_checkpointing, self.device,
                                    tcfg.fsdp_param_dtype, _autocast_dtype(cfg.precision, self.device))  # fmt: skip
        _seed_all(cfg.seed + 1000 * self.rank)  # per-rank randomness (masks, dropout) from here on

        base = build_dataset_config(cfg.data.train, "data.train")
        # data.augment_device=auto: on the device when training on CUDA (the saved config says which it was)
        cfg.data.augment_device = resolve_augment_device(cfg.data.augment_device, self.device)
        sample_fn = self.objective.train_sample_fn(cfg.data)
        # Streamed shards (an IterableDataset) order and split the data themselves: the engine tells them the
        # epoch, the batches it takes and where it resumes; map-style sets go through ResumableSampler.
        self.stream = base if is_stream(base) else None
        self.sampler: ResumableSampler | None = None
        if self.stream is not None:
            self.stream.bind(sample_fn, cfg.seed, self.rank, self.world, cfg.data.skip_corrupt)
            self.stream.check_slots(cfg.data.num_workers)
            self.dataset = self.stream
            self.steps_per_epoch = len(self.stream) // tcfg.batch_size
        else:
            self.dataset = TransformedDataset(base, sample_fn, seed=cfg.seed, skip_corrupt=cfg.data.skip_corrupt)
            self.sampler = ResumableSampler(len(self.dataset), self.world, self.rank, cfg.seed)
            self.steps_per_epoch = self.sampler.per_rank // (micro * tcfg.accum_steps)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"data.train ({cfg.data.train.name}) has {len(self.dataset)} samples, fewer than one global "
                f"batch (train.batch_size={tcfg.batch_size}); lower train.batch_size"
            )
        self.loader = DataLoader(
            self.dataset,
            batch_size=micro,
            sampler=self.sampler,
            num_workers=cfg.data.num_workers,
            collate_fn=collate_skip_none,
            pin_memory=self.device.type == "cuda",
            drop_last=self.stream is None,  # a stream gives whole batches of items (None for skipped ones)
            # A private generator: building an iterator must not consume the global RNG (exact resume).
            generator=torch.Generator().manual_seed(cfg.seed),
            persistent_workers=False,
            # Loader workers start again each epoch: forked, they start at once; spawned (the default inside ranks
            # that `vitssl` itself spawned) each one imports torch first.
            multiprocessing_context=_worker_context(cfg.data.num_workers),
        )
        self.total_steps = tcfg.epochs * self.steps_per_epoch
        if self.rank == 0:
            _logger.info(
                "training on %s (%d samples): %d epochs x %d steps of %d images on %d process(es)",
                cfg.data.train.name, len(self.dataset), tcfg.epochs, self.steps_per_epoch, tcfg.batch_size, self.world,
            )  # fmt: skip
        warmup = cfg.optim.warmup_steps
        if warmup is None:
            warmup = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        self.lr_schedule = cosine_schedule(
            peak_lr(cfg.optim, tcfg.batch_size), cfg.optim.min_lr, self.total_steps, warmup
        )
        wd_end = cfg.optim.weight_decay if cfg.optim.weight_decay_end is None else cfg.optim.weight_decay_end
        self.wd_schedule = cosine_schedule(cfg.optim.weight_decay, wd_end, self.total_steps)

        if cfg.optim.weight_decay_filter:
            groups = self.objective.param_groups(cfg.optim.weight_decay)
        else:
            trainable = [p for p in self.objective.parameters() if p.requires_grad]
            groups = [{"params": trainable, "weight_decay": cfg.optim.weight_decay}]
        self.optimizer = build_optimizer(groups, cfg.optim)
        for group in self.optimizer.param_groups:
            group["apply_wd"] = group.get("weight_decay", 0.0) > 0
        self.amp_dtype = _autocast_dtype(cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        self.model: torch.nn.Module = self.parallel.model
        self.forward = torch.compile(self.model) if tcfg.compile else self.model

        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.skipped = 0  # corrupt samples this rank skipped
        self.skipped_by_rank = [0] * self.world  # every rank's count, as of the last step
        self.last_checkpoint: str | None = None

    # ----------------------------------------------------------------------------------------- state
    def _state(self, weights: bool = True) -> dict[str, Any]:
        rng = dist.all_gather_object(_rng_state())  # every rank's generators, for exact resume
        tensors = {"model": self.objective.state_dict(), "optimizer": self.optimizer.state_dict()} if weights else {}
        return {
            **tensors,
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            # the data position as a global sample count: any world size continues the same global batches
            "sampler": {
                "seed": self.cfg.seed,
                "world_size": self.world,
                "micro_batch": self.micro_batch,
                "samples_in_epoch": self.step_in_epoch * self.cfg.train.batch_size,
            },
            "rng": rng,
            **({"data_stream": self._stream_position()} if self.stream is not None else {}),
            "skipped_corrupt": sum(self.skipped_by_rank),
            "skipped_corrupt_by_rank": list(self.skipped_by_rank),
            "config": to_container(self.cfg),
            "vitssl_version": vitssl.__version__,
        }

    def save(self) -> str:
        if self.parallel.sharded_checkpoints:  # every rank writes its shards
            state = self._state(weights=False)
            path = save_sharded(self.parallel.state_dicts(self.optimizer), state, self.out, self.cfg.train.keep_last)
            self.last_checkpoint = str(path)
            return str(path)
        state = self._state()
        path = None
        if self.rank == 0:
            path = str(save_checkpoint(state, self.out, keep_last=self.cfg.train.keep_last))
        dist.barrier()
        self.last_checkpoint = path
        return path or ""

    def _resume_state(self) -> tuple[str, dict[str, Any]] | None:
        resume = self.cfg.resume
        if resume == "none":
            if list_step_checkpoints(self.out):
                raise ConfigError(
                    f"output_dir {self.out} already holds checkpoints and resume=none would overwrite them; "
                    "use resume=auto to continue that run, or another output_dir"
                )
            return None
        if resume == "auto":
            found = find_resume_checkpoint(self.out)
            if found is None:
                return None
            changes = config_changes(found[1].get("config", {}), to_container(self.cfg))
            if changes:
                raise ConfigError(
                    f"output_dir {self.out} holds a run with other settings ({'; '.join(changes)}); resume=auto "
                    "would continue it with its own weights. Train into another output_dir, or remove its "
                    "checkpoints and use resume=none to start over"
                )
            return str(found[0]), found[1]
        return resume, load_checkpoint(resume, tensors=False)

    def restore(self) -> None:
        found = self._resume_state()
        if found is None:
            return
        path, state = found
        try:
            if state.get("sharded"):  # each rank reads the pieces of its own shards, at any world size
                self.parallel.load_sharded(path, self.optimizer)
            else:
                self.parallel.load_full(state["model"], state["optimizer"], self.optimizer)
        except (RuntimeError, ValueError, KeyError) as err:  # DCP's CheckpointException is a RuntimeError
            first = str(err).strip().splitlines()[0:2]
            raise CheckpointError(
                f"checkpoint {path} does not fit the configured model ({' '.join(first)}); it was written by another "
                "model.backbone/objective: use another output_dir, or resume=none in an empty one"
            ) from None
        for group in self.optimizer.param_groups:  # restore the flag the saved groups may lack
            group.setdefault("apply_wd", group.get("weight_decay", 0.0) > 0)
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.step_in_epoch = int(state.get("step_in_epoch", 0))
        sampler = state.get("sampler", {})
        if "samples_in_epoch" in sampler:
            self.step_in_epoch = int(sampler["samples_in_epoch"]) // self.cfg.train.batch_size
        by_rank = state.get("skipped_corrupt_by_rank")
        if by_rank and len(by_rank) == self.world:
            self.skipped_by_rank = [int(x) for x in by_rank]
            self.skipped = self.skipped_by_rank[self.rank]
        else:  # another world size, or an older checkpoint: the total carries on in rank 0's count
            self.skipped = int(state.get("skipped_corrupt", 0)) if self.rank == 0 else 0
            self.skipped_by_rank = [self.skipped if r == 0 else 0 for r in range(self.world)]
        rngs = state.get("rng")
        same_layout = sampler.get("world_size") == self.world and sampler.get("micro_batch") == self.micro_batch
        if rngs and same_layout and len(rngs) == self.world:
            _set_rng_state(rngs[self.rank])
        elif self.step_in_epoch:  # map-style data: ResumableSampler gives the same global batches at any world size
            _logger.warning("resuming with another world size or batch layout: model randomness (dropout, masks) "
                            "continues from other generators")  # fmt: skip
        saved_stream = state.get("data_stream")
        moved = saved_stream is not None and saved_stream.get("num_workers") != max(1, self.cfg.data.num_workers)
        if self.stream is not None and self.step_in_epoch and moved:
            _logger.warning(
                "resuming a streamed epoch with data.num_workers=%d instead of %s: the loader workers read "
                "other shards, so the rest of this epoch differs from the interrupted run",
                self.cfg.data.num_workers, saved_stream.get("num_workers"),
            )  # fmt: skip
        if self.step_in_epoch >= self.steps_per_epoch:  # saved exactly at an epoch end
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        _logger.info("resumed from %s at step %d (epoch %d, step %d in epoch)", path, self.step, self.epoch,
                     self.step_in_epoch)  # fmt: skip

    def _stream_position(self) -> dict[str, Any]:
        """How far each loader worker of a streamed epoch got, on every rank (it follows from the batches taken:
        the DataLoader takes them round-robin from the workers)."""
        batches = self.step_in_epoch * self.cfg.train.accum_steps
        workers = max(1, self.cfg.data.num_workers)
        per_worker = [b * self.micro_batch for b in self.stream.worker_batches(batches, workers)]  # type: ignore[union-attr]
        return {
            "epoch": self.epoch,
            "num_workers": workers,
            "batches": batches,
            "samples_by_rank_and_worker": [per_worker] * self.world,
        }

    def _start_epoch(self) -> None:
        """Point the data at the current epoch, after the batches of it that were consumed already."""
        accum = self.cfg.train.accum_steps
        if self.stream is not None:
            self.stream.set_epoch(
                self.epoch, self.micro_batch, self.steps_per_epoch * accum, start_batch=self.step_in_epoch * accum
            )
            return
        assert self.sampler is not None  # map-style data
        self.sampler.set_epoch(self.epoch)
        self.dataset.set_epoch(self.epoch)
        self.sampler.set_start(self.step_in_epoch * self.micro_batch * accum)

    # ------------------------------------------------------------------------------------------ loop
    def _write_run_files(self) -> None:
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.cfg.meta = {
            "git_sha": _git_sha(),
            "vitssl_version": vitssl.__version__,
            "torch_version": str(torch.__version__),
            "world_size": self.world,
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        save_config(self.cfg, self.out / "config.yaml")

    def _set_schedules(self) -> float:
        lr = float(self.lr_schedule[self.step])
        wd = float(self.wd_schedule[self.step])
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            if group["apply_wd"]:
                group["weight_decay"] = wd
        return lr

    def _train_step(self, batches: Iterator[Any]) -> dict[str, float]:
        accum = self.cfg.train.accum_steps
        sums: dict[str, float] = {}
        nonfinite = 0.0
        for micro_step in range(accum):
            try:
                with self.telemetry.waiting():
                    batch, skipped = next(batches)
                    batch = _to_device(batch, self.device)
            except UserError as err:  # raised in a loader worker: keep the one line that names the sample
                raise _worker_error(err) from None
            self.skipped += skipped
            if batch is None:
                continue  # the whole micro-batch was corrupt and skipped
            last = micro_step == accum - 1
            # DDP all-reduces gradients in backward; micro-steps before the last skip it. The one no_sync()
            # context must hold forward AND backward (a context manager cannot be entered twice).
            sync = self.parallel.no_sync(last)
            autocast = torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
            with sync:
                with autocast:
                    out = self.forward(batch)
                loss = out["loss"]
                if not torch.isfinite(loss.detach()):
                    nonfinite = 1.0
                self.scaler.scale(loss / accum).backward()
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach()) / accum
        # One collective per step: global mean of logged scalars, non-finite and stop flags.
        keys = sorted(sums)
        skipped_slot = [float(self.skipped) if r == self.rank else 0.0 for r in range(self.world)]
        packed = torch.tensor(
            [sums[k] for k in keys] + skipped_slot + [nonfinite, float(_STOP.is_set())], dtype=torch.float64
        )
        packed = dist.all_reduce_sum(packed)
        metrics = {k: float(packed[i]) / self.world for i, k in enumerate(keys)}
        self.skipped_by_rank = [int(packed[len(keys) + r]) for r in range(self.world)]
        if packed[-2] > 0:
            raise NonFiniteLossError(
                f"loss is {sums.get('loss', math.nan)} (non-finite) at step {self.step + 1} "
                f"(epoch {self.epoch}); the run stopped and its last good checkpoint "
                f"({self.last_checkpoint or 'none yet'}) is kept. Lower optim.lr, set optim.clip_grad, "
                "or use precision=fp32"
            )
        if self.cfg.optim.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            metrics["grad_norm"] = self.parallel.clip_grad_norm(params, self.cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        metrics["_stop_requested"] = float(packed[-1] > 0)
        return metrics

    def run(self) -> TrainResult:
        self.restore()
        self._write_run_files()
        tcfg = self.cfg.train
        logger = MetricLogger(self.out, self.total_steps, self.step, enabled=self.rank == 0)
        last_metrics: dict[str, Any] = {}
        status = "finished"
        stop_requested = False
        for callback in self.callbacks:
            callback.on_train_start(self.objective, self.device)
        self.telemetry = self._telemetry()
        try:
            while self.epoch < tcfg.epochs and status == "finished":
                self._start_epoch()
                self.objective.train()
                batches = iter(self.loader)
                while self.step_in_epoch < self.steps_per_epoch:
                    lr = self._set_schedules()
                    metrics = self._train_step(batches)
                    self.step += 1
                    self.step_in_epoch += 1
                    self.objective.on_step_end(self.step, self.total_steps)
                    stop_requested = metrics.pop("_stop_requested") > 0
                    stop = stop_requested or (tcfg.stop_after_steps is not None and self.step >= tcfg.stop_after_steps)
                    epoch_end = self.step_in_epoch == self.steps_per_epoch
                    if self.step % tcfg.log_every_steps == 0 or epoch_end or stop:
                        last_metrics = {"epoch": self.epoch, "lr": lr, **metrics, **self.telemetry.interval(self.step)}
                        if any(self.skipped_by_rank):  # data.skip_corrupt: counted on every rank
                            last_metrics["skipped_corrupt"] = sum(self.skipped_by_rank)
                            if self.world > 1:
                                for r, n in enumerate(self.skipped_by_rank):
                                    last_metrics[f"skipped_corrupt_rank{r}"] = n
                        logger.log(self.step, last_metrics)
                    if epoch_end:
                        extra: dict[str, float] = {}
                        for callback in self.callbacks:
                            extra.update(callback.on_epoch_end(self.epoch, self.step))
                        if extra:
                            last_metrics.update(extra)
                            logger.log(self.step, {"epoch": self.epoch, **extra})
                    if stop or epoch_end or self.step % tcfg.checkpoint_every_steps == 0:
                        self.save()
                    if stop:
                        status = "stopped"
                        break
                if status == "finished":
                    self.epoch += 1
                    self.step_in_epoch = 0
                del batches
        finally:
            logger.close()
            _STOP.clear()
        if status == "finished":
            self._export_backbone()
        return TrainResult(
            status, self.step, self.epoch, str(self.out), self.last_checkpoint, last_metrics, stop_requested
        )

    def _telemetry(self) -> Telemetry:
        """img/s, data wait and (where the FLOPs and the card's peak are known) MFU for every log line."""
        peak = peak_flops(self.device, self.amp_dtype)
        passes = getattr(self.objective, "backbone_passes_per_sample", None)  # fwd = 1, fwd + bwd = 3
        flops = None
        if peak is not None and passes:
            fwd = forward_flops(self.objective.backbone, self.cfg.data.img_size, self.device)
            flops = passes * fwd if fwd else None
        telemetry = Telemetry(self.cfg.train.batch_size, flops, peak * self.world if peak else None, self.rank == 0)
        telemetry.start(self.step)
        return telemetry

    def _export_backbone(self) -> None:
        from vitssl.backbones import save_backbone

        backbone = self.objective.backbone
        if self.parallel.sharded:  # gather the shards (a collective), into a copy of the backbone on rank 0
            full = self.parallel.full_state(backbone)
            if self.rank != 0:
                return
            with torch.device("meta"):
                backbone = build_objective(self.cfg).backbone
            backbone.load_state_dict(full, assign=True)
        if self.rank != 0:
            return
        try:
            save_backbone(backbone, self.out / "backbone.safetensors")
        except (TypeError, ValueError) as err:  # a backbone without a timm layout (e.g. iGPT token input)
            _logger.warning("backbone not exported in timm's layout: %s", err)


def train(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Run (or resume) the training described by ``cfg`` in this process (one rank of a DDP job).

    Args:
        cfg: a resolved config from :func:`vitssl.config.load_config`.
        callbacks: hooks run inside the loop (e.g. the online k-NN monitor of ``vitssl.eval.monitor``).

    Returns:
        What happened: ``status`` ``"finished"``, or ``"stopped"`` after ``train.stop_after_steps`` or a
        :func:`request_stop`, with the step and the last checkpoint written.

    Raises:
        NonFiniteLossError: the loss became NaN/inf (the last good checkpoint stays in place).
        CheckpointError: ``resume`` names an unusable checkpoint.
    """
    dist.init_distributed()
    with run_log(cfg.output_dir, enabled=dist.get_rank() == 0) as log:  # the run folder's train.log
        result = _Trainer(cfg, callbacks).run()
        if log is not None:  # what `vitssl train` prints at the end
            log.write_only_here(f"{result.status} at step {result.step}; run folder {result.output_dir}")
    return result


__all__ = [
    "Callback",
    "NonFiniteLossError",
    "ResumableSampler",
    "TrainResult",
    "build_objective",
    "load_objective",
    "request_stop",
    "train",
]
