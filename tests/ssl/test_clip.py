"""CLIP objective, tokenizer and zero-shot / retrieval evaluation (``vitssl.ssl.clip``, ``vitssl.eval.zeroshot``)."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitssl.backbones import list_backbones
from vitssl.cli import main
from vitssl.config import ConfigError, build_config, load_config, to_container
from vitssl.data import PALETTE, SHAPE_CLASSES, ShapesCaptions, build_dataset
from vitssl.engine import build_objective, train
from vitssl.eval import zeroshot as zs
from vitssl.eval.features import CorruptSampleError
from vitssl.ssl.clip import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CaptionSample,
    Clip,
    ClipTokenizer,
    LegacyCheckpointError,
    OpenClipViT,
)

TINY_TEXT = {"embed_dim": 32, "text_width": 32, "text_depth": 1, "text_heads": 2}


def _cfg(backbone: str = "test_vit", **objective: object):
    return build_config(
        {
            "model": {"backbone": backbone},
            "objective": {"name": "clip", **TINY_TEXT, **objective},
            "data": {"img_size": 32, "mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)},
        }
    )


@pytest.fixture(scope="module")
def tiny() -> Clip:
    torch.manual_seed(0)
    return build_objective(_cfg()).eval()


def _batch(model: Clip, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    ds = ShapesCaptions(split="val", num_samples=n)
    sample_fn = model.train_sample_fn(_cfg().data)
    images, tokens = zip(*(sample_fn(*ds[i]) for i in range(n)))
    return torch.stack(images), torch.stack(tokens)


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trip_and_layout() -> None:
    tok = ClipTokenizer()
    caption = "A large  White circle in the center"
    ids = tok(caption)
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    row = ids[0]
    eot = int(row.argmax())
    assert row[0] == tok.sot_token_id and row[eot] == tok.eot_token_id == tok.vocab_size - 1
    assert (row[eot + 1 :] == 0).all()
    # the tokenizer lower-cases and cleans whitespace, and decoding gives that text back
    assert tok.decode(row) == "a large white circle in the center"
    for text in ShapesCaptions(split="train", num_samples=20).targets:
        assert tok.decode(tok(text)[0]) == text
    # truncation keeps the end-of-text token in the last column, where argmax pooling finds it
    long = ClipTokenizer(context_length=8)(" ".join(["star"] * 50))[0]
    assert long.shape == (8,) and long[-1] == tok.eot_token_id and int(long.argmax()) == 7
    # the vocabulary stays out of pickles sent to data-loading workers
    assert len(pickle.dumps(tok)) < 500 and pickle.loads(pickle.dumps(tok))("a")[0].tolist() == tok("a")[0].tolist()


# ------------------------------------------------------------------------------------------------ objective


def test_loss_through_objective_matches_open_clip(tiny: Clip) -> None:
    from open_clip.loss import ClipLoss

    images, tokens = _batch(tiny)
    with torch.no_grad():
        ours = tiny((images, tokens))["loss"]
        image = tiny.encode_image(images, normalize=True)
        text = tiny.encode_text(tokens, normalize=True)
        ref = ClipLoss()(image, text, tiny.logit_scale.exp())
    assert abs(float(ours) - float(ref)) < 1e-6


def test_logit_scale_init_and_clamp() -> None:
    model = build_objective(_cfg())
    assert math.isclose(float(model.logit_scale.detach()), math.log(1 / 0.07), rel_tol=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(5.0)  # exp(5) = 148 > 100
    model.on_step_end(1, 10)
    assert math.isclose(float(model.logit_scale.detach()), math.log(100), rel_tol=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(-0.5)
    model.on_step_end(2, 10)
    assert float(model.logit_scale.detach()) == 0.0
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    model.on_step_end(3, 10)
    assert float(model.logit_scale.detach()) == 3.0
    # the scale is learned, and without weight decay
    no_decay = next(g for g in model.param_groups(0.2) if g["weight_decay"] == 0.0)
    assert any(p is model.logit_scale for p in no_decay["params"])
    assert any(p is model.text.positional_embedding for p in no_decay["params"])


@pytest.mark.parametrize("backbone", list_backbones("test_*"))
def test_every_backbone_family_trains(backbone: str) -> None:
    torch.manual_seed(0)
    model = build_objective(_cfg(backbone)).train()
    images, tokens = _batch(model, n=4)
    out = model((images, tokens))
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    out["loss"].backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{backbone}: {name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{backbone}: {name} has a non-finite gradient"
    assert model.encode_image(images).shape == (4, TINY_TEXT["embed_dim"])
    assert model.encode_text(tokens).shape == (4, TINY_TEXT["embed_dim"])


def test_vision_tower_choice_and_its_errors() -> None:
    vit = build_objective(_cfg())
    assert vit.vision_tower == "open_clip" and isinstance(vit.backbone, OpenClipViT)
    # open_clip's ViT-B-16 layout: no patch bias, ln_pre, the projection inside the tower
    keys = set(vit.state_dict())
    assert {"backbone.model.conv1.weight", "backbone.model.ln_pre.weight", "backbone.model.proj"} <= keys
    assert "backbone.model.conv1.bias" not in keys and "image_proj.weight" not in keys
    assert vit.backbone.forward_tokens(torch.zeros(2, 3, 32, 32)).shape == (2, 1 + 64, 32)
    assert [t.shape for t in vit.backbone.forward_intermediate(torch.zeros(1, 3, 32, 32), 2)] == [(1, 65, 32)] * 2
    assert build_objective(_cfg("test_pvt")).vision_tower == "timm"
    assert build_objective(_cfg(vision_tower="timm")).backbone.name == "test_vit"
    with pytest.raises(ConfigError, match=r"needs a vit_\* backbone .*objective\.vision_tower=timm"):
        build_objective(_cfg("test_pvt", vision_tower="open_clip"))
    with pytest.raises(ConfigError, match="choose one of auto, open_clip, timm"):
        build_objective(_cfg(vision_tower="openclip"))
    cfg = _cfg()
    cfg.model.backbone_kwargs = {"class_token": False, "drop_path_rate": 0.1}
    with pytest.raises(ConfigError, match=r"class_token, drop_path_rate=0\.1: .*set objective\.vision_tower=timm"):
        build_objective(cfg)


_LEGACY_BLOCK_NAMES = {
    "attn.in_proj_weight": "qkv.weight",
    "attn.in_proj_bias": "qkv.bias",
    "attn.out_proj.weight": "proj.weight",
    "attn.out_proj.bias": "proj.bias",
    "mlp.c_fc.weight": "fc.weight",
    "mlp.c_fc.bias": "fc.bias",
    "mlp.c_proj.weight": "fc_out.weight",
    "mlp.c_proj.bias": "fc_out.bias",
}


def _legacy_state(model: Clip) -> dict[str, torch.Tensor]:
    """The state dict vitssl wrote before its text tower was open_clip's (own block names, a Linear projection)."""
    out = {}
    for key, value in model.state_dict().items():
        if key == "text.positional_embedding":
            out["text.pos_embed"] = value
        elif key == "text.text_projection":
            out["text.proj.weight"] = value.t()
        elif key.startswith("text.transformer.resblocks."):
            index, rest = key[len("text.transformer.resblocks.") :].split(".", 1)
            out[f"text.blocks.{index}.{_LEGACY_BLOCK_NAMES.get(rest, rest)}"] = value
        else:
            out[key] = value
    return out


