"""Which frames to read: TSN segments, dense clips and multi-view test clips (pure index arithmetic).

The formulas are mmaction2's (1.x) ``SampleFrames`` (which VideoMAE, TimeSformer and ViViT evaluate with), written
for ``n`` frames; the test-clip spacing can also follow PySlowFast or mmaction2 0.x (:data:`DenseSpacing`).
Train-time draws use ``rng`` when given, else numpy's global generator, which the data wrapper seeds per sample
so that a resumed run draws the same frames. Every result is an int64 array of indices in ``[0, n)``; reading
them is :func:`vitssl.video.io.read_frames`'s job, cropping is the transform's (the boxes of
:func:`three_crop_boxes` say where).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

DenseSpacing = Literal["mmaction2", "pyslowfast", "mmaction2_0x"]
"""Where dense test clips start (:func:`dense_indices`): ``mmaction2`` (1.x ``SampleFrames``, the default),
``pyslowfast`` (``get_start_end_idx`` with offset sampling, frames by ``temporal_sampling``) or ``mmaction2_0x``
(0.x ``SampleFrames``, the spacing vitssl used before the 1.x one became the default)."""
DENSE_SPACINGS: tuple[str, ...] = ("mmaction2", "pyslowfast", "mmaction2_0x")


def _randint(high: int, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """``size`` draws from ``[0, high)``: ``rng`` if given, else numpy's global (legacy) generator."""
    if rng is None:
        return np.random.randint(high, size=size).astype(np.int64)
    return rng.integers(high, size=size).astype(np.int64)


def _check(num_frames: int, **positive: int) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def segment_indices(
    num_frames: int, num_segments: int, *, train: bool, rng: np.random.Generator | None = None
) -> np.ndarray:
    """TSN sampling: one frame from each of ``S`` equal segments, shape ``(S,)``.

    With ``avg = n // S``:

    * train: ``idx[s] = s * avg + randint(avg)``; when ``n < S`` (``avg == 0``) the frames are spread evenly,
      ``idx[s] = round(s * n / S) mod n`` (numpy's half-to-even rounding; repeats included, and an index that
      rounds up to ``n`` wraps to frame 0), as mmaction2's ``SampleFrames`` does with its default
      ``out_of_bound_opt='loop'``.
    * test: segment centres, ``idx[s] = int(tick / 2 + tick * s)`` with ``tick = n / S``.

    Args:
        num_frames: frames in the video (``n``).
        num_segments: segments, one frame each (``S``).
        train: random offsets within the segments (else the centres).
        rng: the generator for train draws; None: numpy's global one.
    """
    _check(num_frames, num_segments=num_segments)
    segments = np.arange(num_segments)
    if train:
        avg = num_frames // num_segments
        if avg > 0:
            return segments * avg + _randint(avg, num_segments, rng)
        # mmaction2 rounds s * n / S, which can reach n: its 'loop' wraps that index to frame 0
        spread = np.around(segments * (num_frames / num_segments)).astype(np.int64)
        return np.mod(spread, num_frames)
    tick = num_frames / num_segments
    return (tick / 2.0 + tick * segments).astype(np.int64)


def _repeat_last(indices: np.ndarray, num_frames: int) -> np.ndarray:
    """mmaction2's ``out_of_bound_opt='repeat_last'``: an index past the end becomes the clip's last valid one."""
    safe = indices < num_frames  # (C, L)
    last = np.max(np.where(safe, indices, 0), axis=1, keepdims=True)  # (C, 1); frame 0 is always valid
    return np.where(safe, indices, last)  # (C, L)


