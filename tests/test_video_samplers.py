"""Frame samplers: exact index arrays for small hand-computed cases, bounds, and short videos."""

from __future__ import annotations

import numpy as np
import pytest

from vitssl.video.samplers import dense_indices, multi_view_indices, segment_indices, three_crop_boxes


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
    # train: round(s * 3 / 8) = 0 0 1 1 2 2 2 3 -> the 3 is clamped to the last frame
    assert segment_indices(3, 8, train=True, rng=np.random.default_rng(0)).tolist() == [0, 0, 1, 1, 2, 2, 2, 2]
    # test: tick = 0.375, int(0.1875 + 0.375 s)
    assert segment_indices(3, 8, train=False).tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert segment_indices(1, 4, train=True).tolist() == [0, 0, 0, 0]


def test_dense_test_clips_are_evenly_spaced():
    # span = 4 * 2 = 8, avg = (20 - 8 + 1) / 2 = 6.5: starts int(3.25) = 3 and int(9.75) = 9
    assert dense_indices(20, 4, 2, train=False, num_clips=2).tolist() == [[3, 5, 7, 9], [9, 11, 13, 15]]
    assert dense_indices(20, 4, 2, train=False).tolist() == [[6, 8, 10, 12]]  # avg = 13, start int(6.5)


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
    assert views.tolist() == [[3, 5, 7, 9]] * 3 + [[9, 11, 13, 15]] * 3


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
