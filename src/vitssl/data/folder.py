"""ImageFolder: ``root/<class>/<image>`` trees, optionally split into ``root/train``, ``root/val``, ..."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from vitssl.data.common import DATASETS, IMG_EXTENSIONS, ImageDataset, open_rgb, require_root
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
        base = require_root("imagefolder", root, _LAYOUT)
        if not base.is_dir():
            raise DataError(f"imagefolder root {str(base)!r} is a file; expected a folder with {_LAYOUT}")
        folder = base / split
        if not folder.is_dir():
            present = [s for s in _SPLIT_NAMES if (base / s).is_dir()]
            if present:
                # Falling back to root would silently treat the split folders as classes.
                raise MissingFileError(
                    f"imagefolder root {str(base)!r} has split folders {', '.join(present)} but no {split!r}; "
                    f"choose one of them as split"
                )
            folder = base
        self.root = folder
        exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        self.classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise MissingFileError(f"imagefolder {str(folder)!r} has no class sub-folders; expected {_LAYOUT}")
        self.samples: list[str] = []
        self.targets: list[int] = []
        empty = []
        for label, cls_name in enumerate(self.classes):
            files = sorted(_walk_images(folder / cls_name, exts))
            if not files:
                empty.append(cls_name)
            self.samples += files
            self.targets += [label] * len(files)
        if empty:
            raise MissingFileError(
                f"imagefolder {str(folder)!r}: class folder(s) {', '.join(empty)} hold no images with extensions "
                f"{', '.join(exts)}; remove them or add images"
            )

    def load_image(self, index: int) -> Image.Image:
        return open_rgb(self.samples[index])

    def sample_id(self, index: int) -> str:
        return self.samples[index]


def _walk_images(folder: Path, exts: tuple[str, ...]) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(exts) and not f.startswith(".")]
    return found
