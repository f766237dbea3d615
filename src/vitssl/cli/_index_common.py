"""What ``vitssl index`` commands of images (:mod:`vitssl.cli.index`) and videos (:mod:`vitssl.cli.video_index`)
share: the error translation, the summary writer and the ground-truth options. Imports no torch or faiss."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vitssl.config import ConfigError
from vitssl.errors import UserError


@contextmanager
def index_errors() -> Iterator[None]:
    """faiss-side problems a user fixes by changing the command (factory, training size, index folders)."""
    try:
        yield
    except UserError:
        raise  # says what to fix already (IndexFormatError, IndexSpecError, ConfigError, ...)
    except ValueError as err:  # faiss and the index builder reject factories and sizes with ValueError
        raise ConfigError(str(err)) from None


def write_summary(summary: dict[str, Any], path: str | None) -> dict[str, Any]:
    """A job's summary, also written to ``path`` (``--json``) when given; returned as it is."""
    if path:
        from vitssl.io import write_json

        write_json(summary, Path(path), default=str)
        print(f"summary written to {path}")
    return summary


def gt_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ground-truth reader's options of ``index eval`` (FIVR task / version, CC_WEB_VIDEO's clean protocol)."""
    options: dict[str, Any] = {}
    if args.fivr_task:
        options["task"] = args.fivr_task
    if args.fivr_version:
        options["version"] = args.fivr_version
    if args.cc_web_clean:
        options["clean"] = True
    return options


def add_k_option(p: argparse.ArgumentParser, help: str) -> None:
    """``-k/--k N``: neighbours per query (or the cut-off) in every index command."""
    p.add_argument("-k", "--k", dest="k", type=int, default=10, help=help)


__all__ = ["add_k_option", "gt_options", "index_errors", "write_summary"]
