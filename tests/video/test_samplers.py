"""Frame samplers: exact index arrays for small hand-computed cases, bounds, short videos, and the reference formulas.

The ``_mmaction2_*`` and ``_pyslowfast_*`` functions transcribe the references' index arithmetic (mmaction2 1.x
``SampleFrames._get_train_clips`` / ``_get_test_clips`` / ``transform``, mmaction2 0.x ``_get_test_clips``,
PySlowFast ``decoder.get_start_end_idx`` / ``temporal_sampling``) so that the samplers are compared with them over
many (num_frames, clip_len, interval, num_clips) combinations.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from vitssl.video.samplers import dense_indices, multi_view_indices, segment_indices, three_crop_boxes

# ---- reference transcriptions -------------------------------------------------------------------------------------


def _mmaction2_out_of_bound(frame_inds: np.ndarray, total_frames: int, opt: str) -> np.ndarray:
    """mmaction2 ``SampleFrames.transform``'s out-of-bound handling of ``(clips, clip_len)`` indices."""
    if opt == "loop":
        return np.mod(frame_inds, total_frames)
    safe_inds = frame_inds < total_frames
    unsafe_inds = 1 - safe_inds
    last_ind = np.max(safe_inds * frame_inds, axis=1)
    return safe_inds * frame_inds + (unsafe_inds.T * last_ind).T


