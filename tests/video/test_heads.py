"""The video head registry (``vitssl.video.heads``): a head defined here, outside the package, registers in one line
and trains through the normal config / engine path; unknown names fail with the registered ones."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from vitssl.backbones import create_backbone
from vitssl.config import ConfigError
from vitssl.video.action import VideoAction, VideoActionConfig
from vitssl.video.heads import VIDEO_HEADS, register_head

T, S = 4, 16


class GRUHead(nn.Module):
    """A recurrent temporal head: a GRU over the frame embeddings, its last state through a classifier."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 8) -> None:
        super().__init__()
        self.gru = nn.GRU(dim, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward_features(self, frames: torch.Tensor) -> torch.Tensor:
        return self.gru(frames)[1][-1]  # (B, hidden)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(frames))  # (B, K)


register_head("test_gru", lambda dim, cfg: GRUHead(dim, cfg.num_classes, **cfg.head_kwargs))


def _objective(**overrides: object) -> VideoAction:
    cfg = OmegaConf.structured(VideoActionConfig(**{"num_classes": 4, "num_frames": T, **overrides}))
    return VideoAction(cfg, lambda: create_backbone("test_vit", img_size=S))


def test_registered_heads_are_listed_and_built_by_name() -> None:
    assert {"mean", "temporal", "test_gru"} <= set(VIDEO_HEADS.list())
    objective = _objective(head="test_gru", head_kwargs={"hidden": 12})
    assert isinstance(objective.head, GRUHead) and objective.head.gru.hidden_size == 12
    clips = torch.randn(2, T, 3, S, S)  # (B, T, C, H, W)
    assert objective.eval_features(clips).shape == (2, 12)


def test_unknown_head_fails_naming_the_key_and_the_registered_heads() -> None:
    with pytest.raises(ConfigError, match=r"objective\.head='tsm'.*Valid names: .*mean, temporal, test_gru"):
        _objective(head="tsm")


def test_builtin_heads_refuse_head_kwargs() -> None:
    with pytest.raises(ConfigError, match=r"objective\.head_kwargs.*temporal head takes none"):
        _objective(head="temporal", head_kwargs={"hidden": 3})


def test_an_outside_head_trains_through_the_engine_and_its_run_folder_seeds_another(tmp_path: Path) -> None:
    import vitssl.video.datasets  # noqa: F401  (registers motion)
    from vitssl.config import load_config
    from vitssl.engine import load_objective, train

    kwargs = f"{{num_samples: 8, img_size: {S}, num_frames: {T}}}"
    cfg = load_config(
        "video/action_demo",
        [
            f"output_dir={tmp_path / 'run'}",
            "model.backbone=test_vit",
            "~model.backbone_kwargs",
            "objective.head=test_gru",
            "objective.head_kwargs={hidden: 6}",
            "objective.freeze_backbone=false",
            f"objective.num_frames={T}",
            f"data.train.kwargs={kwargs}",
            f"data.val.kwargs={kwargs}",
            f"data.img_size={S}",
            "train.epochs=1",
            "train.batch_size=4",
            "train.log_every_steps=1",
        ],
    )
    result = train(cfg)
    assert result.status == "finished" and result.step == 2 and math.isfinite(result.metrics["loss"])
    trained, _, _ = load_objective(Path(result.checkpoint_path))
    assert isinstance(trained.head, GRUHead) and trained.head.gru.hidden_size == 6

    # objective.init_from takes the run folder: its checkpoint_last.pth, found by the engine's resolver
    seeded = _objective(head="mean", init_from=str(tmp_path / "run"))
    seeded.setup(None)
    for a, b in zip(trained.backbone.state_dict().values(), seeded.backbone.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ConfigError, match=r"objective\.init_from=.*holds no checkpoint"):
        _objective(init_from=str(tmp_path)).setup(None)
