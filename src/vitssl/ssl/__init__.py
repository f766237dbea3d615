"""Self-supervised objectives. Each is one file plus the import line below that registers it."""

from vitssl.ssl import clip, igpt, moco_v3, supervised  # noqa: F401  (each import registers an objective)
from vitssl.ssl.base import OBJECTIVES, ImageTransform, Objective, register_objective, split_decay

__all__ = ["OBJECTIVES", "ImageTransform", "Objective", "register_objective", "split_decay"]