def _mmaction2_1x_test(num_frames: int, clip_len: int, frame_interval: int, num_clips: int) -> np.ndarray:
    """mmaction2 1.x ``SampleFrames(test_mode=True, out_of_bound_opt='repeat_last')`` (no target_fps, no twice)."""
    ori_clip_len = (clip_len - 1) * frame_interval + 1  # _get_ori_clip_len in test mode
    if clip_len == 1:  # 2D recognizer
        avg_interval = num_frames / float(num_clips)
        base_offsets = np.arange(num_clips) * avg_interval
        clip_offsets = base_offsets + avg_interval / 2.0
    else:  # 3D recognizer
        max_offset = max(num_frames - ori_clip_len, 0)
        if num_clips > 1:
            num_segments = num_clips - 1
            offset_between = max_offset / float(num_segments)
            clip_offsets = np.arange(num_clips) * offset_between
            clip_offsets = np.round(clip_offsets)
        else:
            clip_offsets = np.array([max_offset // 2])
    frame_inds = clip_offsets[:, None] + np.arange(clip_len)[None, :] * frame_interval
    frame_inds = np.concatenate(frame_inds).reshape((-1, clip_len))
    return _mmaction2_out_of_bound(frame_inds, num_frames, "repeat_last").astype(np.int32)


def _mmaction2_0x_test(num_frames: int, clip_len: int, frame_interval: int, num_clips: int) -> np.ndarray:
    """mmaction2 0.x ``SampleFrames._get_test_clips`` with ``out_of_bound_opt='repeat_last'``."""
    ori_clip_len = clip_len * frame_interval
    avg_interval = (num_frames - ori_clip_len + 1) / float(num_clips)
    if num_frames > ori_clip_len - 1:
        base_offsets = np.arange(num_clips) * avg_interval
        clip_offsets = (base_offsets + avg_interval / 2.0).astype(np.int64)
    else:
        clip_offsets = np.zeros((num_clips,), dtype=np.int64)
    frame_inds = clip_offsets[:, None] + np.arange(clip_len)[None, :] * frame_interval
    return _mmaction2_out_of_bound(frame_inds, num_frames, "repeat_last").astype(np.int32)


def _mmaction2_1x_tsn_train_short(num_frames: int, num_clips: int) -> np.ndarray:
    """mmaction2 1.x ``SampleFrames(clip_len=1, num_clips=S)`` train offsets when ``n < S`` (no draw), 'loop'."""
    ori_clip_len = 1 * 1
    avg_interval = (num_frames - ori_clip_len + 1) // num_clips
    assert avg_interval == 0 and not num_frames > max(num_clips, ori_clip_len)  # the branch this covers
    ratio = (num_frames - ori_clip_len + 1.0) / num_clips
    clip_offsets = np.around(np.arange(num_clips) * ratio)
    frame_inds = clip_offsets[:, None] + np.arange(1)[None, :] * 1
    return _mmaction2_out_of_bound(frame_inds, num_frames, "loop").reshape(-1).astype(np.int32)


def _pyslowfast_get_start_end_idx(video_size, clip_size, clip_idx, num_clips_uniform, use_offset=False):
    """PySlowFast ``decoder.get_start_end_idx`` for a test clip (``clip_idx >= 0``)."""
    delta = max(video_size - clip_size, 0)
    if use_offset:
        if num_clips_uniform == 1:
            start_idx = math.floor(delta / 2)
        else:
            start_idx = clip_idx * math.floor(delta / (num_clips_uniform - 1))
    else:
        start_idx = delta * clip_idx / num_clips_uniform
    end_idx = start_idx + clip_size - 1
    return start_idx, end_idx


def _pyslowfast_test(num_frames: int, clip_len: int, sampling_rate: int, num_clips: int) -> np.ndarray:
    """PySlowFast's test clips (fps == target_fps, USE_OFFSET_SAMPLING): ``temporal_sampling`` per clip index."""
    clips = []
    for clip_idx in range(num_clips):
        clip_size = clip_len * sampling_rate * 30.0 / 30.0
        start_idx, end_idx = _pyslowfast_get_start_end_idx(num_frames, clip_size, clip_idx, num_clips, True)
        index = torch.linspace(start_idx, end_idx, clip_len)
        clips.append(torch.clamp(index, 0, num_frames - 1).long().numpy())
    return np.stack(clips)


_GRID = list(
    itertools.product(
        [1, 2, 5, 7, 16, 31, 32, 33, 64, 100, 157, 300], [1, 2, 4, 8, 16], [1, 2, 3, 4], [1, 2, 3, 4, 5, 10]
    )
)


@pytest.mark.parametrize("spacing", ["mmaction2", "mmaction2_0x", "pyslowfast"])
def test_dense_test_clips_equal_the_reference_formulas(spacing):
    reference = {"mmaction2": _mmaction2_1x_test, "mmaction2_0x": _mmaction2_0x_test, "pyslowfast": _pyslowfast_test}
    differ = 0
    for n, clip_len, interval, clips in _GRID:
        got = dense_indices(n, clip_len, interval, train=False, num_clips=clips, spacing=spacing)
        want = reference[spacing](n, clip_len, interval, clips)
        assert got.dtype == np.int64 and got.shape == (clips, clip_len)
        assert got.tolist() == want.tolist(), (n, clip_len, interval, clips)
        differ += got.tolist() != _mmaction2_0x_test(n, clip_len, interval, clips).tolist()
    if spacing != "mmaction2_0x":
        assert differ > len(_GRID) // 4  # the grid does tell the spacings apart


def test_dense_default_spacing_is_mmaction2_1x():
    # max_offset = 20 - (3 * 2 + 1) = 13: starts round(0), round(6.5) = 6 (half to even), 13
    assert dense_indices(20, 4, 2, train=False, num_clips=3).tolist() == [
        [0, 2, 4, 6],
        [6, 8, 10, 12],
        [13, 15, 17, 19],
    ]
    assert dense_indices(20, 4, 2, train=False).tolist() == [[6, 8, 10, 12]]  # max_offset // 2
    with pytest.raises(ValueError, match="unknown dense spacing 'slowfast'; choose one of mmaction2, pyslowfast"):
        dense_indices(20, 4, 2, train=False, spacing="slowfast")


@pytest.mark.parametrize("n, segments", [(n, s) for s in (2, 3, 4, 8, 16, 32) for n in range(1, s)])
def test_fewer_frames_than_segments_wraps_as_mmaction2(n, segments):
    got = segment_indices(n, segments, train=True, rng=np.random.default_rng(0))
    assert got.tolist() == _mmaction2_1x_tsn_train_short(n, segments).tolist()


@pytest.mark.parametrize("n, segments", [(n, s) for s in (1, 3, 8, 16) for n in (1, 2, 5, 8, 16, 17, 100)])
def test_segment_test_indices_equal_mmaction2_single_frame_clips(n, segments):
    assert segment_indices(n, segments, train=False).tolist() == _mmaction2_1x_test(n, 1, 1, segments)[:, 0].tolist()


def test_segment_test_indices_are_the_segment_centres():
    # tick = 10 / 4 = 2.5: int(1.25), int(3.75), int(6.25), int(8.75)
    assert segment_indices(10, 4, train=False).tolist() == [1, 3, 6, 8]
    assert segment_indices(16, 8, train=False).tolist() == [1, 3, 5, 7, 9, 11, 13, 15]


def test_segment_train_indices_draw_one_frame_per_segment():
    # avg = 10 // 4 = 2: s * 2 + randint(2)
    offsets = np.random.default_rng(0).integers(2, size=4)
    got = segment_indices(10, 4, train=True, rng=np.random.default_rng(0))
    assert got.tolist() == (np.arange(4) * 2 + offsets).tolist()
    for seed in range(20):
        got = segment_indices(10, 4, train=True, rng=np.random.default_rng(seed))
        assert all(2 * s <= i < 2 * s + 2 for s, i in enumerate(got.tolist()))
    assert got.dtype == np.int64


def test_train_draws_use_the_global_generator_without_rng():
    # the data wrapper seeds numpy per sample: a reseeded generator draws the same frames again
    np.random.seed(7)
    first = segment_indices(100, 8, train=True)
    np.random.seed(7)
    assert segment_indices(100, 8, train=True).tolist() == first.tolist()
    np.random.seed(7)
    a = dense_indices(100, 4, 2, train=True)
    np.random.seed(7)
    assert dense_indices(100, 4, 2, train=True).tolist() == a.tolist()


def test_fewer_frames_than_segments_spreads_evenly_within_bounds():
    # train: round(s * 3 / 8) = 0 0 1 1 2 2 2 3 -> the 3 wraps to frame 0 (mmaction2's 'loop')
    assert segment_indices(3, 8, train=True, rng=np.random.default_rng(0)).tolist() == [0, 0, 1, 1, 2, 2, 2, 0]
    # test: tick = 0.375, int(0.1875 + 0.375 s)
    assert segment_indices(3, 8, train=False).tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert segment_indices(1, 4, train=True).tolist() == [0, 0, 0, 0]


def test_dense_test_clips_are_evenly_spaced():
    # 0.x: span = 4 * 2 = 8, avg = (20 - 8 + 1) / 2 = 6.5: starts int(3.25) = 3 and int(9.75) = 9
    old = dense_indices(20, 4, 2, train=False, num_clips=2, spacing="mmaction2_0x")
    assert old.tolist() == [[3, 5, 7, 9], [9, 11, 13, 15]]
    assert dense_indices(20, 4, 2, train=False, spacing="mmaction2_0x").tolist() == [[6, 8, 10, 12]]  # int(6.5)
    # 1.x: the first clip at the start, the last ending on the last frame
    assert dense_indices(20, 4, 2, train=False, num_clips=2).tolist() == [[0, 2, 4, 6], [13, 15, 17, 19]]


def test_dense_train_clip_has_a_random_start_in_range():
    start = int(np.random.default_rng(1).integers(13, size=1)[0])  # 20 - 8 + 1 = 13 possible starts
    got = dense_indices(20, 4, 2, train=True, rng=np.random.default_rng(1))
    assert got.tolist() == [[start, start + 2, start + 4, start + 6]]
    for seed in range(30):
        got = dense_indices(20, 4, 2, train=True, rng=np.random.default_rng(seed))
        assert got.shape == (1, 4) and got.min() >= 0 and got.max() <= 19


def test_dense_short_video_repeats_the_last_frame():
    # span 8 > 5 frames: start 0, 0 2 4 6 -> 6 is past the end and repeats 4 (repeat_last, not loop)
    assert dense_indices(5, 4, 2, train=False).tolist() == [[0, 2, 4, 4]]
    assert dense_indices(5, 4, 2, train=True, rng=np.random.default_rng(0)).tolist() == [[0, 2, 4, 4]]
    assert dense_indices(1, 3, 1, train=False, num_clips=2).tolist() == [[0, 0, 0], [0, 0, 0]]


def test_multi_view_indices_are_clip_major():
    views = multi_view_indices(20, 4, 2, num_clips=2, num_crops=3)
    assert views.shape == (6, 4)
    assert views.tolist() == [[0, 2, 4, 6]] * 3 + [[13, 15, 17, 19]] * 3


def test_three_crop_boxes_cover_the_long_side():
    assert three_crop_boxes(48, 64, 48) == [(0, 0, 48, 48), (0, 8, 48, 48), (0, 16, 48, 48)]
    assert three_crop_boxes(64, 48, 48) == [(0, 0, 48, 48), (8, 0, 48, 48), (16, 0, 48, 48)]
    assert three_crop_boxes(50, 64, 32) == [(9, 0, 32, 32), (9, 16, 32, 32), (9, 32, 32, 32)]
    with pytest.raises(ValueError, match="crop size"):
        three_crop_boxes(48, 64, 49)


@pytest.mark.parametrize("bad", [{"num_frames": 0}, {"num_segments": 0}])
def test_segment_arguments_are_checked(bad):
    args = {"num_frames": 10, "num_segments": 4, **bad}
    with pytest.raises(ValueError, match=">= 1"):
        segment_indices(args["num_frames"], args["num_segments"], train=False)
