"""What the entry points share: registering the objectives before a config is read."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def register_objectives() -> None:
    """Import the packages whose import registers objectives and datasets (``vitssl.ssl``, ``vitssl.video``).

    Objectives register by name in :data:`vitssl.registry.OBJECTIVES`; the config and the engine look them up
    there without importing them, so every entry point calls this before it reads a config or a checkpoint.
    """
    import vitssl.ssl
    import vitssl.video.registered  # noqa: F401


def load_run_config(recipe: str | Path | None, overrides: list[str]) -> Any:
    """:func:`vitssl.config.load_config` with the objectives registered."""
    from vitssl.config import load_config

    register_objectives()
    return load_config(recipe, overrides)
