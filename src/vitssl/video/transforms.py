"""Clip transforms: one spatial augmentation shared by every frame of a clip, uint8 ``(T, H, W, 3)`` in,
normalised float ``(T, 3, S, S)`` out, so a DataLoader collates clips to ``(B, T, 3, S, S)``.

torchvision's v2 transforms treat every leading dimension of a plain tensor as a batch and draw their random
parameters once per call, so a ``(T, C, H, W)`` clip gets one crop box and one flip for all its frames: the
motion between frames survives augmentation. The transforms are small picklable classes whose ``repr`` lists
every parameter, because the feature cache keys on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

from vitssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, interpolation_mode
from vitssl.errors import DataError


def _check_common(img_size: int, mean: Sequence[float], std: Sequence[float], interpolation: str) -> None:
    if img_size < 1:
        raise DataError(f"img_size must be positive, got {img_size}")
    if len(mean) != 3 or len(std) != 3:
        raise DataError(f"mean and std need 3 values (R, G, B), got mean={list(mean)} std={list(std)}")
    if any(s <= 0 for s in std):
        raise DataError(f"std must be positive, got {list(std)}")
    interpolation_mode(interpolation)  # fails early, naming the valid modes


def _to_tchw(clip: torch.Tensor) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` → ``(T, 3, H, W)`` (a view; v2 copies when it resizes)."""
    if not isinstance(clip, torch.Tensor) or clip.dtype != torch.uint8 or clip.ndim != 4 or clip.shape[-1] != 3:
        what = f"{clip.dtype} {tuple(clip.shape)}" if isinstance(clip, torch.Tensor) else type(clip).__name__
        raise ValueError(f"a clip transform takes a uint8 tensor (T, H, W, 3), got {what}")
    return clip.permute(0, 3, 1, 2)  # (T, 3, H, W)


class ClipTrainTransform:
    """Random resized crop and horizontal flip, identical for all frames of a clip, then scale and normalise.

    Args:
        img_size: output side in pixels.
        mean: normalisation mean (of pixels scaled to [0, 1]).
        std: normalisation std.
        crop_scale: RandomResizedCrop area range.
        flip: random horizontal flip (turn off when left/right motion is the label, as in ``motion``).
        interpolation: "bilinear", "bicubic" or "nearest".
    """

    def __init__(
        self,
        img_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        flip: bool = True,
        interpolation: str = "bilinear",
    ) -> None:
        _check_common(img_size, mean, std, interpolation)
        if len(crop_scale) != 2 or not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise DataError(f"crop_scale must satisfy 0 < min <= max <= 1, got {tuple(crop_scale)}")
        self.img_size = int(img_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.flip = bool(flip)
        self.interpolation = interpolation
        ops: list = [
            v2.RandomResizedCrop(
                self.img_size, scale=self.crop_scale, interpolation=interpolation_mode(interpolation), antialias=True
            )
        ]
        if self.flip:
            ops.append(v2.RandomHorizontalFlip())
        ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        self.pipeline = v2.Compose(ops)

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        """uint8 ``(T, H, W, 3)`` → float32 ``(T, 3, img_size, img_size)``."""
        return self.pipeline(_to_tchw(clip))

    def __repr__(self) -> str:
        return (
            f"ClipTrainTransform(img_size={self.img_size}, mean={self.mean}, std={self.std}, "
            f"crop_scale={self.crop_scale}, flip={self.flip}, interpolation={self.interpolation!r})"
        )


class ClipEvalTransform:
    """Resize the short side to ``img_size × resize_ratio``, centre-crop ``img_size``, scale and normalise.

    Args:
        img_size: output side in pixels.
        mean: normalisation mean (of pixels scaled to [0, 1]).
        std: normalisation std.
        resize_ratio: resize/crop ratio (256/224 as for images; 1.0 keeps the whole short side, e.g. for ``motion``).
        interpolation: "bilinear", "bicubic" or "nearest".
    """

    def __init__(
        self,
        img_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        resize_ratio: float = 256 / 224,
        interpolation: str = "bilinear",
    ) -> None:
        _check_common(img_size, mean, std, interpolation)
        if resize_ratio < 1.0:
            raise DataError(f"resize_ratio must be >= 1 (resize then crop), got {resize_ratio}")
        self.img_size = int(img_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.resize_ratio = float(resize_ratio)
        self.interpolation = interpolation
        self.pipeline = v2.Compose(
            [
                v2.Resize(
                    round(img_size * resize_ratio), interpolation=interpolation_mode(interpolation), antialias=True
                ),
                v2.CenterCrop(self.img_size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(self.mean, self.std),
            ]
        )

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        """uint8 ``(T, H, W, 3)`` → float32 ``(T, 3, img_size, img_size)``."""
        return self.pipeline(_to_tchw(clip))

    def __repr__(self) -> str:
        return (
            f"ClipEvalTransform(img_size={self.img_size}, mean={self.mean}, std={self.std}, "
            f"resize_ratio={self.resize_ratio:.6g}, interpolation={self.interpolation!r})"
        )


def clip_train_transform(
    img_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    flip: bool = True,
    interpolation: str = "bilinear",
) -> ClipTrainTransform:
    """The training clip transform; see :class:`ClipTrainTransform`."""
    return ClipTrainTransform(img_size, mean, std, crop_scale=crop_scale, flip=flip, interpolation=interpolation)


def clip_eval_transform(
    img_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    resize_ratio: float = 256 / 224,
    interpolation: str = "bilinear",
) -> ClipEvalTransform:
    """The evaluation clip transform; see :class:`ClipEvalTransform`."""
    return ClipEvalTransform(img_size, mean, std, resize_ratio=resize_ratio, interpolation=interpolation)
