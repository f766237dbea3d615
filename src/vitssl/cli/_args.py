"""Argument parsing shared by the commands: ``key=value`` overrides anywhere on the command line.

A command takes options and ``key=value`` overrides (``launch=slurm``, ``optim.lr=3e-4``, ``~model.backbone_kwargs``
to delete a key) in any order: ``vitssl pretrain RECIPE --dry-run launch=slurm`` and
``vitssl pretrain RECIPE launch=slurm --dry-run`` mean the same.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

# key=value, or ~key (delete a key of the recipe, as Hydra spells it)
OVERRIDE_RE = re.compile(r"^(~[A-Za-z_][A-Za-z0-9_.]*$|[A-Za-z_][A-Za-z0-9_.]*=)")


class OverridesParser(argparse.ArgumentParser):
    """Collects ``key=value`` tokens that follow options into ``overrides``.

    argparse fills positionals from the first run of positional tokens only, so ``CKPT --train X launch=slurm``
    would leave ``launch=slurm`` unrecognised; overrides are always ``key=value`` and never a value of an option
    here, so they can be picked out of the leftovers.
    """

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        moved = [a for a in extras if OVERRIDE_RE.match(a)]
        if moved:
            namespace.overrides = [*(getattr(namespace, "overrides", None) or []), *moved]
        return namespace, [a for a in extras if not OVERRIDE_RE.match(a)]


class _Override(str):
    """A ``key=value`` token met inside a list option (``--k 10 20 launch=slurm``)."""


def number_or_override(convert: type) -> Any:
    def parse(text: str) -> Any:
        if OVERRIDE_RE.match(text):
            return _Override(text)
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {convert.__name__}") from None

    parse.__name__ = convert.__name__
    return parse


class ListWithOverrides(argparse.Action):
    """``nargs='+'`` list option whose trailing ``key=value`` tokens go to ``overrides``."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        overrides = [v for v in values if isinstance(v, _Override)]
        items = [v for v in values if not isinstance(v, _Override)]
        if not items:
            parser.error(f"{option_string} needs at least one value")
        setattr(namespace, self.dest, items)
        if overrides:
            namespace.overrides = [*(getattr(namespace, "overrides", None) or []), *map(str, overrides)]


def add_parser(group: argparse._SubParsersAction, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    parser = group.add_parser(name, **kwargs)
    # The group creates plain ArgumentParsers; this one only adds the override collection above.
    parser.__class__ = OverridesParser
    return parser


class _DeprecatedSpelling(argparse.Action):
    """Stores into the current option's ``dest`` and warns that this spelling goes away."""

    def __init__(self, option_strings: Any, dest: str, new: str = "", **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        import warnings

        warnings.warn(
            f"{option_string} is deprecated and will be removed in the next release; use {self.new}",
            FutureWarning,
            stacklevel=2,
        )
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)  # nargs=0: a flag, stores const


def add_deprecated_spelling(parser: argparse.ArgumentParser, old: str, new: str, dest: str, **kwargs: Any) -> None:
    """Accept ``old`` (e.g. ``--output``) for one release as a hidden spelling of ``new`` (e.g. ``--out``).

    ``dest`` is the destination of ``new``; ``kwargs`` (``type``, ``nargs`` ...) must parse the value as ``new``
    does (a flag: ``nargs=0, const=True``). The old spelling is left out of ``--help`` and prints a
    ``FutureWarning`` naming the new one.
    """
    parser.add_argument(old, dest=dest, action=_DeprecatedSpelling, new=new, help=argparse.SUPPRESS, **kwargs)


_DEVICE_RE = re.compile(r"^(auto|cpu|cuda)$")
_DEVICE_INDEX_RE = re.compile(r"^(auto|cpu|cuda|cuda:[0-9]+)$")


def add_device_option(parser: argparse.ArgumentParser, what: str, *, launched: bool = False) -> None:
    """``--device`` as every command spells it: ``auto`` (the default: a GPU when one is visible), ``cpu``,
    ``cuda`` and, for a command that runs in this process only, ``cuda:N``.

    Args:
        parser: the command's parser.
        what: what runs on the device, for the help ("where queries are embedded").
        launched: the command launches ranks (locally or on SLURM), each of which takes its own GPU, so a
            ``cuda:N`` would be wrong on all but one: only auto, cpu and cuda are accepted.
    """
    pattern = _DEVICE_RE if launched else _DEVICE_INDEX_RE
    spelled = "auto, cpu or cuda" if launched else "auto, cpu, cuda or cuda:N"

    def device(text: str) -> str:
        if not pattern.match(text):
            raise argparse.ArgumentTypeError(f"{text!r} is not a device: use {spelled}")
        return text

    device.__name__ = "device"
    help_text = f"{what}: {spelled} (auto: a GPU when one is visible, else the CPU)"
    parser.add_argument("--device", type=device, default="auto", metavar="DEVICE", help=help_text)
