"""The training engine: one loop, optimizers and schedules, checkpoints, distributed helpers."""

from vitssl.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vitssl.engine.trainer import (
    Callback,
    NonFiniteLossError,
    TrainResult,
    build_objective,
    load_objective,
    request_stop,
    train,
)

__all__ = [
    "Callback",
    "CheckpointError",
    "NonFiniteLossError",
    "TrainResult",
    "build_objective",
    "load_checkpoint",
    "load_objective",
    "request_stop",
    "save_checkpoint",
    "train",
]
