"""One command-line convention, audited over the real ``vitssl`` parser: every subcommand's options are walked and
drift fails here.

- ``--out`` names a command's output (a result JSON, an index folder, a results folder, a file to write); another
  spelling of an output is listed in ``OTHER_OUTPUTS`` with its reason. ``--json`` with no value is the one
  print-JSON flag (JSON on stdout instead of text; it writes no file).
- ``-k/--k`` is the neighbour count (or cut-off) wherever there is one.
- One name per concept (device, batch size, data-loading workers, data specs, checkpoint), one spelling per
  destination and one destination per spelling across the whole CLI.
- Datasets are data specs ``NAME[:key=value,...]`` (``--data``, or ``--train`` / ``--val`` for the probes), parsed
  by :func:`vitssl.eval.spec.parse_data_spec`: a malformed spec fails every such command with its message.
- Old spellings (``vitssl.cli._args.add_deprecated_spelling``) are hidden, warn (FutureWarning) and land where the
  new spelling does.
"""

from __future__ import annotations

import argparse
import re
from functools import cache

import pytest

from vitssl.cli import build_parser, main
from vitssl.cli._args import _DeprecatedSpelling
from vitssl.eval.spec import SPEC_SYNTAX

# (command, option or positional dest): why this output is not spelled --out.
OTHER_OUTPUTS: dict[tuple[str, str], str] = {
    ("index build", "--summary"): "--out is the index folder; the JSON summary is a second output",
    ("index merge", "--summary"): "--out is the merged index folder; the JSON summary is a second output",
    ("index query", "--grid"): "a picture beside the --out JSON, named by what it draws",
    ("video eval", "--confusion"): "a picture beside the --out JSON, named by what it draws",
    ("track run", "--render"): "a video beside the --out results, named by what it draws",
    ("video prepare", "dst"): "SRC DST as cp / ffmpeg spell a copy: the command re-encodes SRC into DST",
    ("track synth", "root"): "ROOT is the dataset the command makes, read back later as --seq / --gt",
}
# Words of a help text (or names) that say an option is an output.
_OUTPUT_HELP = re.compile(r"\b(write|writes|written|draw|draws|save|saves|output folder)\b")
_OUTPUT_NAMES = {"out", "output", "outdir", "output_dir", "dst", "json", "save", "grid", "confusion", "render"}
# Neighbour counts: by help text or by a spelling people reach for.
_NEIGHBOUR_HELP = re.compile(r"^(neighbou?r|cut-off)")
_NEIGHBOUR_NAMES = re.compile(r"^-(k|-k|-knn-k|-neighbou?rs|-num-neighbou?rs|-topk|-nn)$")
# concept -> (the one spelling, its dest, spellings of the same concept that must not appear)
CONCEPTS: dict[str, tuple[str, str, re.Pattern[str]]] = {
    "device": ("--device", "device", re.compile(r"^--(device|dev|gpu|gpus|cuda|accelerator)$")),
    "batch size": ("--batch-size", "batch_size", re.compile(r"^--(batch-size|batch|bs|batchsize|batch_size)$")),
    "workers": (
        "--num-workers",
        "num_workers",
        re.compile(r"^(-j|--(num-workers|workers|nworkers|num_workers|jobs|loader-workers|data-workers))$"),
    ),
    "checkpoint": ("--checkpoint", "checkpoint", re.compile(r"^--(checkpoint|ckpt|weights|model-path|resume-from)$")),
}
# Options that take a data spec; and the spellings a dataset option must not have.
DATA_SPEC_OPTIONS = {"--data", "--train", "--val"}
_DATASET_NAMES = re.compile(r"^--(data|dataset|datasets|data-spec|spec|train-data|val-data|test-data|test)$")


