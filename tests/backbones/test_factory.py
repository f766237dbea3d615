"""Backbones: the interface contract over every family, MoCo v3 options, PVT v1 vs the paper, timm round trips."""

from __future__ import annotations

import math
import os
import stat
import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from vitssl.backbones import (
    BACKBONES,
    create_backbone,
    describe_backbone,
    format_backbone_table,
    list_backbones,
    load_backbone,
    load_backbone_state,
    read_backbone_metadata,
    save_backbone,
    sincos_pos_embed_2d,
)
from vitssl.backbones import pvt as pvt_module
from vitssl.backbones._base import register_variant
from vitssl.backbones.vit import VisionTransformerBackbone
from vitssl.config import ConfigError
from vitssl.errors import UserError
from vitssl.registry import UnknownNameError

TEST_NAMES = list_backbones("test_*")
POOLING = {"test_vit": "cls", "test_pvt": "cls", "test_swin": "mean", "test_pvt_v2": "mean"}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _images(h: int, w: int | None = None, batch: int = 2, chans: int = 3) -> torch.Tensor:
    return torch.randn(batch, chans, h, w if w is not None else h)


# --- registry ---------------------------------------------------------------------------------------------------


def test_registry_has_the_curated_names() -> None:
    assert TEST_NAMES == ["test_pvt", "test_pvt_v2", "test_swin", "test_vit"]
    names = set(list_backbones())
    for required in (
        "vit_tiny_patch16_224",
        "vit_small_patch16_224",
        "vit_base_patch16_224",
        "vit_large_patch16_224",
        "vit_small_patch8_224",
        "vit_base_patch32_224",
        "swin_tiny_patch4_window7_224",
        "swin_small_patch4_window7_224",
        "swin_base_patch4_window7_224",
        *(f"pvt_v2_b{i}" for i in range(6)),
        "pvt_tiny",
        "pvt_small",
        "pvt_medium",
        "pvt_large",
    ):
        assert required in names
    assert len(names) < 60  # a curated list, not all of timm
    for name in names:
        assert timm.is_model(BACKBONES.get(name).timm_name), name
    assert list_backbones("swin_*") == sorted(n for n in names if n.startswith("swin_"))


def test_unknown_name_fails_with_valid_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        create_backbone("vit_smal_patch16_224")
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert "vit_smal_patch16_224" in message
    assert "vit_small_patch16_224" in message  # suggestion
    assert "Valid names:" in message and "pvt_large" in message and "pvt_v2_b0" in message
    # the test variants are not offered to users, only pointed at
    assert not any(name in message for name in TEST_NAMES) and "vitssl backbones --all" in message
    assert create_backbone("test_vit").name == "test_vit"  # still buildable by name
    with pytest.raises(UnknownNameError, match="Did you mean 'test_vit'"):
        create_backbone("test_vitt")  # someone typing a test name gets the test names


def test_none_kwargs_mean_model_defaults() -> None:
    bb = create_backbone("test_vit", img_size=None, drop_path_rate=None, pos_embed=None, in_chans=None)
    assert bb.kwargs == {}
    assert bb.img_size == (32, 32) and bb.in_chans == 3 and bb.pos_embed_kind == "learn"


def test_bad_kwargs_fail_clearly() -> None:
    with pytest.raises(ConfigError, match=r"num_classes cannot be set.*~model\.backbone_kwargs\.num_classes"):
        create_backbone("test_vit", num_classes=10)
    with pytest.raises(ConfigError, match=r"test_pvt_v2.*not_an_option"):
        create_backbone("test_pvt_v2", not_an_option=1)
    with pytest.raises(ValueError, match="pos_embed='rope'"):
        create_backbone("test_vit", pos_embed="rope")


# options a ViT recipe passes (MoCo v3's stability fixes, a patch size) that other families do not take
VIT_OPTIONS = dict(patch_size=16, pos_embed="sincos", freeze_patch_embed=True, weight_init="moco")


