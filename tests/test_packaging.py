"""The built wheel carries the recipes, and a recipe runs by name from a folder outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=out)
    (path,) = out.glob("vitssl-*.whl")
    return path


def test_wheel_contains_the_recipes(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = sorted(REPO.joinpath("src/vitssl/recipes").rglob("*.*"))
    assert recipes
    for path in recipes:
        assert f"vitssl/{path.relative_to(REPO / 'src/vitssl').as_posix()}" in names


def test_recipe_runs_by_name_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}  # the wheel's package first, as after `pip install .`
    code = (
        "import vitssl, sys; assert vitssl.__file__.startswith(sys.argv[1]), vitssl.__file__\n"
        "from vitssl.cli import main\n"
        "sys.exit(main(['pretrain', 'pretrain/mocov3_demo', 'output_dir=run', '--dry-run', 'launch=slurm']))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert "#SBATCH" in out.stdout
    code = "from vitssl.config import resolve_config_path as r; print(r('configs/pretrain/test_tiny.yaml'))"
    old_path = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, check=True
    )
    assert old_path.stdout.strip().startswith(str(site))  # the repository path users typed still names the recipe
