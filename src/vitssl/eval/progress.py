"""Progress of long evaluation loops (feature extraction, probes), shown on rank 0: a bar on a terminal, else log
lines."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from vitssl import distributed as dist

_logger = logging.getLogger(__name__)


class Progress:
    """Progress of a long evaluation loop, on rank 0 only: a tqdm bar when stderr is a terminal, else log lines.

    Without a terminal (SLURM logs, pipes) a line is logged each time another 10 % is done or 30 s have passed since
    the last line, from :attr:`QUIET_S` seconds on, so loops of a few seconds stay silent (their callers log a
    summary).

    Args:
        total: units of work (images, epochs, ...).
        desc: what is being done, e.g. ``"features of digits (val, pooled)"``.
        unit: the name of a unit.
        enabled: show anything at all; default: on the main process only.
    """

    LOG_FRACTION = 0.1  # share of the work between two log lines ...
    LOG_EVERY_S = 30.0  # ... or seconds, whichever comes first
    QUIET_S = 5.0  # no log line (and no bar) before the loop has run this long

    def __init__(self, total: int, desc: str, unit: str = "img", enabled: bool | None = None) -> None:
        self.total = max(0, int(total))
        self.desc = desc
        self.unit = unit
        self.enabled = dist.is_main_process() if enabled is None else bool(enabled)
        self.done = 0
        self._t0 = self._last = time.monotonic()
        self._next_fraction = self.LOG_FRACTION
        self._bar: Any = None
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            # leave=False: the bar goes once done (the caller's summary line stays); delay: short loops show none
            self._bar = tqdm(
                total=self.total, desc=desc, unit=unit, dynamic_ncols=True, leave=False, delay=self.QUIET_S
            )

    def update(self, n: int = 1, status: str | None = None) -> None:
        """Count ``n`` more units done; ``status`` (e.g. the current loss) is shown with the count."""
        if not self.enabled:
            return
        self.done += n
        if self._bar is not None:
            if status:
                self._bar.set_postfix_str(status, refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        fraction = self.done / self.total if self.total else 1.0
        due = fraction >= self._next_fraction - 1e-9 or now - self._last >= self.LOG_EVERY_S
        if due and now - self._t0 >= self.QUIET_S:
            self._log(now, status)
            # the next line after another 10 % from here (a line the 30 s rule wrote moves the mark too)
            self._next_fraction = fraction + self.LOG_FRACTION

    def _log(self, now: float, status: str | None) -> None:
        elapsed = now - self._t0
        left = (self.total - self.done) * elapsed / self.done if self.done else float("nan")
        percent = 100.0 * self.done / self.total if self.total else 100.0
        _logger.info(
            "%s: %d/%d %s (%.0f%%), %.0f s, about %.0f s left%s",
            self.desc,
            self.done,
            self.total,
            self.unit,
            percent,
            elapsed,
            left,
            f", {status}" if status else "",
        )
        self._last = now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Progress"]
