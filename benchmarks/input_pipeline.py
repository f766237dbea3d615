"""Input pipeline per core: the official MoCo v3 two-view pipeline (torchvision) vs vitssl's ``MocoV3Views``.

One process, one thread (``torch.set_num_threads(1)``: what one DataLoader worker has), interleaved rounds so
load from other processes hits every pipeline alike. Data: photo-like JPEGs of ImageNet's typical size
(500 x 375, quality 90) cut and rescaled from the two photos scikit-learn ships. Each pipeline reads the file,
decodes it and makes both views of one sample:

* ``official``: moco-v3's ``main_moco.py`` augmentation1 / augmentation2 (RandomResizedCrop, ColorJitter p 0.8,
  RandomGrayscale 0.2, PIL GaussianBlur σ ∈ [0.1, 2] p 1.0 / 0.1, Solarize p 0 / 0.2, flip, ToTensor, Normalize)
  on a fully decoded PIL image, as its ImageFolder loader gives it: its best configuration on one core;
* ``vitssl_cpu``: ``MocoV3Views(augment_device="cpu")`` on a lazily opened JPEG, uint8 views out;
* ``vitssl_gpu_worker``: ``augment_device="gpu"``: the worker's share only (decode, crops, parameter draws).

    python benchmarks/input_pipeline.py [--samples 150] [--rounds 3] [--size 224]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from vitssl.data.decode import open_lazy_rgb
from vitssl.data.transforms import MocoV3Views


class _Blur:
    def __call__(self, x: Image.Image) -> Image.Image:
        return x.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class _Solarize:
    def __call__(self, x: Image.Image) -> Image.Image:
        return ImageOps.solarize(x)


def official(size: int) -> list[T.Compose]:
    """moco-v3's two augmentations, written from the paper's list (as its main_moco.py does)."""
    norm = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    head = [T.RandomResizedCrop(size, scale=(0.08, 1.0)), T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8)]
    one = [*head, T.RandomGrayscale(p=0.2), T.RandomApply([_Blur()], p=1.0), T.RandomHorizontalFlip()]
    two = [*head, T.RandomGrayscale(p=0.2), T.RandomApply([_Blur()], p=0.1), T.RandomApply([_Solarize()], p=0.2)]
    two.append(T.RandomHorizontalFlip())
    return [T.Compose([*one, T.ToTensor(), norm]), T.Compose([*two, T.ToTensor(), norm])]


def make_jpegs(folder: Path, n: int = 32) -> list[Path]:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # (427, 640, 3) x 2
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        photo = photos[i % 2]
        h = int(rng.integers(240, 427))
        w = min(640, round(h * 4 / 3))
        y, x = int(rng.integers(0, 427 - h + 1)), int(rng.integers(0, 640 - w + 1))
        img = Image.fromarray(photo[y : y + h, x : x + w]).resize((500, 375), Image.BICUBIC)
        paths.append(folder / f"{i:03d}.jpg")
        img.save(paths[-1], quality=90)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=150, help="two-view samples per pipeline and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "input_pipeline.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ref = official(args.size)
    cpu, gpu = MocoV3Views(args.size), MocoV3Views(args.size, augment_device="gpu")
    runs = {
        "official": lambda p: [v(Image.open(p).convert("RGB")) for v in ref],
        "vitssl_cpu": lambda p: cpu(open_lazy_rgb(p), 0),
        "vitssl_gpu_worker": lambda p: gpu(open_lazy_rgb(p), 0),
    }
    rates: dict[str, list[float]] = {k: [] for k in runs}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp))
        for fn in runs.values():  # warm-up
            fn(paths[0])
        for _ in range(args.rounds):
            for name, fn in runs.items():
                start = time.perf_counter()
                for i in range(args.samples):
                    fn(paths[i % len(paths)])
                rates[name].append(args.samples / (time.perf_counter() - start))
    median = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "benchmark": "input_pipeline",
        "torch": str(torch.__version__),
        "pillow": Image.__version__,
        "threads": 1,
        "image": "500x375 JPEG q90",
        "img_size": args.size,
        "samples_per_round": args.samples,
        "samples_per_s": {k: [round(r, 1) for r in v] for k, v in rates.items()},
        "median_samples_per_s": {k: round(v, 1) for k, v in median.items()},
        "speedup_vs_official": {k: round(v / median["official"], 2) for k, v in median.items()},
        "cores_for_1000_img_s": {k: round(1000 / v, 1) for k, v in median.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