def _legacy_text_forward(sd: dict[str, torch.Tensor], tokens: torch.Tensor, heads: int) -> torch.Tensor:
    """The old text tower's computation on its own weights: qkv, causal attention, GELU MLP, end-of-text token."""
    x = sd["text.token_embedding.weight"][tokens] + sd["text.pos_embed"][: tokens.shape[1]]  # (B, L, C)
    b, n, c = x.shape
    i = 0
    while f"text.blocks.{i}.qkv.weight" in sd:
        w = {k.rsplit(f"text.blocks.{i}.", 1)[1]: v for k, v in sd.items() if k.startswith(f"text.blocks.{i}.")}
        h = F.layer_norm(x, (c,), w["ln_1.weight"], w["ln_1.bias"])
        q, k, v = F.linear(h, w["qkv.weight"], w["qkv.bias"]).view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, c)
        x = x + F.linear(attn, w["proj.weight"], w["proj.bias"])
        h = F.layer_norm(x, (c,), w["ln_2.weight"], w["ln_2.bias"])
        x = x + F.linear(F.gelu(F.linear(h, w["fc.weight"], w["fc.bias"])), w["fc_out.weight"], w["fc_out.bias"])
        i += 1
    x = F.layer_norm(x, (c,), sd["text.ln_final.weight"], sd["text.ln_final.bias"])
    return F.linear(x[torch.arange(b), tokens.argmax(dim=-1)], sd["text.proj.weight"])  # (B, D)


