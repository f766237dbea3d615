"""Dataset registry, the factory, the error for unreadable samples and shared helpers for file-backed sets."""

from __future__ import annotations

import difflib
import inspect
import logging
import os
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from vitssl.errors import SKIP_HINT, CorruptImageError, DataError, MissingFileError
from vitssl.registry import Registry

_logger = logging.getLogger(__name__)

# Image datasets register in vitssl.data, video ones (clips, tracking pairs, frame features) in vitssl.video; the
# first lookup imports both.
DATASETS: Registry[type[Dataset]] = Registry("dataset", providers=("vitssl.data", "vitssl.video.registered"))

# Extensions PIL decodes out of the box; matched case-insensitively (torchvision's list plus webp/tiff).
IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif")


class ImageDataset(Dataset):
    """Base of every vitssl image dataset: items are ``(PIL RGB image, target)``.

    Subclasses fill ``classes`` (empty if unlabelled) and ``targets`` (one int label or caption per item, read
    without decoding any image) and implement ``load_image`` and ``sample_id``.
    """

    classes: list[str]
    targets: list[Any]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(self)}")
        index = index % len(self)
        return self.load_image(index), self.targets[index]

    def load_image(self, index: int) -> Image.Image:
        """Decode item ``index`` as an RGB image; raises ``CorruptImageError`` naming the file on failure."""
        raise NotImplementedError

    def sample_id(self, index: int) -> str:
        """A stable identifier of item ``index``: the file path for file-backed sets, else e.g. "digits/val/17"."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(len={len(self)}, classes={len(self.classes)})"


# How image files become pixels (open_rgb / to_rgb); caches of features key on it, so features decoded another way
# (1: as stored, clipped at 8 bits; 2: EXIF orientation applied, high bit depths scaled) are not reused.
IMAGE_DECODE_REVISION = 2
# EXIF orientation values (tag 0x0112) other than 1 ("as stored"): the image is shown rotated or mirrored.
EXIF_ORIENTATION = 0x0112
# What shows an image of each orientation as displayed (the EXIF specification's table, as PIL's exif_transpose).
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation of an opened image (1, as stored, when it has none or it cannot be read)."""
    try:
        value = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block: the pixels may still be fine, and PIL shows them as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def to_rgb(img: Image.Image, orient: bool = True) -> Image.Image:
    """An opened image as 8-bit RGB, the way it is displayed: EXIF orientation applied, high bit depths scaled.

    PIL's ``convert("RGB")`` clips 16-bit and 32-bit greyscale (modes ``I;16``, ``I``, ``F``) at 255, which turns
    a 16-bit PNG white; here such pixels are scaled to 8 bits instead (16-bit data by 1/257, float data in [0, 1]
    by 255, anything else by its own range). Phone photos store pixels as the sensor read them and say in EXIF how
    to turn them (as video files say in their display matrix): the orientation is applied so that the model, the
    index and the query grids see what the user sees. (torchvision's default loader ignores EXIF; on ImageNet,
    whose files nearly all lack the tag, the two agree.) ``orient=False`` keeps the stored geometry, for
    annotations drawn on it (detection boxes read as the reference detection code reads its images).
    """
    orientation = exif_orientation(img) if orient else 1
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        import numpy as np

        pixels = np.asarray(img, dtype=np.float64)
        top = float(pixels.max()) if pixels.size else 0.0
        low = float(pixels.min()) if pixels.size else 0.0
        if img.mode.startswith("I;16") or (img.mode == "I" and low >= 0 and top <= 65535):
            scale, offset = 255.0 / 65535.0, 0.0
        elif img.mode == "F" and low >= 0 and top <= 1:
            scale, offset = 255.0, 0.0
        else:  # signed or out-of-range data: its own range onto 0..255
            scale, offset = (255.0 / (top - low) if top > low else 0.0), low
        eight = np.clip(np.rint((pixels - offset) * scale), 0, 255).astype(np.uint8)
        img = Image.fromarray(eight, "L").convert("RGB")
    else:
        img = img.convert("RGB")
    if orientation != 1:
        img = img.transpose(_EXIF_TRANSPOSE[orientation])
    return img


