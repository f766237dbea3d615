"""Procedural shapes: a deterministic, file-free image-classification (and captioning) set for tests and demos.

Each image holds one shape (the class) of a random palette colour, size, rotation and position on a textured
grey background. The background is deliberately *not* an instance signature: a MoCo prototype trained on shapes
over flat random-colour backgrounds learnt to match the two views by their shared background colour and its
k-NN accuracy on shapes never moved. Here every background is drawn from one distribution, independently of the
class: a grey level in 0.3–0.7 (a spread colour jitter's brightness factor 0.6–1.4 covers), a faint tint, smooth
blotches (mostly of brightness) and per-pixel noise, so two crops of one image differ in texture and mean level
and share no hue. What stays common to two views is the shape, its colour and roughly its place.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from vitssl.data.common import DATASETS, ImageDataset, check_procedural

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "heart", "arrow")

# Named colours for captions; each image jitters its colour a little around the named one.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 25),
    "green": (35, 165, 55),
    "blue": (35, 75, 220),
    "purple": (135, 50, 190),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_DEFAULT_NUM_SAMPLES = {"train": 10_000, "val": 2_000, "test": 2_000}
# Caption phrase for the 3×3 cell (row, column) that holds the shape's centre.
_POSITIONS = (
    ("in the top left", "at the top", "in the top right"),
    ("on the left", "in the center", "on the right"),
    ("in the bottom left", "at the bottom", "in the bottom right"),
)
_RADIUS = (0.16, 0.36)  # shape radius as a fraction of the image side
_SMALL, _LARGE = 0.21, 0.31  # radii below/above these are captioned "small"/"large"
_LEVEL = (0.3, 0.7)  # band of background grey levels
_MIN_CONTRAST = 0.15  # least luminance difference between shape and background level


@dataclass(frozen=True)
class ShapeParams:
    """Everything a caption needs, drawn before (and independently of) the pixels."""

    label: int
    colour: str
    rgb: tuple[float, float, float]  # the jittered colour in [0, 1]
    radius: float  # in pixels
    angle: float  # radians
    cx: float  # centre, pixels from the left
    cy: float  # centre, pixels from the top
    img_size: int

    @property
    def position(self) -> str:
        row = min(int(3 * self.cy / self.img_size), 2)
        col = min(int(3 * self.cx / self.img_size), 2)
        return _POSITIONS[row][col]

    @property
    def size_word(self) -> str:
        frac = self.radius / self.img_size
        return "small " if frac < _SMALL else "large " if frac > _LARGE else ""


@DATASETS.register("shapes")
class Shapes(ImageDataset):
    """Procedural shapes, generated on the fly and deterministic in ``(seed, split, index)``.

    Labels cycle through the classes (``index % num_classes``), so every class has the same count up to one.

    Args:
        split: "train", "val" or "test"; each uses its own random stream, so the images differ.
        img_size: image side in pixels.
        num_samples: items in the split (default 10000 for train, 2000 otherwise).
        seed: base seed of the generator.
    """

    def __init__(
        self,
        split: str = "train",
        img_size: int = 32,
        num_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        self.split, num_samples = check_procedural(
            "shapes", split, _SPLIT_IDS, img_size, num_samples, _DEFAULT_NUM_SAMPLES, seed
        )
        self.img_size = img_size
        self.seed = seed
        self.classes = list(SHAPE_CLASSES)
        # The class ids under their own name too, so ShapesCaptions, whose targets are captions, still exposes them.
        self.labels = [i % len(SHAPE_CLASSES) for i in range(num_samples)]
        self.targets = self._targets()

    def _targets(self) -> list[int] | list[str]:
        """The items' targets: the class ids (captions in :class:`ShapesCaptions`)."""
        return self.labels

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index])

    def params(self, index: int, rng: np.random.Generator | None = None) -> ShapeParams:
        """The shape's class, colour, size, rotation and position for item ``index``."""
        rng = self._rng(index) if rng is None else rng
        size = self.img_size
        colour = list(PALETTE)[int(rng.integers(len(PALETTE)))]
        rgb = np.clip(np.array(PALETTE[colour]) / 255.0 + rng.uniform(-0.06, 0.06, 3), 0.0, 1.0)
        radius = rng.uniform(*_RADIUS) * size
        angle = rng.uniform(0.0, 2.0 * math.pi)
        cx, cy = rng.uniform(radius, size - radius, 2)
        return ShapeParams(
            label=index % len(SHAPE_CLASSES),
            colour=colour,
            rgb=(float(rgb[0]), float(rgb[1]), float(rgb[2])),
            radius=float(radius),
            angle=float(angle),
            cx=float(cx),
            cy=float(cy),
            img_size=size,
        )

    def caption(self, index: int) -> str:
        """A short description naming the shape, its colour and position, e.g. "a red star in the top left"."""
        p = self.params(index)
        words = f"{p.size_word}{p.colour} {SHAPE_CLASSES[p.label]} {p.position}"
        article = "an" if words[0] in "aeiou" else "a"
        return f"{article} {words}"

    def load_image(self, index: int) -> Image.Image:
        rng = self._rng(index)
        p = self.params(index, rng)  # the same stream continues into the pixels below
        size = self.img_size
        background = _background(rng, size, p.rgb)  # (S, S, 3)
        alpha = _shape_mask(SHAPE_CLASSES[p.label], p, size)[..., None]  # (S, S, 1)
        fill = np.asarray(p.rgb) + rng.normal(0.0, 0.025, (size, size, 3))  # (S, S, 3) a little grain on the shape
        img = background * (1.0 - alpha) + fill * alpha
        return Image.fromarray(np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8))

    def sample_id(self, index: int) -> str:
        return f"shapes/{self.split}/{index}"


