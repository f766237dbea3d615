"""Frame models of ``vitssl.video.frames``: the input size of an exported backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vitssl.backbones import create_backbone, save_backbone
from vitssl.errors import DataError
from vitssl.video.frames import BackboneFrameModel


def _saved_without_img_size(tmp_path: Path) -> Path:
    backbone = create_backbone("test_vit")  # its variant's own input size (32), no img_size kwarg recorded
    backbone.kwargs.pop("img_size", None)
    return save_backbone(backbone, tmp_path / "backbone.safetensors")


def test_a_backbone_saved_without_img_size_is_fed_the_size_its_model_is_built_for(tmp_path: Path) -> None:
    path = _saved_without_img_size(tmp_path)
    frames = BackboneFrameModel(path)
    image, _ = frames.sample_fn(Image.new("RGB", (80, 60)), -1)
    assert image.shape == (3, 32, 32)  # not a fixed 224, which the model would refuse
    assert frames.feature_fn()(image[None]).shape == (1, frames.backbone.num_features)
    assert BackboneFrameModel(path, img_size=48).sample_fn(Image.new("RGB", (80, 60)), -1)[0].shape == (3, 48, 48)


def test_no_size_anywhere_fails_in_one_line_naming_img_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vitssl.backbones

    path = _saved_without_img_size(tmp_path)
    monkeypatch.setattr(vitssl.backbones, "load_backbone", lambda p: torch.nn.Identity())  # a model with no size
    with pytest.raises(DataError, match=r"records no input size.*pass img_size=N") as info:
        BackboneFrameModel(path)
    assert "\n" not in str(info.value)
