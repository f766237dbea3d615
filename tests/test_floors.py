"""Floors: every module imports only from its own floor or lower ones, function-local imports included.

```
9  cli/, demos/, demo (the `python -m vitssl.demo` shim), __main__     nothing imports cli
8  index/
7  video/                                                             never imports index
6  eval/                                                              never imports video or index
5  launch/
4  engine/
3  ssl/
2  backbones/, data/
1  config, registry, distributed, io, errors, _faiss, the package itself
```

A lower floor that needs something from a higher one takes it as an argument or a callback. The walker reads the
source (``ast``), so what it checks is what the files say, whether or not a code path runs:

- ``import vitssl.a.b`` is an edge to ``vitssl.a.b``; ``from vitssl.a import b`` to ``vitssl.a.b`` when ``b`` is a
  module, else to ``vitssl.a`` (a package's ``__init__`` is a module of its own, named like the package). The
  parents a statement initialises on the way (``vitssl``, ``vitssl.a``) are not edges: every submodule would
  otherwise "import" its package and every package that imports its submodules would be a cycle.
- An import under ``if TYPE_CHECKING:`` (for annotations; it never runs) counts for the floors, not for cycles.
- A constant ``"vitssl.a.b:function"`` (a launch target, imported by name in a spawned process or SLURM job) and
  ``importlib.import_module("vitssl.a.b")`` are edges to ``vitssl.a.b``.
- A registry's ``providers=("vitssl.x", ...)`` (the modules its first lookup imports) are *plugin-loading edges*:
  the one sanctioned inversion, a low registry naming the higher modules that register into it. They are listed
  with their reason in ``PLUGIN_EDGES``, allowed only on a ``Registry(...)``, left out of the floor and cycle
  checks, and checked to name modules that exist and register into that registry.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import NamedTuple

import pytest

import vitssl

PACKAGE_DIR = Path(vitssl.__file__).resolve().parent
FLOORS: dict[int, tuple[str, ...]] = {
    1: (
        "vitssl",
        "vitssl.config",
        "vitssl.registry",
        "vitssl.distributed",
        "vitssl.io",
        "vitssl.errors",
        "vitssl._faiss",
    ),
    2: ("vitssl.backbones", "vitssl.data"),
    3: ("vitssl.ssl",),
    4: ("vitssl.engine",),
    5: ("vitssl.launch",),
    6: ("vitssl.eval",),
    7: ("vitssl.video",),
    8: ("vitssl.index",),
    9: ("vitssl.cli", "vitssl.demos", "vitssl.demo", "vitssl.__main__"),
}
# The console entry points: the only modules outside vitssl.cli that may import it.
CLI_ENTRY_POINTS = ("vitssl.__main__",)

# (registry module, provider): why the registry names it. A registry fills itself on its first lookup by importing
# these (vitssl.registry.Registry), so that a lookup works in a fresh interpreter while no module imports upward.
PLUGIN_EDGES: dict[tuple[str, str], str] = {
    ("vitssl.registry", "vitssl.ssl"): "OBJECTIVES: the image objectives register when vitssl.ssl is imported",
    ("vitssl.registry", "vitssl.video.registered"): "OBJECTIVES: the video objectives (heads, TCA, TransTrack)",
    ("vitssl.data.common", "vitssl.data"): "DATASETS: the image datasets register when vitssl.data is imported",
    ("vitssl.data.common", "vitssl.video.registered"): "DATASETS: video clips, tracking pairs, frame features",
    ("vitssl.backbones._base", "vitssl.backbones"): "BACKBONES: each model family file registers its variants",
    ("vitssl.video.heads", "vitssl.video.heads"): "VIDEO_HEADS: the built-in heads register below the registry",
    ("vitssl.index.pipeline", "vitssl.index.corpora"): "CORPORA: the built-in corpus kinds (images, videos)",
    ("vitssl.index.pipeline", "vitssl.index.embedders"): "EMBEDDERS: image, video, thumbnails, tca",
    ("vitssl.eval.jobs", "vitssl.eval.probe_jobs"): "EVAL_JOBS: the k-NN and linear-probe jobs",
    ("vitssl.eval.jobs", "vitssl.index.jobs"): "EVAL_JOBS: the index train, shard, merge and build jobs",
}

# Violations being worked off: each entry is an upward edge (importer, imported) or a cycle (its modules, sorted).
# Both are empty; a violation not listed here fails, and so does an entry that is no longer a violation.
KNOWN_UPWARD: set[tuple[str, str]] = set()
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


SOURCES = sorted(PACKAGE_DIR.rglob("*.py"))
MODULES = {module_name(p): p for p in SOURCES}


def floor_of(module: str) -> int:
    """The floor of a module: the longest prefix named in FLOORS (the bare package ``vitssl`` is floor 1)."""
    best, best_len = None, -1
    for floor, prefixes in FLOORS.items():
        for prefix in prefixes:
            if prefix == "vitssl" and module != "vitssl":
                continue
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = floor, len(prefix)
    if best is None:
        raise AssertionError(f"module {module} has no floor: add it to FLOORS in tests/test_floors.py")
    return best


_TARGET_RE = re.compile(r"^(vitssl(?:\.\w+)*):[A-Za-z_][\w.]*$")


def _is_registry_call(node: ast.AST) -> bool:
    func = getattr(node, "func", None)
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    return isinstance(node, ast.Call) and name.endswith("Registry")


class Edges(NamedTuple):
    imports: frozenset[str]  # what the module imports (runs), at any depth of the file
    typing: frozenset[str]  # imported under `if TYPE_CHECKING:` only (for annotations; never runs)
    plugins: frozenset[str]  # registry providers: plugin-loading edges


@cache
def edges_of(module: str) -> Edges:
    """The edges of a vitssl module, read from its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    return edges_in(ast.parse(path.read_text(), filename=str(path)), module, package)


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def edges_in(tree: ast.Module, module: str, package: str) -> Edges:
    """The edges of the source ``tree`` of ``module``, whose package is ``package``."""
    found: set[str] = set()
    typing_only: set[str] = set()
    plugins: set[str] = set()
    skip: set[int] = set()  # provider strings (plugins, not launch targets)
    type_only: set[int] = set()  # nodes inside `if TYPE_CHECKING:`
    for node in ast.walk(tree):
        if _is_registry_call(node):
            for kw in node.keywords:
                if kw.arg == "providers":
                    for const in ast.walk(kw.value):
                        if isinstance(const, ast.Constant) and isinstance(const.value, str):
                            plugins.add(const.value)
                            skip.add(id(const))
        if _is_type_checking(node):
            type_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    for node in ast.walk(tree):
        into = typing_only if id(node) in type_only else found
        if isinstance(node, ast.Import):
            into.update(alias.name for alias in node.names if alias.name.split(".")[0] == "vitssl")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "vitssl":
                continue
            for alias in node.names:  # `from vitssl.a import b` imports the submodule b, or takes a name of a
                into.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("vitssl"):
                into.add(arg.value)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            match = _TARGET_RE.match(node.value)
            if match:
                into.add(match.group(1))
    found.discard(module)
    typing_only.discard(module)
    return Edges(frozenset(found), frozenset(typing_only - found), frozenset(plugins))