@DATASETS.register("shapes_captions")
class ShapesCaptions(Shapes):
    """The ``shapes`` images with their captions as targets (for image-text objectives).

    ``labels`` keeps the shape class ids and ``classes`` the shape names, for zero-shot evaluation.
    Options are those of ``shapes``.
    """

    def _targets(self) -> list[int] | list[str]:
        return [self.caption(i) for i in range(len(self.labels))]

    def sample_id(self, index: int) -> str:
        return f"shapes_captions/{self.split}/{index}"


def _luma(rgb: tuple[float, float, float] | np.ndarray) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


@functools.lru_cache(maxsize=16)
def _upsample_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) matrix of linear interpolation weights, aligned on pixel centres."""
    pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0.0, src - 1.0)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, src - 1)
    w = pos - lo
    m = np.zeros((dst, src))
    m[np.arange(dst), lo] += 1.0 - w
    m[np.arange(dst), hi] += w
    return m


def _background(rng: np.random.Generator, size: int, shape_rgb: tuple[float, float, float]) -> np.ndarray:
    """Textured grey background, (S, S, 3) in [0, 1], drawn independently of the shape class."""
    # Grey level in a band the brightness jitter covers, kept away from the shape's luminance so the shape stays
    # visible after RandomGrayscale; this ties the level to the (class-independent) colour, never to the class.
    luma = _luma(shape_rgb)
    gap_lo, gap_hi = max(_LEVEL[0], luma - _MIN_CONTRAST), min(_LEVEL[1], luma + _MIN_CONTRAST)
    gap = max(0.0, gap_hi - gap_lo)
    level = _LEVEL[0] + rng.uniform(0.0, _LEVEL[1] - _LEVEL[0] - gap)  # uniform over the band minus the gap
    if level >= gap_lo:
        level += gap
    tint = rng.uniform(-0.04, 0.04, 3)
    grid = int(rng.integers(3, 7))
    up = _upsample_matrix(grid, size)
    # Smooth blotches, mostly of brightness so crops of one image differ in mean level, partly of hue.
    coarse = rng.normal(0.0, 1.0, (1, grid, grid)) + 0.5 * rng.normal(0.0, 1.0, (3, grid, grid))
    smooth = np.einsum("ij,cjk,lk->ilc", up, coarse, up)  # (S, S, 3)
    fine = rng.normal(0.0, 1.0, (size, size, 1)) + 0.5 * rng.normal(0.0, 1.0, (size, size, 3))  # (S, S, 3)
    amp_smooth, amp_fine = rng.uniform(0.04, 0.1), rng.uniform(0.02, 0.07)
    return level + tint + amp_smooth * smooth + amp_fine * fine


def _polygon(name: str) -> np.ndarray:
    """Unit-radius outline of a polygonal shape, (K, 2), centred on the origin, pointing up."""
    if name == "square":
        t = np.deg2rad([45, 135, 225, 315])
        return np.stack([np.cos(t), np.sin(t)], 1)
    if name == "triangle":
        t = np.deg2rad([-90, 30, 150])
        return np.stack([np.cos(t), np.sin(t)], 1)
    if name == "star":
        t = np.deg2rad(-90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if name == "cross":
        a, b = 0.3, 0.95
        return np.array(
            [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
        )
    if name == "heart":
        t = np.linspace(0.0, 2.0 * math.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y + 2.5], 1) / 16.5
    if name == "arrow":
        return np.array([(-1.0, -0.2), (0.15, -0.2), (0.15, -0.6), (1.0, 0.0), (0.15, 0.6), (0.15, 0.2), (-1.0, 0.2)])
    raise ValueError(f"no polygon for shape {name!r}")


def _shape_mask(name: str, p: ShapeParams, size: int) -> np.ndarray:
    """Anti-aliased coverage of the shape, (S, S) in [0, 1], drawn 4× (2× above 64 px) larger and box-filtered."""
    ss = 4 if size <= 64 else 2
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = p.cx * ss, p.cy * ss, p.radius * ss

    def disc(radius: float, fill: int, dx: float = 0.0, dy: float = 0.0) -> None:
        draw.ellipse((cx + dx - radius, cy + dy - radius, cx + dx + radius, cy + dy + radius), fill=fill)

    if name == "circle":
        disc(0.9 * r, 255)
    elif name == "ring":
        disc(r, 255)
        disc(0.55 * r, 0)
    else:
        c, s = math.cos(p.angle), math.sin(p.angle)
        pts = _polygon(name) @ np.array([[c, s], [-s, c]]) * r + (cx, cy)  # rotate, scale, move
        draw.polygon([tuple(q) for q in pts.tolist()], fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0
