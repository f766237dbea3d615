"""vitssl.cli.eval: the option names of the eval commands (``--out``, ``-k/--k``) and the old spellings they still
accept for one release (hidden in --help, FutureWarning)."""

from __future__ import annotations

import argparse

import pytest

from vitssl.cli import build_parser


def _subparser(*path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize(
    ("command", "old", "new", "dest"),
    [
        (("eval", "zeroshot"), "--output", "--out", "out"),
        (("eval", "retrieval"), "--output", "--out", "out"),
        (("video", "eval"), "--json", "--out", "out"),
    ],
)
def test_old_output_spellings_warn_and_are_hidden(command, old, new, dest):
    parser = _subparser(*command)
    required = ["CKPT", "--data", "shapes"]
    assert getattr(parser.parse_args([*required, new, "r.json"]), dest) == "r.json"
    with pytest.warns(FutureWarning, match=f"{old} is deprecated .* use {new}"):
        assert getattr(parser.parse_args([*required, old, "r.json"]), dest) == "r.json"
    text = parser.format_help()
    assert new in text and old not in text


def test_every_eval_command_writes_its_result_with_out():
    for command in ("knn", "linear", "zeroshot", "retrieval"):
        assert "--out" in _subparser("eval", command).format_help(), command
    assert "--out" in _subparser("video", "eval").format_help()


def test_knn_takes_k_short_and_long():
    parser = _subparser("eval", "knn")
    base = ["CKPT", "--train", "digits", "--val", "digits"]
    assert parser.parse_args([*base, "-k", "5", "10"]).k == [5, 10]
    assert parser.parse_args([*base, "--k", "7"]).k == [7]
    assert "-k K [K ...], --k K [K ...]" in parser.format_help()