def test_old_checkpoints_load_or_fail_in_one_line(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    legacy = _legacy_state(build_objective(_cfg(vision_tower="timm")))  # the old image tower was timm's ViT
    tokens = ClipTokenizer()(["a small red star in the top left", "a ring"])
    converted = build_objective(_cfg(vision_tower="timm")).eval()
    converted.load_state_dict(legacy)
    with torch.no_grad():
        torch.testing.assert_close(converted.encode_text(tokens), _legacy_text_forward(legacy, tokens, 2))
    # open_clip's ViT cannot hold the old timm ViT: resuming such a run fails with the conversion to run
    with pytest.raises(LegacyCheckpointError, match=r"convert it with `vitssl export open_clip CHECKPOINT") as caught:
        build_objective(_cfg()).load_state_dict(legacy)
    assert "\n" not in str(caught.value)
    # an old checkpoint file (its config predates vision_tower): evaluation and export rebuild its timm tower
    old_cfg = to_container(_cfg())
    del old_cfg["objective"]["vision_tower"], old_cfg["objective"]["init_from"]
    torch.save({"model": legacy, "optimizer": {}, "step": 5, "epoch": 0, "config": old_cfg}, tmp_path / "old.pth")
    model, _, step = zs.load_clip_checkpoint(tmp_path / "old.pth")
    assert model.vision_tower == "timm" and step == 5
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), converted.encode_text(tokens))
    assert main(["export", "open_clip", str(tmp_path / "old.pth"), "--out", str(tmp_path / "oc")]) == 0
    assert "open_clip timm tower" in capsys.readouterr().out
    config = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["timm_model_name"] == "vitssl_test_vit"


