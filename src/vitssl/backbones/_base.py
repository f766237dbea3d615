"""The interface every backbone family implements, and the registry the families add their variants to.

A backbone is a thin ``nn.Module`` around a timm model (ours for PVT v1, registered with timm too) kept as the
submodule ``model``: the wrapper's state-dict keys are timm's with a ``model.`` prefix, so exporting to timm's
layout is stripping that prefix.
"""

from __future__ import annotations

import abc
import difflib
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from vitssl.config import ConfigError
from vitssl.registry import Registry

_logger = logging.getLogger(__name__)

# parameter names (last part) that carry positions or tokens, which no_weight_decay() reports
_NO_DECAY_LEAVES = ("cls_token", "reg_token", "pos_embed", "relative_position_bias_table")
# passing these makes no sense for a headless feature extractor built without weights, and timm would get some twice
_RESERVED_KWARGS = (
    "num_classes",
    "pretrained",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "features_only",
    "checkpoint_path",
)
# options timm.create_model itself takes (layer-config switches) besides the model constructor's arguments
_CREATE_MODEL_KWARGS = ("scriptable", "exportable", "no_jit")
# the tiny variants the tests and CPU smoke runs use; listed only on request (`vitssl backbones --all`)
TEST_PREFIX = "test_"
# where create_backbone's options come from in a run, for the fixes the messages suggest
_KWARGS_KEY = "model.backbone_kwargs"


def is_test_variant(name: str) -> bool:
    """Whether ``name`` is one of the tiny ``test_*`` variants (registered, but hidden from users' lists)."""
    return name.startswith(TEST_PREFIX)


def to_2tuple(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``224`` -> ``(224, 224)``; ``(224, 160)`` and ``[224, 160]`` -> ``(224, 160)`` (height, width)."""
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


class Backbone(nn.Module, metaclass=abc.ABCMeta):
    """Common interface of all backbones: ``num_features``, ``forward(x) -> (B, C)`` (pooled embedding),
    ``forward_tokens(x) -> (B, N, C)`` (last-stage tokens) and ``forward_pyramid(x) -> [(B, C_i, H_i, W_i)]``.

    Subclasses build ``self.model`` (a timm-layout module) and set ``num_features``, ``num_prefix_tokens``,
    ``pyramid_strides``, ``pyramid_channels``, ``img_size``, ``in_chans``, ``dynamic_img_size`` and
    ``timm_kwargs``; they declare ``model_class`` and ``wrapper_kwargs``, so options that do not fit the family
    are refused before anything is built.

    Args:
        name: registry name this backbone was created under.
        timm_name: the name ``timm.create_model`` knows.
        defaults: the variant's settings (registered with the name), overridden by ``kwargs``.
        kwargs: the caller's settings, None values already dropped; ``create_backbone(name, **kwargs)`` rebuilds
            the same architecture.
    """

    family: str = ""
    # the model class whose constructor receives the timm kwargs: its signature says which options fit
    model_class: ClassVar[Callable[..., nn.Module] | None] = None
    # options the wrapper consumes itself before building the model
    wrapper_kwargs: ClassVar[tuple[str, ...]] = ()
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
            raise ConfigError(
                f"backbone {name!r}: {', '.join(reserved)} cannot be set on a backbone (backbones are headless and "
                "built without weights; load weights with load_backbone / load_backbone_state); "
                f"{_removal_hint(reserved)}"
            )
        self._check_options(name, kwargs)
        self.name = name
        self.timm_name = timm_name
        self.kwargs: dict[str, Any] = dict(kwargs)
        self.config: dict[str, Any] = {**defaults, **kwargs}

    @classmethod
    def accepted_kwargs(cls) -> set[str] | None:
        """Every option ``create_backbone`` passes on for this family; None when the constructor takes ``**kwargs``
        (then only timm can tell)."""
        if cls.model_class is None:
            return None
        params = inspect.signature(cls.model_class).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return None
        names = {p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL}
        return (names - set(_RESERVED_KWARGS)) | set(cls.wrapper_kwargs) | set(_CREATE_MODEL_KWARGS)

    @classmethod
    def _check_options(cls, name: str, kwargs: Mapping[str, Any]) -> None:
        """Refuse options the family does not take before building anything (timm would raise a bare TypeError)."""
        accepted = cls.accepted_kwargs()
        if accepted is None:
            return
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise options_error(name, unknown, sorted(accepted - set(_CREATE_MODEL_KWARGS)))

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
        """Recompute each transformer block's activations in the backward pass instead of keeping them (activation
        checkpointing, non-reentrant: ``torch.utils.checkpoint(..., use_reentrant=False)``), saving memory for
        one more forward; outputs and gradients are the same."""
        self.model.set_grad_checkpointing(enable)

    @abc.abstractmethod
    def transformer_blocks(self) -> list[nn.Module]:
        """The transformer blocks in forward order: the units activation checkpointing recomputes and FSDP shards
        one by one (``vitssl.engine.parallel``)."""

    def convert_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weights in another layout -> this model's timm layout (``load_backbone_state`` runs it on every load).

        The base drops a classification head the headless model lacks (as timm's pretrained loading does with
        ``num_classes=0``); families whose official checkpoints use other names map them first.

        Args:
            state_dict: weights, already without a ``model.`` prefix.
        """
        classifier = getattr(self.model, "pretrained_cfg", {}).get("classifier") or "head"
        heads = {c.split(".", 1)[0] for c in ((classifier,) if isinstance(classifier, str) else classifier)}
        own = self.model.state_dict().keys()
        return {k: v for k, v in state_dict.items() if k in own or k.split(".", 1)[0] not in heads}

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


