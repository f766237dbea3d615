"""The MoCo v3 input pipeline (vitssl.data.transforms / augment / decode): same view distribution as the official
torchvision pipeline (transcribed below) on real photos, on the CPU path and the batched (GPU) path run on CPU
tensors; reduced-size JPEG decoding; the sample contract; per-batch normalisation; run telemetry."""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from vitssl.config import load_config
from vitssl.data import CorruptImageError, TransformedDataset, build_dataset, collate_skip_none, eval_transform
from vitssl.data.augment import (
    NUM_PARAMS,
    P_BRIGHTNESS,
    P_CONTRAST,
    P_FLIP,
    P_GREY,
    P_HUE,
    P_ORDER,
    P_SATURATION,
    P_SIGMA,
    P_SOLARIZE,
    apply_params_uint8,
    augment_batch,
    draw_view_params,
    normalize_batch,
    prepare_view,
)
from vitssl.data.decode import LazyJpeg, decode_for_crops, draft_scale, open_lazy_rgb
from vitssl.data.transforms import MocoV3Views, resolve_augment_device
from vitssl.engine import train
from vitssl.engine.telemetry import Telemetry, forward_flops
from vitssl.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------- fixtures: real photos as JPEGs
def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)  # two 427 x 640 photos shipped inside scikit-learn


@pytest.fixture(scope="module")
def photo_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder tree of 12 ImageNet-sized (500 x 375, quality 90) JPEG crops of real photos."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(12):
        photo = _photos()[i % 2]
        y, x = int(rng.integers(0, 427 - 330)), int(rng.integers(0, 640 - 440))
        img = Image.fromarray(photo[y : y + 330, x : x + 440]).resize((500, 375), Image.BICUBIC)
        folder = root / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:02d}.jpg", quality=90)
    return root


def _crop_u8(photo: np.ndarray, size: int = 96) -> np.ndarray:
    return np.ascontiguousarray(photo[100 : 100 + 2 * size : 2, 200 : 200 + 2 * size : 2])  # (size, size, 3)


# ------------------------------------------------------------- the official pipeline (moco-v3), transcribed
class _OfficialBlur:
    """moco-v3's loader.GaussianBlur: PIL's GaussianBlur with radius σ ~ U(0.1, 2)."""

    def __call__(self, x: Image.Image) -> Image.Image:
        return x.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class _OfficialSolarize:
    def __call__(self, x: Image.Image) -> Image.Image:
        return ImageOps.solarize(x)


def _official(size: int) -> list[T.Compose]:
    """main_moco.py's augmentation1 / augmentation2 up to ToTensor (uint8 PIL out, so the outputs compare)."""
    jitter = T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8)
    one = [T.RandomResizedCrop(size, scale=(0.08, 1.0)), jitter, T.RandomGrayscale(p=0.2)]
    two = [T.RandomResizedCrop(size, scale=(0.08, 1.0)), jitter, T.RandomGrayscale(p=0.2)]
    one += [T.RandomApply([_OfficialBlur()], p=1.0), T.RandomHorizontalFlip()]
    two += [T.RandomApply([_OfficialBlur()], p=0.1), T.RandomApply([_OfficialSolarize()], p=0.2)]
    two += [T.RandomHorizontalFlip()]
    return [T.Compose(one), T.Compose(two)]


def _views_official(paths: list[Path], size: int, n: int) -> list[list[np.ndarray]]:
    views = _official(size)
    torch.manual_seed(1)
    random.seed(1)
    out = []
    for i in range(n):
        img = Image.open(paths[i % len(paths)]).convert("RGB")
        out.append([np.asarray(v(img)) for v in views])
    return out


def _views_ours(paths: list[Path], size: int, n: int, device: str) -> list[list[np.ndarray]]:
    fn = MocoV3Views(size, augment_device=device)
    torch.manual_seed(2)
    samples = [fn(open_lazy_rgb(paths[i % len(paths)]), 0)[0] for i in range(n)]
    if device == "gpu":  # the batched executor, here on CPU tensors, 50 samples a batch
        batch, _ = collate_skip_none([(views, 0) for views in samples])
        done = []
        for view in batch[0]:
            chunks = [augment_batch(img, par) for img, par in zip(view["image"].split(50), view["params"].split(50))]
            done.append((torch.cat(chunks) * 255).round().byte())  # (n, 3, S, S)
        samples = [[done[0][i], done[1][i]] for i in range(n)]
    return [[v.permute(1, 2, 0).numpy() for v in views] for views in samples]


