"""Image transforms shared by objectives and evaluation: MoCo v3's two asymmetric views and the eval transform.

``MocoV3Views`` is the training sample function: crops sampled on the full-size geometry, the JPEG decoded at the
smallest size that covers them (``vitssl.data.decode``), uint8 all the way, the photometric augmentations either
applied in the worker or left to the training device (``data.augment_device``, ``vitssl.data.augment``).
``moco_v3_views`` is the same recipe as torchvision ``Compose`` transforms (PIL in, normalised float out).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from vitssl.data.augment import apply_params_uint8, blur_kernel_size, draw_view_params
from vitssl.data.decode import decode_for_crops, is_undecoded_jpeg
from vitssl.errors import DataError

# Where the photometric augmentations run: in the loader workers, or batched on the training device.
AUGMENT_DEVICES: tuple[str, ...] = ("cpu", "gpu")
_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range


def resolve_augment_device(value: str, device: torch.device | str | None = None) -> str:
    """``data.augment_device`` as ``"cpu"`` or ``"gpu"``: ``"auto"`` is ``"gpu"`` when training on CUDA.

    Args:
        value: ``"auto"``, ``"cpu"`` or ``"gpu"``.
        device: the training device; None: CUDA when it is available.
    """
    if value == "auto":
        on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        return "gpu" if on_cuda else "cpu"
    if value not in AUGMENT_DEVICES:
        raise DataError(f"data.augment_device must be auto, cpu or gpu, got {value!r}")
    return value


IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


def interpolation_mode(name: str) -> InterpolationMode:
    """torchvision's mode for ``"nearest"``, ``"bilinear"`` or ``"bicubic"``; another name is a DataError."""
    if name not in _INTERPOLATIONS:
        raise DataError(f"interpolation must be one of {', '.join(_INTERPOLATIONS)}, got {name!r}")
    return _INTERPOLATIONS[name]


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise DataError(f"{name} must be a probability in [0, 1], got {p}")


def _per_view(name: str, value: Sequence[float]) -> tuple[float, float]:
    if len(value) != 2:
        raise DataError(f"{name} needs one probability per view (2 values), got {list(value)}")
    for p in value:
        _check_prob(name, p)
    return float(value[0]), float(value[1])


