"""Weight-decay param groups: timm's rule from the backbone's no_weight_decay(), for every family and objective,
and the recipes' choice of rule (the official MoCo v3 ViT recipes decay every parameter)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import vitssl.ssl  # noqa: F401  (registers the objectives, which types the recipes' objective blocks)
from vitssl.backbones import create_backbone, list_backbones
from vitssl.config import CONFIG_DIR, load_config
from vitssl.ssl.base import Objective, backbone_no_decay, split_decay
from vitssl.ssl.clip import Clip, ClipConfig
from vitssl.ssl.igpt import IGPT, IGPTConfig
from vitssl.ssl.moco_v3 import MocoV3, MocoV3Config
from vitssl.ssl.supervised import Supervised, SupervisedConfig

FAMILIES = list_backbones("test_*")  # vit, swin, pvt v1, pvt v2
WEIGHT_DECAY = 0.1


def _factory(name: str, **defaults: Any) -> Callable[..., nn.Module]:
    return lambda **kw: create_backbone(name, **{**defaults, **kw})


def _moco(name: str) -> Objective:
    return MocoV3(MocoV3Config(dim=8, mlp_dim=16, sync_bn=False), _factory(name))


def _clip(name: str) -> Objective:
    cfg = ClipConfig(embed_dim=8, context_length=8, text_width=8, text_depth=1, text_heads=2)
    return Clip(cfg, _factory(name))


def _igpt_bert(name: str) -> Objective:
    return IGPT(IGPTConfig(mode="bert", palette_size=4, token_dim=8, head_dim=8), _factory(name))


def _igpt_ar(name: str) -> Objective:
    # autoregressive iGPT needs a ViT with one token per position
    return IGPT(IGPTConfig(mode="ar", palette_size=4, token_dim=8), _factory(name, patch_size=1, img_size=8))


def _supervised(name: str) -> Objective:
    return Supervised(SupervisedConfig(num_classes=3), _factory(name))


OBJECTIVES = {
    "moco_v3": _moco,
    "clip": _clip,
    "igpt_bert": _igpt_bert,
    "igpt_ar": _igpt_ar,
    "supervised": _supervised,
}
CASES = [(f, o) for f in FAMILIES for o in OBJECTIVES if o != "igpt_ar" or f == "test_vit"]
# the objectives' own >= 2-D tensors that never decay (tokens, position tables, the CLIP temperature)
OWN_NO_DECAY = {"logit_scale", "text.positional_embedding", "sos_token", "mask_token", "decoder.cell_pos_embed"}


def _groups(objective: Objective) -> tuple[set[str], set[str]]:
    """Names of the parameters in the decayed group and in the group without decay."""
    names = {id(p): n for n, p in objective.named_parameters()}
    groups = objective.param_groups(WEIGHT_DECAY)
    assert sorted(g["weight_decay"] for g in groups) == [0.0, WEIGHT_DECAY]
    decay = next(g for g in groups if g["weight_decay"] == WEIGHT_DECAY)
    no_decay = next(g for g in groups if g["weight_decay"] == 0.0)
    as_names = [{names[id(p)] for p in g["params"]} for g in (decay, no_decay)]
    assert sum(len(g["params"]) for g in groups) == sum(map(len, as_names))  # no parameter twice
    return as_names[0], as_names[1]


@pytest.mark.parametrize(("family", "objective_name"), CASES)
def test_groups_follow_the_backbones_no_weight_decay(family: str, objective_name: str) -> None:
    torch.manual_seed(0)
    objective = OBJECTIVES[objective_name](family)
    decay, no_decay = _groups(objective)
    backbone = objective.backbone
    listed = {f"backbone.{n}" for n in backbone.no_weight_decay()}
    trainable = {n for n, p in objective.named_parameters() if p.requires_grad}
    params = dict(objective.named_parameters())

    assert not decay & no_decay
    # every trainable parameter is in one group; frozen ones (MoCo's momentum encoder, ViT's sin-cos table and
    # frozen patch projection) in none
    assert decay | no_decay == trainable
    assert not any(n.startswith("momentum_") for n in decay | no_decay)
    # what the backbone lists, and every 0-/1-D parameter, never decays
    assert listed & trainable <= no_decay
    assert {n for n in trainable if params[n].ndim <= 1} <= no_decay
    # every other >= 2-D weight of the backbone decays: nothing is exempted by a name pattern
    backbone_weights = {n for n in trainable if n.startswith("backbone.") and params[n].ndim >= 2}
    assert backbone_weights - listed <= decay
    # the objective's own parameters: tokens and tables exempt, weights (heads, embeddings) decay
    own = {n for n in trainable if not n.startswith("backbone.")}
    assert {n for n in own if params[n].ndim >= 2} - OWN_NO_DECAY <= decay
    assert own & OWN_NO_DECAY <= no_decay


def test_swin_position_bias_tables_and_pvt_position_embeddings_do_not_decay() -> None:
    """The case that motivated the rule: Swin's tables used to decay, matched by no name pattern."""
    torch.manual_seed(0)
    objective = _moco("test_swin")
    _, no_decay = _groups(objective)
    tables = {n for n, _ in objective.backbone.named_parameters() if n.endswith("relative_position_bias_table")}
    assert tables and {f"backbone.{t}" for t in tables} <= no_decay
    _, no_decay = _groups(_supervised("test_pvt"))
    assert {f"backbone.model.stages.{i}.pos_embed" for i in range(4)} | {"backbone.model.cls_token"} <= no_decay


