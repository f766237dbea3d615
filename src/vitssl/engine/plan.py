"""A memory plan for a recipe (``vitssl pretrain RECIPE --plan``): parameters, activations per sample, and the
largest batch per GPU under DDP and FSDP, from an analytic model of what training keeps in memory.

How it is derived. The objective is built on the meta device (no memory) and runs one forward there on two
samples of ``data.train`` made by the recipe's own sample function, with hooks that record every transformer-block
call (its input tokens ``s``, width ``h``, MLP hidden width ``m``, whether it runs with gradient) and the bytes
autograd saves outside the blocks (patch embedding, heads, logits). Then, per sample:

* a block run with gradient keeps, for the backward pass, its two LayerNorm inputs in fp32 (the residual
  stream) and the inputs of qkv, q/k/v and the attention output (fused attention keeps no ``s × s`` matrix),
  the projection input, the fc1 input and the GELU input/output at the compute width ``e`` (2 bytes under bf16
  autocast, 4 in fp32): ``s · (2h · 4 + (6h + 2m) · e)`` bytes;
* with activation checkpointing a block keeps only its input, ``s · h · 4``, and the backward pass holds one
  block's full set again while it recomputes it;
* blocks run without gradient (a momentum encoder) keep nothing.

Static memory per GPU, ``P`` parameters of which ``T`` train (Adam: two fp32 moments): DDP keeps fp32 weights
``4P``, gradients ``4T`` and DDP's gradient buckets ``4T``, optimizer state ``8T``; FSDP keeps ``(4P + 4T + 8T)
/ W`` of it on each of ``W`` ranks plus the unsharded working set: the root's own parameters (gathered for the
whole step) and two blocks' parameters at the gather dtype with their fp32 gradients (the running block and the
prefetched next one). The largest batch is ``(memory - overhead - static) / activations per sample``; the
overhead (CUDA context, allocator fragmentation, communication buffers) is a parameter.

The block formula is checked against autograd's saved tensors measured on the CPU (``tests/engine/test_plan.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from vitssl.engine.parallel import transformer_blocks

GIB = 1024**3


@dataclass
class BlockCall:
    """One transformer-block call of the forward pass, per sample."""

    tokens: int  # s: tokens through the block (windows of a Swin stage together)
    width: int  # h: token width
    hidden: int  # m: MLP hidden width
    grad: bool  # ran with gradient (kept activations for the backward)
    params: int  # the block's parameter count

    def activation_bytes(self, compute_bytes: int) -> int:
        """What the backward pass needs of this call, without checkpointing."""
        s, h, m = self.tokens, self.width, self.hidden
        return s * (2 * h * 4 + (6 * h + 2 * m) * compute_bytes)

    def checkpointed_bytes(self) -> int:
        """What a checkpointed call keeps: its input, in fp32."""
        return self.tokens * self.width * 4


@dataclass
class MemoryPlan:
    """The plan of one recipe at one world size (bytes unless named otherwise)."""

    recipe: str
    params: int  # every parameter of the objective
    trainable: int  # the ones the optimizer updates
    root_params: int  # parameters outside the transformer blocks (FSDP's root keeps them gathered)
    largest_block_params: int
    blocks: list[BlockCall] = field(default_factory=list)
    other_activation_bytes: int = 0  # saved outside the blocks (embeddings, heads, logits), measured at fp32
    compute_bytes: int = 4  # e: 2 under bf16 autocast
    gather_bytes: int = 4  # FSDP's gather dtype size
    world_size: int = 1

    def activations_per_sample(self, checkpointing: bool) -> int:
        """Bytes of activations one training sample keeps for the backward pass."""
        grad = [b for b in self.blocks if b.grad]
        if not checkpointing:
            blocks = sum(b.activation_bytes(self.compute_bytes) for b in grad)
        else:
            peak = max((b.activation_bytes(self.compute_bytes) for b in grad), default=0)
            blocks = sum(b.checkpointed_bytes() for b in grad) + peak
        return blocks + self.other_activation_bytes

    def static_bytes(self, strategy: str) -> int:
        """Weights, gradients and optimizer state per GPU (no activations)."""
        p, t = self.params, self.trainable
        if strategy == "ddp":
            return 4 * p + 4 * t + 4 * t + 8 * t
        sharded = math.ceil((4 * p + 4 * t + 8 * t) / self.world_size)
        working = self.root_params * (self.gather_bytes + 4) + 2 * self.largest_block_params * (self.gather_bytes + 4)
        return sharded + working

    def largest_batch(self, strategy: str, checkpointing: bool, memory_gib: float, overhead_gib: float) -> int:
        """Samples per GPU that fit in ``memory_gib`` (0: not even the weights fit)."""
        free = memory_gib * GIB - overhead_gib * GIB - self.static_bytes(strategy)
        return max(0, int(free // max(1, self.activations_per_sample(checkpointing))))


def _hidden_width(block: nn.Module, width: int) -> int:
    """The MLP hidden width of a block: the widest Linear output that is not the qkv projection."""
    outs = [m.out_features for m in block.modules() if isinstance(m, nn.Linear) and m.in_features == width]
    outs = [o for o in outs if o != 3 * width] or [4 * width]
    return max(outs)


@contextmanager
def _recording(objective: nn.Module, calls: list[BlockCall], other: list[int]) -> Iterator[None]:
    """Record block calls and the bytes autograd saves outside blocks, during a forward in this context."""
    params = {id(p) for p in objective.parameters()}
    depth = [0]
    handles = []

    def pre(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:  # tokens per sample
        x = args[0] if args else next(iter(kwargs.values()))
        if depth[0] == 0:
            width = int(x.shape[-1])
            n_params = sum(p.numel() for p in block.parameters())
            calls.append(BlockCall(x.numel() // (x.shape[0] * width), width, _hidden_width(block, width),
                                   torch.is_grad_enabled(), n_params))  # fmt: skip
        depth[0] += 1

    def post(*_: Any) -> None:
        depth[0] -= 1

    for block in transformer_blocks(objective):
        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post))
    seen: dict[int, int] = {}
    keep: list[torch.Tensor] = []  # alive until the end, so ids stay unique

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if depth[0] == 0 and id(t) not in params and id(base) not in params:
            keep.append(base)
            seen[id(base)] = base.numel() * base.element_size()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
    finally:
        for handle in handles:
            handle.remove()
        other.append(sum(seen.values()))


_SAMPLES = 2  # samples in the planning batch (BatchNorm in training mode needs more than one)


def _sample_batch(cfg: DictConfig, objective: nn.Module) -> Any:
    """A batch of the first training samples of ``data.train``, through the recipe's sample function."""
    from vitssl.data import TransformedDataset, build_dataset, collate_skip_none, is_stream

    train = cfg.data.train
    base = build_dataset(train.name, root=train.root, split=train.split, **dict(train.kwargs))
    sample_fn = objective.train_sample_fn(cfg.data)
    if is_stream(base):
        base.bind(sample_fn, cfg.seed, 0, 1, cfg.data.skip_corrupt)
        base.set_epoch(0, _SAMPLES, 1)
        samples = [s for s, _ in zip(iter(base), range(_SAMPLES), strict=False)]
    else:
        dataset = TransformedDataset(base, sample_fn, seed=cfg.seed)
        samples = [dataset[i % len(dataset)] for i in range(_SAMPLES)]
    batch, _ = collate_skip_none(samples)
    return batch


