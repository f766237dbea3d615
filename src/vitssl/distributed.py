"""Process-group setup and the few collectives the losses and the engine need.

Launchers (torchrun-style local launch, submitit on SLURM) export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them. Every helper here also works in a
plain single process without any process group: ranks are 0, the world size is 1 and the collectives are
identities, so losses and tests run on a CPU with no setup.

Collectives move CPU tensors to the current CUDA device and back when the backend is NCCL (which only
handles CUDA tensors), so callers may reduce CPU metrics without caring which backend is in use.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

_logger = logging.getLogger(__name__)

# Environment variables every launcher must export when WORLD_SIZE > 1.
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"environment variable {name}={value!r} is not an integer; the launcher must export it as one "
            "(unset it to run in a single process)"
        ) from None


def init_distributed(backend: str | None = None) -> None:
    """Join the default process group when the launcher started several processes.

    A no-op when ``WORLD_SIZE`` is unset or 1, and when a process group already exists (so calling it twice
    is safe). With CUDA available the process binds to GPU ``LOCAL_RANK`` before the group is created.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available, otherwise gloo.

    Raises:
        ValueError: a launcher variable is missing or malformed, or NCCL is asked for a ``LOCAL_RANK`` that
            names no GPU on this node.
    """
    if is_distributed():
        _logger.debug("process group already initialised (rank %d of %d)", get_rank(), get_world_size())
        return
    if "WORLD_SIZE" not in os.environ or _env_int("WORLD_SIZE") <= 1:
        return
    missing = [name for name in _LAUNCH_VARS if name not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but the environment lacks {', '.join(missing)}; launch with "
            "`vitssl` (local or SLURM) or torchrun, which export all of " + ", ".join(_LAUNCH_VARS)
        )
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size}); check the launcher's environment")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA, which is not available here; use backend 'gloo' on CPUs")

    device_id = None
    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local_rank < num_gpus:
        torch.cuda.set_device(local_rank)
        # Binding the group to the device lets NCCL connect eagerly and keeps barrier() on the right GPU.
        device_id = torch.device("cuda", local_rank) if backend == "nccl" else None
    elif backend == "nccl":
        raise ValueError(
            f"LOCAL_RANK={local_rank} but this node has {num_gpus} CUDA device(s); start at most one process per "
            "GPU (processes per node = number of GPUs)"
        )
    elif num_gpus:
        # gloo works on CPU tensors, so more processes than GPUs is legal (e.g. CPU tests on a GPU machine).
        _logger.warning("LOCAL_RANK=%d but only %d CUDA device(s): keeping the default device", local_rank, num_gpus)

    dist.init_process_group(
        backend=backend, init_method="env://", rank=rank, world_size=world_size, device_id=device_id
    )
    _logger.info(
        "joined process group: rank %d of %d (local rank %d), backend %s, master %s:%s",
        rank,
        world_size,
        local_rank,
        backend,
        os.environ["MASTER_ADDR"],
        os.environ["MASTER_PORT"],
    )


def destroy_distributed() -> None:
    """Leave the default process group; a no-op without one."""
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether a default process group exists in this process."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank of this process; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes in the default group; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    """Rank of this process on its node (``LOCAL_RANK``); 0 without a process group."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main_process() -> bool:
    """True on global rank 0, the process that logs, writes checkpoints and requeues."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for all processes; a no-op without a process group."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo is the portable choice for CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather(x: torch.Tensor) -> torch.Tensor:
    # Every rank must pass the same shape: collectives have no way to agree on sizes without an extra round.
    sent = x.detach().to(_comm_device()).contiguous()
    parts = [torch.empty_like(sent) for _ in range(get_world_size())]
    dist.all_gather(parts, sent)
    return torch.cat(parts, dim=0).to(x.device)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, in rank order, without gradient.

    Args:
        x: tensor of the same shape on every rank, ``(N, ...)``.

    Returns:
        ``(N * world_size, ...)``, detached from the graph. With one process: ``x.detach()``, so the result
        never carries gradient whatever the world size.
    """
    if get_world_size() == 1:
        return x.detach()
    with torch.no_grad():
        return _gather(x)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for this rank's slice.

    Each rank's loss may use every slice, so the gradient of this rank's input is the sum over ranks of
    d loss_r / d slice; that is what ``torch.distributed.nn.all_gather`` computes. With DDP averaging parameter
    gradients over ranks, a loss that every rank computes identically (or whose mean over ranks is the global
    loss) then gets exactly the gradient of one process on the concatenated batch.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.batch = x.shape[0]
        return _gather(x)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> torch.Tensor:
        grad = grad_out.to(_comm_device()).contiguous()  # (N * world, ...)
        start = get_rank() * ctx.batch
        if dist.get_backend() == "nccl":
            local = torch.empty_like(grad[start : start + ctx.batch])
            dist.reduce_scatter_tensor(local, grad, op=dist.ReduceOp.SUM)
        else:  # gloo has no reduce-scatter; an all-reduce of the whole gradient is fine at CPU scale
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            local = grad[start : start + ctx.batch]
        return local.to(grad_out.device)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, in rank order, keeping the graph.

    The backward pass gives this rank's ``x`` the sum over ranks of the gradients flowing into its slice
    (``torch.distributed.nn.all_gather`` semantics). Every rank must call backward, since that is a collective.

    Args:
        x: tensor of the same shape on every rank, ``(N, ...)``.

    Returns:
        ``(N * world_size, ...)``; ``x`` itself with one process.
    """
    if get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks; returns a new tensor without gradient and leaves ``t`` unchanged.

    Args:
        t: tensor of the same shape on every rank.
    """
    if get_world_size() == 1:
        return t.detach()
    with torch.no_grad():
        out = t.detach().to(_comm_device(), copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(t.device)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average ``t`` over ranks (e.g. a logged loss); returns a new tensor without gradient.

    Args:
        t: floating-point tensor of the same shape on every rank.
    """
    if get_world_size() == 1:
        return t.detach()
    return all_reduce_sum(t) / get_world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (any picklable object).

    Args:
        obj: the object to send; ignored on ranks other than ``src``.
        src: global rank that sends.
    """
    if get_world_size() == 1:
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Collect one picklable object from every rank, as a list in rank order.

    Args:
        obj: this rank's object.
    """
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def find_free_port() -> int:
    """A TCP port that was free a moment ago, for ``MASTER_PORT`` of a local launch.

    Another program may take it before the process group binds it; the window is short enough for
    launching on one machine.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The device a process computes on: ``auto`` is this rank's GPU when CUDA is available, else the CPU.

    Args:
        name: ``auto`` (also None), ``cpu``, ``cuda``, ``cuda:N`` or a ``torch.device`` (returned as is).

    Raises:
        UserError: a CUDA device is asked for and none is visible.
    """
    from vitssl.errors import UserError

    if isinstance(name, torch.device):
        return name
    name = name or "auto"
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA device is visible; use device=auto or device=cpu")
    if name.startswith("cuda:"):
        return torch.device(name)
    if name not in ("auto", "cuda"):
        raise UserError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N")
    return torch.device("cuda", get_local_rank() % torch.cuda.device_count())
