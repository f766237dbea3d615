"""What a training run is made of, built from its config: the objective under its strategy, the data loader and
its sampler, the optimizer, the lr / weight-decay schedules and the AMP settings.

:func:`build_run` does it in the order that matters for exact resumes and for FSDP: model init from the run's
seed on every rank, the objective's ``setup``, activation checkpointing and the strategy (FSDP shards the
parameters before the optimizer sees them), per-rank seeds, then data, schedules and optimizer.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Sampler

from vitssl import distributed as dist
from vitssl.config import ConfigError, to_container
from vitssl.engine.checkpoint import load_checkpoint
from vitssl.engine.optim import build_optimizer, cosine_schedule, peak_lr
from vitssl.engine.parallel import Parallel, parallelize


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


def _worker_context(num_workers: int) -> str | None:
    """``fork`` for DataLoader workers where the platform has it (what torchrun and SLURM ranks get by default)."""
    import multiprocessing

    return "fork" if num_workers > 0 and "fork" in multiprocessing.get_all_start_methods() else None


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None: fp32, no autocast)."""
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


@dataclass
class Run:
    """The built parts of a training run, as the step loop and the checkpoints use them.

    Attributes:
        rank, world, device: this process's place in the job.
        micro_batch: samples per rank and micro-step (``batch_size / (world × accum_steps)``).
        objective: the objective (sharded in place under FSDP); ``parallel.model`` is what the loop calls.
        forward: ``parallel.model``, or its ``torch.compile`` with ``train.compile``.
        dataset, loader: the training data; ``sampler`` for map-style sets, ``stream`` for streamed shards
            (exactly one of the two is set).
        steps_per_epoch, total_steps: optimizer steps.
        lr_schedule, wd_schedule: per optimizer step.
        amp_dtype, scaler: autocast dtype (None: fp32) and the fp16 gradient scaler (disabled otherwise).
    """

    rank: int
    world: int
    device: torch.device
    micro_batch: int
    objective: torch.nn.Module
    parallel: Parallel
    forward: Callable[[Any], dict[str, torch.Tensor]]
    dataset: Dataset
    sampler: ResumableSampler | None
    stream: Any
    loader: DataLoader
    steps_per_epoch: int
    total_steps: int
    lr_schedule: Any
    wd_schedule: Any
    optimizer: torch.optim.Optimizer
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler


def _micro_batch(cfg: DictConfig, world: int) -> int:
    tcfg = cfg.train
    micro, rest = divmod(tcfg.batch_size, world * tcfg.accum_steps)
    if rest or micro == 0:
        raise ConfigError(
            f"train.batch_size={tcfg.batch_size} must be a positive multiple of "
            f"world_size × train.accum_steps = {world} × {tcfg.accum_steps}"
        )
    return micro


def _build_data(cfg: DictConfig, objective: torch.nn.Module, rank: int, world: int, micro: int, device: torch.device):
    """``(dataset, sampler, stream, loader, steps_per_epoch)`` of ``data.train`` for this rank."""
    from vitssl.data import TransformedDataset, build_dataset_config, collate_skip_none, is_stream
    from vitssl.data.transforms import resolve_augment_device

    tcfg = cfg.train
    base = build_dataset_config(cfg.data.train, "data.train")
    # data.augment_device=auto: on the device when training on CUDA (the saved config says which it was)
    cfg.data.augment_device = resolve_augment_device(cfg.data.augment_device, device)
    sample_fn = objective.train_sample_fn(cfg.data)
    # Streamed shards (an IterableDataset) order and split the data themselves: the engine tells them the
    # epoch, the batches it takes and where it resumes; map-style sets go through ResumableSampler.
    stream = base if is_stream(base) else None
    sampler: ResumableSampler | None = None
    if stream is not None:
        stream.bind(sample_fn, cfg.seed, rank, world, cfg.data.skip_corrupt)
        stream.check_slots(cfg.data.num_workers)
        dataset = stream
        steps_per_epoch = len(stream) // tcfg.batch_size
    else:
        dataset = TransformedDataset(base, sample_fn, seed=cfg.seed, skip_corrupt=cfg.data.skip_corrupt)
        sampler = ResumableSampler(len(dataset), world, rank, cfg.seed)
        steps_per_epoch = sampler.per_rank // (micro * tcfg.accum_steps)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"data.train ({cfg.data.train.name}) has {len(dataset)} samples, fewer than one global "
            f"batch (train.batch_size={tcfg.batch_size}); lower train.batch_size"
        )
    loader = DataLoader(
        dataset,
        batch_size=micro,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=collate_skip_none,
        pin_memory=device.type == "cuda",
        drop_last=stream is None,  # a stream gives whole batches of items (None for skipped ones)
        # A private generator: building an iterator must not consume the global RNG (exact resume).
        generator=torch.Generator().manual_seed(cfg.seed),
        persistent_workers=False,
        # Loader workers start again each epoch: forked, they start at once; spawned (the default inside ranks
        # that `vitssl` itself spawned) each one imports torch first.
        multiprocessing_context=_worker_context(cfg.data.num_workers),
    )
    return dataset, sampler, stream, loader, steps_per_epoch


