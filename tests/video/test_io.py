"""``vitssl.video.io`` is a package (probing, readers, cache); every name callers import from it stays there."""

from __future__ import annotations

import subprocess
import sys

import vitssl.video.io as video_io
from vitssl.video.io import cache, probing, readers

# what src/, tests/ and benchmarks/ import or patch from vitssl.video.io (the module before the split)
NAMES = (
    *video_io.__all__,
    "_AVAILABLE",  # patched by tests
    "_measure_here",  # patched by tests: auto_choice looks it up in the package
    "_open_av",
    "_upright",
)


def test_every_name_callers_use_is_reachable_from_the_package_and_is_the_same_object() -> None:
    missing = [n for n in NAMES if not hasattr(video_io, n)]
    assert not missing, missing
    assert video_io._AVAILABLE is readers._AVAILABLE and video_io.clear_cache is cache.clear_cache
    assert video_io.CorruptVideoError is probing.CorruptVideoError and video_io._open_av is probing._open_av


def test_importing_the_package_imports_no_torch_and_no_reader() -> None:
    code = "import sys, vitssl.video.io; print(sorted({'torch', 'av', 'decord', 'torchcodec'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_probe_files_reports_what_the_probe_command_prints(tmp_path) -> None:
    from tests._videos import write_video
    from vitssl.video.io.report import probe_files

    good = write_video(tmp_path / "ok.mp4", num_frames=12, width=32, height=24)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    report = probe_files([good, tmp_path / "bad.mp4"], decoder="pyav")
    assert report.damaged == 1 and [e["num_frames"] for e in report.entries] == [12, 0]
    ok, bad = report.lines()
    assert ok.startswith(f"{good}: 12 frames,") and "32x24" in ok and ok.endswith("pyav")
    assert bad.startswith(f"{tmp_path / 'bad.mp4'}: DAMAGED: cannot read video") and "\n" not in bad
