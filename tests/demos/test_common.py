"""What the demos share: the run folder that follows the settings, and the demos' command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from vitssl.demos.common import demo_output_dir, demo_root


def test_the_demo_folder_follows_the_settings_unless_output_dir_names_it():
    assert demo_root(["seed=1", "train.epochs=2"], "runs/demo_x") == (
        Path("runs/demo_x-seed=1,train.epochs=2"),
        ["seed=1", "train.epochs=2"],
    )
    assert demo_root(["output_dir=/tmp/here", "seed=1"], "runs/demo_x") == (Path("/tmp/here"), ["seed=1"])
    assert demo_output_dir(["a=b c"], "runs/d") == "runs/d-a=b_c"  # no spaces or slashes in the folder name


def test_the_demos_package_and_command_line_import_no_torch():
    """`python -m vitssl.demo --help` answers at once; each demo imports what it needs when it runs."""
    code = (
        "import sys\nimport vitssl.demos, vitssl.demos.main, vitssl.demos.common\n"
        "print(sorted(m for m in ('torch', 'faiss') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_an_unknown_demo_name_is_an_override_error_in_one_line(tmp_path):
    """Only action / tca / track name a demo; another first word is an override of the digits demo's recipe."""
    proc = subprocess.run(
        [sys.executable, "-m", "vitssl.demo", "actoin", f"output_dir={tmp_path}"], capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("vitssl demo: error:") and len(proc.stderr.strip().splitlines()) == 1