def _check_recipe(
    img_size: int,
    crop_scale: Sequence[float],
    jitter: Sequence[float],
    jitter_p: float,
    grayscale_p: float,
    blur_p: Sequence[float],
    blur_sigma: Sequence[float],
    solarize_p: Sequence[float],
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Check MoCo v3's augmentation settings; returns the per-view blur and solarize probabilities."""
    if img_size < 1:
        raise DataError(f"img_size must be positive, got {img_size}")
    if len(crop_scale) != 2 or not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
        raise DataError(f"crop_scale must satisfy 0 < min <= max <= 1, got {tuple(crop_scale)}")
    if len(blur_sigma) != 2 or not 0.0 < blur_sigma[0] <= blur_sigma[1]:
        raise DataError(f"blur_sigma must satisfy 0 < min <= max, got {tuple(blur_sigma)}")
    if len(jitter) != 4:
        raise DataError(f"jitter needs (brightness, contrast, saturation, hue), got {list(jitter)}")
    _check_prob("jitter_p", jitter_p)
    _check_prob("grayscale_p", grayscale_p)
    return _per_view("blur_p", blur_p), _per_view("solarize_p", solarize_p)


def moco_v3_views(
    img_size: int,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: tuple[float, float] = (1.0, 0.1),
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    solarize_p: tuple[float, float] = (0.0, 0.2),
    flip: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> list[T.Compose]:
    """MoCo v3's (BYOL-style) asymmetric pair of augmentations as torchvision transforms: PIL image in, normalised
    (3, S, S) tensor out. Training uses :class:`MocoV3Views` (the same recipe, several times faster).

    Both views: RandomResizedCrop, ColorJitter (applied with ``jitter_p``), RandomGrayscale, Gaussian blur, solarize,
    horizontal flip. They differ in blur probability (1.0 vs 0.1) and solarize probability (0 vs 0.2). A
    probability of 0 leaves the operation out of the pipeline.

    Args:
        img_size: output side in pixels.
        crop_scale: RandomResizedCrop area range (MoCo v3: 0.08–1; small images do better with a larger minimum).
        jitter: ColorJitter brightness, contrast, saturation, hue.
        jitter_p: probability of applying the colour jitter.
        grayscale_p: probability of converting to grey.
        blur_p: blur probability of view 1 and view 2.
        blur_sigma: range of the blur's σ in pixels.
        solarize_p: solarize probability of view 1 and view 2 (threshold 128, as PIL's default).
        flip: random horizontal flip.
        mean: normalisation mean.
        std: normalisation std.

    Returns:
        Two ``Compose`` transforms, view 1 then view 2.
    """
    blur, solarize = _check_recipe(img_size, crop_scale, jitter, jitter_p, grayscale_p, blur_p, blur_sigma, solarize_p)
    kernel = blur_kernel_size(img_size)
    views = []
    for view in range(2):
        ops: list = [T.RandomResizedCrop(img_size, scale=tuple(crop_scale))]
        if jitter_p > 0:
            ops.append(T.RandomApply([T.ColorJitter(*jitter)], p=jitter_p))
        if grayscale_p > 0:
            ops.append(T.RandomGrayscale(p=grayscale_p))
        if blur[view] > 0:
            ops.append(T.RandomApply([T.GaussianBlur(kernel, sigma=tuple(blur_sigma))], p=blur[view]))
        if solarize[view] > 0:
            ops.append(T.RandomSolarize(threshold=128, p=solarize[view]))
        if flip:
            ops.append(T.RandomHorizontalFlip())
        ops += [T.ToTensor(), T.Normalize(mean, std)]
        views.append(T.Compose(ops))
    return views


def resized_crop_uint8(pixels: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Crop ``box`` (top, left, height, width) of (H, W, 3) uint8 pixels and resize it to (size, size, 3) uint8.

    Bilinear with antialiasing, as PIL's ``resize`` that torchvision's ``RandomResizedCrop`` calls on PIL images
    (torch's uint8 kernel, within a fraction of a level of PIL's on average).
    """
    top, left, h, w = box
    # a writable contiguous copy of the crop: torch's fast uint8 kernel wants channels-last contiguous input
    patch = np.require(pixels[top : top + h, left : left + w], requirements=["C", "W"])  # (h, w, 3)
    x = torch.from_numpy(patch).permute(2, 0, 1).unsqueeze(0)  # (1, 3, h, w), channels last
    out = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return np.ascontiguousarray(out[0].permute(1, 2, 0).numpy())  # (size, size, 3); a view when channels last


def _to_chw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(cv2.split(x)))  # (3, S, S) uint8; cv2's split is the fastest transpose


class MocoV3Views:
    """MoCo v3's two-view sample function: ``(PIL image, target) -> ([view 1, view 2], target)``, uint8 views.

    Per sample: both RandomResizedCrop boxes are drawn on the full-size geometry (a lazily opened JPEG has only
    read its header), the JPEG is decoded with ``draft`` at the strongest reduction that keeps both crops at least
    ``img_size`` on each side, the crops are resized to ``img_size`` in uint8, and then

    * ``augment_device="cpu"``: the colour jitter, greyscale, blur, solarize and flip run here on the uint8 crops;
      a view is a (3, S, S) uint8 tensor;
    * ``augment_device="gpu"``: their parameters are drawn here (so a sample's augmentation still depends only on
      its seed) and a view is ``{"image": (3, S, S) uint8, "params": (NUM_PARAMS,) float}``; the objective applies
      them batched on its device (``vitssl.data.augment.prepare_view``), which also normalises.

    The recipe is the official one (torchvision's draws, PIL's formulas, blur σ as PIL's ``GaussianBlur`` radius on
    the output-size crop); tests/data/test_transforms.py holds both modes to its distribution.

    Args:
        img_size: output side in pixels.
        crop_scale: RandomResizedCrop area range.
        jitter: ColorJitter brightness, contrast, saturation, hue.
        jitter_p: probability of applying the colour jitter.
        grayscale_p: probability of converting to grey.
        blur_p: blur probability of view 1 and view 2.
        blur_sigma: range of the blur's σ in pixels.
        solarize_p: solarize probability of view 1 and view 2 (threshold 128).
        flip: random horizontal flip.
        augment_device: ``"cpu"`` or ``"gpu"`` (see above).
    """

    def __init__(
        self,
        img_size: int,
        crop_scale: Sequence[float] = (0.08, 1.0),
        jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: Sequence[float] = (1.0, 0.1),
        blur_sigma: Sequence[float] = (0.1, 2.0),
        solarize_p: Sequence[float] = (0.0, 0.2),
        flip: bool = True,
        augment_device: str = "cpu",
    ) -> None:
        self.blur_p, self.solarize_p = _check_recipe(
            img_size, crop_scale, jitter, jitter_p, grayscale_p, blur_p, blur_sigma, solarize_p
        )
        if augment_device not in AUGMENT_DEVICES:
            raise DataError(f"data.augment_device must be one of {', '.join(AUGMENT_DEVICES)}, got {augment_device!r}")
        self.img_size = int(img_size)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.jitter = tuple(float(v) for v in jitter)
        self.jitter_p, self.grayscale_p = float(jitter_p), float(grayscale_p)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.flip = bool(flip)
        self.augment_device = augment_device
        self.kernel_cap = blur_kernel_size(self.img_size)
        self.timings: dict[str, float] | None = None  # when a dict: seconds per stage are added (data profile)

    def _tick(self, name: str, start: float) -> float:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[name] = self.timings.get(name, 0.0) + now - start
        return now

    def __call__(self, img: Image.Image, target: Any) -> tuple[list[Any], Any]:
        t = time.perf_counter()
        boxes = [T.RandomResizedCrop.get_params(img, list(self.crop_scale), list(_RATIO)) for _ in range(2)]
        params = [
            draw_view_params(
                self.jitter, self.jitter_p, self.grayscale_p, self.blur_p[v], self.blur_sigma, self.solarize_p[v],
                self.flip,
            )
            for v in range(2)
        ]  # fmt: skip
        t = self._tick("draw", t)
        pixels, boxes, _ = decode_for_crops(img, boxes, self.img_size)  # (H', W', 3)
        t = self._tick("decode", t)
        views: list[Any] = []
        for box, p in zip(boxes, params):
            crop = resized_crop_uint8(pixels, box, self.img_size)  # (S, S, 3)
            t = self._tick("crop", t)
            if self.augment_device == "cpu":
                crop = apply_params_uint8(crop, p, self.kernel_cap, self.timings)
                t = time.perf_counter()
            image = _to_chw(crop)  # (3, S, S) uint8
            views.append(image if self.augment_device == "cpu" else {"image": image, "params": p})
            t = self._tick("to_tensor", t)
        return views, target

    def __repr__(self) -> str:
        return (
            f"MocoV3Views(img_size={self.img_size}, crop_scale={self.crop_scale}, jitter={self.jitter}, "
            f"jitter_p={self.jitter_p}, grayscale_p={self.grayscale_p}, blur_p={self.blur_p}, "
            f"blur_sigma={self.blur_sigma}, solarize_p={self.solarize_p}, flip={self.flip}, "
            f"augment_device={self.augment_device!r})"
        )


class DraftResize(T.Resize):
    """torchvision's ``Resize`` (short side to ``size``) that first decodes an undecoded JPEG with ``draft`` at the
    strongest reduction keeping its short side >= ``size``: the resize then starts from a 1/2-1/8 decode of a large
    photo instead of the full one (nearly the same picture, a fraction of the decode). Other images resize as usual.
    """

    def forward(self, img: Any) -> Any:
        if is_undecoded_jpeg(img) and isinstance(self.size, int):
            width, height = img.size
            for scale in (8, 4, 2):
                if min(width, height) // scale >= self.size:
                    img.draft("RGB", (width // scale, height // scale))
                    break
        return super().forward(img)


def eval_transform(
    img_size: int,
    resize_ratio: float = 256 / 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bilinear",
) -> T.Compose:
    """Resize the short side to ``img_size × resize_ratio``, centre-crop ``img_size``, to tensor, normalise.

    A lazily opened JPEG larger than twice that side is decoded at reduced size first (:class:`DraftResize`).

    Args:
        img_size: output side in pixels.
        resize_ratio: resize/crop ratio (ImageNet convention 256/224; use 1.0 for tiny images such as digits).
        mean: normalisation mean.
        std: normalisation std.
        interpolation: "bilinear" (MoCo v3's linear evaluation), "bicubic" or "nearest".
    """
    if resize_ratio < 1.0:
        raise DataError(f"resize_ratio must be >= 1 (resize then crop), got {resize_ratio}")
    mode = interpolation_mode(interpolation)
    resize = round(img_size * resize_ratio)
    return T.Compose(
        [
            DraftResize(resize, interpolation=mode),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
