"""Data specs (``NAME[:key=value,key=value,...]``: a dataset and its options) and feature layers on the command line.

``NAME`` is a dataset registry key (``vitssl.data.list_datasets()``); ``root`` and ``split`` go to the dataset
factory like its other options. Values are read as YAML scalars (``500`` is an int, ``true`` a bool, ``null``
None); a comma splits options only where a new ``key=`` follows, so paths may contain commas. Examples::

    digits:split=val
    shapes:num_samples=500,split=val
    imagefolder:root=/data/imagenet,split=val
    image_text_csv:root=/data/coco/val.csv,caption_column=caption

The evaluation commands (``vitssl eval ...``, ``vitssl index build``) and zero-shot evaluation share this syntax.
Errors name the option the spec came from (``--train``, ``--val``, ``--data``).

Feature layers (``--layer``, DINO's options): ``pooled``, ``cls``, ``mean`` and ``lastN``; see
:mod:`vitssl.eval.features`. They are parsed here because the command line builds its parser from these
names and must not import torch (this module does not).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from vitssl.config import ConfigError

if TYPE_CHECKING:
    from torch.utils.data import Dataset

_logger = logging.getLogger(__name__)

DEFAULT_SPLIT = "val"
SPEC_SYNTAX = "NAME[:key=value,key=value,...], e.g. shapes:split=val,num_samples=500"
# A comma ends an option only where the next one starts ("key="), so "root=/a,b/c" keeps its comma.
_SPEC_SPLIT = re.compile(r",(?=\s*[A-Za-z_][A-Za-z0-9_]*\s*=)")
_LAYER_RE = re.compile(r"^(?:pooled|cls|mean|last([1-9][0-9]*)(?:avg)?)$")
LAYER_HELP = (
    "pooled | cls | mean | lastN (e.g. last4: class tokens of the last 4 blocks, concatenated) | lastNavg "
    "(lastN then the mean patch token: DINOv2's linear-probe input)"
)


def parse_data_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split a ``NAME[:key=value,...]`` data spec into the dataset name and factory options.

    Args:
        spec: the spec string (syntax in the module docstring).

    Returns:
        ``(name, options)``; ``options`` may hold ``root`` and ``split`` besides dataset options.

    Raises:
        ConfigError: the spec is malformed (the message shows the expected syntax).
    """
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not re.fullmatch(r"[A-Za-z0-9_\-.]+", name):
        raise ConfigError(f"data spec {spec!r}: {name!r} is not a dataset name; expected {SPEC_SYNTAX}")
    options: dict[str, Any] = {}
    if rest.strip():
        for item in _SPEC_SPLIT.split(rest):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key.isidentifier():
                raise ConfigError(f"data spec {spec!r}: option {item!r} is not key=value; expected {SPEC_SYNTAX}")
            if key in options:
                raise ConfigError(f"data spec {spec!r}: option {key!r} is given twice")
            options[key] = _spec_value(value.strip())
    return name, options


def _spec_value(text: str) -> Any:
    if text == "":
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # not YAML (e.g. a path with ": " in it): keep the string
    return value if isinstance(value, (str, int, float, bool, list)) or value is None else text


def resolve_split(spec: str, options: dict[str, Any], split: str | None, default: str = DEFAULT_SPLIT) -> str:
    """The split to use: ``split`` (a ``--split`` option) or the spec's own, which must not disagree.

    Args:
        spec: the spec, for the message.
        options: its parsed options.
        split: the split asked for separately, or None.
        default: used when neither gives one.

    Raises:
        ConfigError: both give a split and they differ.
    """
    own = options.get("split")
    if split is not None and own is not None and str(own) != str(split):
        raise ConfigError(f"data spec {spec!r} names split {own!r} but split {split!r} was asked for; give one")
    return str(split if split is not None else own if own is not None else default)


def parse_layer(layer: str) -> str:
    """Validate a ``--layer`` value (``pooled``, ``cls``, ``mean``, ``lastN``) and return it.

    Raises:
        ConfigError: not one of them.
    """
    if not isinstance(layer, str) or not _LAYER_RE.match(layer):
        raise ConfigError(f"--layer {layer!r} is not a feature layer; choose {LAYER_HELP}")
    return layer


def build_eval_dataset(
    spec: str,
    split: str | None = None,
    default_split: str = DEFAULT_SPLIT,
    absolute_root: bool = False,
    option: str = "--data",
) -> tuple[Dataset, str, dict[str, Any]]:
    """Build the dataset a data spec names (split ``val`` unless the spec or ``split`` sets one).

    Args:
        spec: the data spec.
        split: a split asked for separately (``--split``); must agree with the spec's own.
        default_split: the split when neither gives one.
        absolute_root: make a relative ``root`` absolute first, so the sample ids of file-backed datasets are
            absolute paths (retrieval indexes store them and are queried from anywhere).
        option: the command-line option the spec was given with (``--train``, ``--val``), named in errors.

    Returns:
        ``(dataset, name, options)``; ``options`` holds the split used.

    Raises:
        ConfigError: the spec is malformed, names an unknown dataset, option or split, or its root is missing.
    """
    from vitssl.data import build_dataset

    try:
        name, options = parse_data_spec(spec)
        options["split"] = resolve_split(spec, options, split, default_split)
    except ConfigError as err:
        raise ConfigError(f"{option}: {err}") from None
    if absolute_root and isinstance(options.get("root"), str) and options["root"]:
        options["root"] = canonical_options({"root": options["root"]})["root"]
    try:
        dataset = build_dataset(name, **options)
    except (ValueError, KeyError, FileNotFoundError, NotADirectoryError) as err:
        # unknown name / option, bad split, missing root or file: all fixed by changing the spec
        raise ConfigError(f"{option} {spec!r}: {err}") from None
    return dataset, name, options


def canonical_options(options: dict[str, Any]) -> dict[str, Any]:
    """Options in a form that names the same data wherever the command runs (for cache keys).

    ``root`` becomes an absolute path, so ``root=data/x`` from two working directories is told apart and
    ``root=./x`` equals ``root=x``; keys are sorted.
    """
    out = dict(sorted(options.items()))
    root = out.get("root")
    if isinstance(root, str) and root:
        out["root"] = str(Path(os.path.expandvars(root)).expanduser().absolute())
    return out


__all__ = [
    "DEFAULT_SPLIT",
    "LAYER_HELP",
    "SPEC_SYNTAX",
    "build_eval_dataset",
    "canonical_options",
    "parse_data_spec",
    "parse_layer",
    "resolve_split",
]
