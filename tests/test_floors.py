"""Floors: every module imports only from its own floor or lower ones, function-local imports included.

```
7  cli/, demo, __main__
6  launch/            (runs job callables; knows nothing of eval, index or video)
5  eval/, index/, video/
4  engine/
3  ssl/
2  backbones/, data/
1  config, registry, distributed, io, errors, _faiss, the package itself
```

A lower floor that needs something from a higher one takes it as an argument or a callback.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import vitssl

PACKAGE_DIR = Path(vitssl.__file__).resolve().parent
FLOORS = {
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
    5: ("vitssl.eval", "vitssl.index", "vitssl.video"),
    6: ("vitssl.launch",),
    7: ("vitssl.cli", "vitssl.demo", "vitssl.__main__"),
}


def floor_of(module: str) -> int:
    """The floor of a module: the longest prefix named in FLOORS (the bare package is floor 1)."""
    best, best_len = None, -1
    for floor, prefixes in FLOORS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                if prefix == "vitssl" and module != "vitssl":
                    continue
                best, best_len = floor, len(prefix)
    if best is None:
        raise AssertionError(f"module {module} has no floor: add it to FLOORS in tests/test_floors.py")
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every vitssl module ``path`` imports, at any depth of the file (function-local imports too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "vitssl")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] != "vitssl":
                continue
            found.add(name)
            for alias in node.names:  # `from vitssl import distributed` imports the submodule
                candidate = f"{name}.{alias.name}"
                if (PACKAGE_DIR.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or (
                    PACKAGE_DIR.parent / Path(*candidate.split(".")) / "__init__.py"
                ).exists():
                    found.add(candidate)
    return found


SOURCES = sorted(PACKAGE_DIR.rglob("*.py"))


def test_every_module_has_a_floor():
    for path in SOURCES:
        floor_of(module_name(path))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_imports_go_downward_only(path):
    module = module_name(path)
    floor = floor_of(module)
    upward = sorted(m for m in imported_modules(path) if floor_of(m) > floor)
    assert not upward, f"{module} (floor {floor}) imports higher floors: " + ", ".join(
        f"{m} (floor {floor_of(m)})" for m in upward
    )


def test_launch_knows_nothing_of_evaluation():
    for path in (PACKAGE_DIR / "launch").rglob("*.py"):
        wrong = sorted(m for m in imported_modules(path) if floor_of(m) == 5)
        assert not wrong, f"{module_name(path)} imports {wrong}"


def test_the_floor_walker_sees_function_local_imports():
    # build_objective imports the backbones inside the function; losses import distributed at module level
    assert "vitssl.backbones" in imported_modules(PACKAGE_DIR / "engine" / "trainer.py")
    assert "vitssl.distributed" in imported_modules(PACKAGE_DIR / "ssl" / "losses.py")
    assert floor_of("vitssl.eval.knn") == 5 > floor_of("vitssl.ssl.base") == 3 > floor_of("vitssl._faiss") == 1


def test_the_command_line_parser_imports_no_torch():
    """`vitssl --help` / `--version` and argument errors answer without importing torch (seconds saved)."""
    code = (
        "import sys\nfrom vitssl.cli import build_parser\nbuild_parser()\n"
        "print(sorted(m for m in ('torch', 'faiss', 'timm', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