def _sharpness(x: np.ndarray) -> float:
    g = x.astype(np.float32).mean(axis=2)
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float(np.abs(lap).mean())


def _is_grey(x: np.ndarray) -> bool:
    c = x.astype(np.int16)
    return bool(np.abs(c[..., 0] - c[..., 1]).max() <= 1 and np.abs(c[..., 1] - c[..., 2]).max() <= 1)


def _saturation(x: np.ndarray) -> float:
    c = x.astype(np.float32)
    mx, mn = c.max(axis=2), c.min(axis=2)
    return float(((mx - mn) / np.maximum(mx, 1)).mean())


@pytest.fixture(scope="module")
def view_sets(photo_tree: Path) -> dict[str, list[list[np.ndarray]]]:
    # 112 px output from 500 x 375 photos: crops of >= 224 px decode at 1/2 with draft, so it is exercised
    paths = sorted(photo_tree.glob("train/*/*.jpg"))
    n = 300
    return {
        "official": _views_official(paths, 112, n),
        "cpu": _views_ours(paths, 112, n, "cpu"),
        "gpu": _views_ours(paths, 112, n, "gpu"),
    }


@pytest.mark.parametrize("path", ["cpu", "gpu"])
def test_views_match_the_official_pipeline_in_distribution(view_sets, path: str):
    ref, ours = view_sets["official"], view_sets[path]
    # view 1 is always blurred: its mean sharpness
    sharp_ref = np.mean([_sharpness(v[0]) for v in ref])
    sharp = np.mean([_sharpness(v[0]) for v in ours])
    assert abs(sharp - sharp_ref) <= 0.25 * sharp_ref, (sharp, sharp_ref)
    # view 2 is blurred 10 % of the time: sharper than view 1 in both
    assert np.mean([_sharpness(v[1]) for v in ours]) > 1.3 * sharp
    # greyscale fraction (p = 0.2) of view 2
    grey_ref = np.mean([_is_grey(v[1]) for v in ref])
    grey = np.mean([_is_grey(v[1]) for v in ours])
    assert abs(grey - grey_ref) <= 0.09 and 0.1 < grey < 0.3, (grey, grey_ref)
    # colour: mean saturation of the colour views and mean brightness
    sat_ref = np.mean([_saturation(v[0]) for v in ref if not _is_grey(v[0])])
    sat = np.mean([_saturation(v[0]) for v in ours if not _is_grey(v[0])])
    assert abs(sat - sat_ref) <= 0.1 * sat_ref, (sat, sat_ref)
    lum_ref, lum = np.mean([v[0].mean() for v in ref]), np.mean([v[0].mean() for v in ours])
    assert abs(lum - lum_ref) <= 0.05 * lum_ref, (lum, lum_ref)
    # view 2's mean level (solarize, p = 0.2, darkens bright pixels)
    lum2_ref, lum2 = np.mean([v[1].mean() for v in ref]), np.mean([v[1].mean() for v in ours])
    assert abs(lum2 - lum2_ref) <= 0.05 * lum2_ref, (lum2, lum2_ref)