def open_rgb(source: str | os.PathLike | Any, name: str | None = None, orient: bool = True) -> Image.Image:
    """Decode an image fully (not lazily) and convert it to RGB as it is displayed (:func:`to_rgb`).

    Args:
        source: a path or a binary file object.
        name: what to call the sample in the error message; defaults to the path.
        orient: apply the EXIF orientation (False: the stored geometry, which box annotations refer to).

    Raises:
        CorruptImageError: the file is missing, truncated or not an image; the message names it.
    """
    label = name if name is not None else str(source)
    try:
        with Image.open(source) as img:
            # converting forces the full decode here, so a truncated file fails now and not inside a transform.
            return to_rgb(img, orient)
    except FileNotFoundError as exc:
        raise CorruptImageError(f"image file not found: {label} ({SKIP_HINT})") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        # PIL reports broken files as OSError (incl. UnidentifiedImageError), SyntaxError or ValueError.
        raise CorruptImageError(f"cannot decode image {label}: {type(exc).__name__}: {exc} ({SKIP_HINT})") from exc


def require_root(name: str, root: str | os.PathLike | None, layout: str) -> Path:
    """Resolve the ``root`` of a file-backed dataset, failing with the expected layout when it is unset or missing.

    Args:
        name: the dataset's registry name, for the message.
        root: the user's path (``~`` is expanded).
        layout: a description of the expected files.
    """
    if root is None or str(root) == "":
        raise DataError(
            f"dataset {name!r} needs a root: set data.train.root=PATH (data.val.root for data.val, root=PATH in a "
            f"NAME:root=PATH data spec), where PATH holds {layout}"
        )
    path = Path(os.path.expandvars(str(root))).expanduser()
    if not path.exists():
        raise MissingFileError(f"dataset {name!r}: root {str(path)!r} does not exist; expected {layout}")
    return path


def check_split(name: str, split: str, valid: tuple[str, ...], aliases: dict[str, str] | None = None) -> str:
    """Return the canonical split name, or fail naming the valid ones."""
    split = (aliases or {}).get(split, split)
    if split not in valid:
        raise DataError(f"dataset {name!r} has no split {split!r}; valid splits: {', '.join(valid)}")
    return split


def check_procedural(
    name: str,
    split: str,
    valid: dict[str, int],
    img_size: int,
    num_samples: int | None,
    default: dict[str, int],
    seed: int,
) -> tuple[str, int]:
    """Check a generated dataset's arguments: ``(canonical split, number of samples)``, or a one-line DataError.

    Args:
        name: the dataset's registered name, for the messages.
        split: the split asked for; ``valid`` maps the valid ones to their random streams.
        img_size: image or frame side (at least 8 pixels).
        num_samples: items in the split, or None for ``default[split]``.
        default: the default number of samples per split.
        seed: base seed of the generator (non-negative).
    """
    split = check_split(name, split, tuple(valid))
    if img_size < 8:
        raise DataError(f"{name}: img_size must be at least 8 pixels, got {img_size}")
    num_samples = default[split] if num_samples is None else num_samples
    if num_samples < 1:
        raise DataError(f"{name}: num_samples must be positive, got {num_samples}")
    if seed < 0:
        raise DataError(f"{name}: seed must be non-negative, got {seed}")
    return split, num_samples


def dataset_parameters(name: str) -> list[str]:
    """What dataset ``name``'s builder takes: ``root`` (if it reads files), ``split`` and its options, in order.

    The builder's signature is the one declaration: a generated dataset has no ``root`` parameter at all.
    """
    params = inspect.signature(DATASETS.get(name).__init__).parameters
    return [
        p for p in params if p != "self" and params[p].kind not in (params[p].VAR_KEYWORD, params[p].VAR_POSITIONAL)
    ]


