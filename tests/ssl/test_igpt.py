"""iGPT: palette round trip, causality, the BERT loss, every backbone family, a short run, sampling CLI."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Subset

from vitssl.backbones import BACKBONES, create_backbone, list_backbones
from vitssl.cli.igpt import register_commands
from vitssl.config import ConfigError, load_config
from vitssl.data import TransformedDataset, build_dataset
from vitssl.engine import build_objective, load_checkpoint, train
from vitssl.engine.checkpoint import LAST_NAME
from vitssl.eval.features import extract_features
from vitssl.eval.igpt_samples import completion_grid
from vitssl.eval.knn import knn_predict
from vitssl.ssl import OBJECTIVES
from vitssl.ssl import palette as pal
from vitssl.ssl.igpt import PALETTE_FILE, IGPTConfig, bert_loss, draw_mask, evaluate_bits_per_token

RECIPE = "configs/pretrain/igpt_test_tiny.yaml"
K = 16  # palette colours in these tests


def make_igpt(backbone: str = "test_vit", mode: str = "ar", grid: int = 16, palette_seed: int = 0, **kwargs):
    """An iGPT objective on a tiny backbone with a random (but fixed) palette."""
    cfg = IGPTConfig(mode=mode, palette_size=K, token_dim=16, head_dim=16)
    overrides = {"img_size": grid, **kwargs}

    def factory(**o):
        return create_backbone(backbone, **{**overrides, **o})

    torch.manual_seed(0)
    objective = OBJECTIVES.get("igpt")(cfg, factory)
    objective.set_palette(torch.rand(K, 3, generator=torch.Generator().manual_seed(palette_seed)))
    return objective


# ------------------------------------------------------------------------------------------------ palette
def test_quantize_roundtrip_error_equals_palette_error():
    shapes = build_dataset("shapes", split="train", img_size=16, num_samples=40)
    pixels = pal.sample_pixels(shapes, img_size=16, num_images=40, seed=0)  # (40*256, 3)
    palette, fit_error = pal.fit_palette(pixels, K, seed=0, iters=10)
    assert palette.shape == (K, 3) and fit_error > 0
    images = torch.from_numpy(pixels).T.reshape(1, 3, -1, 1)  # the same pixels as one (1, 3, N, 1) image
    tokens = pal.quantize(images, torch.from_numpy(palette))
    # torch's round trip and faiss's search during the fit are two implementations of the same error
    assert pal.quantization_error(images, torch.from_numpy(palette)) == pytest.approx(fit_error, rel=1e-4)
    # and every pixel went to its nearest colour (compared by distance: exact ties may pick either id)
    d = ((pixels[:, None, :] - palette[None]) ** 2).sum(-1)  # (N, K)
    assert np.allclose(d[np.arange(len(d)), tokens.flatten().numpy()], d.min(1), atol=1e-6)
    # palette colours are their own tokens; uint8 input means the same colours as [0, 1] floats
    swatch = torch.from_numpy(palette).T.reshape(1, 3, 1, K)
    assert pal.quantize(swatch, torch.from_numpy(palette)).flatten().tolist() == list(range(K))
    assert torch.equal(pal.dequantize(torch.arange(K).reshape(1, 1, K), torch.from_numpy(palette)), swatch)
    as_uint8 = (images * 255).round().to(torch.uint8)
    assert torch.equal(
        pal.quantize(as_uint8, torch.from_numpy(palette)), pal.quantize(as_uint8 / 255.0, torch.from_numpy(palette))
    )
    # stored darkest first, so token ids do not depend on the k-means initialisation
    luma = palette @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    assert np.all(np.diff(luma) >= 0)


def test_palette_file_round_trip_and_errors(tmp_path):
    palette = np.random.default_rng(0).random((K, 3), dtype=np.float32)
    path = pal.save_palette(palette, tmp_path / "p.npy")
    assert np.array_equal(pal.load_palette(path, K), palette)
    with pytest.raises(ValueError, match="palette_size"):
        pal.load_palette(path, 2 * K)
    np.save(tmp_path / "bad.npy", np.zeros((K, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(K, 3\)"):
        pal.load_palette(tmp_path / "bad.npy")
    with pytest.raises(ValueError, match="palette_images"):
        pal.fit_palette(palette, 2 * K)  # fewer pixels than colours


# ------------------------------------------------------------------------------------------- causality
def test_ar_logits_are_causal():
    objective = make_igpt(patch_size=1).eval()
    n = objective.num_tokens
    tokens = torch.randint(K, (2, n), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = objective.logits(tokens)  # (2, N, K)
        # position 0 has seen only the start token: identical for different images
        assert torch.allclose(base[0, 0], base[1, 0], atol=1e-6)
        for t in (0, 77, n - 2, n - 1):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1 + torch.arange(2)) % K
            out = objective.logits(changed)
            assert torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6), f"token {t} leaked backwards"
            if t < n - 1:  # the next position must see it (the test would pass vacuously otherwise)
                assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 1e-4


@pytest.mark.parametrize("name", [n for n in list_backbones("test_*") if BACKBONES.get(n).family != "vit"])
def test_ar_on_hierarchical_backbones_fails_clearly(name):
    with pytest.raises(ConfigError, match=r"(?s)causal.*objective\.mode=bert"):
        make_igpt(name, mode="ar", grid=32)


def test_ar_vit_needs_one_token_per_position():
    with pytest.raises(ConfigError, match="patch_size=1"):
        make_igpt("test_vit", mode="ar", grid=32, patch_size=4)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"objective\.mode"):
        OBJECTIVES.get("igpt")(IGPTConfig(mode="gpt"), lambda **o: create_backbone("test_vit", **o))
    with pytest.raises(ConfigError, match=r"objective\.probe_layer=7"):
        cfg = IGPTConfig(palette_size=K, probe_layer=7)
        OBJECTIVES.get("igpt")(cfg, lambda **o: create_backbone("test_vit", img_size=16, patch_size=1, **o))


def test_probe_features_are_the_pooled_output_of_block_probe_layer():
    objective = make_igpt(patch_size=1).eval()  # test_vit: 2 blocks, so the middle one is block 1
    assert objective.probe_layer == 1
    objective.probe_layer = 0
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    vit = objective.backbone.model
    with torch.no_grad():
        h = vit.norm_pre(vit._pos_embed(vit.patch_embed(objective.embed_tokens(objective.tokenize(images)))))
        h = vit.blocks[0](h, is_causal=True)  # (2, 1 + N, C), class token first
        expected = vit.norm(h)[:, 1:].mean(1)  # (2, C)
        assert torch.allclose(objective.eval_features(images), expected, atol=1e-5)
        objective.probe_layer = 1
        assert not torch.allclose(objective.eval_features(images), expected, atol=1e-3)


# ------------------------------------------------------------------------------------------------- BERT
def test_bert_loss_counts_masked_positions_only():
    objective = make_igpt(mode="bert", patch_size=1).eval()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(K, (3, objective.num_tokens), generator=g)
    mask = draw_mask(3, objective.num_tokens, 0.15, g)
    logits = objective.logits(tokens, mask).detach().requires_grad_(True)  # (3, N, K)
    loss = bert_loss(logits, tokens, mask)
    masked_ce = F.cross_entropy(logits[mask], tokens[mask])
    assert torch.allclose(objective.token_loss(tokens, mask)["loss"], masked_ce, atol=1e-5)
    assert not torch.allclose(loss, F.cross_entropy(logits.flatten(0, 1), tokens.flatten()), atol=1e-3)
    loss.backward()
    grad_norm = logits.grad.abs().sum(-1)  # (3, N)
    assert torch.all(grad_norm[~mask] == 0) and torch.all(grad_norm[mask] > 0)
    # the model never sees the true tokens at masked positions
    other = tokens.clone()
    other[mask] = (other[mask] + 3) % K
    assert torch.allclose(objective.logits(other, mask), logits.detach(), atol=1e-6)


def test_draw_mask_rate_and_no_empty_rows():
    mask = draw_mask(400, 64, 0.15, torch.Generator().manual_seed(0))
    assert mask.float().mean().item() == pytest.approx(0.15, abs=0.01)
    assert mask.any(1).all()
    assert draw_mask(50, 4, 0.01, torch.Generator().manual_seed(0)).any(1).all()


# every registered test backbone (their default 32×32 grid; test_vit's patch 4 goes through the pyramid head),
# plus the ViT with one token per position
_BERT_CASES = [(n, {}) for n in list_backbones("test_*")] + [("test_vit", {"patch_size": 1})]


@pytest.mark.parametrize(("name", "kwargs"), _BERT_CASES, ids=[f"{n}{'-p1' if k else ''}" for n, k in _BERT_CASES])
def test_bert_every_backbone_trains(name, kwargs):
    objective = make_igpt(name, mode="bert", grid=32, **kwargs).train()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    out = objective((images, torch.zeros(2)))
    assert torch.isfinite(out["loss"]) and out["bits_per_token"] == pytest.approx(out["loss"].item() / math.log(2))
    out["loss"].backward()
    for pname, p in objective.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{pname} got no gradient"
            assert torch.isfinite(p.grad).all(), pname
    bb = objective.backbone
    width = bb.num_features if bb.family == "vit" else bb.pyramid_channels[objective.probe_layer]
    with torch.no_grad():
        assert objective.eval().eval_features(images).shape == (2, width)


# -------------------------------------------------------------------------------- palette lifecycle
def test_setup_writes_the_palette_and_a_resumed_run_reuses_it(tmp_path):
    cfg = load_config(RECIPE, [f"output_dir={tmp_path}"])
    first = build_objective(cfg)
    with pytest.raises(RuntimeError, match="palette is not set"):
        first.tokenize(torch.rand(1, 3, 8, 8))
    first.setup(cfg)
    written = pal.load_palette(tmp_path / PALETTE_FILE, K)
    assert np.array_equal(written, first.palette.numpy())
    # without setup (no run folder) train_sample_fn fits the same palette: the fit is deterministic
    second = build_objective(cfg)
    second.train_sample_fn(cfg.data)
    assert torch.equal(second.palette, first.palette)
    # resuming: the run folder's file is read back, not refitted
    pal.save_palette(written[::-1].copy(), tmp_path / PALETTE_FILE)
    third = build_objective(cfg)
    third.setup(cfg)
    assert np.array_equal(third.palette.numpy(), written[::-1])
    # an explicit palette_path wins, and a wrong one fails naming the key
    explicit = pal.save_palette(written, tmp_path / "shared.npy")
    fourth = build_objective(load_config(RECIPE, [f"output_dir={tmp_path}", f"objective.palette_path={explicit}"]))
    fourth.setup(cfg)
    assert np.array_equal(fourth.palette.numpy(), written)
    bad = build_objective(load_config(RECIPE, [f"output_dir={tmp_path}", "objective.palette_path=/no/such.npy"]))
    with pytest.raises(ConfigError, match=r"objective\.palette_path"):
        bad.train_sample_fn(cfg.data)


# ---------------------------------------------------------------------------------------- short run
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("igpt_run")
    cfg = load_config(RECIPE, [f"output_dir={out}"])
    result = train(cfg)
    assert result.status == "finished"
    return cfg, out / LAST_NAME


def _objectives(cfg, checkpoint):
    state = load_checkpoint(checkpoint)
    torch.manual_seed(cfg.seed)
    random_init = build_objective(cfg).eval()
    trained = build_objective(cfg).eval()
    trained.load_state_dict(state["model"])  # the palette comes back with the weights
    random_init.set_palette(trained.palette)
    return random_init, trained


def test_short_run_lowers_val_bits_and_beats_random_init_knn(trained_run):
    cfg, checkpoint = trained_run
    random_init, trained = _objectives(cfg, checkpoint)
    sample_fn = trained.eval_sample_fn(cfg.data)
    splits = {}
    for role in ("train", "val"):
        d = cfg.data[role]
        splits[role] = TransformedDataset(build_dataset(d.name, split=d.split, **dict(d.kwargs)), sample_fn, seed=0)
    bank = Subset(splits["train"], range(800))
    scores = {}
    for name, model in (("random", random_init), ("trained", trained)):
        bits = evaluate_bits_per_token(model, splits["val"], batch_size=128)["bits_per_token"]
        train_f, train_l = extract_features(model.eval_features, bank, 256)
        val_f, val_l = extract_features(model.eval_features, splits["val"], 256)
        votes = knn_predict(train_f, train_l, val_f, 20, 0.07, 10)
        scores[name] = (bits, (torch.as_tensor(votes).argmax(1) == val_l).float().mean().item() * 100)
    (bits_random, knn_random), (bits_trained, knn_trained) = scores["random"], scores["trained"]
    assert bits_random > math.log2(K) - 0.5  # an untrained model is near uniform over the palette
    assert bits_trained < bits_random - 1.0, scores
    assert knn_trained > knn_random + 8.0, scores


def test_sample_and_evaluate_commands(trained_run, tmp_path, capsys):
    _, checkpoint = trained_run
    parser = argparse.ArgumentParser()
    groups = {"igpt": parser.add_subparsers(dest="cmd").add_parser("igpt").add_subparsers(dest="sub")}
    register_commands(None, groups)
    out = tmp_path / "grid.png"
    args = parser.parse_args(["igpt", "sample", str(checkpoint), "--n", "3", "--completions", "2", "--out", str(out)])
    assert args.func(args) == 0
    grid = Image.open(out)
    cell = 8 * 4 + 2  # 8×8 tokens at scale 4, plus the gap
    assert grid.size == (4 * cell + 2, 3 * cell + 2)  # columns: original, top half, 2 completions

    args = parser.parse_args(["igpt", "evaluate", str(checkpoint), "--max-images", "64", "--device", "cpu"])
    capsys.readouterr()
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 64 and report["tokens"] == 64 * 64
    assert report["bits_per_token"] == pytest.approx(report["nats_per_token"] / math.log(2))


def test_completion_keeps_the_top_half(trained_run):
    cfg, checkpoint = trained_run
    _, trained = _objectives(cfg, checkpoint)
    tokens = torch.randint(K, (2, trained.num_tokens), generator=torch.Generator().manual_seed(4))
    half = trained.num_tokens // 2
    done = trained.complete(tokens, half, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(done[:, :half], tokens[:, :half])
    assert done.min() >= 0 and done.max() < K
    again = trained.complete(tokens, half, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(done, again)  # seeded sampling is reproducible
    grid = completion_grid(trained, trained.detokenize(tokens), num_completions=1, scale=1)
    assert grid.size == (3 * (8 + 2) + 2, 2 * (8 + 2) + 2)
    with pytest.raises(ValueError, match="mode=ar"):
        make_igpt(mode="bert", patch_size=1).complete(tokens, half)
