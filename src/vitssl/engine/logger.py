"""Rank-0 logging: a JSON-lines metrics file, a tqdm bar (terminal) or plain lines, TensorBoard if present."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

_logger = logging.getLogger(__name__)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class MetricLogger:
    """Writes ``metrics.jsonl`` and shows progress; silent on ranks other than 0.

    Args:
        output_dir: run folder (``metrics.jsonl`` goes there).
        total_steps: optimizer steps of the whole run (for the ETA).
        start_step: first step of this process (after a resume).
        enabled: False on ranks other than 0.
    """

    def __init__(self, output_dir: str | Path, total_steps: int, start_step: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.start_step = start_step
        self.path = Path(output_dir) / "metrics.jsonl"
        self._t0 = time.perf_counter()
        self._bar = None
        self._tb = None
        if not enabled:
            return
        self._truncate_after(start_step)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(output_dir) / "tb"), purge_step=start_step + 1)
        except ImportError:  # tensorboard is optional
            self._tb = None

    def _truncate_after(self, step: int) -> None:
        """Drop lines a killed run logged after the checkpoint it resumes from (no duplicate steps)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        self.path.write_text("".join(f"{line}\n" for line in kept))

    def eta_seconds(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return math.nan
        return (time.perf_counter() - self._t0) / done * (self.total_steps - step)

    def log(self, step: int, metrics: dict[str, Any], show: bool = True) -> None:
        """Append one JSON object (with ``step``) and update the progress display."""
        if not self.enabled:
            return
        values = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        record = {"step": step, **values, "time": round(time.time(), 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self._tb.add_scalar(key, value, step)
        if not show:
            return
        shown = {k: v for k, v in record.items() if k not in ("step", "epoch", "time")}
        if torch.cuda.is_available():
            shown["mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        text = " ".join(f"{k}={_fmt(v)}" for k, v in shown.items())
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(text, refresh=True)
        else:
            eta = self.eta_seconds(step)
            eta_text = "?" if math.isnan(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
            _logger.info("step %d/%d epoch %s eta %s %s", step, self.total_steps, record.get("epoch"), eta_text, text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
