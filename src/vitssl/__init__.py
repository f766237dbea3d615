"""vitssl: self-supervised pretraining of vision transformers.

``import vitssl`` is light (no torch): the command line answers ``--help`` and ``--version`` at once, and each
command imports what it needs. ``import vitssl.backbones`` registers vitssl's backbones, PVT v1 among them,
with timm, so that ``timm.create_model("pvt_small")`` works after it.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
