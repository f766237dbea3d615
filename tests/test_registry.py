"""Registries fill themselves: the first lookup or listing imports the modules that register the entries."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import vitssl
from vitssl.registry import Registry, UnknownNameError

PACKAGE_DIR = Path(vitssl.__file__).resolve().parent


def _module_registries() -> list[tuple[str, str]]:
    """``(module, name)`` of every module-level ``NAME = SomeRegistry(...)`` in the package."""
    found = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text())
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for node in tree.body:
            target = node.target if isinstance(node, ast.AnnAssign) else None
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
            call = getattr(node, "value", None)
            is_call = isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
            if isinstance(target, ast.Name) and is_call and call.func.id.endswith("Registry"):
                found.append((module, target.id))
    return found


REGISTRIES = _module_registries()


def test_the_scan_finds_the_registries():
    assert {("vitssl.registry", "OBJECTIVES"), ("vitssl.backbones._base", "BACKBONES")} <= set(REGISTRIES)
    assert ("vitssl.data.common", "DATASETS") in REGISTRIES


@pytest.mark.parametrize(("module", "name"), REGISTRIES, ids=[f"{m}.{n}" for m, n in REGISTRIES])
def test_a_registry_lists_everything_in_a_fresh_interpreter(module, name):
    """Importing only the registry's module, its listing equals the listing of a process that imported all."""
    import importlib

    registry = getattr(importlib.import_module(module), name)
    assert registry.providers, f"{module}.{name} names no provider modules: its first lookup cannot fill it"
    # what the package registers (tests register entries of their own in this process, e.g. test_engine's)
    expected = [n for n in registry.list() if getattr(registry.get(n), "__module__", "").startswith("vitssl.")]
    assert expected
    code = f"import json\nfrom {module} import {name} as r\nprint(json.dumps(r.list()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == expected


def test_load_objective_in_a_fresh_interpreter(tmp_path):
    """The Python API works without `import vitssl.ssl` first (it failed with 'no objective is registered')."""
    from vitssl.config import load_config
    from vitssl.engine import train

    train(load_config("pretrain/test_tiny", [f"output_dir={tmp_path}", "train.epochs=1", "train.batch_size=32"]))
    code = (
        "import sys\nfrom vitssl.engine import load_objective\n"
        f"objective, cfg, _ = load_objective({str(tmp_path / 'checkpoint_last.pth')!r})\n"
        "print(type(objective).__name__, cfg.objective.name, 'vitssl.video' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["Supervised", "supervised", "False"]  # found in vitssl.ssl: the video package is not imported


def test_a_video_recipe_loads_in_a_fresh_interpreter():
    """`load_config` needs no registration step first (the commands and demos no longer take one): the recipe's
    objective and datasets are found in vitssl.video on the first lookup."""
    code = (
        "from vitssl.config import load_config\nfrom vitssl.data import check_dataset_options\n"
        "cfg = load_config('video/action_demo')\nd = cfg.data.train\n"
        "check_dataset_options(d.name, d.root, dict(d.kwargs), key='data.train')\n"
        "print(cfg.objective.name, d.name)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["video_action", "motion"]


def test_a_lookup_imports_providers_until_it_finds_the_name():
    registry: Registry[int] = Registry("thing", providers=("json", "vitssl.errors"))
    registry.register("one", 1)
    assert registry.get("one") == 1 and registry._pending == ["json", "vitssl.errors"]  # nothing imported
    with pytest.raises(UnknownNameError, match=r"unknown thing 'two'.*Valid names: one"):
        registry.get("two")
    assert registry._pending == []  # an unknown name imported every provider before failing


def test_a_provider_that_fails_to_import_is_tried_again():
    registry: Registry[int] = Registry("thing", providers=("vitssl._no_such_module",))
    for _ in range(2):
        with pytest.raises(ModuleNotFoundError):
            registry.list()
