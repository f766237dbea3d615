"""One small registry: named factories, wildcard listing, helpful errors for unknown names.

A registry fills itself: it knows the modules whose import registers its entries (its *providers*, named as
strings, the way packaging entry points name plugins) and imports them on the first lookup or listing. So
``from vitssl.engine import load_objective; load_objective(path)`` works in a fresh interpreter without an
``import vitssl.ssl`` first, and a lower floor never imports a higher one in its code.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
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
        providers: modules whose import registers the entries, imported in this order on the first lookup
            (a lookup stops importing once it finds its name; a listing imports them all).
    """

    def __init__(self, kind: str, providers: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.providers = tuple(providers)
        self._items: dict[str, T] = {}
        self._pending = list(self.providers)  # providers not imported yet

    def _fill(self, until: str | None = None) -> None:
        """Import the providers not imported yet: all of them, or until ``until`` is registered.

        A provider is taken off the list before it is imported, so a lookup made while it imports (by the
        provider itself, or a package it imports) does not import it again.
        """
        while self._pending and (until is None or until not in self._items):
            module = self._pending.pop(0)
            try:
                importlib.import_module(module)
            except BaseException:
                self._pending.insert(0, module)  # the next lookup tries again (and raises the same error)
                raise

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
        self._fill(until=name)
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        self._fill()
        close = difflib.get_close_matches(name, self._items, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Valid names: {', '.join(sorted(self._items))}"

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted names matching a shell-style wildcard ``pattern``."""
        self._fill()
        return sorted(n for n in self._items if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        self._fill(until=name if isinstance(name, str) else None)
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        self._fill()
        return iter(sorted(self._items))

    def __len__(self) -> int:
        self._fill()
        return len(self._items)


# Objectives (image and video) register here by name, so that the config can type an ``objective`` block and the
# engine can build one, neither importing the modules that define them: the first lookup imports the packages
# that define them.
OBJECTIVES: Registry[type] = Registry("objective", providers=("vitssl.ssl", "vitssl.video.registered"))
