"""vitssl: self-supervised pretraining of vision transformers.

Importing the package registers vitssl's backbones (including PVT v1) with timm, so that
``timm.create_model("pvt_small")`` works after ``import vitssl``.
"""

__version__ = "0.1.0"

from vitssl import backbones  # registers the backbones with timm

__all__ = ["__version__", "backbones"]