def _keys_taken(name: str, key: str | None) -> str:
    """The keys dataset ``name`` takes, as a config block ``key`` (``data.train``) spells them, or as option names."""
    params = dataset_parameters(name)
    if key is None:
        return ", ".join(params) or "(none)"
    fields = [f"{key}.{p}" for p in ("root", "split") if p in params]
    options = [f"{key}.kwargs.{p}" for p in params if p not in ("root", "split")]
    return ", ".join([f"{key}.name", *fields, *options])


def check_dataset_options(
    name: str, root: str | os.PathLike | None = None, options: dict[str, Any] | None = None, key: str | None = None
) -> None:
    """Refuse what dataset ``name`` does not take, naming the key and the keys it takes, before anything is read.

    Args:
        name: registry name.
        root: the root given (None or "" = none); refused for generated datasets, which read nothing.
        options: dataset options (a config's ``kwargs``).
        key: the config block the dataset comes from (``data.train``), for the message; None outside a config.

    Raises:
        DataError: ``root`` given to a dataset without one, or an option the dataset does not have.
    """
    params = dataset_parameters(name)
    taken = _keys_taken(name, key)
    if root is not None and str(root) != "" and "root" not in params:
        where = f"{key}.root" if key else "root"
        fix = f"set {key}.root=null" if key else "leave root out"
        raise DataError(
            f"{where}={str(root)!r}: dataset {name!r} is generated and reads no files, so it takes no root; "
            f"{fix} (or choose a dataset that reads files). Keys {name!r} takes: {taken}"
        )
    valid = [p for p in params if p not in ("root", "split")]
    for option in options or {}:
        if option not in valid:
            close = difflib.get_close_matches(option, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            if key:
                raise DataError(
                    f"{key}.kwargs.{option}: dataset {name!r} has no option {option!r}.{hint} "
                    f"Keys {name!r} takes: {taken}"
                )
            raise DataError(
                f"dataset {name!r} has no option {option!r}.{hint} Valid options: {', '.join(valid) or '(none)'}"
            )


def build_dataset(
    name: str, root: str | os.PathLike | None = None, split: str = "train", *, key: str | None = None, **kwargs: Any
) -> Dataset:
    """Build a registered dataset.

    Options equal to None are dropped, so ``null`` in a config means the dataset's default.

    Args:
        name: registry name, see ``list_datasets()``.
        root: data location (folder, file or shard pattern, depending on the dataset); refused by generated sets.
        split: "train", "val", ... (each dataset lists the ones it has).
        key: the config block the dataset comes from (``data.train``), named in the error messages.
        **kwargs: dataset options; unknown ones fail with the list of valid ones.
    """
    check_dataset_options(name, root, kwargs, key)
    cls = DATASETS.get(name)
    options = {k: v for k, v in kwargs.items() if v is not None}
    if "root" in dataset_parameters(name):
        options["root"] = root
    dataset = cls(split=split, **options)
    _logger.debug("built dataset %s split=%s: %d items, %d classes", name, split, len(dataset), len(dataset.classes))
    return dataset


def build_dataset_config(dcfg: Any, key: str, **overrides: Any) -> Dataset:
    """Build the dataset a config block describes (``cfg.data.train``), naming ``key`` in its error messages.

    Args:
        dcfg: a ``DatasetConfig`` (``name``, ``root``, ``split``, ``kwargs``).
        key: where it sits in the config: ``data.train`` or ``data.val``.
        **overrides: options that replace the block's ``kwargs`` entries.
    """
    return build_dataset(dcfg.name, root=dcfg.root, split=dcfg.split, key=key, **{**dict(dcfg.kwargs), **overrides})


def list_datasets(pattern: str = "*") -> list[str]:
    """Registered dataset names matching a shell-style wildcard."""
    return DATASETS.list(pattern)