def _test_starts(num_frames: int, clip_len: int, stride: int, num_clips: int, spacing: str) -> np.ndarray:
    """First frames of the ``num_clips`` test clips under ``spacing`` (see :func:`dense_indices`)."""
    clips = np.arange(num_clips)
    if spacing == "mmaction2_0x":
        span = clip_len * stride
        if num_frames <= span - 1:
            return np.zeros(num_clips, dtype=np.int64)
        avg = (num_frames - span + 1) / num_clips
        return (clips * avg + avg / 2.0).astype(np.int64)
    if spacing == "pyslowfast":
        delta = max(num_frames - clip_len * stride, 0)
        if num_clips == 1:
            return np.array([delta // 2], dtype=np.int64)
        return clips * (delta // (num_clips - 1))
    if clip_len == 1:  # mmaction2 samples single frames (2-D models) at segment centres
        avg = num_frames / num_clips
        return (clips * avg + avg / 2.0).astype(np.int64)
    max_offset = max(num_frames - ((clip_len - 1) * stride + 1), 0)
    if num_clips == 1:
        return np.array([max_offset // 2], dtype=np.int64)
    return np.round(clips * (max_offset / (num_clips - 1))).astype(np.int64)  # half to even, as numpy rounds


def dense_indices(
    num_frames: int,
    clip_len: int,
    stride: int,
    *,
    train: bool,
    rng: np.random.Generator | None = None,
    num_clips: int = 1,
    spacing: DenseSpacing = "mmaction2",
) -> np.ndarray:
    """Dense clips of ``L`` frames, ``stride`` apart, shape ``(num_clips, L)``.

    A clip starting at ``o`` is ``o + stride * arange(L)`` (except under ``pyslowfast``, below):

    * train: one clip (``num_clips`` is ignored) with ``o = randint(n - L * stride + 1)``; ``o = 0`` when the
      video is shorter than ``L * stride`` frames.
    * test, ``spacing="mmaction2"`` (1.x, the default): with ``max_offset = max(n - ((L - 1) * stride + 1), 0)``
      (the room left after the clip's own extent), ``o[c] = round(c * max_offset / (C - 1))``, the first clip at
      the start and the last ending on the last frame; ``o = max_offset // 2`` for one clip. Single-frame clips
      (``L == 1``) start at the segment centres ``int(c * avg + avg / 2)``, ``avg = n / C``.
    * test, ``spacing="pyslowfast"`` (``get_start_end_idx`` with ``DATA.USE_OFFSET_SAMPLING``, the spacing
      mmaction2 1.x aligns with): ``delta = max(n - L * stride, 0)``, ``o[c] = c * floor(delta / (C - 1))``
      (``floor(delta / 2)`` for one clip), and the clip's frames are PySlowFast's ``temporal_sampling``:
      ``L`` points of ``linspace(o, o + L * stride - 1, L)`` truncated to integers.
    * test, ``spacing="mmaction2_0x"``: ``o[c] = int(c * avg + avg / 2)`` with ``avg = (n - L * stride + 1) / C``,
      all at 0 when the video is shorter than ``L * stride``; mmaction2 0.x's centred segments.

    Indices past the end repeat the clip's last in-range frame (mmaction2's ``out_of_bound_opt='repeat_last'``,
    not ``'loop'``; PySlowFast clamps to the last frame): a short video gives a clip that freezes on its last
    frame rather than jumping back.

    Args:
        num_frames: frames in the video (``n``).
        clip_len: frames per clip (``L``).
        stride: frame interval within a clip.
        train: one random clip (else ``num_clips`` evenly spaced ones).
        rng: the generator for the train draw; None: numpy's global one.
        num_clips: test clips per video (``C``).
        spacing: where test clips start, one of :data:`DENSE_SPACINGS`.
    """
    _check(num_frames, clip_len=clip_len, stride=stride, num_clips=num_clips)
    if spacing not in DENSE_SPACINGS:
        raise ValueError(f"unknown dense spacing {spacing!r}; choose one of {', '.join(DENSE_SPACINGS)}")
    if train:
        room = num_frames - clip_len * stride + 1
        starts = _randint(room, 1, rng) if room > 0 else np.zeros(1, dtype=np.int64)
    else:
        starts = _test_starts(num_frames, clip_len, stride, num_clips, spacing)
        if spacing == "pyslowfast":
            # torch.linspace's own float32 points (its rounding decides ties at integers), clamped and truncated
            span = clip_len * stride - 1
            points = [torch.linspace(float(o), float(o + span), clip_len) for o in starts.tolist()]
            return torch.stack(points).clamp(0, num_frames - 1).long().numpy()  # (C, L)
    indices = starts[:, None] + stride * np.arange(clip_len)[None, :]  # (C, L)
    return _repeat_last(indices.astype(np.int64), num_frames)


def multi_view_indices(
    num_frames: int,
    clip_len: int,
    stride: int,
    *,
    num_clips: int,
    num_crops: int,
    spacing: DenseSpacing = "mmaction2",
) -> np.ndarray:
    """Test views ``num_clips x num_crops`` (TimeSformer 1x3, ViViT 4x3): frame indices per view.

    Shape ``(num_clips * num_crops, L)``, clip-major: view ``v`` reads clip ``v // num_crops`` (the test clips of
    :func:`dense_indices`) and is cropped with box ``v % num_crops`` (e.g. of :func:`three_crop_boxes`); the
    prediction of a video is the mean over its views.

    Args:
        num_frames: frames in the video.
        clip_len: frames per clip.
        stride: frame interval within a clip.
        num_clips: temporal clips.
        num_crops: spatial crops per clip (1 or 3 in practice).
        spacing: where the clips start, one of :data:`DENSE_SPACINGS`.
    """
    _check(num_frames, num_crops=num_crops)
    clips = dense_indices(num_frames, clip_len, stride, train=False, num_clips=num_clips, spacing=spacing)  # (C, L)
    return np.repeat(clips, num_crops, axis=0)  # (C * K, L)


def three_crop_boxes(height: int, width: int, size: int) -> list[tuple[int, int, int, int]]:
    """mmaction2's ``ThreeCrop``: three ``size x size`` boxes along the longer side, as ``(top, left, h, w)``.

    Left / centre / right for a landscape frame, top / centre / bottom for a portrait one; the other axis is
    centred. Resize the short side to ``size`` first so that the three crops cover the whole frame.

    Args:
        height, width: frame size.
        size: crop side, at most ``min(height, width)``.
    """
    if not 1 <= size <= min(height, width):
        raise ValueError(f"crop size {size} must lie in [1, {min(height, width)}] for a {height}x{width} frame")
    if width >= height:
        top = (height - size) // 2
        return [(top, left, size, size) for left in (0, (width - size) // 2, width - size)]
    left = (width - size) // 2
    return [(top, left, size, size) for top in (0, (height - size) // 2, height - size)]


__all__ = [
    "DENSE_SPACINGS",
    "DenseSpacing",
    "dense_indices",
    "multi_view_indices",
    "segment_indices",
    "three_crop_boxes",
]
