"""The training job: what every training run executes (``vitssl train|pretrain|sweep``, the demos, SLURM jobs).

:func:`pretrain_job` rebuilds the config from its :class:`PretrainJob` payload, refuses dataset options the
datasets do not take, and runs :func:`vitssl.engine.train` with the online k-NN monitor
(:class:`vitssl.eval.monitor.KnnMonitor`). It sits on the evaluation floor because of that monitor: the payload
must stay plain data (it is pickled into SLURM jobs and requeued), so the monitor is built here, inside the job's
process, from the config, rather than passed in.

Launch runs it by name, :data:`PRETRAIN_TARGET`, in spawned processes and SLURM jobs. Importing this module is
light (no torch): the command line imports it while it builds its parser.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from vitssl.engine import TrainResult

# The launch target, by name: spawned processes and SLURM jobs import it from here.
PRETRAIN_TARGET = "vitssl.eval.train_job:pretrain_job"


@dataclass(frozen=True)
class PretrainJob:
    """The payload of a training job: the resolved run config as plain data (picklable, YAML-able)."""

    config: dict[str, Any]  # vitssl.config.to_container(cfg); output_dir absolute

    @classmethod
    def from_config(cls, cfg: DictConfig) -> PretrainJob:
        """The payload of a resolved config (its ``output_dir`` made absolute: jobs start in other folders)."""
        from vitssl.config import to_container
        from vitssl.launch.common import absolute_output_dir

        absolute_output_dir(cfg)
        return cls(to_container(cfg))

    def requeued(self) -> PretrainJob:
        """The payload of the same run after a preemption or time-out: continue from its last checkpoint."""
        return dataclasses.replace(self, config={**self.config, "resume": "auto"})


def pretrain_job(job: PretrainJob) -> TrainResult:
    """Run (or resume) one training run on this rank.

    Args:
        job: the run's payload.

    Returns:
        The engine's result: status (finished / stopped), step, checkpoint and last metrics.

    Raises:
        DataError: a dataset of ``data.train`` / ``data.val`` is given an option it does not take.
        ConfigError: the online k-NN monitor is asked to vote with labels of another dataset.
    """
    from vitssl.config import from_container
    from vitssl.data import check_dataset_options
    from vitssl.engine import train
    from vitssl.eval.monitor import KnnMonitor

    cfg = from_container(job.config)
    for key in ("train", "val"):  # keys a dataset does not take are refused before anything is built
        if cfg.data[key] is not None:
            d = cfg.data[key]
            check_dataset_options(d.name, d.root, dict(d.kwargs), key=f"data.{key}")
    monitor = KnnMonitor(cfg)  # refuses a data.val of other classes now; logs when it is off
    return train(cfg, callbacks=[monitor])


def train_run(cfg: DictConfig) -> TrainResult:
    """Train (or resume, or find finished) the run of a resolved config in this process: :func:`pretrain_job`
    of its payload. The Python API's counterpart of ``vitssl train`` with the local backend."""
    return pretrain_job(PretrainJob.from_config(cfg))


__all__ = ["PRETRAIN_TARGET", "PretrainJob", "pretrain_job", "train_run"]