def _to_meta(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return torch.empty_like(batch, device="meta")
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_meta(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_meta(v) for k, v in batch.items()}
    return batch


def plan_memory(cfg: DictConfig, world_size: int, recipe: str = "") -> MemoryPlan:
    """Build the memory plan of a resolved config (see the module docstring for the model).

    Args:
        cfg: the run config (``data.train`` must be readable: one sample is drawn from it).
        world_size: ranks the run would use.
        recipe: the recipe's name, for the report.
    """
    from vitssl.engine.trainer import build_objective

    cfg = cfg.copy()
    if "trim_padding" in cfg.objective:  # CLIP: plan for the whole text context (trimming reads values)
        cfg.objective.trim_padding = False
    with torch.device("meta"):
        objective = build_objective(cfg)
    batch = _to_meta(_sample_batch(cfg, objective))
    calls: list[BlockCall] = []
    other: list[int] = []
    objective.train()
    with _recording(objective, calls, other):
        objective(batch)
    blocks = transformer_blocks(objective)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    gpu_bf16 = cfg.precision in ("auto", "bf16")
    param_dtype = cfg.train.fsdp_param_dtype
    gather_bf16 = param_dtype == "bf16" or (param_dtype == "auto" and gpu_bf16)
    return MemoryPlan(
        recipe=recipe,
        params=sum(p.numel() for p in objective.parameters()),
        trainable=sum(p.numel() for p in objective.parameters() if p.requires_grad),
        root_params=sum(p.numel() for p in objective.parameters() if id(p) not in in_blocks),
        largest_block_params=max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0),
        blocks=calls,
        other_activation_bytes=other[0] // _SAMPLES,
        compute_bytes=2 if gpu_bf16 else 4,
        gather_bytes=2 if gather_bf16 else 4,
        world_size=world_size,
    )


def format_plan(plan: MemoryPlan, memory_gib: float, overhead_gib: float) -> str:
    """The plan as the text ``vitssl pretrain RECIPE --plan`` prints."""
    grad = [b for b in plan.blocks if b.grad]
    lines = [
        f"memory plan for {plan.recipe or 'the run'} on {plan.world_size} GPU(s) of {memory_gib:g} GiB "
        f"({overhead_gib:g} GiB kept for the CUDA context and allocator)",
        f"  parameters       {plan.params / 1e6:,.1f} M ({plan.trainable / 1e6:,.1f} M trained)",
        f"  blocks per sample {len(plan.blocks)} calls ({len(grad)} with gradient), compute at "
        f"{'bf16' if plan.compute_bytes == 2 else 'fp32'}",
    ]
    for ckpt in (False, True):
        per = plan.activations_per_sample(ckpt)
        lines.append(f"  activations/sample {'with' if ckpt else 'without'} checkpointing: {per / 2**20:,.1f} MiB")
    lines.append("  strategy  static/GPU   largest batch/GPU (no ckpt)   (activation checkpointing)")
    for strategy in ("ddp", "fsdp"):
        static = plan.static_bytes(strategy) / GIB
        plain = plan.largest_batch(strategy, False, memory_gib, overhead_gib)
        ckpt = plan.largest_batch(strategy, True, memory_gib, overhead_gib)
        lines.append(f"  {strategy:<8}  {static:8.2f} GiB  {plain:>12d}                  {ckpt:>12d}")
    return "\n".join(lines)


__all__ = ["BlockCall", "MemoryPlan", "format_plan", "plan_memory"]