def _gradient_jpeg(path: Path, width: int = 1000, height: int = 750) -> Path:
    """A JPEG whose red channel encodes x and green channel y: a crop's colour range gives its box."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    img = np.stack([x, y, np.full_like(x, 128)], axis=2).round().astype(np.uint8)
    Image.fromarray(img).save(path, quality=95)
    return path


def _box_stats(views: list[np.ndarray], width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    scales, ratios = [], []
    for v in views:
        r, g = v[..., 0].astype(np.float32), v[..., 1].astype(np.float32)
        fw = (r[:, -1].mean() - r[:, 0].mean()) / 255 * width / (width - 1)  # crop width / image width
        fh = (g[-1, :].mean() - g[0, :].mean()) / 255 * height / (height - 1)
        scales.append(fw * fh)
        ratios.append(fw * width / (fh * height))
    return np.array(scales), np.array(ratios)


def test_crop_scale_and_aspect_histograms_match_torchvision_through_draft(tmp_path: Path):
    # 64 px crops of a 1000 x 750 JPEG: most decode at 1/2 .. 1/8, so the geometry must survive the reduced decode
    path = _gradient_jpeg(tmp_path / "grad.jpg")
    n, size = 300, 64
    off = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0), solarize_p=(0.0, 0.0), flip=False)
    ours = MocoV3Views(size, **off)
    torch.manual_seed(3)
    mine = [ours(open_lazy_rgb(path), 0)[0][0].permute(1, 2, 0).numpy() for _ in range(n)]
    rrc = T.RandomResizedCrop(size, scale=(0.08, 1.0))
    torch.manual_seed(4)
    ref = [np.asarray(rrc(Image.open(path).convert("RGB"))) for _ in range(n)]
    (s1, r1), (s0, r0) = _box_stats(mine, 1000, 750), _box_stats(ref, 1000, 750)
    scale_bins, ratio_bins = np.linspace(0.08, 1.0, 6), np.exp(np.linspace(math.log(3 / 4), math.log(4 / 3), 5))
    h1, h0 = np.histogram(s1, scale_bins)[0] / n, np.histogram(s0, scale_bins)[0] / n
    assert np.abs(h1 - h0).max() <= 0.08, (h1, h0)
    h1, h0 = np.histogram(r1, ratio_bins)[0] / n, np.histogram(r0, ratio_bins)[0] / n
    assert np.abs(h1 - h0).max() <= 0.08, (h1, h0)


# ------------------------------------------------------------------- each operation against torchvision/PIL
_OPS = [
    ("brightness", P_BRIGHTNESS, 1.3, lambda im: TF.adjust_brightness(im, 1.3)),
    ("brightness", P_BRIGHTNESS, 0.7, lambda im: TF.adjust_brightness(im, 0.7)),
    ("contrast", P_CONTRAST, 0.65, lambda im: TF.adjust_contrast(im, 0.65)),
    ("saturation", P_SATURATION, 1.2, lambda im: TF.adjust_saturation(im, 1.2)),
    ("hue", P_HUE, 0.08, lambda im: TF.adjust_hue(im, 0.08)),
    ("hue", P_HUE, -0.1, lambda im: TF.adjust_hue(im, -0.1)),
    ("grey", P_GREY, 1.0, lambda im: TF.rgb_to_grayscale(im, 3)),
    ("blur", P_SIGMA, 1.5, lambda im: im.filter(ImageFilter.GaussianBlur(radius=1.5))),
    ("blur", P_SIGMA, 0.4, lambda im: im.filter(ImageFilter.GaussianBlur(radius=0.4))),
    ("solarize", P_SOLARIZE, 1.0, lambda im: ImageOps.solarize(im)),
    ("flip", P_FLIP, 1.0, lambda im: TF.hflip(im)),
]


def _identity_params() -> torch.Tensor:
    p = torch.zeros(NUM_PARAMS)
    p[P_BRIGHTNESS], p[P_CONTRAST], p[P_SATURATION] = 1.0, 1.0, 1.0
    p[P_ORDER : P_ORDER + 4] = torch.arange(4.0)
    return p


@pytest.mark.parametrize(("name", "slot", "value", "reference"), _OPS, ids=[f"{o[0]}{o[2]}" for o in _OPS])
def test_each_operation_matches_pil_on_both_executors(name, slot, value, reference):
    crop = _crop_u8(_photos()[0])
    p = _identity_params()
    p[slot] = value
    want = np.asarray(reference(Image.fromarray(crop))).astype(np.float32)
    cpu = apply_params_uint8(crop.copy(), p, kernel_cap=23).astype(np.float32)
    x = torch.from_numpy(crop).permute(2, 0, 1)[None]
    gpu = (augment_batch(x, p[None])[0].permute(1, 2, 0) * 255).numpy()
    for got in (cpu, gpu):
        assert np.abs(got - want).mean() < 1.5, (name, np.abs(got - want).mean())


def test_batched_executor_applies_each_samples_own_parameters_and_jitter_order():
    crops = torch.from_numpy(np.stack([_crop_u8(p) for p in _photos()])).permute(0, 3, 1, 2)  # (2, 3, 96, 96)
    torch.manual_seed(0)
    params = torch.stack(
        [draw_view_params((0.4, 0.4, 0.2, 0.1), 1.0, 0.5, 0.5, (0.1, 2.0), 0.5, True) for _ in range(2)]
    )
    params[0, P_ORDER : P_ORDER + 4] = torch.tensor([3.0, 2.0, 1.0, 0.0])  # hue first
    batch = augment_batch(crops, params)  # (2, 3, 96, 96)
    for i in range(2):
        alone = augment_batch(crops[i : i + 1], params[i : i + 1])[0]
        assert torch.allclose(batch[i], alone, atol=1e-5)
        cpu = apply_params_uint8(crops[i].permute(1, 2, 0).numpy().copy(), params[i], 23).astype(np.float32)
        assert np.abs(cpu - (alone.permute(1, 2, 0) * 255).numpy()).mean() < 2.0
    order_swapped = params.clone()
    order_swapped[0, P_ORDER : P_ORDER + 4] = torch.arange(4.0)
    assert not torch.allclose(augment_batch(crops, order_swapped)[0], batch[0], atol=1e-3)


def test_drawn_parameters_follow_torchvision_distributions():
    torch.manual_seed(0)
    p = torch.stack([draw_view_params((0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.1, (0.1, 2.0), 0.2, True) for _ in range(4000)])
    jittered = (p[:, P_ORDER : P_ORDER + 4] != torch.arange(4.0)).any(1) | (p[:, P_BRIGHTNESS] != 1)
    assert abs(jittered.float().mean() - 0.8) < 0.03
    j = p[jittered]
    assert j[:, P_BRIGHTNESS].min() >= 0.6 and j[:, P_BRIGHTNESS].max() <= 1.4
    assert j[:, P_SATURATION].min() >= 0.8 and j[:, P_SATURATION].max() <= 1.2
    assert -0.1 <= j[:, P_HUE].min() < -0.09 and 0.09 < j[:, P_HUE].max() <= 0.1
    assert sorted(j[0, P_ORDER : P_ORDER + 4].tolist()) == [0, 1, 2, 3]
    for slot, prob in ((P_GREY, 0.2), (P_SOLARIZE, 0.2), (P_FLIP, 0.5)):
        assert abs((p[:, slot] > 0).float().mean() - prob) < 0.03
    sigma = p[p[:, P_SIGMA] > 0, P_SIGMA]
    assert abs(len(sigma) / 4000 - 0.1) < 0.02 and sigma.min() >= 0.1 and sigma.max() <= 2.0


# ------------------------------------------------------------------------------------------ decoding
def test_draft_decodes_at_the_largest_reduction_that_covers_the_crops(photo_tree: Path):
    path = sorted(photo_tree.glob("train/*/*.jpg"))[0]  # 500 x 375
    assert draft_scale((500, 375), [(0, 0, 375, 375)], 112) == 2  # 187 px >= 112 at 1/2, 93 < 112 at 1/4
    assert draft_scale((500, 375), [(0, 0, 375, 375), (0, 0, 150, 200)], 112) == 1  # the smaller crop decides
    assert draft_scale((500, 375), [(0, 0, 375, 500)], 40) == 8
    img = open_lazy_rgb(path)
    assert isinstance(img, LazyJpeg) and img.tile  # header read, pixels not decoded
    pixels, boxes, scale = decode_for_crops(img, [(10, 20, 360, 300)], 112)
    assert scale == 2 and pixels.shape == (188, 250, 3) and boxes == [(5, 10, 180, 150)]
    full = np.asarray(Image.open(path).convert("RGB"))
    pixels, boxes, scale = decode_for_crops(open_lazy_rgb(path), [(10, 20, 100, 100)], 112)
    assert scale == 1 and np.array_equal(pixels, full) and boxes == [(10, 20, 100, 100)]


def test_lazy_jpeg_truncated_is_a_one_line_error_and_skippable(photo_tree: Path, tmp_path: Path):
    good = sorted(photo_tree.glob("train/*/*.jpg"))[0]
    root = tmp_path / "tree"
    (root / "a").mkdir(parents=True)
    (root / "a" / "0.jpg").write_bytes(good.read_bytes())
    (root / "a" / "1.jpg").write_bytes(good.read_bytes()[:3000])  # header fine, body cut
    ds = build_dataset("imagefolder", root=root)
    fn = MocoV3Views(64)
    with pytest.raises(CorruptImageError, match=r"1\.jpg.*data\.skip_corrupt=true"):
        fn(*ds[1])
    with pytest.raises(CorruptImageError, match=r"1\.jpg"):
        ds[1][0].resize((8, 8))  # any PIL use of the lazy image decodes it, with the same error
    tds = TransformedDataset(ds, fn, seed=0, skip_corrupt=True)
    assert tds[1] is None and tds[0] is not None


def test_eval_transform_drafts_large_jpegs_and_gives_nearly_the_same_picture(tmp_path: Path):
    path = tmp_path / "big.jpg"
    Image.fromarray(_photos()[1]).resize((1280, 854), Image.BICUBIC).save(path, quality=90)
    tf = eval_transform(96, 256 / 224)  # short side 110: 854 decodes at 1/4 (213 px)
    lazy = open_lazy_rgb(path)
    out = tf(lazy)
    assert lazy.size == (320, 214)  # drafted
    full = tf(Image.open(path).convert("RGB"))
    assert out.shape == full.shape == (3, 96, 96) and (out - full).abs().mean() < 0.05  # normalised units


# ------------------------------------------------------------------------- the sample contract, MoCo v3
def _moco_cfg(root: Path, *extra: str):
    return load_config(
        "pretrain/mocov3_demo",
        [
            f"data.train.root={root}", "data.train.name=imagefolder", "data.train.split=train", "data.val=null",
            "data.img_size=32", "model.backbone=test_vit", "objective.dim=16", "objective.mlp_dim=32", *extra,
        ],
    )  # fmt: skip


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_sample_contract_and_moco_forward_on_uint8_views(photo_tree: Path, device: str):
    from vitssl.engine.trainer import build_objective

    cfg = _moco_cfg(photo_tree, f"data.augment_device={device}")
    obj = build_objective(cfg)
    obj.setup(cfg)
    ds = build_dataset("imagefolder", root=photo_tree, split="train")
    views, target = obj.train_sample_fn(cfg.data)(*ds[3])
    assert len(views) == 2 and target == ds.targets[3]
    image = views[0] if device == "cpu" else views[0]["image"]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    batch, _ = collate_skip_none([obj.train_sample_fn(cfg.data)(*ds[i]) for i in range(4)])
    out = obj(batch)
    assert torch.isfinite(out["loss"])


def test_per_batch_normalisation_matches_torchvision_normalize():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    want = torch.stack([T.Normalize(mean, std)(v.float() / 255) for v in x])
    assert torch.allclose(normalize_batch(x, mean, std), want, atol=1e-6)
    assert torch.allclose(prepare_view(x, mean, std), want, atol=1e-6)
    floats = torch.randn(2, 3, 8, 8)
    assert prepare_view(floats, mean, std) is floats  # already normalised views pass through


def test_same_seed_gives_the_same_parameters_on_both_devices(photo_tree: Path):
    ds = build_dataset("imagefolder", root=photo_tree, split="train")
    cpu = TransformedDataset(ds, MocoV3Views(48, augment_device="cpu"), seed=5)
    gpu = TransformedDataset(ds, MocoV3Views(48, augment_device="gpu"), seed=5)
    (c1, _), _ = cpu[2]
    (g1, _), _ = gpu[2]
    done = (augment_batch(g1["image"][None], g1["params"][None])[0] * 255).round()
    assert (done - c1.float()).abs().mean() < 2.0  # one draw, two executors


def test_augment_device_resolution_and_bad_values():
    assert resolve_augment_device("auto", "cpu") == "cpu"
    assert resolve_augment_device("auto", torch.device("cuda", 0)) == "gpu"
    assert resolve_augment_device("gpu", "cpu") == "gpu"
    with pytest.raises(DataError, match="augment_device must be auto, cpu or gpu, got 'tpu'"):
        resolve_augment_device("tpu")
    with pytest.raises(DataError, match="augment_device"):
        MocoV3Views(32, augment_device="auto")


# ----------------------------------------------------------------------------------------- telemetry
def test_telemetry_reports_img_s_data_wait_mfu_and_warns(caplog):
    tel = Telemetry(global_batch=64, flops_per_sample=1e9, peak=1e12)
    tel.start(0)
    with tel.waiting():
        torch.randn(200, 200) @ torch.randn(200, 200)
    first = tel.interval(2)
    assert first["img_s"] > 0 and 0 < first["data_wait"] <= 1
    assert first["mfu"] == pytest.approx(first["img_s"] * 1e9 / 1e12, rel=1e-2)
    with caplog.at_level(logging.WARNING, logger="vitssl.engine.telemetry"):
        with tel.waiting():
            sum(range(100_000))
        second = tel.interval(3)
    assert second["data_wait"] > 0.1 and "data.num_workers" in caplog.text and "augment_device=gpu" in caplog.text
    assert tel.interval(3) == {}  # no step since the last line
    assert Telemetry(8).interval(1) == {}  # never started: nothing to report


def test_forward_flops_of_a_vit():
    from vitssl.backbones import create_backbone

    vit = create_backbone("test_vit", img_size=32)
    flops = forward_flops(vit, 32, torch.device("cpu"))
    assert flops is not None and flops > 0
    # at least the patch projection and one (q, k, v, proj, 2-layer MLP) block on every token
    tokens, width = 64, vit.num_features
    assert flops > 2 * tokens * width * width * (4 + 8)
    wide = forward_flops(create_backbone("test_vit", img_size=64), 64, torch.device("cpu"))
    assert wide > 3.5 * flops  # 4x the tokens: linear layers 4x, attention more


def test_training_run_logs_img_s_and_data_wait(photo_tree: Path, tmp_path: Path):
    cfg = _moco_cfg(
        photo_tree, f"output_dir={tmp_path / 'run'}", "train.epochs=1", "train.batch_size=4", "train.log_every_steps=1",
        "eval.knn_every_epochs=0", "data.augment_device=auto",
    )  # fmt: skip
    train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in lines if "loss" in r]
    assert logged and all("img_s" in r and 0 <= r["data_wait"] <= 1 for r in logged)
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "augment_device: cpu" in saved  # auto resolved for a CPU run, and written down


def test_batched_colour_operations_equal_torchvision_tensor_functions():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 16, 16)
    factors = torch.tensor([0.7, 1.0, 1.3])
    hues = torch.tensor([-0.1, 0.02, 0.09])
    for slot, fn, values in (
        (P_BRIGHTNESS, TF.adjust_brightness, factors),
        (P_CONTRAST, TF.adjust_contrast, factors),
        (P_SATURATION, TF.adjust_saturation, factors),
        (P_HUE, TF.adjust_hue, hues),
    ):
        p = _identity_params().repeat(3, 1)
        p[:, slot] = values
        want = torch.stack([fn(x[i], float(values[i])) for i in range(3)])
        # 1e-3: torchvision's tensor luma weighs red 0.2989, PIL's (the reference pipeline's, and ours) 0.299
        assert torch.allclose(augment_batch(x, p), want, atol=1e-3), slot


# ------------------------------------------------------------------------------------------ data profile
def test_profile_pipeline_times_every_stage(photo_tree: Path):
    from vitssl.data.profile import profile_pipeline

    ds = build_dataset("imagefolder", root=photo_tree, split="train")
    fn = MocoV3Views(64, augment_device="gpu")
    prof = profile_pipeline(ds, fn, num_samples=6, batch_size=4)
    assert prof.samples == 6 and fn.timings is None  # the sample function is left as it was
    assert {"read", "decode", "crop", "to_tensor", "collate"} <= set(prof.worker_ms)
    assert list(prof.worker_ms)[:2] == ["read", "draw"] and list(prof.worker_ms)[-1] == "collate"
    assert set(prof.device_ms) == {"host_to_device", "device_augment"} and prof.device_ms["device_augment"] > 0
    assert prof.img_s_per_core == pytest.approx(1000 / sum(prof.worker_ms.values()))
    assert prof.cores_for(2 * prof.img_s_per_core) == pytest.approx(2.0)
    cpu = profile_pipeline(ds, MocoV3Views(64), num_samples=4, batch_size=4)
    assert "hue" in cpu.worker_ms or "blur" in cpu.worker_ms  # the augmentations ran in the worker
    text = cpu.format(1000)
    assert "img/s per core" in text and "1000 img/s needs" in text
    with pytest.raises(DataError, match="must be positive"):
        profile_pipeline(ds, fn, num_samples=0)


def test_data_profile_cli(photo_tree: Path, capsys):
    from vitssl.cli import main

    rc = main(
        ["data", "profile", "pretrain/mocov3_demo", f"data.train.root={photo_tree}", "data.train.name=imagefolder",
         "data.train.split=train", "data.val=null", "model.backbone=test_vit", "--samples", "4", "--batch-size", "2",
         "--target-img-s", "500"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "decode" in out and "img/s per core" in out and "500 img/s needs" in out


def test_views_are_the_same_with_loader_workers(photo_tree: Path):
    from torch.utils.data import DataLoader

    ds = TransformedDataset(build_dataset("imagefolder", root=photo_tree, split="train"), MocoV3Views(32), seed=3)

    def collect(workers: int) -> torch.Tensor:
        loader = DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate_skip_none)
        return torch.cat([batch[0][1] for batch, _ in loader])  # view 2, uint8

    assert torch.equal(collect(0), collect(2))