@pytest.mark.parametrize("name", ["pvt_tiny", "test_pvt", "test_pvt_v2", "test_swin"])
def test_options_of_another_family_are_one_line_config_errors(name: str) -> None:
    # Swin takes patch_size and weight_init; a ViT-style "depth" is its "depths"
    options = VIT_OPTIONS if name != "test_swin" else dict(pos_embed="sincos", freeze_patch_embed=True, depth=3)
    with pytest.raises(ConfigError) as info:
        create_backbone(name, drop_path_rate=0.1, **options)
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert message.startswith(f"backbone {name!r} does not take the options ")
    for option in options:
        assert f"~model.backbone_kwargs.{option}" in message, option  # how to delete each one
    assert "(or every backbone option with ~model.backbone_kwargs)" in message
    assert "~model.backbone_kwargs.drop_path_rate" not in message  # options that fit are not blamed
    if name in ("pvt_tiny", "test_pvt"):
        assert "patch_size (did you mean patch_sizes?)" in message
    if name == "test_swin":
        assert "depth (did you mean depths?)" in message


@pytest.mark.parametrize(
    ("name", "size", "fix"),
    [
        ("pvt_tiny", 100, "set data.img_size=96"),
        ("test_pvt", 48, "set data.img_size=64"),  # halfway rounds up
        ("test_pvt", 16, "set data.img_size=32"),  # never below one stride
        ("test_pvt", (64, 40), "set model.backbone_kwargs.img_size=[64,32]"),
        ("test_swin", 225, "set data.img_size=224"),
        ("test_vit", (30, 32), "set data.img_size=32"),
    ],
)
def test_sizes_that_do_not_fit_name_the_nearest_valid_size(name: str, size: int | tuple, fix: str) -> None:
    with pytest.raises(ConfigError) as info:
        create_backbone(name, img_size=size)
    message = str(info.value)
    assert message.startswith(f"backbone {name!r}: img_size=") and fix in message and "\n" not in message


def test_pvt_stride_follows_its_patch_sizes() -> None:
    bb = create_backbone("test_pvt", patch_sizes=(2, 2, 2, 2), img_size=48)  # total stride 16
    assert bb.pyramid_strides == [2, 4, 8, 16]
    with pytest.raises(ConfigError, match=r"total patch stride 16; set data\.img_size=48"):
        create_backbone("test_pvt", patch_sizes=(2, 2, 2, 2), img_size=40)


def test_options_are_checked_against_the_constructor_signature() -> None:
    from vitssl.backbones.pvt import PVTBackbone
    from vitssl.backbones.pvt_v2 import PVTv2Backbone
    from vitssl.backbones.swin import SwinBackbone

    assert {"patch_sizes", "sr_ratios", "img_size", "drop_path_rate"} <= PVTBackbone.accepted_kwargs()
    assert {
        "pos_embed",
        "freeze_patch_embed",
        "weight_init",
        "patch_size",
    } <= VisionTransformerBackbone.accepted_kwargs()
    assert "img_size" in PVTv2Backbone.accepted_kwargs()  # the wrapper's own option
    assert "window_size" in SwinBackbone.accepted_kwargs() and "num_classes" not in SwinBackbone.accepted_kwargs()


def test_registering_a_variant_twice_is_harmless() -> None:
    """A module that runs twice (reloaded, imported under two names) re-registers the same specs without error."""
    first = BACKBONES.get("test_vit")
    again = register_variant(
        "test_vit",
        VisionTransformerBackbone,
        "vit_tiny_patch16_224",
        **dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
    )
    assert again is first and BACKBONES.get("test_vit") is first
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timm warns when a name is registered over
        assert pvt_module._register_with_timm(pvt_module.pvt_tiny) is pvt_module.pvt_tiny
    assert timm.models.model_entrypoint("pvt_tiny") is pvt_module.pvt_tiny


