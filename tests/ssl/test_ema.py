"""The one EMA update (vitssl.ssl.ema): its formula, bit-identity with the update MoCo v3 and TCA each wrote
before (a fused lerp by 1 - m), both objectives going through it, and its refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from vitssl.backbones import create_backbone
from vitssl.ssl import ema
from vitssl.ssl.ema import ema_update


def _pair(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (7,), (2, 2, 5)]
    return [torch.randn(s, generator=g) for s in shapes], [torch.randn(s, generator=g) for s in shapes]


def test_ema_update_is_the_moving_average_and_bit_identical_to_the_former_updates() -> None:
    target, source = _pair()
    before = [t.clone() for t in target]
    former = [t.clone() for t in target]
    m = 0.996
    ema_update(target, source, m)
    torch._foreach_lerp_(former, source, 1.0 - m)  # what moco_v3.py and video/tca/model.py each did
    for t, f, b, s in zip(target, former, before, source):
        assert torch.equal(t, f)
        torch.testing.assert_close(t, m * b + (1 - m) * s)
    kept, copied = [t.clone() for t in target], [t.clone() for t in target]
    ema_update(kept, source, 1.0)
    ema_update(copied, source, 0.0)
    assert all(torch.equal(k, t) for k, t in zip(kept, target)) and all(
        torch.equal(c, s) for c, s in zip(copied, source)
    )


def test_ema_update_refuses_lists_that_do_not_mirror_each_other() -> None:
    target, source = _pair()
    with pytest.raises(ValueError, match="must mirror its source"):
        ema_update(target[:2], source, 0.9)
    with pytest.raises(ValueError, match="must mirror its source"):
        ema_update([target[1], target[0], target[2]], source, 0.9)
    with pytest.raises(ValueError, match=r"momentum 1.5 must lie in \[0, 1\]"):
        ema_update(target, source, 1.5)


def test_moco_v3_and_tca_update_their_copies_through_it(monkeypatch) -> None:
    from vitssl.ssl.moco_v3 import MocoV3, MocoV3Config, momentum_at
    from vitssl.video.tca import VideoTCA, VideoTCAConfig

    calls: list[float] = []

    def counted(target, source, momentum):
        calls.append(momentum)
        ema_update(target, source, momentum)

    monkeypatch.setattr("vitssl.ssl.moco_v3.ema_update", counted)
    monkeypatch.setattr("vitssl.video.tca.model.ema_update", counted)
    moco = MocoV3(
        OmegaConf.structured(MocoV3Config(dim=8, mlp_dim=16)),
        lambda **kw: create_backbone("test_vit", img_size=16, **kw),
    )
    tca_cfg = VideoTCAConfig(pca_dim=16, num_heads=4, ffn=32, queue_size=8, key_momentum=0.9)
    tca = VideoTCA(OmegaConf.structured(tca_cfg), lambda: create_backbone("test_vit", img_size=16))
    with torch.no_grad():
        for p in [*moco.backbone.parameters(), *tca.encoder.parameters()]:
            p.add_(1.0)
    key_before = copy.deepcopy(tca.key_encoder)
    moco.on_step_end(3, 10)
    tca.on_step_end(3, 10)
    assert calls == [momentum_at(3, 10, 0.99), 0.9]
    for (name, k), b, q in zip(tca.key_encoder.named_parameters(), key_before.parameters(), tca.encoder.parameters()):
        torch.testing.assert_close(k, 0.9 * b + 0.1 * q, msg=name)
    assert ema.__all__ == ["ema_update"]
