"""Names the command modules of other areas still import from here.

Every registry fills itself on its first lookup (:class:`vitssl.registry.Registry`), so a command needs no step
of its own before it reads a config: it calls :func:`vitssl.config.load_config`. The two names below remain for
the commands that import them (``cli/eval.py``, ``cli/index.py``, ``cli/video_index.py``, ``cli/track_run.py``)
and for ``benchmarks/track_fps.py``.
"""

from __future__ import annotations

from vitssl.config import load_config as load_run_config


def register_objectives() -> None:
    """Import the packages that register objectives and datasets (``vitssl.ssl``, ``vitssl.video``) now.

    Not needed for correctness (the first lookup imports them); calling it pays that import up front.
    """
    import vitssl.ssl
    import vitssl.video.registered  # noqa: F401


__all__ = ["load_run_config", "register_objectives"]
