"""What ``vitssl index`` commands of images (:mod:`vitssl.cli.index`) and videos (:mod:`vitssl.cli.video_index`)
share: the ground-truth options and ``-k/--k``. Imports no torch or faiss (the error translation and the summary
writer they share with the index jobs are :mod:`vitssl.index.jobs`)."""

from __future__ import annotations

import argparse
from typing import Any


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


__all__ = ["add_k_option", "gt_options"]
