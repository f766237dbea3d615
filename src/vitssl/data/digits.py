"""scikit-learn's bundled 8×8 digits (1797 images, no download) as a tiny RGB image-classification set."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from vitssl.data.common import DATASETS, ImageDataset, check_split
from vitssl.errors import DataError

# 397 of the 1797 images are held out by default (the figure the project's digits results are quoted on).
DIGITS_VAL_FRACTION = 397 / 1797


def stratified_split(labels: np.ndarray, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: each class gives a share of ``n_val`` proportional to its size.

    Shares are rounded by largest remainder so they sum to exactly ``n_val``; the members are drawn from a
    permutation seeded by ``seed``. Written here (not sklearn's splitter) so the split never changes with a
    library version.

    Args:
        labels: (N,) integer labels.
        n_val: number of held-out items.
        seed: seed of the permutation.

    Returns:
        Sorted train indices and sorted val indices.
    """
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n_val / len(labels)
    shares = np.floor(exact).astype(int)
    # Ties in the remainder go to the lower class id (stable argsort), keeping the split deterministic.
    order = np.argsort(-(exact - shares), kind="stable")
    shares[order[: n_val - shares.sum()]] += 1
    rng = np.random.default_rng(seed)
    val = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, shares)]
    val_idx = np.sort(np.concatenate(val))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) images in 0..16 and their labels; cached, as train and val sets each need them."""
    from sklearn.datasets import load_digits  # imported here: sklearn takes a second to import

    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int64)


@DATASETS.register("digits")
class Digits(ImageDataset):
    """scikit-learn's ``load_digits`` upscaled to ``img_size`` RGB, with a seeded stratified held-out split.

    Args:
        split: "train" or "val" ("test" is an alias of "val").
        img_size: output side in pixels; the 8×8 originals are upscaled bilinearly.
        val_fraction: share of the 1797 images held out as "val" (default leaves 397).
        seed: seed of the split.
    """

    def __init__(
        self,
        split: str = "train",
        img_size: int = 16,
        val_fraction: float = DIGITS_VAL_FRACTION,
        seed: int = 0,
    ) -> None:
        self.split = check_split("digits", split, ("train", "val"), aliases={"test": "val"})
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"digits: val_fraction must be in (0, 1), got {val_fraction}")
        if img_size < 1:
            raise DataError(f"digits: img_size must be a positive number of pixels, got {img_size}")
        images, labels = _load_digits()
        n_val = round(val_fraction * len(labels))
        train_idx, val_idx = stratified_split(labels, n_val, seed)
        self.indices = train_idx if self.split == "train" else val_idx
        # Values are 0..16; stretch to 0..255 once so every item is a cheap resize.
        self.images = np.round(images[self.indices] * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
        self.targets = [int(t) for t in labels[self.indices]]
        self.classes = [str(d) for d in range(10)]
        self.img_size = img_size

    def load_image(self, index: int) -> Image.Image:
        img = Image.fromarray(self.images[index])
        return img.resize((self.img_size, self.img_size), Image.Resampling.BILINEAR).convert("RGB")

    def sample_id(self, index: int) -> str:
        return f"digits/{self.split}/{index}"
