"""``python -m vitssl.demo [action|tca|track] [key=value ...]``: run a demo and print its table.

Without a demo name it runs ``make demo``'s MoCo v3 digits demo (:mod:`vitssl.demos.pretrain`); ``action``,
``tca`` and ``track`` run the video demos (:mod:`vitssl.demos.action`, :mod:`vitssl.demos.tca`,
:mod:`vitssl.demos.track`). ``key=value`` overrides go to the demo's recipe; the run folder follows them.
"""

from __future__ import annotations

import argparse
import logging
import sys

from vitssl.errors import UserError


def _run(name: str, overrides: list[str]) -> None:
    """Run demo ``name`` with ``overrides`` and print its table and what it wrote."""
    import torch

    if name == "pretrain":
        from vitssl.demos.common import demo_root
        from vitssl.demos.pretrain import DEFAULT_OUTPUT, format_table, run_demo

        results = run_demo(overrides)
        run_dir = demo_root(overrides, DEFAULT_OUTPUT)[0]
        print(format_table(results))
        print(f"\nwrote {run_dir / 'results.json'} and {run_dir / 'curves.png'}")
        return
    # The video demos compute on tiny matrices: thread hand-offs cost more than they save (the action demo measured
    # 20x slower with 2 threads on 2 busy cores; TCA's one small layer 0.4 s a step against 4-5 s), so one thread.
    torch.set_num_threads(1)
    if name == "action":
        from vitssl.demos.action import ACTION_OUTPUT, format_action_table, run_action_demo
        from vitssl.demos.common import demo_root

        results = run_action_demo(overrides)
        print(format_action_table(results))
        print(f"\nwrote {demo_root(overrides, ACTION_OUTPUT)[0] / 'results.json'} and each head's confusion.png")
    elif name == "tca":
        from vitssl.demos.common import demo_root
        from vitssl.demos.tca import TCA_OUTPUT, format_tca_table, run_tca_demo

        results = run_tca_demo(overrides)
        print(format_tca_table(results))
        print(f"\nwrote {demo_root(overrides, TCA_OUTPUT)[0] / 'results.json'}")
    elif name == "track":
        from vitssl.demos.common import demo_root
        from vitssl.demos.track import TRACK_OUTPUT, format_track_table, run_track_demo

        results = run_track_demo(overrides)
        root = demo_root(overrides, TRACK_OUTPUT)[0]
        print(format_track_table(results))
        print(f"\nwrote {root / 'results.json'}, the MOT results in {root / 'results'} and rendered videos")


VIDEO_DEMOS = ("action", "tca", "track")


def main(argv: list[str] | None = None) -> int:
    """Parse, run one demo, print; an error the user can fix prints one line and exits with status 2."""
    parser = argparse.ArgumentParser(
        prog="python -m vitssl.demo",
        description="make demo: MoCo v3 on scikit-learn's bundled digits, then k-NN and linear probes against "
        "baselines",
        epilog="`python -m vitssl.demo action|tca|track [key=value ...]`: the video demos",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the demo recipe, e.g. seed=1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("vitssl").setLevel(logging.INFO)
    overrides = list(args.overrides)
    name = overrides.pop(0) if overrides[:1] and overrides[0] in VIDEO_DEMOS else "pretrain"
    try:
        _run(name, overrides)
    except UserError as err:
        print(f"vitssl demo: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
