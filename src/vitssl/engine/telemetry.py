"""Throughput telemetry of a training run: images/s, the fraction of step time spent waiting for data, and MFU.

The trainer times the part of each step it spends getting the next batch (waiting for the loader workers and
the host-to-device copy) and, at every log line, reports over the steps since the last one

* ``img_s``: global images per second (every rank's samples; rank 0's clock),
* ``data_wait``: the fraction of that time rank 0 spent waiting for data (0 = the input pipeline keeps up),
* ``mfu``: model FLOPs utilisation, when the objective says how many backbone passes a sample costs, the backbone's
  forward FLOPs can be counted and the accelerator's peak is known (bf16/fp16 on a CUDA card of the table).

A data wait above 10 % of step time logs a warning naming the fixes (once per run, not from the first interval,
which holds the loader workers' start-up).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import torch

_logger = logging.getLogger(__name__)

DATA_WAIT_WARNING = 0.10  # fraction of step time spent waiting for data above which the run warns

# Dense bf16/fp16 tensor-core peak FLOP/s per device, by a substring of torch.cuda.get_device_name().
_PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10", 125e12),
    ("V100", 125e12),
)


def peak_flops(device: torch.device, dtype: torch.dtype | None) -> float | None:
    """Dense bf16/fp16 peak FLOP/s of ``device``, or None (CPU, fp32, or a card not in the table)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _PEAK_FLOPS if key in name), None)


def forward_flops(backbone: torch.nn.Module, img_size: int, device: torch.device) -> float | None:
    """FLOPs of one backbone forward on one ``img_size`` image (a multiply-add counts 2), or None if uncountable."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = backbone.training
    try:
        backbone.eval()
        x = torch.zeros(1, 3, img_size, img_size, device=device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            backbone(x)
        return float(counter.get_total_flops()) or None
    except (RuntimeError, TypeError, ValueError) as err:  # e.g. a token-input backbone (iGPT)
        _logger.debug("backbone FLOPs not counted: %s", err)
        return None
    finally:
        backbone.train(was_training)


class Telemetry:
    """Accumulates data-wait time per step and turns it into ``img_s``, ``data_wait`` and ``mfu`` per log interval.

    Args:
        global_batch: images per optimizer step over all ranks.
        flops_per_sample: training FLOPs of one sample (None: no MFU).
        peak: the accelerator's peak FLOP/s times the number of ranks (None: no MFU).
        enabled: False on ranks other than 0 (no warnings there).
    """

    def __init__(
        self, global_batch: int, flops_per_sample: float | None = None, peak: float | None = None, enabled: bool = True
    ) -> None:
        self.global_batch = global_batch
        self.flops_per_sample = flops_per_sample
        self.peak = peak
        self.enabled = enabled
        self._wait = 0.0
        self._t0 = time.perf_counter()
        self._step0: int | None = None
        self._warned = False
        self._intervals = 0  # the first interval holds the workers' start-up: no warning from it

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Time a block spent waiting for data (next batch, host-to-device copy)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._wait += time.perf_counter() - start

    def start(self, step: int) -> None:
        """Begin an interval at ``step`` (the run's first step, or after a resume)."""
        self._t0, self._wait, self._step0 = time.perf_counter(), 0.0, step

    def interval(self, step: int) -> dict[str, float]:
        """Metrics over the steps since the last call (or ``start``), then begin the next interval."""
        now = time.perf_counter()
        elapsed = now - self._t0
        steps = step - (self._step0 if self._step0 is not None else step)
        out: dict[str, float] = {}
        if steps > 0 and elapsed > 0:
            self._intervals += 1
            img_s = steps * self.global_batch / elapsed
            out["img_s"] = round(img_s, 2)
            out["data_wait"] = round(min(1.0, self._wait / elapsed), 4)
            if self.flops_per_sample and self.peak:
                out["mfu"] = round(img_s * self.flops_per_sample / self.peak, 4)
            warn = self.enabled and self._intervals > 1 and not self._warned
            if warn and out["data_wait"] > DATA_WAIT_WARNING:
                self._warned = True  # once per run: the metric stays in every line
                _logger.warning(
                    "the input pipeline is the bottleneck: %.0f%% of step time waits for data (%.0f img/s); raise "
                    "data.num_workers (one worker per free CPU core), set data.augment_device=gpu, or profile it "
                    "with `vitssl data profile RECIPE`",
                    100 * out["data_wait"], out["img_s"],
                )  # fmt: skip
        self._t0, self._wait, self._step0 = now, 0.0, step
        return out


__all__ = ["DATA_WAIT_WARNING", "Telemetry", "forward_flops", "peak_flops"]
