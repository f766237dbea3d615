"""A generated near-duplicate video benchmark: procedural source clips, their transformed copies, distractors.

:func:`make_neardup_benchmark` writes, with PyAV (h264 in mp4)::

    <root>/
      train/sources/src_000.mp4           source clips (procedural scenes with moving objects and a panning camera)
      train/copies/src_000_<edit>.mp4     one copy per edit of TRANSFORMS: the positives of that source
      train/distractors/dis_000.mp4       other clips of the same generator; every other one opens on the backdrop
                                          of a source (in that source's split): a hard negative
      test/...                            the same for the held-out sources
      train.txt, test.txt                 absolute video paths of each split, one a line (sources, their copies
                                          right after each source, then distractors)
      ground_truth.jsonl                  queries = sources, relevant = their copies (vitssl's ground-truth format,
                                          paths relative to <root>; read by vitssl.eval.retrieval_metrics)
      benchmark.json                      the settings, counts and edits (a rerun with the same settings reuses
                                          the folder)

Every source is its own scene: a smooth colour field under a texture of blobs, three to five shapes (discs, boxes,
rings) in their own colours drifting and bouncing, the camera panning slowly, and a cut to a second shot with
other colours halfway through, so no two sources share a frame and a temporal cut keeps part of a source only.
The folder is written to a temporary sibling and renamed into place: complete or absent.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vitssl.errors import DataError

BENCHMARK_FORMAT = 1
GROUND_TRUTH_FILE = "ground_truth.jsonl"
SPLITS = ("train", "test")


def _resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (T, H, W, 3) -> (T, height, width, 3), bilinear with antialiasing."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    y = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()  # (T, h, w, 3)


def _even(x: float) -> int:
    return max(2, round(x / 2) * 2)


# --------------------------------------------------------------------------------------------------------------
# Source clips
# --------------------------------------------------------------------------------------------------------------


def _colour_field(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random colour image (h, w, 3) float in [0, 255]: a few 2-D cosine waves, blotches on top."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    field = np.zeros((h, w, 3), dtype=np.float32) + rng.uniform(40, 215, size=3)
    for _ in range(3):
        fy, fx = rng.uniform(0.5, 3.0, size=2) * 2 * np.pi / max(h, w)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.cos(fy * yy + fx * xx + phase)[..., None]  # (h, w, 1)
        field += wave * rng.uniform(-45, 45, size=3)
    for _ in range(int(rng.integers(6, 12))):  # soft blobs: texture a copy's crop must keep
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(0.04, 0.12) * max(h, w)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        field += blob * rng.uniform(-70, 70, size=3)
    return np.clip(field, 0, 255)


def _shot(
    rng: np.random.Generator, size: int, num_frames: int, background_rng: np.random.Generator | None = None
) -> np.ndarray:
    """One shot: a panning view of a colour field with moving shapes, uint8 (T, size, size, 3); the field comes
    from ``background_rng`` when given (a scene that shares another one's backdrop)."""
    pan = size // 4
    background = _colour_field(background_rng or rng, size + 2 * pan, size + 2 * pan)
    pan_dir = rng.uniform(-1, 1, size=2)
    pan_dir /= np.linalg.norm(pan_dir) + 1e-6
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    shapes = []
    for _ in range(int(rng.integers(3, 6))):
        shapes.append(
            {
                "kind": int(rng.integers(0, 3)),  # 0 disc, 1 box, 2 ring
                "pos": rng.uniform(0.15, 0.85, size=2) * size,
                "vel": rng.uniform(-1.0, 1.0, size=2) * size / 20,
                "radius": rng.uniform(0.08, 0.18) * size,
                "colour": rng.uniform(0, 255, size=3).astype(np.float32),
            }
        )
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        offset = pan + pan_dir * pan * math.sin(2 * math.pi * t / max(num_frames, 2) / 2)
        oy, ox = round(offset[0]), round(offset[1])
        img = background[oy : oy + size, ox : ox + size].copy()  # (size, size, 3)
        for s in shapes:
            pos = s["pos"] + s["vel"] * t
            pos = np.abs((pos + size) % (2 * size) - size)  # bounce off the borders
            dy, dx = yy - pos[0], xx - pos[1]
            r = s["radius"]
            if s["kind"] == 0:
                mask = dy * dy + dx * dx <= r * r
            elif s["kind"] == 1:
                mask = (np.abs(dy) <= r) & (np.abs(dx) <= 0.7 * r)
            else:
                d2 = dy * dy + dx * dx
                mask = (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
            img[mask] = s["colour"]
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def render_clip(seed: int, size: int, num_frames: int, backdrop_of: int | None = None) -> np.ndarray:
    """A procedural clip: two shots of ``num_frames / 2`` frames each, uint8 (T, size, size, 3).

    Args:
        seed: the clip's identity: every seed gives another scene.
        size: frame side in pixels (even).
        num_frames: frames T.
        backdrop_of: the seed of another clip whose first shot's backdrop this clip reuses (with its own shapes,
            motion and second shot): a hard negative for that clip.
    """
    rng = np.random.default_rng(seed)
    first = num_frames // 2
    backdrop = np.random.default_rng(backdrop_of) if backdrop_of is not None else None
    return np.concatenate([_shot(rng, size, first, backdrop), _shot(rng, size, num_frames - first)])


# --------------------------------------------------------------------------------------------------------------
# Edits (the transformed copies)
# --------------------------------------------------------------------------------------------------------------


def _logo(size: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed logo (s, s, 3) and its alpha mask (s, s): a white rounded badge with a dark bar and dot."""
    s = max(6, size // 4)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / (s - 1) * 2 - 1  # [-1, 1]
    badge = (np.abs(yy) ** 4 + np.abs(xx) ** 4) <= 1.0
    mark = ((np.abs(yy) < 0.2) & (xx < 0.3)) | ((yy - 0.0) ** 2 + (xx - 0.6) ** 2 < 0.06)
    logo = np.full((s, s, 3), 245, dtype=np.uint8)
    logo[mark] = (200, 30, 30)
    return logo, badge


def _edit_reencode(frames: np.ndarray, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    small = _resize(frames, _even(size * 0.75), _even(size * 0.75))
    return small, {"crf": 38}


def _edit_crop(frames: np.ndarray, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    m = size // 7
    return _resize(frames[:, m : size - m, m : size - m], size, size), {}


def _edit_flip(frames: np.ndarray, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    return np.ascontiguousarray(frames[:, :, ::-1]), {}


def _edit_speed(frames: np.ndarray, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    idx = np.floor(np.arange(0, len(frames), 1.5)).astype(np.int64)  # 1.5x speed at the same frame rate
    return frames[idx], {}


def _edit_cut(frames: np.ndarray, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    t = len(frames)
    return frames[t // 4 : t // 4 + max(1, t // 2)], {}  # the middle half


def _edit_brightness(frames: np.ndarray, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    return np.clip(frames.astype(np.int16) + 45, 0, 255).astype(np.uint8), {}


def _edit_logo(frames: np.ndarray, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    logo, alpha = _logo(size)
    out = frames.copy()
    s = logo.shape[0]
    y, x = 2, size - s - 2  # top right
    region = out[:, y : y + s, x : x + s]
    region[:, alpha] = logo[alpha]
    return out, {}


TRANSFORMS: dict[str, Callable[[np.ndarray, int], tuple[np.ndarray, dict[str, Any]]]] = {
    "reencode": _edit_reencode,  # 3/4 size, h264 at crf 38 (a much lower bitrate)
    "crop": _edit_crop,  # the central 5/7, scaled back up
    "flip": _edit_flip,  # mirrored left-right
    "speed": _edit_speed,  # 1.5x faster
    "cut": _edit_cut,  # the middle half only
    "brightness": _edit_brightness,  # +45 grey levels
    "logo": _edit_logo,  # a badge over the top-right corner
}


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


def write_clip(path: str | os.PathLike, frames: np.ndarray, fps: float, crf: int = 23) -> Path:
    """Encode uint8 (T, H, W, 3) frames (even H, W) as h264 in mp4 with PyAV.

    Args:
        path: output file (its folder is created).
        frames: the frames.
        fps: frame rate.
        crf: x264 constant rate factor (higher: lower bitrate).
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames.shape[1:3]
    container = av.open(str(path), mode="w", format="mp4")
    try:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": str(crf), "g": str(max(1, round(fps)))}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
    return path


def make_neardup_benchmark(
    root: str | os.PathLike,
    *,
    num_sources: int = 16,
    num_distractors: int = 16,
    size: int = 64,
    seed: int = 0,
    duration: float = 8.0,
    fps: float = 10.0,
    test_fraction: float = 0.5,
    transforms: tuple[str, ...] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the near-duplicate benchmark described in the module doc into ``root``.

    Args:
        root: output folder; an existing one written with the same settings is reused as it is.
        num_sources: source clips (queries); each gets one copy per edit.
        num_distractors: unrelated clips.
        size: frame side of the sources in pixels (even).
        seed: seed of every scene and of the split.
        duration: seconds per source clip.
        fps: frame rate of the written clips.
        test_fraction: share of the sources (and distractors) held out in ``test``.
        transforms: the edits to apply (names of :data:`TRANSFORMS`); default all.
        overwrite: rewrite ``root`` even when its settings match.

    Returns:
        ``root``.

    Raises:
        DataError: an impossible setting (no sources, odd size, unknown edit, empty split).
    """
    from vitssl.eval.retrieval_metrics import write_vitssl
    from vitssl.io import atomic_dir, write_json

    edits = tuple(TRANSFORMS) if transforms is None else tuple(transforms)
    unknown = [t for t in edits if t not in TRANSFORMS]
    if unknown:
        raise DataError(f"unknown near-duplicate edits {unknown}; choose from {', '.join(TRANSFORMS)}")
    if num_sources < 2 or num_distractors < 0:
        raise DataError(f"need num_sources >= 2 and num_distractors >= 0, got {num_sources} and {num_distractors}")
    if size < 16 or size % 2:
        raise DataError(f"size={size}: frames need an even side of at least 16 pixels (yuv420p)")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction={test_fraction} must lie strictly between 0 and 1")
    num_frames = round(duration * fps)
    if num_frames < 4:
        raise DataError(f"duration {duration} s at {fps} fps gives {num_frames} frames; need at least 4")
    root = Path(root).absolute()
    settings = {
        "format": BENCHMARK_FORMAT,
        "num_sources": num_sources,
        "num_distractors": num_distractors,
        "size": size,
        "seed": seed,
        "duration": duration,
        "fps": fps,
        "test_fraction": test_fraction,
        "transforms": list(edits),
    }
    info_path = root / "benchmark.json"
    if not overwrite and info_path.is_file():
        try:
            if json.loads(info_path.read_text(encoding="utf-8")).get("settings") == settings:
                return root
        except (OSError, ValueError):
            pass  # unreadable: write it again
    n_test = min(num_sources - 1, max(1, round(num_sources * test_fraction)))
    d_test = round((num_distractors + 1) // 2 * test_fraction)
    rng = np.random.default_rng(seed)
    test_sources = set(rng.permutation(num_sources)[:n_test].tolist())
    scene_seeds = rng.integers(0, 2**31, size=num_sources + num_distractors)
    lists: dict[str, list[str]] = {s: [] for s in SPLITS}
    pairs = []
    with atomic_dir(root, overwrite=True) as tmp:
        for i in range(num_sources):
            split = "test" if i in test_sources else "train"
            frames = render_clip(int(scene_seeds[i]), size, num_frames)
            rel = f"{split}/sources/src_{i:03d}.mp4"
            write_clip(tmp / rel, frames, fps)
            lists[split].append(rel)
            copies = []
            for name in edits:
                edited, opts = TRANSFORMS[name](frames, size)
                copy = f"{split}/copies/src_{i:03d}_{name}.mp4"
                write_clip(tmp / copy, edited, fps, crf=opts.get("crf", 23))
                copies.append(copy)
            lists[split].extend(copies)
            pairs.append((str(root / rel), [str(root / c) for c in copies]))
        for j in range(num_distractors):
            # every other distractor shares a source's opening backdrop (and that source's split): a hard negative
            sibling = (j // 2) % num_sources if j % 2 else None
            if sibling is not None:
                split = "test" if sibling in test_sources else "train"
            else:
                split = "test" if j // 2 < d_test else "train"
            rel = f"{split}/distractors/dis_{j:03d}.mp4"
            backdrop = int(scene_seeds[sibling]) if sibling is not None else None
            write_clip(tmp / rel, render_clip(int(scene_seeds[num_sources + j]), size, num_frames, backdrop), fps)
            lists[split].append(rel)
        for split in SPLITS:
            (tmp / f"{split}.txt").write_text("".join(f"{root / p}\n" for p in lists[split]), encoding="utf-8")
        write_vitssl(tmp / GROUND_TRUTH_FILE, pairs, relative_to=root)
        counts = {split: len(paths) for split, paths in lists.items()}
        write_json(
            {"settings": settings, "videos": counts, "test_sources": sorted(test_sources)}, tmp / "benchmark.json"
        )
    return root


__all__ = ["GROUND_TRUTH_FILE", "TRANSFORMS", "make_neardup_benchmark", "render_clip", "write_clip"]