class BackboneRegistry(Registry[Callable[..., Backbone]]):
    """The backbone registry; its unknown-name message leaves out the ``test_*`` variants users never need."""

    def unknown_message(self, name: str) -> str:
        # someone typing a test name (test_vitt) is shown the test names; everyone else the real ones
        shown = [n for n in self if is_test_variant(name) or not is_test_variant(n)]
        close = difflib.get_close_matches(name, shown, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        hidden = "" if is_test_variant(name) else f" (and the {TEST_PREFIX}* variants: vitssl backbones --all)"
        return f"unknown {self.kind} {name!r}.{hint} Valid names: {', '.join(shown)}{hidden}"


# name -> factory(**kwargs) -> Backbone; filled by the family modules, which `vitssl.backbones` imports (the first
# lookup imports it)
BACKBONES: BackboneRegistry = BackboneRegistry("backbone", providers=("vitssl.backbones",))


def _removal_hint(options: list[str]) -> str:
    """How a user removes options a recipe passes: ``~model.backbone_kwargs.NAME`` (or all of them)."""
    each = " ".join(f"~{_KWARGS_KEY}.{o}" for o in options)
    they, them = ("they come", "them") if len(options) > 1 else ("it comes", "it")
    return (
        f"{they} from {_KWARGS_KEY} in the recipe: delete {them} with {each} on the command line "
        f"(or every backbone option with ~{_KWARGS_KEY})"
    )


def options_error(name: str, unknown: list[str], accepted: list[str]) -> ConfigError:
    """The one-line error for options backbone ``name`` does not take, with close matches and the fix.

    Args:
        name: registry name.
        unknown: the options it does not take.
        accepted: the options it takes (for suggestions and the list).
    """
    shown = []
    for option in unknown:
        close = difflib.get_close_matches(option, accepted, n=1, cutoff=0.75)
        shown.append(f"{option} (did you mean {close[0]}?)" if close else option)
    return ConfigError(
        f"backbone {name!r} does not take the option{'s' if len(unknown) > 1 else ''} {', '.join(shown)}; "
        f"{_removal_hint(unknown)}. Options of {name!r}: {', '.join(accepted)}"
    )


def check_img_size(name: str, img_size: tuple[int, int], multiple: int, what: str, extra: str = "") -> None:
    """Raise a ConfigError naming the nearest valid size unless both sides of ``img_size`` are multiples.

    Args:
        name: registry name.
        img_size: (height, width).
        multiple: what each side must be a multiple of.
        what: the name of that constraint for the message, e.g. "the total patch stride".
        extra: an alternative fix appended to the message.
    """
    if not any(side % multiple for side in img_size):
        return
    nearest = tuple(max(multiple, (side + multiple // 2) // multiple * multiple) for side in img_size)
    if nearest[0] == nearest[1]:
        fix = (
            f"set data.img_size={nearest[0]}, the nearest multiple (or {_KWARGS_KEY}.img_size={nearest[0]} where the "
            "recipe sets the size there)"
        )
    else:
        fix = f"set {_KWARGS_KEY}.img_size=[{nearest[0]},{nearest[1]}], the nearest multiples"
    raise ConfigError(
        f"backbone {name!r}: img_size={tuple(img_size)} is not a multiple of {what} {multiple}; {fix}{extra}"
    )


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
        # option names were checked against the constructor beforehand, so a value is of the wrong kind
        raise ConfigError(
            f"backbone {backbone_name!r} (timm model {timm_name!r}) cannot be built with {dict(kwargs)}: {e}; "
            "check the values (per-stage options such as depths or num_heads take one value per stage), which come "
            f"from {_KWARGS_KEY} in the recipe (delete one with ~{_KWARGS_KEY}.NAME)"
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
