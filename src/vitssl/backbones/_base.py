"""The interface every backbone family implements, and the registry the families add their variants to.

A backbone is a thin ``nn.Module`` around a timm model (ours for PVT v1, registered with timm too) kept as the
submodule ``model``: the wrapper's state-dict keys are timm's with a ``model.`` prefix, so exporting to timm's
layout is stripping that prefix.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from vitssl.registry import Registry

_logger = logging.getLogger(__name__)

# name -> factory(**kwargs) -> Backbone; filled by the family modules when `vitssl.backbones` is imported
BACKBONES: Registry[Callable[..., Backbone]] = Registry("backbone")

# parameter names (last part) that carry positions or tokens, which no_weight_decay() reports
_NO_DECAY_LEAVES = ("cls_token", "reg_token", "pos_embed", "relative_position_bias_table")
# passing these makes no sense for a headless feature extractor, and timm would get them twice
_RESERVED_KWARGS = ("num_classes", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "features_only")


def to_2tuple(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``224`` -> ``(224, 224)``; ``(224, 160)`` and ``[224, 160]`` -> ``(224, 160)`` (height, width)."""
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


class Backbone(nn.Module, metaclass=abc.ABCMeta):
    """Common interface of all backbones (see the Backbone contract in DESIGN.md).

    Subclasses build ``self.model`` (a timm-layout module) and set ``num_features``, ``num_prefix_tokens``,
    ``pyramid_strides``, ``pyramid_channels``, ``img_size``, ``in_chans``, ``dynamic_img_size`` and
    ``timm_kwargs``.

    Args:
        name: registry name this backbone was created under.
        timm_name: the name ``timm.create_model`` knows.
        defaults: the variant's settings (registered with the name), overridden by ``kwargs``.
        kwargs: the caller's settings, None values already dropped; ``create_backbone(name, **kwargs)`` rebuilds
            the same architecture.
    """

    family: str = ""
    model: nn.Module
    num_features: int
    num_prefix_tokens: int
    pyramid_strides: list[int]
    pyramid_channels: list[int]
    img_size: tuple[int, int]
    in_chans: int
    dynamic_img_size: bool
    timm_kwargs: dict[str, Any]

    def __init__(self, name: str, timm_name: str, defaults: Mapping[str, Any], kwargs: Mapping[str, Any]) -> None:
        super().__init__()
        reserved = sorted(set(kwargs) & set(_RESERVED_KWARGS))
        if reserved:
            raise TypeError(
                f"backbone {name!r}: {', '.join(reserved)} cannot be set on a backbone (backbones are headless and "
                "built without weights; load weights with load_backbone / load_backbone_state)"
            )
        self.name = name
        self.timm_name = timm_name
        self.kwargs: dict[str, Any] = dict(kwargs)
        self.config: dict[str, Any] = {**defaults, **kwargs}

    # --- the contract -------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (B, num_features) of images (B, in_chans, H, W)."""

    @abc.abstractmethod
    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage tokens after the final norm, (B, num_prefix_tokens + H_L * W_L, num_features)."""

    @abc.abstractmethod
    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale maps [(B, C_i, H / s_i, W / s_i)] for ``s_i`` in ``pyramid_strides``."""

    @abc.abstractmethod
    def forward_intermediate(self, x: torch.Tensor, n: int) -> list[torch.Tensor]:
        """Tokens (B, N, C) output by each of the last ``n`` blocks, with the final norm applied, oldest first."""

    # --- shared helpers -----------------------------------------------------------------------------------------

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict in timm's key layout (what ``timm.create_model(self.timm_name, **self.timm_kwargs)`` loads)."""
        return self.model.state_dict()

    def no_weight_decay(self) -> set[str]:
        """Names (in this module's ``named_parameters``) of tokens, position embeddings and position-bias tables."""
        params = {n for n, _ in self.named_parameters()}
        own = getattr(self.model, "no_weight_decay", None)
        names = {f"model.{n}" for n in (own() if own is not None else ())}
        names |= {n for n in params if n.rsplit(".", 1)[-1] in _NO_DECAY_LEAVES}
        return names & params  # timm lists names a model may lack (e.g. ViT's dist_token)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory."""
        self.model.set_grad_checkpointing(enable)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, timm_name={self.timm_name!r}"

    def _check_input(self, x: torch.Tensor, multiple: int) -> tuple[int, int]:
        """Validate an image batch; return its (H, W).

        Args:
            x: the batch.
            multiple: H and W must be multiples of this (the patch size or total stride).
        """
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"backbone {self.name!r} takes (B, {self.in_chans}, H, W) inputs, got {tuple(x.shape)}"
                + (" (set in_chans to match)" if x.ndim == 4 else "")
            )
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if not self.dynamic_img_size and (h, w) != tuple(self.img_size):
            raise ValueError(
                f"backbone {self.name!r} was built for {self.img_size[0]}x{self.img_size[1]} inputs, got {h}x{w}: "
                f"create it with img_size=({h}, {w}), or with dynamic_img_size=True to accept any size whose "
                f"sides are multiples of {multiple}"
            )
        if h % multiple or w % multiple:
            raise ValueError(
                f"backbone {self.name!r} needs input sides that are multiples of {multiple}, got {h}x{w}: "
                "resize or pad the images"
            )
        return h, w


