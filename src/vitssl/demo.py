"""``python -m vitssl.demo [action|tca|track] [key=value ...]`` (``make demo``): the demos of :mod:`vitssl.demos`.

This module keeps the command's name; :func:`vitssl.demos.main.main` parses, runs and prints.
"""

from __future__ import annotations

import sys

from vitssl.demos import common
from vitssl.demos.main import main
from vitssl.demos.pretrain import DEFAULT_OUTPUT


def demo_output_dir(overrides: list[str], default: str = DEFAULT_OUTPUT) -> str:
    """The digits demo's run folder for ``overrides`` (:func:`vitssl.demos.common.demo_output_dir`)."""
    return common.demo_output_dir(overrides, default)


__all__ = ["DEFAULT_OUTPUT", "demo_output_dir", "main"]

if __name__ == "__main__":
    sys.exit(main())
