"""The objective contract: a registered ``nn.Module`` the engine trains without knowing what it is."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
from torch import nn

from vitssl.config import DataConfig, ObjectiveConfig
from vitssl.registry import OBJECTIVES

# Weight decay follows timm's rule (``param_groups_weight_decay``): no decay for 0-/1-D tensors (norm weights,
# biases, scales) and for the names a backbone lists in its ``no_weight_decay()`` (tokens, position embeddings,
# relative position-bias tables), the one source of truth for backbone parameters. Objectives add the >= 2-D
# tokens and tables of their own modules by full name in their ``param_groups``; nothing is matched by substring.


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: register an objective; its ``Config`` dataclass types the ``objective`` block."""

    def _add(cls: type[Objective]) -> type[Objective]:
        cls.name = name
        OBJECTIVES.register(name, cls)
        return cls

    return _add


def split_decay(
    named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float, no_decay: Collection[str] = ()
) -> list[dict[str, Any]]:
    """Two param groups: decayed weights, and 0-/1-D parameters plus the ``no_decay`` names without decay.

    Args:
        named_params: ``module.named_parameters()`` (or a selection); frozen parameters are left out.
        weight_decay: decay of the first group (the engine's schedule rescales it each step).
        no_decay: full parameter names that get no decay whatever their shape, e.g. ``backbone_no_decay(module)``.
    """
    decay, no_decay_params = [], []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name in no_decay:
            no_decay_params.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay_params, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def backbone_no_decay(module: nn.Module) -> set[str]:
    """Full names (in ``module.named_parameters()``) of what every submodule's ``no_weight_decay()`` lists.

    Backbones (and timm models) name their tokens, position embeddings and position-bias tables there; the
    outermost module that has the method answers for everything below it.

    Args:
        module: an objective, or any module holding backbones.
    """
    names: set[str] = set()
    owners: list[str] = []
    for prefix, sub in module.named_modules():
        if sub is module or any(prefix.startswith(f"{owner}.") for owner in owners):
            continue
        listed = getattr(sub, "no_weight_decay", None)
        if callable(listed):
            owners.append(prefix)
            names |= {f"{prefix}.{n}" for n in listed()}
    return names


class ImageTransform:
    """Picklable sample function applying an image transform and passing the target through."""

    def __init__(self, transform: Callable[[Any], Any]) -> None:
        self.transform = transform

    def __call__(self, image: Any, target: Any) -> tuple[Any, Any]:
        return self.transform(image), target

    def __repr__(self) -> str:  # part of the feature-cache key: describes the evaluation transform
        return f"ImageTransform({self.transform!r})"


class Objective(nn.Module):
    """Base class. Subclasses set ``Config``, build their modules in ``__init__`` and return a loss dict.

    Args:
        cfg: the objective's own config block (an instance of ``Config`` or an OmegaConf node of it).
        backbone_factory: returns a fresh backbone each call (momentum encoders build a second one).
    """

    Config: type[ObjectiveConfig] = ObjectiveConfig
    name: str = ""
    backbone: nn.Module
    # False for losses that contrast each sample with the rest of its batch (MoCo v3, CLIP): gradient
    # accumulation would compute them over batch / accum_steps samples, so the engine refuses accum_steps > 1.
    supports_accumulation: bool = True

    def __init__(self, cfg: Any, backbone_factory: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def setup(self, cfg: Any) -> None:
        """Run-level preparation, called by the engine once per run on every rank; default: nothing.

        The engine calls it with the full resolved config after building the objective and moving it to its
        device, before ``train_sample_fn``, for work that needs the data or the run folder (iGPT fits its palette
        and writes it into ``output_dir``).
        """

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Called by the engine after every optimizer step (momentum / EMA updates, clamps)."""

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer param groups by timm's rule: no decay on 0-/1-D parameters (norms, biases) and on what the
        backbone's ``no_weight_decay()`` names; objectives with tokens of their own add them by name."""
        return split_decay(self.named_parameters(), weight_decay, backbone_no_decay(self))

    def train_sample_fn(self, data_cfg: DataConfig) -> Callable[[Any, Any], Any]:  # pragma: no cover
        """Per-sample transform ``(image, target) -> sample`` for training (augmented views, tokens...)."""
        raise NotImplementedError

    def eval_sample_fn(self, data_cfg: DataConfig) -> Callable[[Any, Any], Any]:
        """Per-sample transform for frozen-feature evaluation: resize, centre crop, normalise."""
        from vitssl.data.transforms import eval_transform

        ratio = 1.0 if data_cfg.img_size < 96 else 256 / 224  # no resize margin on tiny images
        return ImageTransform(eval_transform(data_cfg.img_size, ratio, data_cfg.mean, data_cfg.std))

    def eval_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen features for k-NN / linear evaluation; default: the backbone's pooled embedding."""
        return self.backbone(images)
