"""Image datasets, per-sample transforms and multi-view wrappers.

``build_dataset(name, root, split, **options)`` builds any registered dataset (``list_datasets()``); items are
``(PIL RGB image, target)`` with an int label, or a caption for image-text sets. ``TransformedDataset`` applies a
sample function under per-(seed, epoch, index) random seeds; ``MultiView`` makes the views objectives train on.
"""

from vitssl.data import cifar, digits, folder, image_text, shapes, shards  # noqa: F401  (register the datasets)
from vitssl.data.cifar import CIFAR10, CIFAR100
from vitssl.data.common import (
    DATASETS,
    IMG_EXTENSIONS,
    CorruptImageError,
    ImageDataset,
    build_dataset,
    build_dataset_config,
    check_dataset_options,
    dataset_parameters,
    list_datasets,
    open_rgb,
)
from vitssl.data.digits import Digits
from vitssl.data.folder import ImageFolder
from vitssl.data.image_text import ImageTextCSV, WebDataset, expand_braces
from vitssl.data.shapes import PALETTE, SHAPE_CLASSES, Shapes, ShapesCaptions
from vitssl.data.shards import ShardStream, is_stream
from vitssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, blur_kernel_size, eval_transform, moco_v3_views
from vitssl.data.wrappers import MultiView, SingleView, TransformedDataset, collate_skip_none, sample_seed

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "PALETTE",
    "SHAPE_CLASSES",
    "CorruptImageError",
    "Digits",
    "ImageDataset",
    "ImageFolder",
    "ImageTextCSV",
    "MultiView",
    "Shapes",
    "ShapesCaptions",
    "ShardStream",
    "SingleView",
    "TransformedDataset",
    "WebDataset",
    "blur_kernel_size",
    "build_dataset",
    "build_dataset_config",
    "check_dataset_options",
    "collate_skip_none",
    "dataset_parameters",
    "eval_transform",
    "expand_braces",
    "is_stream",
    "list_datasets",
    "moco_v3_views",
    "open_rgb",
    "sample_seed",
]