def test_text_tower_pools_end_of_text_and_trims_exactly(tiny: Clip) -> None:
    tokens = tiny.tokenize(["a red star", "a large white circle in the center", "an orange heart at the bottom"])
    noisy = tokens.clone()  # whatever follows the end-of-text token: causal attention must ignore it
    noisy[:, 12:] = torch.randint(1, 1000, noisy[:, 12:].shape)
    with torch.no_grad():
        trimmed = tiny.text(tokens)
        try:
            tiny.text.trim_padding = False
            untrimmed, changed = tiny.text(tokens), tiny.text(noisy)
        finally:
            tiny.text.trim_padding = True
    torch.testing.assert_close(trimmed, untrimmed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(changed, untrimmed, atol=1e-5, rtol=1e-5)


def test_sample_function_and_caption_errors(tiny: Clip) -> None:
    sample_fn = tiny.train_sample_fn(_cfg().data)
    assert isinstance(sample_fn, CaptionSample)
    image, caption = ShapesCaptions(split="train", num_samples=1)[0]
    x, ids = pickle.loads(pickle.dumps(sample_fn))(image, caption)
    assert x.shape == (3, 32, 32) and ids.shape == (77,) and tiny.tokenizer.decode(ids) == caption
    with pytest.raises(TypeError, match="image_text_csv, webdataset or shapes_captions"):
        sample_fn(image, 3)  # a class-labelled dataset given to clip
    with pytest.raises(ValueError, match="empty caption"):
        sample_fn(image, "  ")
    with pytest.raises(ValueError, match=r"text_width=30 must be divisible by objective\.text_heads=4"):
        build_objective(_cfg(text_width=30, text_heads=4))


# ----------------------------------------------------------------------------------- evaluation building blocks


def test_template_and_classname_files(tmp_path) -> None:
    templates = zs.load_templates("zeroshot/shapes_templates.txt")  # shipped, found under configs/
    assert len(templates) == 16 and all(t.count("{}") == 1 for t in templates)
    assert zs.load_classnames("zeroshot/shapes_classnames.txt") == list(SHAPE_CLASSES)
    bad = tmp_path / "t.txt"
    bad.write_text("# comment\na photo of a {}\n\na photo\n")
    with pytest.raises(ConfigError, match=r"t\.txt line 4: template 'a photo'"):
        zs.load_templates(bad)
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        zs.load_classnames(tmp_path / "nope.txt")


def test_zeroshot_classifier_is_renormalised_mean_of_normalised_prompts(tiny: Clip) -> None:
    classes, templates = ["star", "ring"], ["a red {}", "a {} at the top", "a small blue {}"]
    weights = zs.zeroshot_classifier(tiny, classes, templates, batch_size=4)
    assert weights.shape == (2, TINY_TEXT["embed_dim"])
    for k, name in enumerate(classes):
        with torch.no_grad():
            emb = F.normalize(tiny.encode_text(tiny.tokenize([t.replace("{}", name) for t in templates])), dim=-1)
        torch.testing.assert_close(weights[k], F.normalize(emb.mean(0), dim=0), atol=1e-6, rtol=1e-5)


def test_topk_accuracy_and_retrieval_recall() -> None:
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1]])
    acc = zs.topk_accuracy(logits, torch.tensor([0, 1, 1, 2]))
    assert acc["top1"] == 50.0 and acc["top5"] == 100.0 and acc["per_class_top1"] == [100.0, 50.0, 0.0]
    # 3 images, 5 captions: image 0 has captions 0 and 3, image 2 has captions 2 and 4
    img = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]), dim=1)
    txt = F.normalize(torch.tensor([[1.0, 0.1, 0], [0.1, 0.2, 1.0], [0, 0, 1.0], [0.9, 0, 0.2], [0, 0.3, 0.9]]), dim=1)
    t2i = torch.tensor([0, 1, 2, 0, 2])
    r = zs.retrieval_recall(img, txt, t2i, ks=(1, 2))
    # text→image: caption 1 (image 1) ranks image 2 first, image 1 second; the rest hit at rank 1
    assert r["text_to_image"] == {"R@1": 80.0, "R@2": 100.0}
    # image→text: image 0 → caption 0; image 1 → best caption 4 (0.3), its caption 1 second; image 2 → caption 2
    assert r["image_to_text"] == {"R@1": pytest.approx(200 / 3), "R@2": 100.0}
    exact = zs.retrieval_recall(img, img, torch.arange(3), chunk_size=2)
    assert all(v == 100.0 for d in exact.values() for v in d.values())


def test_unreadable_samples_fail_by_name_or_are_skipped(tmp_path, tiny: Clip) -> None:
    rows = ["filepath,title"]
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (40, 40), PALETTE[colour]).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,a {colour} square")
    rows += ["0.png,a red square again", "missing.png,a ghost", "1.png,"]  # second caption, missing file, empty
    (tmp_path / "val.csv").write_text("\n".join(rows) + "\n")
    dataset = build_dataset("image_text_csv", root=tmp_path, split="val")
    sample_fn = tiny.eval_sample_fn(_cfg().data)
    with pytest.raises(CorruptSampleError, match=r"missing.png.*--skip-corrupt") as caught:
        zs.encode_images(tiny, dataset, sample_fn, batch_size=2)
    assert "data.skip_corrupt" not in str(caught.value)  # the training fix does not apply to an evaluation
    result = zs.retrieval_evaluate(tiny, dataset, sample_fn, batch_size=2, skip_corrupt=True)
    # 0.png listed twice is one image with two captions
    assert (result["num_images"], result["num_texts"], result["skipped_corrupt"]) == (3, 4, 2)


