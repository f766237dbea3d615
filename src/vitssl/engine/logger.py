"""Rank-0 logging: a JSON-lines metrics file, a tqdm bar (terminal) or plain lines, TensorBoard if present, and
``train.log``, the run folder's copy of what the console showed during the run."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

_logger = logging.getLogger(__name__)


RUN_LOG_NAME = "train.log"
# The console's format (vitssl.cli), with the date: a run folder's log outlives the day it was written.
_RUN_LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")


class _RunLogHandler(logging.FileHandler):
    """Appends to ``train.log``; the file (and its folder) is created by the first line, so a run refused before
    it logged anything leaves no folder behind."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, mode="a", encoding="utf-8", delay=True)
        self.setFormatter(_RUN_LOG_FORMAT)

    def _open(self) -> Any:  # the stream, as in logging.FileHandler
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()

    def write_only_here(self, message: str, level: int = logging.INFO) -> None:
        """A line for the file alone (what the console showed some other way: a progress bar, a printed result)."""
        self.handle(logging.LogRecord(__name__, level, __file__, 0, message, None, None))


_ACTIVE: list[_RunLogHandler] = []  # the run log of the run in progress in this process, if any


@contextlib.contextmanager
def run_log(output_dir: str | Path, enabled: bool = True) -> Iterator[_RunLogHandler | None]:
    """Copy every log line of the run into ``output_dir/train.log`` (appended to on resume) while it runs.

    The handler sits on the root logger, so the file gets what the console handler gets. vitssl's INFO lines
    go to the file even where nothing configured logging (the Python API); the console then still shows only
    warnings, as Python's last-resort handler does. An error that ends the run is written last.

    Args:
        output_dir: the run folder.
        enabled: False on ranks other than 0 (one process writes the file).

    Yields:
        The handler (``write_only_here`` adds a line the console showed otherwise), or None when disabled.
    """
    if not enabled:
        yield None
        return
    root, package = logging.getLogger(), logging.getLogger("vitssl")
    handler = _RunLogHandler(Path(output_dir) / RUN_LOG_NAME)
    # Without handlers, Python prints warnings through logging.lastResort, which stops once any handler exists.
    console = logging.lastResort if not root.hasHandlers() and logging.lastResort is not None else None
    level = package.level
    if package.getEffectiveLevel() > logging.INFO:
        package.setLevel(logging.INFO)
    if console is not None:
        root.addHandler(console)
    root.addHandler(handler)
    _ACTIVE.append(handler)
    try:
        yield handler
    except BaseException as err:
        if handler.stream is not None:  # the run had started (a refused config leaves no file)
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            handler.write_only_here(f"run ended with {type(err).__name__}: {first}", logging.ERROR)
        raise
    finally:
        _ACTIVE.remove(handler)
        root.removeHandler(handler)
        if console is not None:
            root.removeHandler(console)
        package.setLevel(level)
        handler.close()


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
        eta = self.eta_seconds(step)
        eta_text = "?" if math.isnan(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
        line = f"step {step}/{self.total_steps} epoch {record.get('epoch')} eta {eta_text} {text}"
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(text, refresh=True)
            for handler in _ACTIVE:  # the bar showed it: train.log gets it as a line
                handler.write_only_here(line)
        else:
            _logger.info("%s", line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
