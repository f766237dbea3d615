"""CLIP runs and open_clip, both ways (``vitssl.ssl.open_clip_io``, ``vitssl export open_clip``): exports that
open_clip loads with the same embeddings, runs that start from open_clip checkpoints, open_clip checkpoints in
``vitssl eval zeroshot|retrieval``. Weights are random or written here; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import timm
import torch
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from safetensors.torch import save_file

from vitssl.backbones import create_backbone, list_backbones
from vitssl.cli import main
from vitssl.config import ConfigError, build_config, to_container
from vitssl.data import ShapesCaptions
from vitssl.engine import build_objective
from vitssl.errors import MissingFileError
from vitssl.eval import zeroshot as zs
from vitssl.ssl._timm_names import timm_model_name
from vitssl.ssl.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Clip
from vitssl.ssl.open_clip_io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    export_open_clip,
    load_open_clip_weights,
    to_open_clip_state_dict,
)

TINY_TEXT = {"embed_dim": 32, "text_width": 32, "text_depth": 1, "text_heads": 2}
CAPTIONS = ["a small red star in the top left", "a large white circle in the center", "an orange heart", "x"]


def _cfg(backbone: str, **objective: object):
    return build_config(
        {
            "model": {"backbone": backbone},
            "objective": {"name": "clip", **TINY_TEXT, **objective},
            "data": {"img_size": 32, "mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)},
        }
    )


def _model(backbone: str, seed: int = 0, **objective: object) -> Clip:
    torch.manual_seed(seed)
    model = build_objective(_cfg(backbone, **objective)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.5)  # not the initial value: the export must carry the learned one
    return model


def _save_run(model: Clip, run: Path, step: int = 7) -> Path:
    """An engine checkpoint of ``model`` as a run folder's ``checkpoint_last.pth``."""
    run.mkdir(parents=True, exist_ok=True)
    cfg = _cfg(model.backbone.name, vision_tower=model.cfg.vision_tower)
    state = {"model": model.state_dict(), "optimizer": {}, "step": step, "epoch": 0, "config": to_container(cfg)}
    torch.save(state, run / "checkpoint_last.pth")
    return run / "checkpoint_last.pth"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Clip, Path, Path]]:
    """Per tower: the model, its run checkpoint and its export folder (written by the command line)."""
    root = tmp_path_factory.mktemp("open_clip")
    out = {}
    for backbone in ("test_vit", "test_pvt"):
        model = _model(backbone)
        ckpt = _save_run(model, root / backbone / "run")
        folder = root / backbone / "export"
        assert main(["export", "open_clip", str(ckpt.parent), "--out", str(folder)]) == 0
        out[backbone] = (model, ckpt, folder)
    return out


# ------------------------------------------------------------------------------------------- export -> open_clip