def check_min_input_size(name: str, h: int, w: int, min_size: int) -> None:
    """Raise a clear error when an input side is below ``min_size`` (PVT's spatial-reduction convs need a grid of at
    least their kernel in every stage).

    Args:
        name: backbone name for the message.
        h: input height.
        w: input width.
        min_size: smallest side the backbone takes.
    """
    if min(h, w) < min_size:
        raise ValueError(
            f"backbone {name!r} needs inputs of at least {min_size}x{min_size} "
            f"(its spatial-reduction convs would get an empty grid), got {h}x{w}"
        )


def check_last_blocks(name: str, n: int, available: int, where: str) -> None:
    """Raise a clear error unless 1 <= n <= available.

    Args:
        name: backbone name for the message.
        n: requested number of blocks.
        available: number of blocks that can be returned.
        where: which blocks those are, for the message.
    """
    if not 1 <= n <= available:
        raise ValueError(
            f"backbone {name!r}: forward_intermediate(x, n={n}) needs 1 <= n <= {available} "
            f"(the number of blocks in {where}, whose tokens share one shape)"
        )


def create_timm_model(backbone_name: str, timm_name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Build a headless timm model without weights, turning timm's unknown-argument errors into clear ones.

    Args:
        backbone_name: registry name, for the message.
        timm_name: timm model name.
        kwargs: model kwargs.
    """
    import timm

    try:
        return timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as e:
        raise TypeError(
            f"backbone {backbone_name!r} (timm model {timm_name!r}) does not accept the options {sorted(kwargs)}: {e}"
        ) from e


def register_variant(
    name: str, cls: type[Backbone], timm_name: str, doc: str = "", **defaults: Any
) -> Callable[..., Backbone]:
    """Register ``name``: ``cls`` over timm model ``timm_name``, with ``defaults`` under the caller's kwargs.

    Args:
        name: registry key.
        cls: wrapper class of the family.
        timm_name: timm model name.
        doc: one line describing the variant (shown by ``help(factory)``).
        **defaults: variant settings (e.g. the tiny test widths) that the caller's kwargs override.
    """

    spec = (f"{cls.__module__}.{cls.__qualname__}", timm_name, defaults)
    if name in BACKBONES and getattr(BACKBONES.get(name), "spec", None) == spec:
        return BACKBONES.get(name)  # the defining module ran twice (e.g. reloaded): keep the first registration

    def factory(**kwargs: Any) -> Backbone:
        return cls(name, timm_name, defaults, kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc or f"{cls.family} backbone over timm's {timm_name}."
    factory.family = cls.family  # type: ignore[attr-defined]
    factory.timm_name = timm_name  # type: ignore[attr-defined]
    factory.spec = spec  # type: ignore[attr-defined]
    BACKBONES.register(name, factory)
    return factory
