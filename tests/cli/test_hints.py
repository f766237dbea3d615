"""Every hint names something real: each config key (``data.train.root=``, ``train.batch_size``) and each
command-line flag (``--out``) that a message string in the package names exists in the config dataclasses or in
a parser of the ``vitssl`` command."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import typing
from pathlib import Path

import pytest

import vitssl
from vitssl.cli import build_parser
from vitssl.config import Config, DatasetConfig
from vitssl.registry import OBJECTIVES

PACKAGE_DIR = Path(vitssl.__file__).resolve().parent
_SECTIONS = ("data", "train", "optim", "eval", "model", "launch", "objective")
# a dotted key after something that is not part of a name or a path (vitssl.eval.knn is a module, not a key)
_KEY = re.compile(rf"(?<![\w./-])((?:{'|'.join(_SECTIONS)})(?:\.[a-z_][a-z0-9_]*)+\*?)(?![\w(/-])")
_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
_NOT_KEYS = {"py", "yaml", "json", "jsonl", "txt", "log", "pth", "csv", "tsv", "md"}  # file names: train.py
_FREE_FORM = ("kwargs", "backbone_kwargs", "sbatch_extra", "meta")  # mappings whose entries are the user's


def _message_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a module (f-string parts included), docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            found.append((node.lineno, text))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.append((node.lineno, node.value))
    return found


def _fields(cls: type) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _dataclass_of(tp: typing.Any) -> type | None:
    for candidate in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _key_exists(key: str) -> bool:
    parts = key.split(".")
    if parts[0] == "objective":  # typed by the objective: a field of any registered objective's config
        if len(parts) != 2:
            return False
        fields = {f for n in OBJECTIVES for f in _fields(OBJECTIVES.get(n).Config)}
        if parts[1].endswith("*"):  # objective.text_*: the fields of that prefix
            return any(f.startswith(parts[1][:-1]) for f in fields)
        return parts[1] in fields
    node: type | None = Config
    for i, part in enumerate(parts):
        if node is None:
            return False
        fields = _fields(node)
        if part not in fields:
            return False
        if part in _FREE_FORM:
            return True  # data.train.kwargs.num_samples: an option of the dataset, checked by the dataset
        if node is DatasetConfig or i == len(parts) - 1:
            return i == len(parts) - 1
        node = _dataclass_of(fields[part])
    return True


def _all_flags() -> set[str]:
    flags: set[str] = set()
    todo = [build_parser()]
    while todo:
        parser = todo.pop()
        for action in parser._actions:
            flags.update(o for o in action.option_strings if o.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
    return flags


def _hints() -> list[tuple[str, str, str]]:
    """``(where, kind, name)`` of every key and flag the package's message strings name."""
    found = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        rel = path.relative_to(PACKAGE_DIR.parent)
        for line, text in _message_strings(path):
            for match in _KEY.finditer(text):
                if match.group(1).rsplit(".", 1)[-1] not in _NOT_KEYS:
                    found.append((f"{rel}:{line}", "key", match.group(1)))
            for match in _FLAG.finditer(text):
                found.append((f"{rel}:{line}", "flag", match.group(1)))
    return found


HINTS = _hints()


def test_the_scan_finds_hints():
    names = {name for _, _, name in HINTS}
    assert {"data.skip_corrupt", "train.batch_size", "--force", "eval.knn_every_epochs"} <= names
    assert _key_exists("data.train.kwargs.num_samples") and _key_exists("objective.num_classes")
    assert not _key_exists("data.root") and not _key_exists("data.train.kwarg")


def test_every_named_config_key_exists():
    wrong = sorted({f"{where}: {name}" for where, kind, name in HINTS if kind == "key" and not _key_exists(name)})
    assert not wrong, "hints naming config keys that do not exist:\n" + "\n".join(wrong)


# flags of other programs that messages quote: pip's (the faiss install hint), srun's, open_clip's training script
_OTHER_PROGRAMS = {"--force-reinstall", "--no-deps", "--kill-on-bad-exit", "--train-num-samples"}


def test_every_named_flag_exists():
    flags = _all_flags() | _OTHER_PROGRAMS | {"--help", "--version"}
    wrong = sorted({f"{where}: {name}" for where, kind, name in HINTS if kind == "flag" and name not in flags})
    assert not wrong, "hints naming flags no vitssl parser has:\n" + "\n".join(wrong)


@pytest.mark.parametrize("hint", ["set data.root=PATH", "use --no-such-flag", "data.train.kwarg.x=1"])
def test_a_wrong_hint_is_caught(hint):
    keys = [m.group(1) for m in _KEY.finditer(hint)]
    flags = [m.group(1) for m in _FLAG.finditer(hint)]
    assert any(not _key_exists(k) for k in keys) or any(f not in _all_flags() for f in flags)
