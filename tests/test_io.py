"""Atomic writes (vitssl.io): whole new content or the old one, never half, and no temporaries left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from vitssl import io
from vitssl._faiss import faiss


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_bytes_and_text_creating_the_folder(tmp_path):
    path = tmp_path / "a" / "b" / "out.bin"
    assert io.atomic_write(path, b"\x00\x01") == path
    assert path.read_bytes() == b"\x00\x01"
    io.atomic_write(path, "é\n")  # str is UTF-8
    assert path.read_bytes() == "é\n".encode()
    assert _names(path.parent) == ["out.bin"]


def test_permissions_follow_mode_less_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        io.atomic_write(tmp_path / "default", b"x")
        io.atomic_write(tmp_path / "private", b"x", mode=0o600)
        os.umask(0o077)
        io.atomic_write(tmp_path / "masked", b"x")
        with io.atomic_path(tmp_path / "via_path", perm=0o640) as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"default": 0o644, "private": 0o600, "masked": 0o600, "via_path": 0o600}


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"), io.atomic_open(path, "wb") as f:
        f.write(b"half of the new")
        raise RuntimeError("disk on fire")
    with pytest.raises(KeyboardInterrupt), io.atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    with pytest.raises(TypeError):  # not JSON-encodable: nothing is written at all
        io.write_json({"x": object()}, path)
    assert path.read_bytes() == b"old"
    assert _names(tmp_path) == ["model.pt"]


def test_killed_writer_leaves_the_old_file_intact(tmp_path):
    path = tmp_path / "features.npy"
    path.write_bytes(b"old")
    code = (
        "import os, signal, sys\n"
        "from vitssl.io import atomic_open\n"
        "with atomic_open(sys.argv[1]) as f:\n"
        "    f.write(b'half'); f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], check=False)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == b"old"
    # Only a killed process leaves a temporary, and it is a hidden sibling that no reader opens by name.
    leftovers = [n for n in _names(tmp_path) if n != "features.npy"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".features.tmp-") and leftovers[0].endswith(".npy")


def test_writers_to_one_path_never_share_a_temporary(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    with io.atomic_path(path) as first, io.atomic_path(path) as second:
        assert first != second  # same process: the random part differs
        first.write_text("1")
        second.write_text("2")
    assert path.read_text() == "1"  # the last to finish wins
    # Processes that happened to draw the same random part still differ by process id.
    monkeypatch.setattr(io.secrets, "token_hex", lambda n: "00000000")
    names = []
    for pid in (111, 222):
        monkeypatch.setattr(io.os, "getpid", lambda pid=pid: pid)
        names.append(io._tmp_sibling(path).name)
    assert names[0] != names[1]
    # And were the whole name ever taken, the exclusive create refuses it instead of sharing the file.
    with io.atomic_path(path) as tmp, pytest.raises(FileExistsError), io.atomic_path(path):
        pass
    assert not tmp.exists() and _names(tmp_path) == ["out.json"]


def test_concurrent_writers_leave_one_complete_file(tmp_path):
    path = tmp_path / "manifest.json"
    errors = []

    def writer(i: int) -> None:
        try:
            for j in range(30):
                io.write_json({"writer": i, "round": j, "payload": "x" * 5000}, path)
        except Exception as err:  # surfaced below; a thread's exception would otherwise vanish
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert json.loads(path.read_text())["payload"] == "x" * 5000
    assert _names(tmp_path) == ["manifest.json"]


def test_atomic_path_serves_writers_that_pick_by_suffix(tmp_path):
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    with io.atomic_path(tmp_path / "vectors.npy") as tmp:
        assert tmp.suffix == ".npy" and tmp.name.startswith(".vectors.tmp-")
        np.save(tmp, vectors)  # would append ".npy" to a name without it
    np.testing.assert_array_equal(np.load(tmp_path / "vectors.npy"), vectors)
    index = faiss.IndexFlatL2(4)
    index.add(vectors)
    with io.atomic_path(tmp_path / "index.faiss") as tmp:
        faiss.write_index(index, str(tmp))
    assert faiss.read_index(str(tmp_path / "index.faiss")).ntotal == 3
    with io.atomic_open(tmp_path / "notes.txt", "w") as f:
        f.write("text mode\n")
    assert (tmp_path / "notes.txt").read_text() == "text mode\n"
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"), io.atomic_open(tmp_path / "x", "ab"):
        pass
    assert _names(tmp_path) == ["index.faiss", "notes.txt", "vectors.npy"]


def test_write_json(tmp_path):
    path = tmp_path / "sub" / "result.json"
    io.write_json({"b": 1, "a": Path("p")}, path, sort_keys=True, default=str)
    assert path.read_text() == '{\n  "a": "p",\n  "b": 1\n}\n'


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    target = tmp_path / "index"
    with io.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError), io.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("2")
        raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(FileExistsError, match="overwrite=True"), io.atomic_dir(target, overwrite=False) as tmp:
        (tmp / "a.txt").write_text("3")
    with io.atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("4")
    assert _names(target) == ["b.txt"]
    assert _names(tmp_path) == ["index"]