def graph(with_typing: bool = False) -> dict[str, set[str]]:
    """Module -> the vitssl modules it imports (and, ``with_typing``, those it names in annotations only);
    plugin-loading edges are left out."""
    return {m: set(edges_of(m).imports) | (set(edges_of(m).typing) if with_typing else set()) for m in MODULES}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One readable chain per cycle: for each strongly connected component (Tarjan), the shortest cycle through
    each of its modules, deduplicated (a chain starts and ends at the same module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:  # recursion depth is bounded by the module count (a few hundred)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in g:
                continue
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            strongconnect(v)

    chains: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for component in components:
        inside = set(component)
        for start in component:  # breadth-first search back to start inside the component
            parent = {start: None}
            queue = [start]
            end = None
            while queue and end is None:
                nxt = []
                for v in queue:
                    for w in sorted(g[v] & inside):
                        if w == start:
                            end = v
                            break
                        if w not in parent:
                            parent[w] = v
                            nxt.append(w)
                    if end is not None:
                        break
                queue = nxt
            chain = [start]
            v = end
            while v is not None and v != start:
                chain.append(v)
                v = parent[v]
            chain = [start, *reversed(chain[1:]), start]
            key = tuple(sorted(set(chain)))
            if key not in seen:
                seen.add(key)
                chains.append(chain)
    return chains


def upward_edges(g: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(m, t) for m, targets in g.items() for t in targets if floor_of(t) > floor_of(m)}


# ----------------------------------------------------------------------------------------------------------------
# The rules
# ----------------------------------------------------------------------------------------------------------------


def test_every_module_has_a_floor_and_every_import_exists():
    for module in MODULES:
        floor_of(module)
    missing = sorted((m, t) for m, targets in graph(with_typing=True).items() for t in targets if t not in MODULES)
    assert not missing, "imports of vitssl modules that do not exist: " + ", ".join(f"{m} -> {t}" for m, t in missing)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_downward_only(module):
    """One case per module: what it imports (annotations included) sits on its floor or lower."""
    here = floor_of(module)
    targets = set(edges_of(module).imports) | set(edges_of(module).typing)
    new = sorted(t for t in targets if floor_of(t) > here and (module, t) not in KNOWN_UPWARD)
    assert not new, f"{module} (floor {here}) imports against the floors: " + ", ".join(
        f"{t} (floor {floor_of(t)})" for t in new
    )


def test_known_upward_edges_are_still_there():
    fixed = sorted(KNOWN_UPWARD - upward_edges(graph(with_typing=True)))
    assert not fixed, f"KNOWN_UPWARD lists edges that are gone, remove them: {fixed}"


def test_no_module_cycles():
    chains = cycles(graph())
    new = [c for c in chains if tuple(sorted(set(c))) not in KNOWN_CYCLES]
    assert not new, "modules that import each other (directly or through others):\n" + "\n".join(
        "  " + " -> ".join(c) for c in new
    )
    fixed = KNOWN_CYCLES - {tuple(sorted(set(c))) for c in chains}
    assert not fixed, f"KNOWN_CYCLES lists cycles that are gone, remove them: {sorted(fixed)}"


def test_nothing_imports_cli():
    wrong = sorted(
        (m, t)
        for m, targets in graph(with_typing=True).items()
        for t in targets
        if floor_of(t) == 9
        and t.startswith("vitssl.cli")
        and not m.startswith("vitssl.cli")
        and m not in CLI_ENTRY_POINTS
    )
    assert not wrong, "cli is imported by: " + ", ".join(f"{m} -> {t}" for m, t in wrong)


def test_plugin_loading_edges_are_the_listed_ones():
    found = {(m, p) for m in MODULES for p in edges_of(m).plugins}
    assert found == set(PLUGIN_EDGES), (
        f"registry providers not listed in PLUGIN_EDGES: {sorted(found - set(PLUGIN_EDGES))}; "
        f"listed but gone: {sorted(set(PLUGIN_EDGES) - found)}"
    )
    for _, provider in PLUGIN_EDGES:
        assert provider in MODULES, f"a registry names the provider {provider}, which is no vitssl module"


def test_each_provider_registers_into_its_registry():
    """Each provider a registry names defines entries of it: an entry's class or factory lives in the provider's
    package (a provider module such as ``vitssl.video.registered`` stands for its package, ``vitssl.video``)."""
    registries = {
        "vitssl.registry": ("OBJECTIVES",),
        "vitssl.data.common": ("DATASETS",),
        "vitssl.backbones._base": ("BACKBONES",),
        "vitssl.video.heads": ("VIDEO_HEADS",),
        "vitssl.index.pipeline": ("CORPORA", "EMBEDDERS"),
        "vitssl.eval.jobs": ("EVAL_JOBS",),
    }
    assert {m for m, _ in PLUGIN_EDGES} == set(registries)
    for (module, provider), _ in PLUGIN_EDGES.items():
        home = provider if MODULES[provider].name == "__init__.py" else provider.rsplit(".", 1)[0]
        defined = []
        for name in registries[module]:
            registry = getattr(importlib.import_module(module), name)
            defined += [n for n in registry.list() if getattr(registry.get(n), "__module__", "").startswith(home + ".")]
        assert defined, f"{module} names the provider {provider}, which registers nothing in {registries[module]}"


# ----------------------------------------------------------------------------------------------------------------
# The walker itself
# ----------------------------------------------------------------------------------------------------------------


def test_the_walker_sees_function_local_imports_and_submodules():
    # build_objective imports the backbones inside a function; losses import distributed at module level
    assert "vitssl.backbones" in edges_of("vitssl.engine.trainer").imports
    assert "vitssl.distributed" in edges_of("vitssl.ssl.losses").imports
    # `from vitssl.ssl import palette as pal`-style imports are the submodule, not the package's __init__
    assert "vitssl.ssl.palette" in edges_of("vitssl.ssl.igpt").imports
    assert "vitssl.ssl" not in edges_of("vitssl.ssl.igpt").imports
    # the package __init__ is a module of its own: it imports its objectives
    assert {"vitssl.ssl.clip", "vitssl.ssl.igpt"} <= edges_of("vitssl.ssl").imports
    # registry providers are plugin edges, not imports
    assert edges_of("vitssl.registry").plugins == {"vitssl.ssl", "vitssl.video.registered"}
    assert floor_of("vitssl.eval.knn") == 6 > floor_of("vitssl.ssl.base") == 3 > floor_of("vitssl._faiss") == 1
    assert floor_of("vitssl.index.core") == 8 > floor_of("vitssl.video.io") == 7 > floor_of("vitssl.launch") == 5


def test_the_cycle_finder_reports_chains():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}}
    chains = cycles(g)
    assert ["a", "b", "c", "a"] in chains and ["e", "f", "e"] in chains
    assert all(c[0] == c[-1] for c in chains) and not any("d" in c for c in chains)


def test_the_walker_sees_launch_targets_and_import_module():
    source = (
        "import importlib\nTARGET = 'vitssl.cli.pretrain:pretrain_job'\n"
        "def f():\n    importlib.import_module('vitssl.demos')\n    from vitssl.engine import checkpoint, train\n"
        "    from . import io\n"
    )
    edges = edges_in(ast.parse(source), "vitssl.probe", "vitssl")
    assert edges.imports == {
        "vitssl.cli.pretrain",
        "vitssl.demos",
        "vitssl.engine.checkpoint",
        "vitssl.engine",
        "vitssl.io",
    }
    assert not edges.typing and not edges.plugins


def test_the_command_line_parser_imports_no_torch():
    """`vitssl --help` / `--version` and argument errors answer without importing torch (seconds saved)."""
    code = (
        "import sys\nfrom vitssl.cli import build_parser\nbuild_parser()\n"
        "print(sorted(m for m in ('torch', 'faiss', 'timm', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
