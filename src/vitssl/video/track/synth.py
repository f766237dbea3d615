"""Procedural tracking sequences in the MOTChallenge layout, for the demo and the tests.

Each sequence is a textured background (smooth coloured noise plus fine grain) with several textured,
coloured rectangles (stripes, checks, dots or a gradient inside a dark border, one texture and colour per
object) moving over it:

- ``linear`` objects enter from outside an edge at constant velocity, cross the frame and leave it;
- ``bounce`` objects appear inside the frame, bounce off its borders and disappear after a while.

The first two objects of a sequence cross each other head on, so every sequence has at least one crossing;
objects have a fixed depth order, so the nearer one hides the farther one where they overlap. The ground truth
(``gt/gt.txt``) gives each object's box clipped to the frame, "consider" 1, class 1 and its visibility (the
fraction of the clipped box not hidden by nearer objects); rows are written while at least ``min_inside`` of
the object's area is inside the frame. ``det/det.txt`` holds noisy detections of the same boxes: each
object seen with at least ``det_min_visibility`` is detected with probability ``det_recall``, its box jittered
by ``det_jitter`` of its size, plus ``det_false_per_frame`` false positives per frame on average.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from vitssl.config import ConfigError
from vitssl.io import PathLike, atomic_dir, atomic_write
from vitssl.video.track.mot import format_mot

_TEXTURES = ("hstripes", "vstripes", "checks", "dots", "gradient", "diagonal")


@dataclasses.dataclass
class _Object:
    texture: np.ndarray  # (h, w, 3) uint8 patch
    depth: float  # larger = nearer the camera (drawn later)
    start: int  # first frame index (0-based) it exists in
    end: int  # one past its last frame index
    pos: np.ndarray  # (T, 2) top-left x, y per frame index (float)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Bilinear-upsampled random grid: ``(H, W)`` in [0, 1] with blobs about ``1/cells`` of the frame wide."""
    grid = rng.random((cells + 1, cells + 1))
    ys = np.linspace(0, cells, height)
    xs = np.linspace(0, cells, width)
    y0, x0 = np.minimum(ys.astype(int), cells - 1), np.minimum(xs.astype(int), cells - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy  # (H, W)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A muted textured background: two colours mixed by smooth noise, plus grain."""
    low, high = rng.uniform(40, 110, 3), rng.uniform(70, 150, 3)
    mix = _smooth_noise(rng, height, width, cells=int(rng.integers(3, 7)))[..., None]  # (H, W, 1)
    image = low * (1 - mix) + high * mix + rng.normal(0, 6, (height, width, 1))  # (H, W, 3)
    return np.clip(image, 0, 255).astype(np.uint8)


def _hue_colour(hue: float, value: float = 1.0) -> np.ndarray:
    """A saturated RGB colour (0-255) of ``hue`` in [0, 1)."""
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6
    rgb = value * (1 - np.clip(np.minimum(k, 4 - k), 0, 1))
    return 255 * (0.25 + 0.75 * rgb)


def _texture(rng: np.random.Generator, h: int, w: int, kind: str, colour: np.ndarray) -> np.ndarray:
    """An ``(h, w, 3)`` uint8 object patch: ``kind`` texture in ``colour`` and a darker shade, dark border."""
    ys, xs = np.mgrid[0:h, 0:w]
    period = int(rng.integers(3, 6))
    if kind == "hstripes":
        pattern = (ys // period) % 2
    elif kind == "vstripes":
        pattern = (xs // period) % 2
    elif kind == "checks":
        pattern = ((ys // period) + (xs // period)) % 2
    elif kind == "dots":
        pattern = (((ys % (2 * period)) - period) ** 2 + ((xs % (2 * period)) - period) ** 2 < period**2).astype(int)
    elif kind == "diagonal":
        pattern = ((ys + xs) // period) % 2
    else:  # gradient
        pattern = ys / max(h - 1, 1)
    shade = colour * 0.45
    patch = shade + (colour - shade) * np.asarray(pattern, float)[..., None]  # (h, w, 3)
    border = max(1, min(h, w) // 10)
    patch[:border], patch[-border:], patch[:, :border], patch[:, -border:] = 20, 20, 20, 20
    return np.clip(patch, 0, 255).astype(np.uint8)


def _linear_path(
    rng: np.random.Generator,
    num_frames: int,
    height: int,
    width: int,
    h: int,
    w: int,
    speed: float,
    side: int,
    start: int,
    cross: float | None = None,
) -> np.ndarray:
    """Top-left positions ``(T, 2)`` of an object entering from ``side`` (0 left, 1 right, 2 top, 3 bottom)."""
    along = rng.uniform(0.15, 0.85) if cross is None else cross
    angle = rng.uniform(-0.35, 0.35) if cross is None else 0.0  # a crossing pair travels straight at each other
    if side in (0, 1):  # horizontal travel
        x0 = -w if side == 0 else width
        y0 = along * (height - h)
        direction = np.array([1.0 if side == 0 else -1.0, angle])
    else:
        x0 = along * (width - w)
        y0 = -h if side == 2 else height
        direction = np.array([angle, 1.0 if side == 2 else -1.0])
    direction = direction / np.linalg.norm(direction)
    t = np.arange(num_frames, dtype=np.float64)[:, None] - start  # (T, 1)
    return np.array([x0, y0]) + t * speed * direction  # (T, 2)


def _bounce_path(
    rng: np.random.Generator, num_frames: int, height: int, width: int, h: int, w: int, speed: float
) -> np.ndarray:
    """Top-left positions ``(T, 2)`` bouncing inside the frame (reflection at the borders)."""
    span = np.array([max(width - w, 1), max(height - h, 1)], dtype=np.float64)
    start = rng.random(2) * span
    angle = rng.uniform(0, 2 * np.pi)
    velocity = speed * np.array([np.cos(angle), np.sin(angle)])
    raw = start + np.arange(num_frames, dtype=np.float64)[:, None] * velocity  # (T, 2) unfolded
    folded = np.mod(raw, 2 * span)
    return np.where(folded > span, 2 * span - folded, folded)  # (T, 2) reflected


def _make_objects(
    rng: np.random.Generator,
    num_frames: int,
    height: int,
    width: int,
    count: int,
    bounce_prob: float,
    size_range: tuple[float, float],
    speed_range: tuple[float, float],
) -> list[_Object]:
    objects = []
    hues = (rng.random() + np.arange(count) / max(count, 1)) % 1.0  # evenly spread hues: distinct colours
    rng.shuffle(hues)
    kinds = rng.permutation(np.resize(np.array(_TEXTURES), count))
    crossing_sides = (0, 1) if rng.random() < 0.5 or height > width else (2, 3)  # horizontal or vertical
    crossing_start = int(rng.integers(0, max(1, num_frames // 4)))
    crossing_line = 0.5 + rng.uniform(-0.1, 0.1)
    for k in range(count):
        h = round(rng.uniform(*size_range) * height)
        w = round(h * rng.uniform(0.45, 0.8))  # upright, pedestrian-like boxes
        h, w = max(h, 6), max(w, 4)
        speed = rng.uniform(*speed_range) * width  # pixels per frame
        texture = _texture(rng, h, w, str(kinds[k]), _hue_colour(float(hues[k]), rng.uniform(0.7, 1.0)))
        depth = rng.random()
        if k < 2:  # a head-on crossing: entering from opposite sides at the same time on the same line
            pos = _linear_path(
                rng, num_frames, height, width, h, w, speed, crossing_sides[k], crossing_start, crossing_line
            )
            objects.append(_Object(texture, depth + k, crossing_start, num_frames, pos))
        elif rng.random() < bounce_prob:
            start = int(rng.integers(0, max(1, num_frames // 2)))
            end = min(num_frames, start + int(rng.integers(max(2, num_frames // 3), num_frames + 1)))
            pos = _bounce_path(rng, num_frames, height, width, h, w, speed)
            objects.append(_Object(texture, depth, start, end, pos))
        else:
            start = int(rng.integers(-num_frames // 3, max(1, (3 * num_frames) // 4)))
            side = int(rng.integers(0, 4))
            pos = _linear_path(rng, num_frames, height, width, h, w, speed, side, start)
            objects.append(_Object(texture, depth, max(start, 0), num_frames, pos))
    return objects


def _render_frame(
    background: np.ndarray, objects: list[_Object], t: int, min_inside: float
) -> tuple[np.ndarray, list[tuple[int, np.ndarray, float]]]:
    """Frame ``t`` (0-based) and its gt as ``[(object index, clipped xywh box, visibility)]``."""
    height, width = background.shape[:2]
    image = background.copy()
    owner = np.full((height, width), -1, dtype=np.int64)  # nearest object at each pixel
    boxes = {}
    for k in sorted(range(len(objects)), key=lambda j: objects[j].depth):
        obj = objects[k]
        if not obj.start <= t < obj.end:
            continue
        h, w = obj.texture.shape[:2]
        x, y = (round(float(v)) for v in obj.pos[t])
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if x1 <= x0 or y1 <= y0 or (x1 - x0) * (y1 - y0) < min_inside * h * w:
            continue
        image[y0:y1, x0:x1] = obj.texture[y0 - y : y1 - y, x0 - x : x1 - x]
        owner[y0:y1, x0:x1] = k
        boxes[k] = (x0, y0, x1, y1)
    gt = []
    for k, (x0, y0, x1, y1) in sorted(boxes.items()):
        area = (x1 - x0) * (y1 - y0)
        visibility = float((owner[y0:y1, x0:x1] == k).sum()) / area
        gt.append((k, np.array([x0, y0, x1 - x0, y1 - y0], dtype=np.float64), visibility))
    return image, gt


def _detections(
    rng: np.random.Generator,
    gt_rows: np.ndarray,
    num_frames: int,
    height: int,
    width: int,
    recall: float,
    jitter: float,
    false_per_frame: float,
    min_visibility: float,
) -> np.ndarray:
    """Noisy detections ``frame,-1,l,t,w,h,score,-1,-1,-1`` of the gt boxes, plus false positives."""
    rows = []
    for row in gt_rows:
        if row[8] < min_visibility or rng.random() > recall:
            continue
        left, top, w, h = row[2:6]
        noise = rng.normal(0, jitter, 4) * np.array([w, h, w, h])
        x0, y0 = np.clip(left + noise[0], 0, width - 1), np.clip(top + noise[1], 0, height - 1)
        x1 = np.clip(left + w + noise[2], x0 + 1, width)
        y1 = np.clip(top + h + noise[3], y0 + 1, height)
        score = float(np.clip(rng.normal(0.85, 0.1) * (0.6 + 0.4 * row[8]), 0.05, 1.0))
        rows.append([row[0], -1, x0, y0, x1 - x0, y1 - y0, round(score, 4), -1, -1, -1])
    for frame in range(1, num_frames + 1):
        for _ in range(rng.poisson(false_per_frame)):
            h = rng.uniform(0.1, 0.3) * height
            w = h * rng.uniform(0.4, 0.9)
            x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
            rows.append([frame, -1, x0, y0, w, h, round(float(rng.uniform(0.1, 0.6)), 4), -1, -1, -1])
    det = np.array(rows, dtype=np.float64).reshape(-1, 10)
    det[:, 2:6] = np.round(det[:, 2:6], 2)
    return det[np.argsort(det[:, 0], kind="stable")]


def _seqinfo(name: str, num_frames: int, fps: float, height: int, width: int) -> str:
    return (
        f"[Sequence]\nname={name}\nimDir=img1\nframeRate={fps:g}\nseqLength={num_frames}\n"
        f"imWidth={width}\nimHeight={height}\nimExt=.jpg\n"
    )


def write_sequence(
    folder: PathLike,
    *,
    num_frames: int = 40,
    size: tuple[int, int] = (96, 128),
    seed: int = 0,
    num_objects: tuple[int, int] = (3, 5),
    bounce_prob: float = 0.4,
    object_size: tuple[float, float] = (0.25, 0.45),
    speed: tuple[float, float] = (0.02, 0.045),
    fps: float = 10.0,
    det_recall: float = 0.9,
    det_jitter: float = 0.05,
    det_false_per_frame: float = 0.3,
    det_min_visibility: float = 0.3,
    min_inside: float = 0.25,
    quality: int = 92,
) -> Path:
    """Write one generated sequence in the MOTChallenge layout at ``folder`` (replacing it atomically).

    Args:
        folder: the sequence folder; its name is the sequence's name.
        num_frames: frames in the sequence.
        size: (height, width) of the frames in pixels.
        seed: random seed; the same seed and arguments give the same files.
        num_objects: (min, max) objects in the sequence, both inclusive; min >= 2 (the first two cross).
        bounce_prob: probability that an object after the first two bounces instead of crossing the frame.
        object_size: (min, max) object height as a fraction of the frame height.
        speed: (min, max) speed as a fraction of the frame width per frame.
        fps: frame rate written to seqinfo.ini.
        det_recall: probability that a visible object is detected in det.txt.
        det_jitter: standard deviation of the detection box noise, as a fraction of the box size.
        det_false_per_frame: mean number of false positives per frame in det.txt.
        det_min_visibility: objects less visible than this are never detected.
        min_inside: an object with less than this fraction of its area inside the frame has no gt row there.
        quality: JPEG quality of the frames.

    Returns:
        ``folder`` as a Path.
    """
    from PIL import Image

    folder = Path(folder)
    height, width = size
    if num_frames < 1 or height < 16 or width < 16:
        raise ConfigError(
            f"generated sequences need num_frames >= 1 and size >= (16, 16), got {num_frames} frames of {tuple(size)}"
        )
    if min(num_objects) < 2 or num_objects[0] > num_objects[1]:
        raise ConfigError(
            f"num_objects must be (min, max) with 2 <= min <= max (the first two cross), got {num_objects}"
        )
    rng = np.random.default_rng(seed)
    count = int(rng.integers(num_objects[0], num_objects[1] + 1))
    objects = _make_objects(rng, num_frames, height, width, count, bounce_prob, object_size, speed)
    background = _background(rng, height, width)
    gt_rows = []
    with atomic_dir(folder) as tmp:
        (tmp / "img1").mkdir()
        for t in range(num_frames):
            image, boxes = _render_frame(background, objects, t, min_inside)
            Image.fromarray(image).save(tmp / "img1" / f"{t + 1:06d}.jpg", quality=quality)
            for k, box, visibility in boxes:
                gt_rows.append([t + 1, k + 1, *box, 1, 1, round(visibility, 4), -1])
        gt = np.array(gt_rows, dtype=np.float64).reshape(-1, 10)
        det = _detections(
            rng, gt, num_frames, height, width, det_recall, det_jitter, det_false_per_frame, det_min_visibility
        )
        atomic_write(tmp / "gt" / "gt.txt", _gt_text(gt))
        atomic_write(tmp / "det" / "det.txt", format_mot(det))
        atomic_write(tmp / "seqinfo.ini", _seqinfo(folder.name, num_frames, fps, height, width))
    return folder


def _gt_text(gt: np.ndarray) -> str:
    """MOTChallenge gt lines have nine columns: frame,id,l,t,w,h,consider,class,visibility."""
    lines = format_mot(gt).splitlines()
    return "".join(line.rsplit(",", 1)[0] + "\n" for line in lines)


def write_sequences(
    root: PathLike,
    *,
    num_sequences: int = 4,
    num_frames: int = 40,
    size: tuple[int, int] = (96, 128),
    seed: int = 0,
    prefix: str = "SYN",
    **kwargs,
) -> list[Path]:
    """Write ``num_sequences`` generated sequences ``root/{prefix}-01``, ... (see :func:`write_sequence`).

    Args:
        root: the folder to hold the sequences (created).
        num_sequences: how many sequences.
        num_frames: frames per sequence.
        size: (height, width) of the frames.
        seed: base seed; sequence ``i`` uses ``seed * 1000 + i``, so different seeds give disjoint sets.
        prefix: name prefix of the sequence folders.
        **kwargs: passed to :func:`write_sequence` (objects, speeds, detection noise, ...).

    Returns:
        The sequence folders, in order.
    """
    if num_sequences < 1:
        raise ConfigError(f"num_sequences must be >= 1, got {num_sequences}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return [
        write_sequence(root / f"{prefix}-{i + 1:02d}", num_frames=num_frames, size=size, seed=seed * 1000 + i, **kwargs)
        for i in range(num_sequences)
    ]