# --- the contract, per test variant --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TEST_NAMES)
def test_output_shapes_follow_the_contract(name: str) -> None:
    bb = create_backbone(name).eval()
    x = _images(32)
    with torch.no_grad():
        pooled = bb(x)
        tokens = bb.forward_tokens(x)
        pyramid = bb.forward_pyramid(x)
        inter = bb.forward_intermediate(x, 2)
    c, p = bb.num_features, bb.num_prefix_tokens
    last_stride = bb.pyramid_strides[-1]
    assert pooled.shape == (2, c)
    assert tokens.shape == (2, p + (32 // last_stride) ** 2, c)
    assert len(pyramid) == len(bb.pyramid_strides) == len(bb.pyramid_channels)
    for fmap, stride, chans in zip(pyramid, bb.pyramid_strides, bb.pyramid_channels):
        assert fmap.shape == (2, chans, 32 // stride, 32 // stride)
    assert pyramid[-1].shape[1] == c
    assert [t.shape for t in inter] == [tokens.shape] * 2
    # the pieces agree: last block's normed tokens are forward_tokens; the last map and the pooled vector come from them
    torch.testing.assert_close(inter[-1], tokens)
    torch.testing.assert_close(pyramid[-1].flatten(2).transpose(1, 2), tokens[:, p:])
    expected_pooled = tokens[:, 0] if POOLING[name] == "cls" else tokens.mean(dim=1)
    torch.testing.assert_close(pooled, expected_pooled)
    with pytest.raises(ValueError, match="forward_intermediate"):
        bb.forward_intermediate(x, 0)
    with pytest.raises(ValueError, match="n=99"):
        bb.forward_intermediate(x, 99)


@pytest.mark.parametrize("name", TEST_NAMES)
def test_every_trainable_parameter_gets_a_gradient(name: str) -> None:
    # 64 px so that every stage has more than one token (one token gives exactly zero q/k gradients)
    bb = create_backbone(name, img_size=64, drop_path_rate=0.0).train()
    out = bb(_images(64))  # (B, C)
    (out * torch.randn_like(out)).sum().backward()  # random weights: a plain sum cancels through LayerNorm
    missing = [n for n, p in bb.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing


@pytest.mark.parametrize("name", TEST_NAMES)
def test_drop_path_rate_and_in_chans_are_accepted(name: str) -> None:
    bb = create_backbone(name, drop_path_rate=0.2, in_chans=5)
    rates = [m.drop_prob for m in bb.modules() if isinstance(m, timm.layers.DropPath)]
    assert rates and max(rates) == pytest.approx(0.2)
    assert bb.eval()(_images(32, chans=5)).shape == (2, bb.num_features)
    with pytest.raises(ValueError, match="in_chans"):
        bb(_images(32, chans=3))


def test_no_weight_decay_names_tokens_and_position_tables() -> None:
    assert create_backbone("test_vit").no_weight_decay() == {"model.cls_token", "model.pos_embed"}
    pvt_names = create_backbone("test_pvt").no_weight_decay()
    assert pvt_names == {"model.cls_token"} | {f"model.stages.{i}.pos_embed" for i in range(4)}
    swin = create_backbone("test_swin")
    tables = {n for n, _ in swin.named_parameters() if n.endswith("relative_position_bias_table")}
    assert tables and swin.no_weight_decay() == tables


# --- ViT: MoCo v3 options, iGPT-style inputs ------------------------------------------------------------------


def _moco_v3_sincos(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """moco-v3 vits.py build_2d_sincos_position_embedding, written out as it is there (square grids)."""
    grid_w, grid_h = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32))
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    pos = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)[None]
    return torch.cat([torch.zeros(1, 1, dim), pos], dim=1)


def test_sincos_pos_embed_is_moco_v3s_and_fixed() -> None:
    bb = create_backbone("test_vit", pos_embed="sincos")
    pos = bb.model.pos_embed
    assert not pos.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.meshgrid without indexing=, as moco-v3 calls it
        reference = _moco_v3_sincos(8, 8, 32)
    torch.testing.assert_close(pos.detach(), reference)
    assert not pos[0, 0].any()  # class token slot
    # non-square grids: first half of the channels follows the row, second half the column
    emb = sincos_pos_embed_2d((2, 3), 8, num_prefix_tokens=0)[0].reshape(2, 3, 8)
    torch.testing.assert_close(emb[0, :, :4], emb[0, :1, :4].expand(3, 4))
    torch.testing.assert_close(emb[:, 0, 4:], emb[:1, 0, 4:].expand(2, 4))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d((2, 2), 6)


def test_frozen_patch_projection_and_sincos_survive_an_optimizer_step() -> None:
    bb = create_backbone("test_vit", pos_embed="sincos", freeze_patch_embed=True, weight_init="moco").train()
    proj = bb.model.patch_embed.proj
    val = math.sqrt(6.0 / (3 * 4 * 4 + 32))  # moco-v3's uniform patch-projection init
    assert proj.weight.abs().max() <= val and not proj.bias.any()
    frozen = {"model.patch_embed.proj.weight", "model.patch_embed.proj.bias", "model.pos_embed"}
    assert {n for n, p in bb.named_parameters() if not p.requires_grad} == frozen
    before = {n: p.detach().clone() for n, p in bb.named_parameters()}
    opt = torch.optim.AdamW(bb.parameters(), lr=1e-2, weight_decay=0.1)
    out = bb(_images(32))
    (out * torch.randn_like(out)).sum().backward()
    assert all(p.grad is None for n, p in bb.named_parameters() if n in frozen)
    opt.step()
    for n, p in bb.named_parameters():
        assert torch.equal(p, before[n]) == (n in frozen), n


def test_vit_takes_token_maps_and_causal_attention() -> None:
    """iGPT feeds a D-channel embedding map with 1x1 patches and attends causally."""
    bb = create_backbone("test_vit", in_chans=16, patch_size=1, img_size=8, class_token=False).eval()
    x = torch.randn(2, 16, 8, 8)
    tokens = bb.forward_tokens(x, is_causal=True)  # (B, 64, C)
    assert tokens.shape == (2, 64, 32) and bb.num_prefix_tokens == 0
    x2 = x.clone()
    x2[:, :, -1, -1] += 1.0  # changes only the last token
    tokens2 = bb.forward_tokens(x2, is_causal=True)
    torch.testing.assert_close(tokens[:, :-1], tokens2[:, :-1])
    assert not torch.allclose(tokens[:, -1], tokens2[:, -1])
    torch.testing.assert_close(bb(x), bb.forward_tokens(x).mean(dim=1))  # no class token: mean of normed tokens
    assert len(bb.forward_intermediate(x, 2, is_causal=True)) == 2


# --- input sizes ------------------------------------------------------------------------------------------------


def test_vit_sizes() -> None:
    bb = create_backbone("test_vit", img_size=(32, 48)).eval()
    assert bb.forward_pyramid(_images(32, 48))[0].shape == (2, 32, 8, 12)
    with pytest.raises(ValueError, match=r"built for 32x48 inputs, got 48x32.*img_size=\(48, 32\)"):
        bb(_images(48, 32))
    dyn = create_backbone("test_vit", dynamic_img_size=True).eval()
    assert dyn.forward_pyramid(_images(48, 24))[0].shape == (2, 32, 12, 6)
    with pytest.raises(ValueError, match="multiples of 4"):
        dyn(_images(30))
    with pytest.raises(ConfigError, match=r"not a multiple of the patch size 4; set data\.img_size=32"):
        create_backbone("test_vit", img_size=30)


def test_swin_sizes() -> None:
    bb = create_backbone("test_swin", img_size=(32, 24)).eval()
    shapes = [tuple(f.shape[-2:]) for f in bb.forward_pyramid(_images(32, 24))]
    assert shapes == [(8, 6), (4, 3), (2, 2), (1, 1)]  # odd sides are padded by patch merging
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        bb(_images(32))
    dyn = create_backbone("test_swin", dynamic_img_size=True).eval()
    assert dyn.forward_tokens(_images(64, 32)).shape == (2, 2 * 1, 64)
    with pytest.raises(ConfigError, match=r"data\.img_size=32.*multiples of 4, e.g. 224, 256, 192, 64 or \(224, 160\)"):
        create_backbone("test_swin", img_size=30)


def test_real_swin_at_non_224_sizes() -> None:
    bb = create_backbone("swin_tiny_patch4_window7_224", img_size=(96, 64)).eval()
    with torch.no_grad():
        shapes = [tuple(f.shape[1:]) for f in bb.forward_pyramid(_images(96, 64, batch=1))]
    assert shapes == [(96, 24, 16), (192, 12, 8), (384, 6, 4), (768, 3, 2)]
    assert bb.pyramid_strides == [4, 8, 16, 32] and bb.num_features == 768


def test_pvt_sizes() -> None:
    bb = create_backbone("test_pvt").eval()  # position embeddings made for 32x32, resized for other inputs
    shapes = [tuple(f.shape[-2:]) for f in bb.forward_pyramid(_images(64, 32))]
    assert shapes == [(16, 8), (8, 4), (4, 2), (2, 1)]
    assert bb.forward_tokens(_images(64, 32)).shape == (2, 1 + 2, 32)
    with pytest.raises(ValueError, match="multiples of 32"):
        bb(_images(48))
    with pytest.raises(ConfigError, match="multiple of PVT's total patch stride 32"):
        create_backbone("test_pvt", img_size=48)
    with pytest.raises(ValueError, match="sr_ratio 1"):
        create_backbone("test_pvt", sr_ratios=(4, 2, 1, 2))
    v2 = create_backbone("test_pvt_v2").eval()
    assert [tuple(f.shape[-2:]) for f in v2.forward_pyramid(_images(64, 32))][-1] == (2, 1)
    with pytest.raises(ValueError, match="at least 16x16"):
        v2(_images(8))


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "pvt_tiny", "pvt_v2_b0"])
def test_real_variants_at_small_size(name: str) -> None:
    bb = create_backbone(name, img_size=64).eval()
    with torch.no_grad():
        assert bb(_images(64, batch=1)).shape == (1, bb.num_features)
        assert [f.shape[-1] for f in bb.forward_pyramid(_images(64, batch=1))] == [64 // s for s in bb.pyramid_strides]


# --- PVT v1 vs the paper ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pvt_tiny", "pvt_small", "pvt_medium", "pvt_large"])
def test_pvt_parameter_counts_match_the_paper(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=1000)  # registered with timm on import
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    assert params_m == pytest.approx(pvt_module.PAPER_PARAMS_M[name], rel=0.01)


def test_pvt_architecture_follows_the_paper() -> None:
    with torch.device("meta"):
        model = timm.create_model("pvt_small", num_classes=0)
    assert [len(s.blocks) for s in model.stages] == [3, 4, 6, 3]
    assert [s.patch_embed.proj.kernel_size[0] for s in model.stages] == [4, 2, 2, 2]
    assert [s.blocks[0].attn.num_heads for s in model.stages] == [1, 2, 5, 8]
    assert [s.blocks[0].attn.sr_ratio for s in model.stages] == [8, 4, 2, 1]
    assert [s.blocks[0].mlp.fc1.out_features // s.blocks[0].mlp.fc1.in_features for s in model.stages] == [8, 8, 4, 4]
    assert [s.pos_embed.shape[1] for s in model.stages] == [56 * 56, 28 * 28, 14 * 14, 1 + 7 * 7]
    assert model.stages[0].blocks[0].attn.q.bias is not None


def test_pvt_timm_classifier_interface() -> None:
    model = timm.create_model(
        "pvt_tiny", num_classes=7, img_size=32, embed_dims=(8, 16, 24, 32), num_heads=(1, 1, 1, 1)
    )
    x = _images(32)
    assert model(x).shape == (2, 7)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 32)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3
    assert model.pretrained_cfg["first_conv"] == "stages.0.patch_embed.proj"


# --- export and timm round trips --------------------------------------------------------------------------------

ROUND_TRIPS = [(name, {}, 32) for name in TEST_NAMES] + [
    ("test_vit", dict(pos_embed="sincos", freeze_patch_embed=True), 32),
    ("test_swin", dict(img_size=(32, 24)), (32, 24)),
]


@pytest.mark.parametrize(("name", "kwargs", "size"), ROUND_TRIPS)
def test_saved_backbone_loads_in_timm(name: str, kwargs: dict, size: int | tuple[int, int], tmp_path: Path) -> None:
    bb = create_backbone(name, **kwargs).eval()
    path = save_backbone(bb, tmp_path / "bb.safetensors")
    meta = read_backbone_metadata(path)
    assert meta == {"name": name, "kwargs": kwargs, "timm_name": bb.timm_name, "timm_kwargs": bb.timm_kwargs}
    model = timm.create_model(
        meta["timm_name"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
        num_classes=0,
        **meta["timm_kwargs"],
    ).eval()
    saved = load_file(str(path))
    assert set(saved) == set(model.state_dict())  # no missing, no unexpected keys
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    x = _images(*size) if isinstance(size, tuple) else _images(size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), bb(x))
        torch.testing.assert_close(load_backbone(path).eval()(x), bb(x))


def test_load_backbone_state_layouts(tmp_path: Path) -> None:
    src = create_backbone("test_pvt")
    dst = create_backbone("test_pvt")
    checkpoint = {f"backbone.{k}": v for k, v in src.state_dict().items()} | {"head.weight": torch.zeros(1)}
    load_backbone_state(dst, checkpoint, prefix="backbone.")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    load_backbone_state(dst, src.timm_state_dict())
    with pytest.raises(KeyError, match=r"missing stages\.0\.pos_embed"):
        load_backbone_state(dst, {k: v for k, v in src.timm_state_dict().items() if k != "stages.0.pos_embed"})
    with pytest.raises(KeyError, match=r"no weights under prefix 'momentum\.'"):
        load_backbone_state(dst, checkpoint, prefix="momentum.")
    with pytest.raises(ValueError, match=r"\*.safetensors"):
        save_backbone(src, tmp_path / "bb.pth")


def _official_pvt_layout(state: dict[str, torch.Tensor], num_classes: int = 1000) -> dict[str, torch.Tensor]:
    """Our PVT v1 timm-layout weights in the official code's layout (whai362/PVT, classification/pvt.py).

    The mapping, stage i counted from 0 here and from 1 there: ``stages.i.patch_embed.*`` -> ``patch_embed{i+1}.*``,
    ``stages.i.pos_embed`` -> ``pos_embed{i+1}`` (the last one with the class slot first, as ours),
    ``stages.i.blocks.j.*`` -> ``block{i+1}.j.*`` (same names inside a block: norm1, attn.q, attn.kv, attn.sr,
    attn.norm, attn.proj, norm2, mlp.fc1, mlp.fc2); ``cls_token`` and ``norm`` keep their names; the official
    checkpoints also hold the ImageNet classifier ``head``.
    """
    official = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "stages":
            stage, kind, rest = int(parts[1]) + 1, parts[2], parts[3:]
            key = ".".join([f"block{stage}", *rest] if kind == "blocks" else [f"{kind}{stage}", *rest])
        official[key] = value
    width = state["cls_token"].shape[-1]
    official["head.weight"] = torch.randn(num_classes, width)
    official["head.bias"] = torch.zeros(num_classes)
    return official


def test_pvt_loads_official_checkpoints_and_other_sizes(tmp_path: Path) -> None:
    """Official PVT keys (patch_embed1, pos_embed1, block1.0, head) load through every path: timm's pretrained
    loading, load_backbone_state (plain, or inside a checkpoint's "model" entry); position embeddings are
    resized for another img_size and the classifier is dropped."""
    bb = create_backbone("test_pvt").eval()
    official = _official_pvt_layout(bb.timm_state_dict())
    assert {"block1.0.attn.sr.weight", "pos_embed4", "patch_embed2.proj.weight", "head.weight"} <= set(official)
    assert not any(k.startswith("stages.") for k in official)
    x = _images(32)
    x_big = _images(64)
    with torch.no_grad():
        expected, expected_big = bb(x), bb(x_big)

    for checkpoint in (official, {"model": official, "epoch": 300}):
        loaded = create_backbone("test_pvt").eval()
        result = load_backbone_state(loaded, checkpoint)
        assert not result.missing_keys and not result.unexpected_keys
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected)
    # built for 64 px: the 32-px embeddings are resized at load exactly as the backbone resizes them per input
    big = create_backbone("test_pvt", img_size=64).eval()
    load_backbone_state(big, official)
    with torch.no_grad():
        torch.testing.assert_close(big(x_big), expected_big)

    path = tmp_path / "pvt_official.pth"
    torch.save({"model": official}, path)
    for kwargs, images, out in (
        (bb.timm_kwargs, x, expected),
        ({**bb.timm_kwargs, "img_size": 64}, x_big, expected_big),
    ):
        model = timm.create_model(
            "pvt_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=0, **kwargs
        ).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(images), out)