# ------------------------------------------------------------------------------------- learning, end to end


class _ColourLabelled(ShapesCaptions):
    """shapes_captions labelled by colour: the 8 palette colours are the classes."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.classes = list(PALETTE)
        self.labels = [self.classes.index(self.params(i).colour) for i in range(len(self))]


def test_short_cpu_run_learns_zero_shot_and_retrieval() -> None:
    """~150 steps of batch 64 on captioned shapes (a few seconds): well above chance on held-out images.

    Zero-shot classifies colour (8 classes, 12.5% chance): a tiny ViT learns it in a few seconds, while the
    shape itself needs the longer demo run (`configs/pretrain/clip_demo.yaml`).
    """
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_objective(cfg)
    train_set = ShapesCaptions(split="train", num_samples=1024)
    sample_fn = model.train_sample_fn(cfg.data)
    images, tokens = (torch.stack(t) for t in zip(*(sample_fn(*train_set[i]) for i in range(len(train_set)))))
    params = model.param_groups(0.1)
    opt = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.98), eps=1e-6)
    steps, g = 150, torch.Generator().manual_seed(0)
    for step in range(steps):
        for group in opt.param_groups:  # 15 warm-up steps, then cosine
            group["lr"] = 3e-3 * min((step + 1) / 15, 0.5 * (1 + math.cos(math.pi * step / steps)))
        idx = torch.randint(0, len(images), (64,), generator=g)
        loss = model((images[idx], tokens[idx]))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.on_step_end(step + 1, steps)
    model.eval()

    held_out = _ColourLabelled(split="val", num_samples=200)
    eval_fn = model.eval_sample_fn(cfg.data)
    # prompts read like the captions ("an orange star"): the class name carries its article
    names = [("an " if c[0] in "aeiou" else "a ") + c for c in held_out.classes]
    templates = ["{} " + shape for shape in SHAPE_CLASSES]
    acc = zs.zeroshot_evaluate(model, held_out, names, templates, eval_fn, batch_size=100)
    assert acc["num_samples"] == 200 and acc["top1"] > 50.0  # chance 12.5

    ret = zs.retrieval_evaluate(model, held_out, eval_fn, batch_size=100)
    assert ret["num_images"] == ret["num_texts"] == 200
    assert ret["image_to_text"]["R@1"] > 2.5 and ret["text_to_image"]["R@1"] > 2.5  # chance 0.5
    assert ret["image_to_text"]["R@10"] > 15.0  # chance 5


def test_engine_checkpoint_through_eval_commands(tmp_path, capsys) -> None:
    # logit_scale starts at ln 200, above the cap: the engine's on_step_end hook must bring it to ln 100
    cfg = build_config(
        {
            "output_dir": str(tmp_path / "run"),
            "device": "cpu",
            "model": {"backbone": "test_vit"},
            "objective": {"name": "clip", **TINY_TEXT, "init_temperature": 0.005},
            "data": {"train": {"name": "shapes_captions", "kwargs": {"num_samples": 32}}, "img_size": 32},
            "train": {"epochs": 1, "batch_size": 16},
            "optim": {"lr": 1e-3, "lr_scaling": "none"},
        }
    )
    cfg.data.num_workers = 0
    assert train(cfg).status == "finished"
    ckpt = tmp_path / "run" / "checkpoint_last.pth"
    logit_scale = float(torch.load(ckpt, weights_only=True)["model"]["logit_scale"])
    assert math.log(100) - 0.01 < logit_scale <= math.log(100) + 1e-6

    assert main(
        ["eval", "zeroshot", str(ckpt), "--data", "shapes_captions:num_samples=24", "--device", "cpu",
         "--classnames", "zeroshot/shapes_classnames.txt", "--templates", "zeroshot/shapes_templates.txt"]
    ) == 0  # fmt: skip
    assert "zero-shot shapes_captions (24 images, 8 classes, 16 templates)" in capsys.readouterr().out
    result = json.loads((tmp_path / "run" / "zeroshot-shapes_captions-val.json").read_text())
    assert result["step"] == 2 and result["num_samples"] == 24 and result["num_templates"] == 16
    assert 0.0 <= result["top1"] <= result["top5"] <= 100.0 and result["classnames"] == list(SHAPE_CLASSES)

    out = tmp_path / "r.json"
    assert main(["eval", "retrieval", str(ckpt), "--data", "shapes_captions:num_samples=24,split=test",
                 "--device", "cpu", "--out", str(out)]) == 0  # fmt: skip
    assert "text to image: R@1" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["num_images"] == 24 and set(result["text_to_image"]) == {"R@1", "R@5", "R@10"}
    # the command line names the option of a data spec it cannot use, in one line
    assert main(["eval", "retrieval", str(ckpt), "--data", "shapes_captions:num_sample=3", "--device", "cpu"]) == 2
    assert "--data 'shapes_captions:num_sample=3'" in capsys.readouterr().err

    # a checkpoint of another objective is refused by name
    other = build_config({"model": {"backbone": "test_vit"}, "objective": {"name": "supervised", "num_classes": 8}})
    torch.save({"model": {}, "optimizer": {}, "step": 0, "epoch": 0, "config": to_container(other)}, tmp_path / "s.pth")
    with pytest.raises(ConfigError, match=r"objective 'supervised'.*need a 'clip' checkpoint"):
        zs.run_zeroshot(tmp_path / "s.pth", "shapes_captions:num_samples=4", device="cpu")


def test_engine_starts_from_an_open_clip_folder_and_resumes_exactly(tmp_path) -> None:
    from vitssl.ssl.open_clip_io import export_open_clip

    torch.manual_seed(3)
    source = build_objective(_cfg())
    with torch.no_grad():
        source.logit_scale.fill_(math.log(20.0))  # the default init is ln(1/0.07): 14.3
    export_open_clip(source, tmp_path / "oc", _cfg().data)

    def run(out: str, **train_options: object) -> object:
        cfg = build_config(
            {
                "output_dir": str(tmp_path / out),
                "device": "cpu",
                "model": {"backbone": "test_vit"},
                "objective": {"name": "clip", **TINY_TEXT, "init_from": str(tmp_path / "oc")},
                "data": {"train": {"name": "shapes_captions", "kwargs": {"num_samples": 32}}, "img_size": 32},
                "train": {"epochs": 1, "batch_size": 8, "log_every_steps": 1, **train_options},
                "optim": {"lr": 1e-3, "lr_scaling": "none"},
            }
        )
        cfg.data.num_workers = 0
        return train(cfg)

    def records(out: str) -> list[dict]:
        return [json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    assert run("full").status == "finished"
    assert records("full")[0]["logit_scale"] == pytest.approx(20.0)  # the first step ran the open_clip weights
    assert run("part", stop_after_steps=2).status == "stopped"
    assert run("part").status == "finished"  # resumed: its own weights replace init_from's
    assert [r["loss"] for r in records("part")] == [r["loss"] for r in records("full")]
    full = torch.load(tmp_path / "full" / "checkpoint_last.pth", weights_only=True)["model"]
    part = torch.load(tmp_path / "part" / "checkpoint_last.pth", weights_only=True)["model"]
    assert full.keys() == part.keys() and all(torch.equal(full[k], part[k]) for k in full)


@pytest.mark.parametrize("recipe", ["clip_vit_base", "clip_swin_tiny", "clip_pvt_small", "clip_demo"])
def test_recipes_validate(recipe: str) -> None:
    cfg = load_config(f"pretrain/{recipe}")
    assert cfg.objective.name == "clip" and cfg.objective.context_length == 77
    assert cfg.optim.name == "adamw" and list(cfg.optim.betas) == [0.9, 0.98]
    assert list(cfg.data.mean) == list(OPENAI_CLIP_MEAN)