@cache
def commands() -> dict[str, argparse.ArgumentParser]:
    """Every leaf command of ``vitssl``, by its words (``"eval knn"``)."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            found[" ".join(words)] = parser
        for sub in subs:
            for name, child in sub.choices.items():
                walk(child, (*words, name))

    walk(build_parser(), ())
    return found


def actions(command: str, visible: bool = True) -> list[argparse.Action]:
    """The options and positionals of ``command`` (no --help): the visible ones, or the hidden ones."""
    return [
        a
        for a in commands()[command]._actions
        if not isinstance(a, argparse._HelpAction) and (a.help != argparse.SUPPRESS) == visible
    ]


def name_of(action: argparse.Action) -> str:
    """The longest spelling of an option, the dest of a positional."""
    return max(action.option_strings, key=len) if action.option_strings else action.dest


def all_visible() -> list[tuple[str, argparse.Action]]:
    return [(c, a) for c in commands() for a in actions(c)]


def test_the_walk_sees_every_command_group():
    names = set(commands())
    assert {"eval knn", "index build", "video eval", "track run", "export backbone", "pretrain", "logs"} <= names
    assert len(names) >= 30 and all(actions(c) or c == "recipes" for c in names)


def _is_print_json_flag(action: argparse.Action) -> bool:
    return action.option_strings == ["--json"] and action.nargs == 0


def test_outputs_are_spelled_out():
    wrong = []
    for command, action in all_visible():
        names = {action.dest, *(s.lstrip("-").replace("-", "_") for s in action.option_strings)}
        is_output = bool(names & _OUTPUT_NAMES) or bool(_OUTPUT_HELP.search(action.help or ""))
        if not is_output or _is_print_json_flag(action) or (command, name_of(action)) in OTHER_OUTPUTS:
            continue
        if action.option_strings != ["--out"] or action.dest != "out":
            wrong.append(f"vitssl {command} {'/'.join(action.option_strings) or action.dest}: {action.help}")
    assert not wrong, "outputs not spelled --out (spell them --out or list them in OTHER_OUTPUTS):\n" + "\n".join(wrong)


def test_other_outputs_still_exist():
    """An entry of OTHER_OUTPUTS whose option is gone is stale: remove it."""
    for command, name in OTHER_OUTPUTS:
        assert any(name_of(a) == name for a in actions(command)), (command, name)


def test_json_is_only_the_print_flag():
    """``--json`` takes no value anywhere (the old ``--json FILE`` of index and video commands is a hidden spelling
    of --out or --summary)."""
    for command, action in all_visible():
        if "--json" in action.option_strings:
            assert _is_print_json_flag(action) and action.dest == "json", command
            assert re.match(r"print (a )?JSON", action.help or ""), (command, action.help)


def test_neighbours_are_k():
    seen = []
    for command, action in all_visible():
        spelled = any(_NEIGHBOUR_NAMES.match(s) for s in action.option_strings)
        if spelled or _NEIGHBOUR_HELP.match(action.help or "") or action.dest == "k":
            seen.append(command)
            assert action.option_strings == ["-k", "--k"] and action.dest == "k", (command, action.option_strings)
    assert {"eval knn", "index query", "index eval"} <= set(seen)


@pytest.mark.parametrize("concept", sorted(CONCEPTS))
def test_one_name_per_concept(concept):
    spelling, dest, synonyms = CONCEPTS[concept]
    for command, action in all_visible():
        if any(synonyms.match(s) for s in action.option_strings) or (action.dest == dest and action.option_strings):
            assert action.option_strings == [spelling] and action.dest == dest, (command, action.option_strings)


def test_every_device_option_takes_the_same_values_and_defaults_to_auto():
    seen = []
    for command, action in all_visible():
        if action.dest != "device":
            continue
        seen.append(command)
        assert action.default == "auto", command
        for value in ("auto", "cpu", "cuda"):
            assert action.type(value) == value, (command, value)
        for wrong in ("gpu", "CUDA", "cuda:x", ""):
            with pytest.raises(argparse.ArgumentTypeError, match="is not a device"):
                action.type(wrong)
        # cuda:N only where the command runs in this process; launched ranks each take their own GPU
        launched = command in ("eval features", "eval knn", "eval linear", "index build")
        if launched:
            with pytest.raises(argparse.ArgumentTypeError, match="auto, cpu or cuda"):
                action.type("cuda:1")
        else:
            assert action.type("cuda:1") == "cuda:1", command
    assert {"eval knn", "index query", "track run", "video eval", "igpt sample", "data profile"} <= set(seen)


def test_checkpoints_are_named_checkpoint():
    """A command's model argument is the positional ``checkpoint`` (or ``--checkpoint`` where it is optional)."""
    for command, action in all_visible():
        if not action.option_strings and re.search(r"\b(ckpt|checkpoint|weights|model)\b", action.dest):
            assert action.dest == "checkpoint", (command, action.dest)


def test_one_spelling_per_dest_and_one_dest_per_spelling():
    spellings: dict[str, set[tuple[str, ...]]] = {}
    dests: dict[str, set[str]] = {}
    for _, action in all_visible():
        if action.option_strings:
            spellings.setdefault(action.dest, set()).add(tuple(action.option_strings))
            for s in action.option_strings:
                dests.setdefault(s, set()).add(action.dest)
    assert {d: s for d, s in spellings.items() if len(s) > 1} == {}
    assert {s: d for s, d in dests.items() if len(d) > 1} == {}


