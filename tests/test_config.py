"""Recipes by name (shipped in the package), ``~key`` deletions, one-line messages for wrong values."""

from __future__ import annotations

import pytest

from vitssl.config import CONFIG_DIR, ConfigError, list_recipes, load_config, resolve_config_path
from vitssl.demo import DEFAULT_OUTPUT, demo_output_dir


def test_recipes_ship_inside_the_package():
    assert CONFIG_DIR.parent.name == "vitssl" and (CONFIG_DIR / "pretrain" / "mocov3_demo.yaml").is_file()
    assert {"pretrain/mocov3_demo", "pretrain/test_tiny", "pretrain/clip_vit_base"} <= set(list_recipes())
    # the repository paths users typed before the move still name the shipped recipes
    assert resolve_config_path("configs/pretrain/test_tiny.yaml") == resolve_config_path("pretrain/test_tiny")
    with pytest.raises(ConfigError, match=r"recipe 'pretrain/nope' not found.*pretrain/mocov3_demo"):
        resolve_config_path("pretrain/nope")


def test_tilde_deletes_a_recipe_key_before_the_settings_apply():
    vit = load_config("pretrain/mocov3_vit_small")
    assert dict(vit.model.backbone_kwargs)  # the ViT recipe's own options (sin-cos position embedding, ...)
    pvt = load_config("pretrain/mocov3_vit_small", ["~model.backbone_kwargs", "model.backbone=pvt_small"])
    assert pvt.model.backbone == "pvt_small" and dict(pvt.model.backbone_kwargs) == {}
    key = next(iter(vit.model.backbone_kwargs))
    one = load_config("pretrain/mocov3_vit_small", [f"~model.backbone_kwargs.{key}"])
    assert key not in one.model.backbone_kwargs and len(one.model.backbone_kwargs) == len(vit.model.backbone_kwargs) - 1
    with pytest.raises(ConfigError, match=r"~model.nope: the recipe sets no key"):
        load_config("pretrain/mocov3_vit_small", ["~model.nope"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=fast", r"^config key 'optim.lr': .*'fast'.*; expected a float like"),
        ("model.backbone_kwargs=null", r"clear the recipe's with ~model.backbone_kwargs"),
        ("seed", r"must look like key=value .* or ~key"),
    ],
)
def test_wrong_values_give_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config("pretrain/test_tiny", [override])
    assert "\n" not in str(info.value)


def test_demo_folder_follows_its_settings():
    assert demo_output_dir([]) == DEFAULT_OUTPUT
    assert demo_output_dir(["seed=1"]) == f"{DEFAULT_OUTPUT}-seed=1"
    assert demo_output_dir(["train.epochs=5", "seed=1"]) == demo_output_dir(["seed=1", "train.epochs=5"])
    assert demo_output_dir(["output_dir=x"]) == DEFAULT_OUTPUT  # an explicit output_dir wins (the demo keeps it)
