"""The one training loop. It knows the objective contract and nothing about any particular objective.

The run's parts are built by :mod:`vitssl.engine.build`, its checkpoints written and restored by
:mod:`vitssl.engine.resume`; this module runs the steps: schedules, micro-steps under AMP with the gradient-sync
switch, the one collective per step, the callbacks' pre-optimizer-step hook, clipping, logging, checkpoints at
their cadence, a stop on request, and the backbone export at the end.
"""

from __future__ import annotations

import logging
import math
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

import vitssl
from vitssl import distributed as dist
from vitssl.config import save_config
from vitssl.engine.build import ResumableSampler, build_objective, build_run, load_objective
from vitssl.engine.callbacks import Callback, GradNormLog
from vitssl.engine.logger import MetricLogger, run_log
from vitssl.engine.resume import RESUMABLE_CHANGES, Progress, config_changes, restore, save
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


class _Trainer:
    def __init__(self, cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> None:
        self.cfg = cfg
        dist.init_distributed()
        self.out = Path(cfg.output_dir)
        self.run_parts = run = build_run(cfg)
        self.rank, self.world, self.device = run.rank, run.world, run.device
        self.objective, self.optimizer = run.objective, run.optimizer
        self.callbacks = list(callbacks)
        if cfg.train.log_grad_norm and cfg.optim.clip_grad is None:  # clipping logs the same norm already
            self.callbacks.append(GradNormLog())  # last: the norm of what the other callbacks left
        # A callback need not derive from Callback; one written before this hook existed simply has none.
        self._pre_step_hooks = [
            c.on_before_optimizer_step for c in self.callbacks if hasattr(c, "on_before_optimizer_step")
        ]
        if self.rank == 0:
            _logger.info(
                "training on %s (%d samples): %d epochs x %d steps of %d images on %d process(es)",
                cfg.data.train.name, len(run.dataset), cfg.train.epochs, run.steps_per_epoch, cfg.train.batch_size,
                self.world,
            )  # fmt: skip
        self.progress = Progress(skipped_by_rank=[0] * self.world)

    # ------------------------------------------------------------------------------------------ data
    def _start_epoch(self) -> None:
        """Point the data at the current epoch, after the batches of it that were consumed already."""
        run, accum, p = self.run_parts, self.cfg.train.accum_steps, self.progress
        if run.stream is not None:
            start = p.step_in_epoch * accum
            run.stream.set_epoch(p.epoch, run.micro_batch, run.steps_per_epoch * accum, start_batch=start)
            return
        assert run.sampler is not None  # map-style data
        run.sampler.set_epoch(p.epoch)
        run.dataset.set_epoch(p.epoch)  # type: ignore[attr-defined]
        run.sampler.set_start(p.step_in_epoch * run.micro_batch * accum)

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
        step = self.progress.step
        lr = float(self.run_parts.lr_schedule[step])
        wd = float(self.run_parts.wd_schedule[step])
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            if group["apply_wd"]:
                group["weight_decay"] = wd
        return lr

    def _train_step(self, batches: Iterator[Any]) -> dict[str, float]:
        run, p = self.run_parts, self.progress
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
            p.skipped += skipped
            if batch is None:
                continue  # the whole micro-batch was corrupt and skipped
            last = micro_step == accum - 1
            # DDP all-reduces gradients in backward; micro-steps before the last skip it. The one no_sync()
            # context must hold forward AND backward (a context manager cannot be entered twice).
            sync = run.parallel.no_sync(last)
            autocast = torch.autocast(self.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None)
            with sync:
                with autocast:
                    out = run.forward(batch)
                loss = out["loss"]
                if not torch.isfinite(loss.detach()):
                    nonfinite = 1.0
                run.scaler.scale(loss / accum).backward()
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach()) / accum
        # One collective per step: global mean of logged scalars, non-finite and stop flags.
        keys = sorted(sums)
        skipped_slot = [float(p.skipped) if r == self.rank else 0.0 for r in range(self.world)]
        packed = torch.tensor(
            [sums[k] for k in keys] + skipped_slot + [nonfinite, float(_STOP.is_set())], dtype=torch.float64
        )
        packed = dist.all_reduce_sum(packed)
        metrics = {k: float(packed[i]) / self.world for i, k in enumerate(keys)}
        p.skipped_by_rank = [int(packed[len(keys) + r]) for r in range(self.world)]
        if packed[-2] > 0:
            raise NonFiniteLossError(
                f"loss is {sums.get('loss', math.nan)} (non-finite) at step {p.step + 1} "
                f"(epoch {p.epoch}); the run stopped and its last good checkpoint "
                f"({p.last_checkpoint or 'none yet'}) is kept. Lower optim.lr, set optim.clip_grad, "
                "or use precision=fp32"
            )
        clip = self.cfg.optim.clip_grad
        if clip is not None or self._pre_step_hooks:
            run.scaler.unscale_(self.optimizer)  # the hooks and clipping see the true gradients (fp16)
        for hook in self._pre_step_hooks:  # documented order: unscale, hooks, clipping, step (engine.callbacks)
            metrics.update(hook(p.step + 1, self.objective, self.optimizer) or {})
        if clip is not None:
            params = [q for g in self.optimizer.param_groups for q in g["params"] if q.grad is not None]
            metrics["grad_norm"] = run.parallel.clip_grad_norm(params, clip)
        run.scaler.step(self.optimizer)
        run.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        metrics["_stop_requested"] = float(packed[-1] > 0)
        return metrics

    def run(self) -> TrainResult:
        run, p, cfg = self.run_parts, self.progress, self.cfg
        restore(cfg, run, p)
        self._write_run_files()
        tcfg = cfg.train
        logger = MetricLogger(self.out, run.total_steps, p.step, enabled=self.rank == 0)
        last_metrics: dict[str, Any] = {}
        status = "finished"
        stop_requested = False
        for callback in self.callbacks:
            callback.on_train_start(self.objective, self.device)
        self.telemetry = self._telemetry()
        try:
            while p.epoch < tcfg.epochs and status == "finished":
                self._start_epoch()
                self.objective.train()
                batches = iter(run.loader)
                while p.step_in_epoch < run.steps_per_epoch:
                    lr = self._set_schedules()
                    metrics = self._train_step(batches)
                    p.step += 1
                    p.step_in_epoch += 1
                    self.objective.on_step_end(p.step, run.total_steps)
                    stop_requested = metrics.pop("_stop_requested") > 0
                    stop = stop_requested or (tcfg.stop_after_steps is not None and p.step >= tcfg.stop_after_steps)
                    epoch_end = p.step_in_epoch == run.steps_per_epoch
                    if p.step % tcfg.log_every_steps == 0 or epoch_end or stop:
                        last_metrics = {"epoch": p.epoch, "lr": lr, **metrics, **self.telemetry.interval(p.step)}
                        if any(p.skipped_by_rank):  # data.skip_corrupt: counted on every rank
                            last_metrics["skipped_corrupt"] = sum(p.skipped_by_rank)
                            if self.world > 1:
                                for r, n in enumerate(p.skipped_by_rank):
                                    last_metrics[f"skipped_corrupt_rank{r}"] = n
                        logger.log(p.step, last_metrics)
                    if epoch_end:
                        extra: dict[str, float] = {}
                        for callback in self.callbacks:
                            extra.update(callback.on_epoch_end(p.epoch, p.step))
                        if extra:
                            last_metrics.update(extra)
                            logger.log(p.step, {"epoch": p.epoch, **extra})
                    if stop or epoch_end or p.step % tcfg.checkpoint_every_steps == 0:
                        save(cfg, run, p)
                    if stop:
                        status = "stopped"
                        break
                if status == "finished":
                    p.epoch += 1
                    p.step_in_epoch = 0
                del batches
        finally:
            logger.close()
            _STOP.clear()
        if status == "finished":
            self._export_backbone()
        return TrainResult(status, p.step, p.epoch, str(self.out), p.last_checkpoint, last_metrics, stop_requested)

    def _telemetry(self) -> Telemetry:
        """img/s, data wait and (where the FLOPs and the card's peak are known) MFU for every log line."""
        amp_dtype = self.run_parts.amp_dtype
        peak = peak_flops(self.device, amp_dtype)
        passes = getattr(self.objective, "backbone_passes_per_sample", None)  # fwd = 1, fwd + bwd = 3
        flops = None
        if peak is not None and passes:
            fwd = forward_flops(self.objective.backbone, self.cfg.data.img_size, self.device)
            flops = passes * fwd if fwd else None
        telemetry = Telemetry(self.cfg.train.batch_size, flops, peak * self.world if peak else None, self.rank == 0)
        telemetry.start(self.progress.step)
        return telemetry

    def _export_backbone(self) -> None:
        from vitssl.backbones import save_backbone

        backbone = self.objective.backbone
        if self.run_parts.parallel.sharded:  # gather the shards (a collective), into a copy of the backbone on rank 0
            full = self.run_parts.parallel.full_state(backbone)
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
        callbacks: hooks run inside the loop (e.g. the online k-NN monitor of ``vitssl.eval.monitor``; see
            :mod:`vitssl.engine.callbacks` for when each hook runs).

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
    "RESUMABLE_CHANGES",
    "Callback",
    "NonFiniteLossError",
    "ResumableSampler",
    "TrainResult",
    "build_objective",
    "config_changes",
    "load_objective",
    "request_stop",
    "train",
]
