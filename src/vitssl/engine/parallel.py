"""Parallelism applied to a built objective, one function per strategy, without touching model code.

The engine builds the objective as a plain module and then, in this order (as torchtitan's ``parallelize``):

1. :func:`apply_activation_checkpointing` (``train.activation_checkpointing``): every tower recomputes its
   transformer blocks in the backward pass (non-reentrant ``torch.utils.checkpoint``);
2. ``train.strategy``: :func:`apply_ddp` (every rank holds the whole model; gradients all-reduced), or
   :func:`apply_fsdp` (FSDP2's ``fully_shard``: each transformer block, then the objective as the root, so every
   parameter, gradient and optimizer state is a DTensor sharded along dim 0 over the ranks, and a block's
   weights are gathered only while it runs).

Towers are found by what they expose, not by their names: a module with ``transformer_blocks()`` (every vitssl
backbone) or an open_clip ``Transformer`` (the CLIP towers). A momentum encoder or an EMA copy is a tower like the
online one, so it is sharded block by block the same way; its parameters and the online ones then have the same
shards on every rank, and the EMA update (``vitssl.ssl.ema.ema_update``) works shard by shard with no communication.

:class:`Parallel` is what the engine keeps: the module to call, the gradient-sync switch for accumulation,
gradient clipping and the state dicts for checkpoints, for whichever strategy was applied.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vitssl import distributed as dist
from vitssl.config import ConfigError

_logger = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp")
_PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _open_clip_transformer() -> type | None:
    try:
        from open_clip.transformer import Transformer
    except ImportError:  # open_clip is a dependency of the CLIP objective only
        return None
    return Transformer


def towers(module: nn.Module) -> list[nn.Module]:
    """The outermost submodules of ``module`` that are transformer towers (backbones, open_clip towers), in order."""
    clip_transformer = _open_clip_transformer()
    found: list[tuple[str, nn.Module]] = []
    for name, sub in module.named_modules():
        if any(name.startswith(f"{owner}.") for owner, _ in found):
            continue
        if callable(getattr(sub, "transformer_blocks", None)) or (
            clip_transformer is not None and isinstance(sub, clip_transformer)
        ):
            found.append((name, sub))
    return [sub for _, sub in found]


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """Every transformer block of every tower in ``module`` (online, momentum and text towers alike)."""
    blocks: list[nn.Module] = []
    for tower in towers(module):
        blocks += tower.transformer_blocks() if hasattr(tower, "transformer_blocks") else list(tower.resblocks)
    return blocks


def apply_activation_checkpointing(module: nn.Module) -> int:
    """Turn on per-block activation checkpointing in every tower of ``module``; returns how many towers.

    Each tower's own ``set_grad_checkpointing`` does it (timm's, PVT's, open_clip's), so parameter names and
    checkpoints stay those of the plain model. Outputs and gradients are unchanged; only memory and time differ.

    Raises:
        ConfigError: ``module`` holds no tower that can checkpoint its blocks.
    """
    count = 0
    for tower in towers(module):
        if hasattr(tower, "set_grad_checkpointing"):
            tower.set_grad_checkpointing(True)
        else:  # an open_clip Transformer outside a tower that has the switch
            tower.grad_checkpointing = True
        count += 1
    if not count:
        raise ConfigError(
            f"train.activation_checkpointing=true, but {type(module).__name__} holds no transformer tower "
            "(a vitssl backbone or an open_clip tower) whose blocks could be checkpointed; set it to false"
        )
    return count


def apply_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` around ``module`` when several ranks run; the module itself on one."""
    if dist.get_world_size() == 1:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def fsdp_param_dtype(setting: str, amp_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype FSDP gathers parameters in: ``auto`` follows the run's autocast dtype (bf16 on GPUs).

    Args:
        setting: ``train.fsdp_param_dtype``: auto | fp32 | bf16.
        amp_dtype: the autocast dtype of the run (None: fp32).
    """
    if setting == "auto":
        return torch.bfloat16 if amp_dtype == torch.bfloat16 else torch.float32
    if setting not in _PARAM_DTYPES:
        raise ConfigError(f"train.fsdp_param_dtype={setting!r}; valid values: auto, {', '.join(_PARAM_DTYPES)}")
    return _PARAM_DTYPES[setting]


def apply_fsdp(module: nn.Module, device: torch.device, param_dtype: torch.dtype = torch.float32) -> int:
    """Shard ``module`` in place with FSDP2: each transformer block, then ``module`` as the root; returns the blocks.

    Gradients are reduced in fp32 whatever ``param_dtype`` is (bf16 sums over many ranks lose digits); the sharded
    master weights and optimizer state stay fp32. Blocks reshard after their forward (their weights are gathered
    again for the backward); the root keeps its small remainder (embeddings, heads) gathered until the backward.

    Args:
        module: the objective (it must define ``forward``).
        device: this rank's device (a one-dimensional mesh over every rank is built on its type).
        param_dtype: the dtype parameters are gathered in for forward and backward.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = transformer_blocks(module)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return len(blocks)


def _full_float(norm: torch.Tensor) -> float:
    full = getattr(norm, "full_tensor", None)  # a DTensor under FSDP: the norm over every rank's shards
    return float(full() if full is not None else norm)


def grad_norm(params: Iterable[torch.Tensor]) -> float:
    """The global L2 norm of the gradients of ``params`` (those that have one), over every rank's shards under
    FSDP; the value ``optim.clip_grad`` compares with its limit. A collective under FSDP."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return _full_float(torch.nn.utils.get_total_norm(grads))


@dataclass
class Parallel:
    """What the engine keeps of the parallelism it applied.

    Attributes:
        strategy: ``ddp`` or ``fsdp``.
        objective: the objective (sharded in place under FSDP).
        model: what the engine calls: the DDP wrapper, or the objective itself.
        sharded: parameters are DTensor shards (FSDP on several ranks); checkpoints are then always sharded.
    """

    strategy: str
    objective: nn.Module
    model: nn.Module
    sharded: bool

    @property
    def sharded_checkpoints(self) -> bool:
        """Checkpoints go through DCP (every ``fsdp`` run, even on one rank, so the run keeps one format)."""
        return self.strategy == "fsdp"

    @contextlib.contextmanager
    def no_sync(self, sync: bool) -> Iterator[None]:
        """Around forward AND backward of a micro-step: skip the gradient reduction unless ``sync``."""
        if sync or dist.get_world_size() == 1:
            yield
        elif self.sharded:
            self.objective.set_requires_gradient_sync(False)  # type: ignore[operator]
            try:
                yield
            finally:
                self.objective.set_requires_gradient_sync(True)  # type: ignore[operator]
        else:
            with self.model.no_sync():  # type: ignore[operator]
                yield

    def clip_grad_norm(self, params: Iterable[torch.Tensor], max_norm: float) -> float:
        """Clip the global gradient norm to ``max_norm``; returns the norm before clipping (over all shards)."""
        return _full_float(torch.nn.utils.clip_grad_norm_(list(params), max_norm))

    def state_dicts(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``{"model", "optimizer"}`` keyed by parameter name (shards under FSDP), for a sharded checkpoint."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.objective, optimizer)
        return {"model": model_state, "optimizer": optim_state}

    def load_sharded(self, path: Any, optimizer: torch.optim.Optimizer) -> None:
        """Load a sharded checkpoint into the objective and optimizer, resharding to this run's layout."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        from vitssl.engine.sharded import load_sharded_into

        state = self.state_dicts(optimizer)
        load_sharded_into(path, state)
        set_state_dict(self.objective, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    def load_full(self, model_state: dict[str, Any], optim_state: dict[str, Any], optimizer: Any) -> None:
        """Load a single-file checkpoint's whole state (optimizer by slot) into a plain or sharded objective."""
        if not self.sharded:
            self.objective.load_state_dict(model_state)
            optimizer.load_state_dict(optim_state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            self.objective,
            optimizer,
            model_state_dict=model_state,
            optim_state_dict=_optimizer_by_name(optim_state, self.objective, optimizer),
            options=StateDictOptions(full_state_dict=True),
        )

    def full_state(self, module: nn.Module) -> dict[str, torch.Tensor] | None:
        """``module``'s whole state dict on the CPU on rank 0 (None elsewhere); a collective under FSDP."""
        if not self.sharded:
            return {k: v.detach().cpu() for k, v in module.state_dict().items()} if dist.get_rank() == 0 else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if dist.get_rank() == 0 else None


def _optimizer_by_name(optim_state: dict[str, Any], module: nn.Module, optimizer: Any) -> dict[str, Any]:
    """An optimizer state dict by slot (``optimizer.state_dict()``) keyed by parameter name instead, as DCP's
    ``set_state_dict`` takes it; slots follow the order of this optimizer's groups (built as the saved one was)."""
    names = {id(p): n for n, p in module.named_parameters()}
    slot_names = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved_slots = [i for group in optim_state["param_groups"] for i in group["params"]]
    if len(saved_slots) != len(slot_names):
        raise ConfigError(
            f"the checkpoint's optimizer holds {len(saved_slots)} parameters, this run's {len(slot_names)}: it was "
            "written by another objective or optim configuration"
        )
    by_slot = dict(zip(saved_slots, slot_names))
    return {
        "state": {by_slot[i]: value for i, value in optim_state["state"].items()},
        "param_groups": [{**g, "params": [by_slot[i] for i in g["params"]]} for g in optim_state["param_groups"]],
    }


def parallelize(
    objective: nn.Module, strategy: str, activation_checkpointing: bool, device: torch.device, param_dtype: str,
    amp_dtype: torch.dtype | None,
) -> Parallel:  # fmt: skip
    """Apply activation checkpointing and a strategy to a built objective (on its device), as configured.

    FSDP on one rank shards nothing (there is nobody to share with): the objective runs as it is, and its
    checkpoints are still sharded ones, so the run can continue on more ranks.

    Args:
        objective: the built objective, on ``device``.
        strategy: ``train.strategy``.
        activation_checkpointing: ``train.activation_checkpointing``.
        device: this rank's device.
        param_dtype: ``train.fsdp_param_dtype``.
        amp_dtype: the run's autocast dtype (None: fp32).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"train.strategy={strategy!r}; valid values: {', '.join(STRATEGIES)}")
    if activation_checkpointing:
        count = apply_activation_checkpointing(objective)
        _logger.info("activation checkpointing on in %d tower(s)", count)
    if strategy == "ddp":
        return Parallel(strategy, objective, apply_ddp(objective, device), sharded=False)
    dtype = fsdp_param_dtype(param_dtype, amp_dtype)
    if dist.get_world_size() == 1:
        return Parallel(strategy, objective, objective, sharded=False)
    blocks = apply_fsdp(objective, device, dtype)
    _logger.info("FSDP: %d blocks and the root sharded over %d ranks (params %s, reduce fp32)", blocks,
                 dist.get_world_size(), str(dtype).removeprefix("torch."))  # fmt: skip
    return Parallel(strategy, objective, objective, sharded=True)


__all__ = [
    "STRATEGIES",
    "Parallel",
    "apply_activation_checkpointing",
    "apply_ddp",
    "apply_fsdp",
    "fsdp_param_dtype",
    "grad_norm",
    "parallelize",
    "towers",
    "transformer_blocks",
]