@pytest.mark.parametrize("name", ["test_vit", "test_swin", "test_pvt_v2"])
def test_timm_classifier_checkpoints_load_without_their_head(name: str) -> None:
    """A timm model's state dict with an ImageNet head (what timm's checkpoints hold) loads into the headless
    backbone, as timm's own pretrained loading drops the head when num_classes=0."""
    bb = create_backbone(name).eval()
    classifier = timm.create_model(bb.timm_name, num_classes=10, **bb.timm_kwargs).eval()
    state = classifier.state_dict()
    assert any(k.startswith("head.") for k in state)
    load_backbone_state(bb, state)
    x = _images(32)
    with torch.no_grad():
        features = classifier.forward_head(classifier.forward_features(x), pre_logits=True)
        torch.testing.assert_close(bb(x), features)
    with pytest.raises(KeyError, match="unexpected not_a_weight"):
        load_backbone_state(bb, {**state, "not_a_weight": torch.zeros(1)})


def test_pvt_gradient_checkpointing_gives_the_same_result() -> None:
    bb = create_backbone("test_pvt").train()
    x = _images(32)
    ref = bb(x)
    bb.set_grad_checkpointing(True)
    torch.testing.assert_close(bb(x), ref)


# --- description for the CLI ------------------------------------------------------------------------------------


