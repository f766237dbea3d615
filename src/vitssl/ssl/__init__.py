"""Self-supervised objectives. Each is one file plus the import line below that registers it."""

from vitssl.ssl.base import OBJECTIVES, ImageTransform, Objective, register_objective, split_decay
from vitssl.ssl import moco_v3, supervised  # noqa: F401  (each import registers an objective)

__all__ = ["OBJECTIVES", "ImageTransform", "Objective", "register_objective", "split_decay"]
