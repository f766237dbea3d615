"""Atomic writes: a reader never sees half a file or half a folder, and a failed write leaves the old one.

A reader (another rank, a concurrent command, a crashed run being resumed) opens either the old content or
the new, complete one: everything is written under a hidden temporary sibling name and renamed into place,
which POSIX makes atomic within one file system. Pick the helper by how the content is produced:

- :func:`atomic_write` - the bytes or text are in memory (``atomic_write(path, text)``).
- :func:`atomic_open` - a writer streams into a file object (``torch.save(obj, f)``, ``np.save(f, a)``).
- :func:`atomic_path` - a library wants a path and opens it itself (``faiss.write_index(index, str(tmp))``).
- :func:`write_json` - indented JSON, built on :func:`atomic_write`.
- :func:`atomic_dir` - a whole folder (feature sets, index folders); :func:`make_tmp_dir` + :func:`replace_dir`
  are its two halves for callers that manage the temporary folder themselves.

Temporary names are ``.<stem>.tmp-<pid>-<random><suffix>``: the process id and a random part keep two writers
(ranks, concurrent commands, hosts sharing a file system) from ever sharing one, and the target's suffix is
kept so that writers which pick a format or append an extension by name (``np.save`` adds ``.npy`` to other
names, PIL and matplotlib choose the format from it) write exactly where they are told. A temporary is
removed when the write fails with an exception; only a killed process can leave one behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

PathLike = str | os.PathLike[str]


def _tmp_sibling(path: Path) -> Path:
    """A hidden sibling name that no other writer, in this process or another, will pick."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` alone must set one)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere: set and restore at once (briefly visible to other threads creating files).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable; best effort (some file systems refuse directory fsync)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike, *, perm: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it is synced and renamed to ``path``.

    For writers that take a path and open it themselves (``faiss.write_index(index, str(tmp))``). The parent
    folder is created. If the block raises, the temporary is removed and ``path`` keeps its old content.

    Args:
        path: destination file.
        perm: permission bits of the result, less the process umask (like a newly created file).

    Yields:
        The temporary path: an empty file reserved for this writer (created exclusively).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    # O_EXCL: the name is ours alone even if a random part ever repeats.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        yield tmp
        # The writer may have used its own file handle: sync through a new one (fsync acts on the file).
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, perm & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb", *, perm: int = 0o644, encoding: str = "utf-8") -> Iterator[IO[Any]]:
    """Open a file object whose content replaces ``path`` when the block ends without an exception.

    For writers that stream into a file object: ``with atomic_open(p) as f: torch.save(obj, f)``.

    Args:
        path: destination file.
        mode: "wb" (bytes) or "w" (text).
        perm: permission bits of the result, less the process umask.
        encoding: text encoding for mode "w".

    Yields:
        The open file object (of a temporary sibling of ``path``).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole new file: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path, perm=perm) as tmp, open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
        yield f


def atomic_write(path: PathLike, data: bytes | str, mode: int = 0o644) -> Path:
    """Replace ``path`` with ``data`` atomically (str is written as UTF-8), creating its folder.

    Args:
        path: destination file.
        data: the whole new content.
        mode: permission bits of the result, less the process umask.

    Returns:
        ``path`` as a Path.
    """
    with atomic_open(path, "wb", perm=mode) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def write_json(
    obj: Any, path: PathLike, *, sort_keys: bool = False, default: Callable[[Any], Any] | None = None
) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically, creating its folder.

    Args:
        obj: the value to write.
        path: destination file.
        sort_keys: sort object keys (stable diffs of manifests).
        default: ``json.dumps``'s fallback for values it cannot encode (e.g. ``str``); None raises on them.
    """
    # Encoded before the file is touched: an unencodable value leaves the old file as it was.
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=default) + "\n")


def make_tmp_dir(directory: PathLike) -> Path:
    """Create and return an empty hidden sibling of ``directory`` to fill before :func:`replace_dir`."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(directory)
    tmp.mkdir()
    return tmp


def replace_dir(tmp: PathLike, directory: PathLike) -> None:
    """Rename a finished temporary folder to ``directory``; a folder already there is removed only afterwards."""
    tmp, directory = Path(tmp), Path(directory)
    if directory.exists():
        # Two renames, so readers see the old or the new folder, never none for longer than between them.
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)


@contextlib.contextmanager
def atomic_dir(directory: PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder to fill; on success it replaces ``directory``, on failure it is removed.

    Args:
        directory: destination folder.
        overwrite: replace a folder already at ``directory``; False raises FileExistsError instead (checked
            when the block ends, so check earlier too where filling the folder is expensive).

    Yields:
        The temporary folder, a hidden sibling of ``directory``.
    """
    directory = Path(directory)
    tmp = make_tmp_dir(directory)
    try:
        yield tmp
        if not overwrite and directory.exists():
            raise FileExistsError(f"{directory} already exists; pass overwrite=True to replace it")
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