def test_datasets_are_data_specs():
    """A dataset option is --data (or --train / --val), shown as SPEC with the one syntax."""
    seen = set()
    for command, action in all_visible():
        names = set(action.option_strings)
        assert not any(_DATASET_NAMES.match(s) for s in names - DATA_SPEC_OPTIONS), (command, action.option_strings)
        if names & DATA_SPEC_OPTIONS:
            seen.add(command)
            assert action.metavar == "SPEC", (command, action.option_strings, action.metavar)
    for command in seen:  # the syntax is spelled out once per command
        assert any(SPEC_SYNTAX in (a.help or "") for a in actions(command)), command
    assert {"eval features", "eval knn", "eval linear", "eval zeroshot", "index build", "video eval"} <= seen


# Each command that takes a dataset, with a malformed spec where the dataset goes.
BAD_SPEC = "shapes:num_samples"
DATA_COMMANDS = {
    "eval features": ["eval", "features", "{ckpt}", "--data", BAD_SPEC],
    "eval knn": ["eval", "knn", "{ckpt}", "--train", BAD_SPEC, "--val", "digits"],
    "eval linear": ["eval", "linear", "{ckpt}", "--train", "digits", "--val", BAD_SPEC],
    "eval zeroshot": ["eval", "zeroshot", "{ckpt}", "--data", BAD_SPEC],
    "eval retrieval": ["eval", "retrieval", "{ckpt}", "--data", BAD_SPEC],
    "index build": ["index", "build", "{ckpt}", "--data", BAD_SPEC, "--out", "{tmp}/idx"],
    "video eval": ["video", "eval", "{ckpt}", "--data", BAD_SPEC],
}


def test_every_command_with_a_data_spec_is_checked_here():
    with_specs = {c for c, a in all_visible() if set(a.option_strings) & DATA_SPEC_OPTIONS}
    assert with_specs == set(DATA_COMMANDS)


@pytest.mark.parametrize("command", sorted(DATA_COMMANDS))
def test_a_malformed_spec_fails_with_the_spec_syntax(command, tmp_path, capsys):
    ckpt = tmp_path / "checkpoint_last.pth"
    ckpt.write_bytes(b"never loaded: the spec fails first")
    argv = [a.format(ckpt=ckpt, tmp=tmp_path) for a in DATA_COMMANDS[command]]
    assert main([*argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"data spec {BAD_SPEC!r}: option 'num_samples' is not key=value; expected NAME[:key=value" in err, err


def test_deprecated_spellings_are_hidden_and_land_where_the_new_one_does():
    found = 0
    for command in commands():
        visible = {s: a for a in actions(command) for s in a.option_strings}
        for action in actions(command, visible=False):
            if not isinstance(action, _DeprecatedSpelling):
                continue
            found += 1
            new = visible.get(action.new)
            assert new is not None and new.dest == action.dest, (command, action.option_strings, action.new)
            assert (new.nargs == 0) == (action.nargs == 0), (command, action.option_strings)
            namespace = argparse.Namespace()
            value = None if action.nargs == 0 else "x.json"
            with pytest.warns(FutureWarning, match=f"{action.option_strings[0]} is deprecated .* use {action.new}"):
                action(commands()[command], namespace, value, action.option_strings[0])
            assert getattr(namespace, action.dest) == (action.const if action.nargs == 0 else "x.json")
            assert action.option_strings[0] not in commands()[command].format_help().split(), command
    assert found >= 8


def test_no_visible_option_says_it_is_deprecated():
    said = [(c, a.option_strings) for c, a in all_visible() if re.search(r"deprecat|obsolete", a.help or "", re.I)]
    assert not said


@pytest.mark.parametrize(
    ("argv", "dest", "old"),
    [
        (["index", "query", "IDX", "--image", "q.png", "--json", "r.json"], "out", "--json"),
        (["index", "eval", "IDX", "--json", "r.json"], "out", "--json"),
        (["index", "build", "CKPT", "--data", "digits", "--out", "idx", "--json", "r.json"], "summary", "--json"),
        (["index", "merge", "a", "b", "--out", "idx", "--json", "r.json"], "summary", "--json"),
    ],
)
def test_the_old_index_json_spellings_still_parse(argv, dest, old):
    with pytest.warns(FutureWarning, match=f"{old} is deprecated"):
        args = build_parser().parse_args(argv)
    assert getattr(args, dest) == "r.json"