def test_describe_and_table() -> None:
    d = describe_backbone("test_swin")
    assert d["family"] == "swin" and d["timm_name"] == "swin_tiny_patch4_window7_224"
    assert d["params"] == sum(p.numel() for p in create_backbone("test_swin").parameters())
    assert d["num_features"] == 64 and d["pyramid_strides"] == [4, 8, 16, 32] and d["img_size"] == [32, 32]
    assert (
        describe_backbone("test_vit", pos_embed="sincos", freeze_patch_embed=True)["trainable_params"]
        < (describe_backbone("test_vit")["params"])
    )
    table = format_backbone_table("test_*", include_test=True)
    assert table.splitlines()[0].split()[:3] == ["name", "family", "params"]
    assert all(name in table for name in TEST_NAMES) and len(table.splitlines()) == 2 + len(TEST_NAMES)


def test_table_hides_test_variants_unless_asked() -> None:
    pattern = "[pt]*_[tp]*"  # pvt_tiny, test_pvt, test_pvt_v2: cheap to describe
    rows = [line.split()[0] for line in format_backbone_table(pattern).splitlines()[2:]]  # `vitssl backbones PATTERN`
    assert rows == ["pvt_tiny"]
    rows = [line.split()[0] for line in format_backbone_table(pattern, include_test=True).splitlines()[2:]]  # --all
    assert rows == ["pvt_tiny", "test_pvt", "test_pvt_v2"]
    with pytest.raises(UnknownNameError, match=r"only test_\* variants match 'test_\*'.*--all"):
        format_backbone_table("test_*")
    with pytest.raises(UnknownNameError) as info:
        format_backbone_table("nope*")
    message = str(info.value)
    assert isinstance(info.value, UserError) and message.startswith("no backbone matches 'nope*'")
    assert "Valid names: " in message and "vit_small_patch16_224" in message and "test_vit" not in message


# --- the weight file --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_backbone_file_mode_follows_the_umask(umask: int, tmp_path: Path) -> None:
    """Written like every other run file (0666 less the umask: 0644 usually), not safetensors' 0600."""
    bb = create_backbone("test_vit")
    previous = os.umask(umask)
    try:
        path = save_backbone(bb, tmp_path / "run" / "backbone.safetensors")
        save_backbone(bb, path)  # over an existing file: replaced whole
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["backbone.safetensors"]  # no temporary left behind
    assert load_backbone(path).name == "test_vit"
