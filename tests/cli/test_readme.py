"""Every ``vitssl ...`` line in README.md's code blocks parses with the real parser, without a FutureWarning.

The README must show the current spellings: a renamed option left in it would still run (old spellings are
accepted for one release) but teach users the deprecated one. Placeholders are filled in the way a reader would:
``$CKPT`` / ``$IN`` / ``$TRAIN`` / ``$VAL`` / ``$SLURM`` with the values the README assigns (or store folders),
``[--opt a|b]`` with ``--opt a`` (the option used), ``[FILE]`` with the file.
"""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

import pytest

from vitssl.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"
# Shell variables of the README's ImageNet recipes: what the README assigns them, or a stand-in store folder.
VARIABLES = {
    "CKPT": "runs/moco_vit_base/checkpoint_last.pth",
    "IN": "imagefolder:root=/data/imagenet",
    "TRAIN": "runs/moco_vit_base/features/imagefolder-train-last4avg-0",
    "VAL": "runs/moco_vit_base/features/imagefolder-val-last4avg-0",
    "SLURM": "launch=slurm launch.nodes=2 launch.gpus_per_node=8",
}


def readme_commands() -> list[str]:
    """The ``vitssl`` command lines of the README's fenced code blocks (continuations joined, comments dropped)."""
    blocks, current = [], None
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split(" ; "):
                part = re.sub(r"\s+#.*$", "", part.strip())
                if part.startswith("vitssl "):
                    commands.append(part)
    return commands


def _argv(command: str) -> list[str]:
    for name, value in VARIABLES.items():
        command = command.replace(f"${name}", value)
    command = re.sub(r"\[(--[^\]]*)\]", lambda m: m.group(1).split("|")[0], command)  # [--cost iou|giou]
    command = re.sub(r"\[([^\]-][^\]]*)\]", r"\1", command)  # [clip.mp4]
    return shlex.split(command)[1:]


COMMANDS = readme_commands()


def test_readme_has_the_commands():
    # The extraction itself: a README reformatted so that no block is read any more must fail here.
    assert len(COMMANDS) >= 40
    assert any(c.startswith("vitssl eval knn") for c in COMMANDS)
    assert any(c.startswith("vitssl track evaluate") for c in COMMANDS)


@pytest.fixture(scope="module")
def parser():
    return build_parser()


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses_without_deprecation(parser, command):
    argv = _argv(command)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            parser.parse_args(argv)
        except SystemExit as exit_:
            pytest.fail(f"README command does not parse (exit {exit_.code}): {command}")
    deprecated = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert not deprecated, f"README shows a deprecated spelling: {command}: {deprecated}"
