"""vitssl.video.files: the one video lister."""

from __future__ import annotations

import pytest

from vitssl.errors import MissingFileError
from vitssl.video.files import is_video_file, list_videos


def test_list_videos_recurses_sorts_and_ignores_other_files(tmp_path):
    for rel in ("b/clip.MP4", "a/x.mkv", "a/notes.txt", "top.webm"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "dir.mp4").mkdir()  # a folder named like a video is not one
    assert list_videos(tmp_path, relative=True) == ["a/x.mkv", "b/clip.MP4", "top.webm"]
    assert list_videos(tmp_path)[0] == str(tmp_path / "a/x.mkv")
    assert list_videos(tmp_path, extensions=(".webm",), relative=True) == ["top.webm"]
    assert is_video_file(tmp_path / "b/clip.MP4") and not is_video_file(tmp_path / "dir.mp4")


def test_list_videos_names_a_missing_folder(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist"):
        list_videos(tmp_path / "nope")
