"""vitssl._faiss: which faiss is loaded, the warning about several faiss builds, and a quiet loader."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from vitssl import _faiss
from vitssl._faiss import faiss


def _fake_distribution(site: Path, name: str, version: str, files: list[str]) -> None:
    """A minimal installed-distribution record, as pip leaves one in site-packages."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in [*files, f"{info.name}/METADATA"]))


def _run(code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)


def test_faiss_info_describes_the_loaded_faiss():
    info = _faiss.faiss_info()
    assert info["version"] == faiss.__version__
    assert Path(info["path"]) == Path(faiss.__file__).parent
    assert info["distributions"]  # the distribution this faiss came from
    assert isinstance(info["gpu_support"], bool) and info["gpu_support"] == hasattr(faiss, "StandardGpuResources")
    assert info["num_gpus"] >= 0 and (info["gpu_support"] or info["num_gpus"] == 0)
    assert _faiss.gpu_available() == (info["gpu_support"] and info["num_gpus"] > 0)


def test_several_faiss_builds_are_found_and_warned_about(tmp_path, monkeypatch, caplog):
    _fake_distribution(tmp_path, "faiss-cpu", "1.15.1", ["faiss/__init__.py", "faiss/_swigfaiss.so"])
    _fake_distribution(tmp_path, "faiss-haystack", "3.0.0", ["haystack_integrations/faiss.py"])  # a plugin
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    assert _faiss.faiss_distributions() == ["faiss-cpu"]
    with caplog.at_level(logging.WARNING, logger="vitssl._faiss"):
        _faiss._warn_if_several_faiss()
    assert not caplog.records

    _fake_distribution(tmp_path, "faiss-gpu", "1.15.1", ["faiss/__init__.py", "faiss/_swigfaiss.so"])
    assert _faiss.faiss_distributions() == ["faiss-cpu", "faiss-gpu"]
    with caplog.at_level(logging.WARNING, logger="vitssl._faiss"):
        _faiss._warn_if_several_faiss()
    [record] = caplog.records
    assert "several faiss builds are installed (faiss-cpu, faiss-gpu)" in record.getMessage()
    assert "pip uninstall -y faiss-cpu && pip install --force-reinstall --no-deps 'faiss-gpu==1.15.1'" in (
        record.getMessage()
    )


def test_import_warns_once_and_keeps_the_loader_quiet(tmp_path):
    # A GPU build recorded beside the real faiss: the import sees two builds of the module.
    _fake_distribution(tmp_path, "faiss-gpu-cu12", "1.14.1", ["faiss/__init__.py"])
    code = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "import vitssl._faiss as f\n"
        "f.faiss_info(); f.gpu_available()\n"
        "import vitssl._faiss\n"
    )
    err = _run(code, tmp_path).stderr
    assert err.count("several faiss builds are installed") == 1, err
    assert "faiss-gpu-cu12" in err
    assert "faiss.loader" not in err  # "Loading faiss ...", "Could not load library with AVX2 support ..."


def test_loader_messages_show_at_debug():
    err = _run("import logging; logging.basicConfig(level=logging.DEBUG)\nimport vitssl._faiss\n").stderr
    assert "faiss.loader" in err


def test_a_faiss_folder_without_the_library_fails_with_the_fix(tmp_path, monkeypatch):
    # What `pip uninstall faiss-cpu` leaves after faiss-gpu was installed over it: an importable, empty folder.
    _fake_distribution(tmp_path, "faiss-gpu", "1.15.1", ["faiss/__init__.py"])
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    empty = types.ModuleType("faiss")
    empty.__path__ = [str(tmp_path / "faiss")]
    with pytest.raises(ImportError, match=r"incomplete.*pip install --force-reinstall --no-deps 'faiss-gpu==1\.15\.1'"):
        _faiss._check_complete(empty)
    assert _faiss._check_complete(faiss) is faiss
