"""What the demos share: the run folder that follows the settings, and training a run or reusing it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from vitssl.engine import TrainResult


def demo_output_dir(overrides: list[str], default: str) -> str:
    """``default``, or ``<default>-<overrides>`` when settings change (an explicit ``output_dir=`` is left out).

    Other settings never reuse another run's weights: ``seed=1`` trains into ``runs/demo-seed=1``.
    """
    settings = sorted(o for o in overrides if not o.startswith("output_dir="))
    if not settings:
        return default
    slug = re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", ",".join(settings))[:120]
    return f"{default}-{slug}"


def demo_root(overrides: list[str], default: str) -> tuple[Path, list[str]]:
    """``(demo folder, the other overrides)``: the folder an ``output_dir=`` override names, else the folder that
    follows the settings (:func:`demo_output_dir`)."""
    root = next((o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")), None)
    settings = [o for o in overrides if not o.startswith("output_dir=")]
    return Path(root or demo_output_dir(settings, default)), settings


def train_or_reuse(cfg: DictConfig) -> TrainResult:
    """Train the run of ``cfg`` in this process; a finished run in its folder is reused (``resume=auto``), and the
    demo says so."""
    from vitssl.engine.checkpoint import LAST_NAME
    from vitssl.eval.train_job import train_run

    run_dir = Path(cfg.output_dir)
    if (run_dir / LAST_NAME).is_file():
        print(f"reusing the run in {run_dir} (same settings; resume=auto continues or skips it)")
    return train_run(cfg)


__all__ = ["demo_output_dir", "demo_root", "train_or_reuse"]
