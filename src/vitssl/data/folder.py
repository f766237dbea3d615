"""ImageFolder: ``root/<class>/<image>`` trees, optionally split into ``root/train``, ``root/val``, ..."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from vitssl.data.common import DATASETS, IMG_EXTENSIONS, ImageDataset, require_root
from vitssl.data.decode import open_lazy_rgb
from vitssl.errors import DataError, MissingFileError

_LAYOUT = "one sub-folder per class with images inside (root/<class>/<image>.jpg), or root/<split>/<class>/<image>"
# Folder names that mark a root as holding splits; if one of them exists, the requested split must exist too.
_SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


@DATASETS.register("imagefolder")
class ImageFolder(ImageDataset):
    """A torchvision-style ImageFolder tree, decoded lazily with PIL.

    ``root/<split>`` is used when it exists, else ``root`` itself. Class names are the sorted sub-folder names;
    images inside a class folder are found recursively and sorted, so indices are stable across machines.

    Args:
        root: the tree's root folder.
        split: sub-folder to use when present.
        extensions: accepted file extensions (case-insensitive).
    """

    def __init__(
        self, root: str | os.PathLike | None, split: str = "train", extensions: tuple[str, ...] = IMG_EXTENSIONS
    ) -> None:
        self.root, self.classes, self.samples, self.targets = scan_class_tree(
            "imagefolder", root, split, _LAYOUT, extensions, "images"
        )

    def load_image(self, index: int) -> Image.Image:
        # RGB JPEGs come undecoded: the sample function decodes them at the size its crops need
        return open_lazy_rgb(self.samples[index])

    def sample_id(self, index: int) -> str:
        return self.samples[index]


def scan_class_tree(
    name: str, root: str | os.PathLike | None, split: str, layout: str, extensions: tuple[str, ...], what: str
) -> tuple[Path, list[str], list[str], list[int]]:
    """Find ``root/[<split>/]<class>/**/<file>`` files: the folder used, sorted classes, files and their labels.

    ``root/<split>`` is used when it exists, else ``root`` itself (unless ``root`` holds other split folders:
    falling back would silently treat them as classes). Files are found recursively and sorted, so indices are
    stable across machines. Shared by ``imagefolder`` and ``videofolder``.

    Args:
        name: the dataset's registry name, for messages.
        root: the tree's root folder.
        split: sub-folder to use when present.
        layout: a description of the expected tree, for messages.
        extensions: accepted file extensions (case-insensitive).
        what: what the files are ("images", "videos"), for messages.

    Raises:
        DataError: ``root`` is a file. MissingFileError: no root, no classes, or an empty class folder.
    """
    base = require_root(name, root, layout)
    if not base.is_dir():
        raise DataError(f"{name} root {str(base)!r} is a file; expected a folder with {layout}")
    folder = base / split
    if not folder.is_dir():
        present = [s for s in _SPLIT_NAMES if (base / s).is_dir()]
        if present:
            raise MissingFileError(
                f"{name} root {str(base)!r} has split folders {', '.join(present)} but no {split!r}; "
                f"choose one of them as split"
            )
        folder = base
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise MissingFileError(f"{name} {str(folder)!r} has no class sub-folders; expected {layout}")
    samples: list[str] = []
    targets: list[int] = []
    empty = []
    for label, cls_name in enumerate(classes):
        files = sorted(_walk_files(folder / cls_name, exts))
        if not files:
            empty.append(cls_name)
        samples += files
        targets += [label] * len(files)
    if empty:
        raise MissingFileError(
            f"{name} {str(folder)!r}: class folder(s) {', '.join(empty)} hold no {what} with extensions "
            f"{', '.join(exts)}; remove them or add {what}"
        )
    return folder, classes, samples, targets


def _walk_files(folder: Path, exts: tuple[str, ...]) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(exts) and not f.startswith(".")]
    return found
