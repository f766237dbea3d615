"""Image transforms shared by objectives and evaluation: MoCo v3's two asymmetric views and the eval transform."""

from __future__ import annotations

from collections.abc import Sequence

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from vitssl.errors import DataError

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


def blur_kernel_size(img_size: int) -> int:
    """Odd Gaussian-blur kernel of about 10% of the image side, at least 3 (23 at 224 px, as in BYOL).

    MoCo v3 blurs with PIL's ``GaussianBlur(radius=σ)``, whose support follows σ; torchvision needs a fixed
    kernel. 10% of the side covers ±3σ for σ up to 2 at ImageNet sizes, and on tiny images it caps the support
    at a few pixels, so σ = 2 softens a 32 px image instead of wiping it out.
    """
    k = round(0.1 * img_size)
    k = k if k % 2 == 1 else k + 1
    return max(3, k)


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise DataError(f"{name} must be a probability in [0, 1], got {p}")


def _per_view(name: str, value: Sequence[float]) -> tuple[float, float]:
    if len(value) != 2:
        raise DataError(f"{name} needs one probability per view (2 values), got {list(value)}")
    for p in value:
        _check_prob(name, p)
    return float(value[0]), float(value[1])


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
    """MoCo v3's (BYOL-style) asymmetric pair of augmentations: PIL image in, normalised (3, S, S) tensor out.

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
    if img_size < 1:
        raise DataError(f"img_size must be positive, got {img_size}")
    if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
        raise DataError(f"crop_scale must satisfy 0 < min <= max <= 1, got {tuple(crop_scale)}")
    if not 0.0 < blur_sigma[0] <= blur_sigma[1]:
        raise DataError(f"blur_sigma must satisfy 0 < min <= max, got {tuple(blur_sigma)}")
    if len(jitter) != 4:
        raise DataError(f"jitter needs (brightness, contrast, saturation, hue), got {list(jitter)}")
    _check_prob("jitter_p", jitter_p)
    _check_prob("grayscale_p", grayscale_p)
    blur = _per_view("blur_p", blur_p)
    solarize = _per_view("solarize_p", solarize_p)
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


def eval_transform(
    img_size: int,
    resize_ratio: float = 256 / 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bilinear",
) -> T.Compose:
    """Resize the short side to ``img_size × resize_ratio``, centre-crop ``img_size``, to tensor, normalise.

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
            T.Resize(resize, interpolation=mode),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
