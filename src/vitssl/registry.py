"""One small registry: named factories, wildcard listing, helpful errors for unknown names."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from vitssl.errors import UserError

T = TypeVar("T")


class UnknownNameError(UserError, KeyError):
    """Raised for a name that is not registered; the message lists the valid names."""


class Registry(Generic[T]):
    """Maps names to objects (usually classes or factory functions).

    Args:
        kind: what the registry holds ("backbone", "objective", ...); used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable as ``@registry.register()`` or ``@registry.register("x")``.

        Args:
            name: registry key; defaults to the object's ``__name__``.
            obj: the object, when not used as a decorator.
        """

        def _add(item: T) -> T:
            key = name or item.__name__  # type: ignore[attr-defined]
            if key in self._items and self._items[key] is not item:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = item
            return item

        return _add(obj) if obj is not None else _add

    def get(self, name: str) -> T:
        """Return the object registered as ``name``; unknown names fail with the valid names."""
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self._items, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Valid names: {', '.join(sorted(self._items))}"

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted names matching a shell-style wildcard ``pattern``."""
        return sorted(n for n in self._items if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)


# Objectives (image and video) register here by name, so that the config can type an ``objective`` block and the
# engine can build one, neither importing the modules that define them. The command-line entry points import
# the objective packages (``vitssl.ssl``, ``vitssl.video``) before they read a config.
OBJECTIVES: Registry[type] = Registry("objective")
