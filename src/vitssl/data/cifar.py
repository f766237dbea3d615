"""CIFAR-10 / CIFAR-100 from the python-pickle layout on local disk (never downloaded)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from vitssl.data.common import DATASETS, ImageDataset, check_split, require_root
from vitssl.errors import DataError, MissingFileError


class _CifarBase(ImageDataset):
    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str

    def __init__(self, root: str | os.PathLike | None, split: str) -> None:
        layout = f"{self.folder}/ with {', '.join(self.train_files + self.test_files + (self.meta_file,))}"
        base = require_root(self.name, root, layout)
        self.split = check_split(self.name, split, ("train", "test"), aliases={"val": "test"})
        # root may be the extracted folder itself or the folder that holds it.
        folder = base / self.folder if (base / self.folder).is_dir() else base
        missing = [f for f in (*self.train_files, *self.test_files, self.meta_file) if not (folder / f).is_file()]
        if missing:
            raise MissingFileError(
                f"{self.name}: {str(folder)!r} lacks {', '.join(missing)}; expected the python version of the "
                f"dataset, i.e. {layout} (root may point at {self.folder}/ or its parent)"
            )
        self.root = folder
        files = self.train_files if self.split == "train" else self.test_files
        chunks, labels = [], []
        for f in files:
            entry = _load_pickle(folder / f)
            chunks.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels += list(entry[self._label_key()])
        self.data = np.ascontiguousarray(np.concatenate(chunks).transpose(0, 2, 3, 1))  # (N, 32, 32, 3)
        self.targets = [int(t) for t in labels]
        self.classes = list(_load_pickle(folder / self.meta_file)[self._names_key()])
        if len(self.targets) != len(self.data):
            raise DataError(f"{self.name}: {str(folder)!r} has {len(self.data)} images but {len(self.targets)} labels")

    def _label_key(self) -> str:
        raise NotImplementedError

    def _names_key(self) -> str:
        raise NotImplementedError

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.data[index])  # uint8 (32, 32, 3) is RGB

    def sample_id(self, index: int) -> str:
        return f"{self.name}/{self.split}/{index}"


def _load_pickle(path: Path) -> dict[str, Any]:
    # The official archives were pickled by Python 2; latin1 maps their byte strings to str one-to-one.
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataError(f"cannot read CIFAR pickle {str(path)!r}: {exc}; re-extract the archive") from exc


@DATASETS.register("cifar10")
class CIFAR10(_CifarBase):
    """CIFAR-10 from ``cifar-10-batches-py/`` (data_batch_1..5, test_batch, batches.meta).

    Args:
        root: ``cifar-10-batches-py/`` or its parent folder.
        split: "train" or "test" ("val" is an alias of "test").
    """

    name = "cifar10"
    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file = "batches.meta"

    def __init__(self, root: str | os.PathLike | None, split: str = "train") -> None:
        super().__init__(root, split)

    def _label_key(self) -> str:
        return "labels"

    def _names_key(self) -> str:
        return "label_names"


@DATASETS.register("cifar100")
class CIFAR100(_CifarBase):
    """CIFAR-100 from ``cifar-100-python/`` (train, test, meta).

    Args:
        root: ``cifar-100-python/`` or its parent folder.
        split: "train" or "test" ("val" is an alias of "test").
        label_mode: "fine" (100 classes) or "coarse" (20 super-classes).
    """

    name = "cifar100"
    folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    meta_file = "meta"

    def __init__(
        self, root: str | os.PathLike | None, split: str = "train", label_mode: Literal["fine", "coarse"] = "fine"
    ) -> None:
        if label_mode not in ("fine", "coarse"):
            raise DataError(f"cifar100: label_mode must be 'fine' or 'coarse', got {label_mode!r}")
        self.label_mode = label_mode
        super().__init__(root, split)

    def _label_key(self) -> str:
        return f"{self.label_mode}_labels"

    def _names_key(self) -> str:
        return f"{self.label_mode}_label_names"