@pytest.mark.parametrize("backbone", ["test_vit", "test_pvt"])
def test_export_loads_in_open_clip_with_the_same_embeddings(exported, backbone: str) -> None:
    model, _, folder = exported[backbone]
    assert {CONFIG_FILE, WEIGHTS_FILE} <= {p.name for p in folder.iterdir()}
    config = json.loads((folder / CONFIG_FILE).read_text())
    vision = config["model_cfg"]["vision_cfg"]
    assert config["vitssl"]["step"] == 7 and config["preprocess_cfg"]["size"] == 32

    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    oc.eval()
    assert type(oc) is open_clip.CLIP  # the public checkpoints' layout, flat text keys
    if backbone == "test_vit":  # open_clip's own ViT, sized as test_vit
        assert isinstance(oc.visual, VisionTransformer) and "timm_model_name" not in vision
        assert (vision["width"], vision["layers"], vision["patch_size"], vision["head_width"]) == (32, 2, 4, 16)
    else:  # the registered backbone through open_clip's timm tower
        assert isinstance(oc.visual, TimmModel) and vision["timm_model_name"] == "vitssl_test_pvt"

    torch.manual_seed(1)
    images = torch.randn(5, 3, 32, 32)
    tokens = model.tokenize(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(oc.encode_image(images), model.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(oc.encode_text(tokens), model.encode_text(tokens), atol=1e-5, rtol=0)
    assert float(oc.logit_scale.detach()) == pytest.approx(2.5)
    # open_clip's tokenizer for the folder and its evaluation transform are vitssl's
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{folder}")(CAPTIONS), tokens)
    image, caption = ShapesCaptions(split="val", num_samples=1)[0]
    assert torch.equal(
        preprocess(image.resize((48, 40))),
        model.eval_sample_fn(_cfg(backbone).data)(image.resize((48, 40)), caption)[0],
    )


def test_timm_names_build_every_registered_backbone() -> None:
    for name in list_backbones("test_*"):
        ours = create_backbone(name).model.state_dict()
        theirs = timm.create_model(timm_model_name(name), num_classes=0).state_dict()
        assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ours.items()}, name
    assert timm_model_name("test_vit") == "vitssl_test_vit"  # timm has a test_vit of its own: kept apart
    assert timm_model_name("vit_base_patch16_224") == "vit_base_patch16_224"


def test_export_refuses_what_open_clip_cannot_rebuild(tmp_path, capsys) -> None:
    # a PVT whose widths differ from the registered variant's has no timm model name open_clip could build
    torch.manual_seed(0)
    cfg = build_config(
        {
            "model": {"backbone": "test_pvt", "backbone_kwargs": {"embed_dims": [8, 16, 24, 40]}},
            "objective": {"name": "clip", **TINY_TEXT},
            "data": {"img_size": 32},
        }
    )
    model = build_objective(cfg)
    with pytest.raises(ConfigError, match=r"embed_dims=\(8, 16, 24, 40\) is not timm model 'vitssl_test_pvt'"):
        export_open_clip(model, tmp_path / "x", cfg.data)
    assert not (tmp_path / "x").exists()
    # a checkpoint of another objective, a missing run: one line, status 2
    other = build_config({"model": {"backbone": "test_vit"}, "objective": {"name": "supervised", "num_classes": 2}})
    (tmp_path / "sup").mkdir()
    torch.save({"model": {}, "optimizer": {}, "step": 0, "epoch": 0, "config": to_container(other)},
               tmp_path / "sup" / "checkpoint_3.pth")  # fmt: skip
    assert main(["export", "open_clip", str(tmp_path / "sup"), "--out", str(tmp_path / "o")]) == 2
    assert "objective 'supervised'" in capsys.readouterr().err
    assert main(["export", "open_clip", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "nope does not exist" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------- open_clip -> our objective


def test_init_from_open_clip_folder_and_state_dicts(exported, tmp_path) -> None:
    source, _, folder = exported["test_vit"]
    expected = source.state_dict()

    def started_from(path: Path) -> Clip:
        cfg = _cfg("test_vit", init_from=str(path))
        model = build_objective(cfg)
        model.setup(cfg)  # the engine calls it before resuming, so a resumed run's weights win
        return model

    def same(model: Clip) -> bool:
        return all(torch.equal(v, model.state_dict()[k]) for k, v in expected.items())

    assert same(started_from(folder))
    oc, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    torch.save({"state_dict": {f"module.{k}": v for k, v in oc.state_dict().items()}}, tmp_path / "ddp.pt")
    assert same(started_from(tmp_path / "ddp.pt"))  # a training checkpoint of open_clip_train (DDP prefixes)
    text_parts = ("token_", "positional_", "transformer.", "ln_final", "text_projection")
    custom_text = {
        ("text." + k if k.startswith(text_parts) else k): v for k, v in to_open_clip_state_dict(source).items()
    }
    save_file(custom_text, str(tmp_path / "custom_text.safetensors"))  # CustomTextCLIP's layout
    assert same(started_from(tmp_path / "custom_text.safetensors"))


def test_init_from_names_every_mismatch_in_one_line(exported, tmp_path) -> None:
    _, _, folder = exported["test_vit"]
    deeper = build_objective(_cfg("test_vit", text_depth=2))
    with pytest.raises(ConfigError, match=r"text_cfg\.layers: 1 \(here 2\)") as caught:
        load_open_clip_weights(deeper, folder)  # the folder's config says which setting differs
    assert "\n" not in str(caught.value)
    weights = folder / WEIGHTS_FILE
    with pytest.raises(ConfigError, match=r"missing transformer\.resblocks\.1\.") as caught:
        load_open_clip_weights(deeper, weights)  # a bare state dict: the keys
    assert "\n" not in str(caught.value)
    wider = build_objective(_cfg("test_vit", embed_dim=16))
    with pytest.raises(ConfigError, match=r"shapes text_projection \(32, 32\) vs \(32, 16\), visual\.proj \(32, 32\)"):
        load_open_clip_weights(wider, weights)
    pvt = build_objective(_cfg("test_pvt"))
    with pytest.raises(ConfigError, match=r"missing visual\.trunk\..*unexpected visual\.") as caught:
        load_open_clip_weights(pvt, weights)  # a ViT checkpoint for a PVT tower
    assert "\n" not in str(caught.value)
    with pytest.raises(MissingFileError, match=r"nothing\.pt"):
        load_open_clip_weights(deeper, tmp_path / "nothing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"bad\.pt is not a readable open_clip state dict"):
        load_open_clip_weights(deeper, tmp_path / "bad.pt")


# ------------------------------------------------------------------------------------------ evaluation commands


def test_eval_commands_accept_open_clip_checkpoints(exported, tmp_path, capsys) -> None:
    _, ckpt, folder = exported["test_pvt"]
    data = "shapes_captions:num_samples=24"
    zs_args = ["--data", data, "--device", "cpu", "--classnames", "zeroshot/shapes_classnames.txt"]

    def zeroshot(checkpoint: Path, *extra: str) -> dict:
        out = tmp_path / f"{checkpoint.name}.json"
        assert main(["eval", "zeroshot", str(checkpoint), *zs_args, *extra, "--out", str(out)]) == 0
        return json.loads(out.read_text())

    ours, theirs = zeroshot(ckpt), zeroshot(folder)
    assert (ours["format"], theirs["format"], theirs["step"]) == ("vitssl", "open_clip", None)
    assert theirs["per_class_top1"] == ours["per_class_top1"] and theirs["top5"] == ours["top5"]

    # an open_clip state dict with the model config of its architecture (open_clip registers it by name)
    model_cfg = json.loads((folder / CONFIG_FILE).read_text())["model_cfg"]
    (tmp_path / "tiny-pvt-clip.json").write_text(json.dumps(model_cfg))
    oc, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    torch.save(oc.state_dict(), tmp_path / "weights.pt")
    named = zeroshot(tmp_path / "weights.pt", "--model", str(tmp_path / "tiny-pvt-clip.json"))
    assert named["open_clip_model"].endswith("tiny-pvt-clip.json") and named["top1"] == ours["top1"]

    assert main(["eval", "retrieval", str(folder), "--data", data, "--device", "cpu"]) == 0
    assert "text to image: R@1" in capsys.readouterr().out
    result = json.loads((folder / "retrieval-shapes_captions-val.json").read_text())  # next to the weights
    reference = zs.run_retrieval(ckpt, data, output=tmp_path / "r.json", device="cpu")
    assert result["image_to_text"] == reference["image_to_text"] and result["num_images"] == 24

    # one line, status 2: a state dict without --model, an unknown model name
    assert main(["eval", "zeroshot", str(tmp_path / "weights.pt"), "--data", data, "--model", "ViT-Q-99"]) == 2
    assert "'ViT-Q-99' is not an open_clip model name" in capsys.readouterr().err
    save_file({"x": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    assert main(["eval", "retrieval", str(tmp_path / "w.safetensors"), "--data", data]) == 2
    err = capsys.readouterr().err
    assert "needs --model NAME" in err and len(err.strip().splitlines()) == 1