def test_moco_momentum_encoder_is_in_no_group() -> None:
    objective = _moco("test_vit")
    grouped = {id(p) for g in objective.param_groups(WEIGHT_DECAY) for p in g["params"]}
    momentum = [p for n, p in objective.named_parameters() if n.startswith("momentum_")]
    assert momentum and not any(id(p) in grouped for p in momentum)


def test_backbone_no_decay_collects_every_backbone_under_its_prefix() -> None:
    holder = nn.ModuleDict({"a": create_backbone("test_vit"), "b": nn.ModuleList([create_backbone("test_pvt")])})
    names = backbone_no_decay(holder)
    assert names == {f"a.{n}" for n in holder["a"].no_weight_decay()} | {
        f"b.0.{n}" for n in holder["b"][0].no_weight_decay()
    }
    assert names <= {n for n, _ in holder.named_parameters()}


def test_split_decay_uses_only_shape_and_the_names_given() -> None:
    module = nn.ModuleDict({"lin": nn.Linear(2, 2), "pos_embed": nn.Embedding(3, 2)})
    groups = split_decay(module.named_parameters(), 0.5)
    assert [len(g["params"]) for g in groups] == [2, 1]  # the 2-D pos_embed weight decays unless named
    groups = split_decay(module.named_parameters(), 0.5, {"pos_embed.weight"})
    assert [len(g["params"]) for g in groups] == [1, 2]


# --- recipes -----------------------------------------------------------------------------------------------------

RECIPES = sorted(p.stem for p in (CONFIG_DIR / "pretrain").glob("*.yaml"))
OFFICIAL_ALL_DECAY = {"mocov3_vit_small", "mocov3_vit_base", "mocov3_vit_large", "mocov3_vit_huge"}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_state_their_weight_decay_rule(recipe: str) -> None:
    cfg = load_config(f"pretrain/{recipe}")
    assert cfg.optim.weight_decay_filter is (recipe not in OFFICIAL_ALL_DECAY)
    text = (CONFIG_DIR / "pretrain" / f"{recipe}.yaml").read_text()
    if recipe in OFFICIAL_ALL_DECAY:
        assert "weight_decay_filter: false" in text and "official" in text
    else:
        assert "timm's no-decay filter" in text  # the one-line comment saying which rule applies


def test_official_recipes_are_the_moco_v3_vit_ones() -> None:
    assert set(RECIPES) >= OFFICIAL_ALL_DECAY
