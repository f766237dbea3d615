"""Every registered vitssl backbone as a ``timm.create_model`` name, so open_clip's timm tower
(``vision_cfg.timm_model_name``) can build it.

A variant that is a timm model under its own name with no settings of its own is reached by that name
(``vit_base_patch16_224``, ``swin_tiny_patch4_window7_224``, and ``pvt_small`` once :mod:`vitssl.backbones` is
imported). Importing this module registers the others (the tiny ``test_*`` variants) as ``vitssl_<name>``:
``timm.create_model("vitssl_test_pvt", **kwargs)`` builds the variant's timm model with its registered settings
under ``kwargs``. The prefix keeps them apart from timm's own models of the same name (timm has a ``test_vit``
of other sizes). timm lists the names it registers in this module's ``__all__``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm
import torch
from torch import nn

from vitssl.backbones import BACKBONES, create_backbone, list_backbones

__all__: list[str] = []


def _entrypoint(name: str, timm_name: str) -> Callable[..., nn.Module]:
    def build(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained:
            raise ValueError(f"vitssl backbone {name!r} has no pretrained weights to download")
        with torch.device("meta"):  # the variant's settings as timm receives them, without allocating it
            settings = create_backbone(name).timm_kwargs
        return timm.create_model(BACKBONES.get(name).timm_name, pretrained=False, **{**settings, **kwargs})

    build.__name__ = build.__qualname__ = timm_name
    build.__module__ = __name__
    build.__doc__ = f"vitssl backbone {name!r} (timm model {BACKBONES.get(name).timm_name!r} with its settings)."
    return build


PREFIX = "vitssl_"


def timm_model_name(name: str) -> str:
    """The ``timm.create_model`` name of registered backbone ``name`` (with its registered settings)."""
    factory = BACKBONES.get(name)
    _, timm_name, defaults = factory.spec
    return name if timm_name == name and not defaults else PREFIX + name


def register_backbones_with_timm() -> list[str]:
    """Register every backbone that timm cannot build by its own name; returns the timm names added (none on a
    second call)."""
    added = []
    for name in list_backbones():
        timm_name = timm_model_name(name)
        if not timm.models.is_model(timm_name):
            timm.models.register_model(_entrypoint(name, timm_name))
            added.append(timm_name)
    return added


register_backbones_with_timm()
