"""What the entry points share: registering the objectives before a config is read."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def register_objectives() -> None:
    """Import the packages that register objectives and datasets (``vitssl.ssl``, ``vitssl.video``) now.

    The registries fill themselves on their first lookup (:class:`vitssl.registry.Registry`), so this is not
    needed for correctness; the entry points call it to pay the import once, up front, in the process that then
    forks loader workers or ranks.
    """
    import vitssl.ssl
    import vitssl.video.registered  # noqa: F401


def load_run_config(recipe: str | Path | None, overrides: list[str]) -> Any:
    """:func:`vitssl.config.load_config` with the objectives registered."""
    from vitssl.config import load_config

    register_objectives()
    return load_config(recipe, overrides)