def _build_optimizer(cfg: DictConfig, objective: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optim.weight_decay_filter:
        groups = objective.param_groups(cfg.optim.weight_decay)
    else:
        trainable = [p for p in objective.parameters() if p.requires_grad]
        groups = [{"params": trainable, "weight_decay": cfg.optim.weight_decay}]
    optimizer = build_optimizer(groups, cfg.optim)
    for group in optimizer.param_groups:
        group["apply_wd"] = group.get("weight_decay", 0.0) > 0  # the weight-decay schedule moves these groups
    return optimizer


def build_run(cfg: DictConfig) -> Run:
    """Build every part of the run ``cfg`` describes, for this rank (the process group is initialised already).

    Raises:
        ConfigError: the batch does not split over ranks and accumulation steps, the objective cannot
            accumulate, the data holds less than one batch, or an option has an invalid value.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    device = dist.resolve_device(cfg.device)
    tcfg = cfg.train
    micro = _micro_batch(cfg, world)

    # Model init is identical on every rank (DDP would broadcast rank 0's weights anyway).
    seed_all(cfg.seed)
    objective = build_objective(cfg).to(device)
    if tcfg.accum_steps > 1 and not getattr(objective, "supports_accumulation", True):
        raise ConfigError(
            f"train.accum_steps={tcfg.accum_steps}: objective {cfg.objective.name} contrasts each sample with "
            "the rest of its batch, so accumulating would shrink its negatives to batch/accum_steps; reach "
            "the batch with more processes (launch.*) or lower train.batch_size, and set train.accum_steps=1"
        )
    objective.setup(cfg)  # run-level preparation (e.g. iGPT's palette), before any data is read
    amp_dtype = autocast_dtype(cfg.precision, device)
    # activation checkpointing, then DDP or FSDP (which shards the parameters: before the optimizer sees them)
    parallel = parallelize(objective, tcfg.strategy, tcfg.activation_checkpointing, device, tcfg.fsdp_param_dtype,
                           amp_dtype)  # fmt: skip
    seed_all(cfg.seed + 1000 * rank)  # per-rank randomness (masks, dropout) from here on

    dataset, sampler, stream, loader, steps_per_epoch = _build_data(cfg, objective, rank, world, micro, device)
    total_steps = tcfg.epochs * steps_per_epoch
    warmup = cfg.optim.warmup_steps
    if warmup is None:
        warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
    lr_schedule = cosine_schedule(peak_lr(cfg.optim, tcfg.batch_size), cfg.optim.min_lr, total_steps, warmup)
    wd_end = cfg.optim.weight_decay if cfg.optim.weight_decay_end is None else cfg.optim.weight_decay_end
    wd_schedule = cosine_schedule(cfg.optim.weight_decay, wd_end, total_steps)

    optimizer = _build_optimizer(cfg, objective)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    forward = torch.compile(parallel.model) if tcfg.compile else parallel.model
    return Run(
        rank, world, device, micro, objective, parallel, forward, dataset, sampler, stream, loader,
        steps_per_epoch, total_steps, lr_schedule, wd_schedule, optimizer, amp_dtype, scaler,
    )  # fmt: skip


__all__ = ["ResumableSampler", "Run", "autocast_dtype", "build_objective", "build_run", "load_objective", "seed_all"]
