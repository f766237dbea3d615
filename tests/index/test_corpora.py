"""The built-in corpus kinds' metadata (vitssl.index.corpora): an image row's class name read from the dataset's
targets (never by decoding the image), a video's file size, and nothing where nothing is cheap to know."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vitssl.index.corpora import ImageCorpus, VideoCorpus
from vitssl.index.pipeline import corpus_metadata


def test_a_digits_row_has_its_class_name_as_label_without_decoding_an_image(monkeypatch):
    from vitssl.data.digits import Digits

    def no_decoding(self, index):
        raise AssertionError(f"metadata decoded image {index}")

    monkeypatch.setattr(Digits, "load_image", no_decoding)
    corpus = ImageCorpus("digits", "val")
    targets = corpus.dataset.targets
    assert len(set(targets)) == 10  # every class shows up, so a wrong mapping cannot pass by luck
    metadata = corpus_metadata(corpus, range(len(corpus)))
    assert metadata == [{"label": corpus.dataset.classes[t]} for t in targets]
    assert metadata[:3] == [{"label": str(t)} for t in targets[:3]]


@pytest.mark.parametrize(
    "dataset",
    [
        SimpleNamespace(classes=["cat", "dog"]),  # no targets: only decoding would tell
        SimpleNamespace(classes=[], targets=[0, 1]),  # unlabelled
        SimpleNamespace(classes=["cat"], targets=["a caption", "another"]),  # image-text pairs
        SimpleNamespace(classes=["cat"], targets=[5, True]),  # out of range, not a class id
    ],
)
def test_an_image_row_without_a_cheap_class_name_has_no_metadata(dataset):
    corpus = ImageCorpus("digits", "val")
    corpus._dataset = dataset
    assert [corpus.metadata(r) for r in (0, 1)] == [{}, {}]
    assert corpus_metadata(corpus, [0, 1]) is None


def test_a_numpy_target_gives_its_class_name():
    import numpy as np

    corpus = ImageCorpus("digits", "val")
    corpus._dataset = SimpleNamespace(classes=["cat", "dog"], targets=np.array([1, 0]))
    assert corpus_metadata(corpus, [0, 1]) == [{"label": "dog"}, {"label": "cat"}]


def test_a_video_row_has_its_file_size_and_a_missing_file_none(tmp_path):
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    a.write_bytes(b"x" * 1234)
    b.write_bytes(b"y" * 7)
    corpus = VideoCorpus("videos:root=x", (str(a), str(b), str(tmp_path / "gone.mp4")))
    assert corpus_metadata(corpus, [0, 1, 2]) == [{"bytes": 1234}, {"bytes": 7}, {}]
