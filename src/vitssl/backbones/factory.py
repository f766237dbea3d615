"""Create, list, describe, save and load backbones by registry name."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from vitssl.backbones._base import BACKBONES, TEST_PREFIX, Backbone, is_test_variant
from vitssl.io import atomic_write
from vitssl.registry import UnknownNameError

_logger = logging.getLogger(__name__)

# safetensors metadata keys (values are strings; kwargs are JSON)
_META_NAME = "vitssl.backbone"
_META_KWARGS = "vitssl.backbone_kwargs"
_META_TIMM_NAME = "timm.model_name"
_META_TIMM_KWARGS = "timm.model_kwargs"
_MODEL_PREFIX = "model."


def create_backbone(name: str, **kwargs: Any) -> Backbone:
    """Build the backbone registered as ``name`` (random init, never downloads weights).

    Args:
        name: a registry name, see ``list_backbones()``; unknown names fail with the valid ones.
        **kwargs: options of the family (``img_size``, ``in_chans``, ``drop_path_rate``, timm model kwargs, ...);
            a value of None means "the model's default" and is dropped.
    """
    factory = BACKBONES.get(name)
    return factory(**{k: v for k, v in kwargs.items() if v is not None})


def list_backbones(pattern: str = "*") -> list[str]:
    """Sorted registry names matching a shell-style wildcard, e.g. ``"vit_*"`` or ``"test_*"``."""
    return BACKBONES.list(pattern)


def _to_json(value: Mapping[str, Any], what: str) -> str:
    try:
        return json.dumps(dict(value), sort_keys=True)
    except TypeError as e:
        raise TypeError(f"cannot record the {what} {dict(value)!r} in the weight file: {e}; use plain values") from e


def _from_json(text: str) -> dict[str, Any]:
    """JSON kwargs back to Python, lists as tuples (as the model code was given them)."""

    def tuples(v: Any) -> Any:
        return tuple(tuples(i) for i in v) if isinstance(v, list) else v

    return {k: tuples(v) for k, v in json.loads(text).items()}


def save_backbone(backbone: Backbone, path: str | os.PathLike[str]) -> Path:
    """Write the weights as safetensors in timm's key layout, with what is needed to rebuild as metadata.

    The file loads into timm alone: ``timm.create_model(backbone.timm_name, pretrained=True,
    pretrained_cfg_overlay=dict(file=path), num_classes=0, **backbone.timm_kwargs)`` (for ``pvt_*``, after
    ``import vitssl.backbones``), or into a backbone with ``load_backbone(path)``.

    Args:
        backbone: a backbone from ``create_backbone``.
        path: output file; must end in ``.safetensors`` (timm picks the format by that suffix).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: backbone weights are written as safetensors; name the file '*.safetensors'")
    metadata = {
        "format": "pt",
        _META_NAME: backbone.name,
        _META_KWARGS: _to_json(backbone.kwargs, "backbone kwargs"),
        _META_TIMM_NAME: backbone.timm_name,
        _META_TIMM_KWARGS: _to_json(backbone.timm_kwargs, "timm model kwargs"),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in backbone.timm_state_dict().items()}
    # safetensors' save_file creates its file with mode 0600; the atomic write gives 0644 less the umask, like the
    # run's other files, and a reader never sees half a file.
    atomic_write(path, safetensors_bytes(tensors, metadata=metadata))
    _logger.info("saved backbone %s (%d tensors) to %s", backbone.name, len(tensors), path)
    return path


def read_backbone_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``save_backbone`` recorded: ``name``, ``kwargs``, ``timm_name``, ``timm_kwargs``.

    Args:
        path: a file written by ``save_backbone``.
    """
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    missing = [k for k in (_META_NAME, _META_KWARGS, _META_TIMM_NAME, _META_TIMM_KWARGS) if k not in meta]
    if missing:
        raise ValueError(
            f"{path}: not a vitssl backbone file (metadata lacks {', '.join(missing)}); "
            "write it with vitssl.backbones.save_backbone, or build the backbone yourself and use load_backbone_state"
        )
    return {
        "name": meta[_META_NAME],
        "kwargs": _from_json(meta[_META_KWARGS]),
        "timm_name": meta[_META_TIMM_NAME],
        "timm_kwargs": _from_json(meta[_META_TIMM_KWARGS]),
    }


def load_backbone(path: str | os.PathLike[str], **overrides: Any) -> Backbone:
    """Rebuild a backbone saved by ``save_backbone`` and load its weights.

    Args:
        path: the ``.safetensors`` file.
        **overrides: kwargs replacing the recorded ones (e.g. ``img_size`` for another input size,
            ``drop_path_rate=0.0``); None values are dropped.
    """
    meta = read_backbone_metadata(path)
    backbone = create_backbone(meta["name"], **{**meta["kwargs"], **overrides})
    load_backbone_state(backbone, load_file(str(path)))
    return backbone


def load_backbone_state(
    backbone: Backbone, state_dict: Mapping[str, torch.Tensor], prefix: str = "", strict: bool = True
) -> torch.nn.modules.module._IncompatibleKeys:
    """Load weights in timm's layout, the backbone's own (``model.``-prefixed) layout, or a family's official one.

    Official layouts are mapped by ``backbone.convert_state_dict`` (PVT v1: ``patch_embed1``, ``block1.0``, ...);
    a classification head the backbone lacks is dropped, as timm's pretrained loading does.

    Args:
        backbone: the target.
        state_dict: the weights; a checkpoint dict holding them under ``model`` or ``state_dict`` (an official
            checkpoint file, a vitssl training checkpoint) is unwrapped first.
        prefix: take only keys under this prefix, stripped first, e.g. ``"backbone."`` for the ``model`` entry of
            a training checkpoint (the objective's state dict).
        strict: fail on missing or unexpected keys (after the prefixes are stripped).
    """
    for key in ("model", "state_dict"):
        if isinstance(state_dict.get(key), Mapping):
            state_dict = state_dict[key]
            break
    if prefix:
        picked = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not picked:
            sample = ", ".join(list(state_dict)[:5])
            raise KeyError(f"no weights under prefix {prefix!r}; the state dict's keys start like: {sample}")
        state_dict = picked
    if state_dict and all(k.startswith(_MODEL_PREFIX) for k in state_dict):
        state_dict = {k[len(_MODEL_PREFIX) :]: v for k, v in state_dict.items()}
    result = backbone.model.load_state_dict(backbone.convert_state_dict(state_dict), strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "") if keys else "none"

        raise KeyError(
            f"weights do not match backbone {backbone.name!r} built with {backbone.kwargs}: missing "
            f"{show(result.missing_keys)}; unexpected {show(result.unexpected_keys)}. Build the backbone with the "
            "kwargs the weights were trained with (load_backbone reads them from a saved file)"
        )
    return result


def describe_backbone(name: str, **kwargs: Any) -> dict[str, Any]:
    """Parameter count, feature width, pyramid strides etc. of a backbone, built on the meta device (no memory).

    Args:
        name: registry name.
        **kwargs: as for ``create_backbone``.
    """
    with torch.device("meta"):
        backbone = create_backbone(name, **kwargs)
    return {
        "name": name,
        "family": backbone.family,
        "timm_name": backbone.timm_name,
        "params": sum(p.numel() for p in backbone.parameters()),
        "trainable_params": sum(p.numel() for p in backbone.parameters() if p.requires_grad),
        "num_features": backbone.num_features,
        "num_prefix_tokens": backbone.num_prefix_tokens,
        "pyramid_strides": list(backbone.pyramid_strides),
        "pyramid_channels": list(backbone.pyramid_channels),
        "img_size": list(backbone.img_size),
        "in_chans": backbone.in_chans,
    }


def _format_count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def format_backbone_table(pattern: str = "*", include_test: bool = False) -> str:
    """A text table of the backbones matching ``pattern`` (for ``vitssl backbones [PATTERN] [--all]``).

    Args:
        pattern: shell-style wildcard over registry names.
        include_test: also list the tiny ``test_*`` variants (for tests and CPU smoke runs).
    """
    matches = list_backbones(pattern)
    names = [n for n in matches if include_test or not is_test_variant(n)]
    if not names:
        if matches:  # only hidden test variants match
            raise UnknownNameError(
                f"only {TEST_PREFIX}* variants match {pattern!r}, and those tiny test models are listed only on "
                "request: add --all (include_test=True)"
            )
        shown = [n for n in list_backbones() if include_test or not is_test_variant(n)]
        hidden = "" if include_test else f" (and the {TEST_PREFIX}* variants: --all)"
        raise UnknownNameError(
            f"no backbone matches {pattern!r} (a shell-style wildcard such as 'vit_*' or 'pvt*'). "
            f"Valid names: {', '.join(shown)}{hidden}"
        )
    header = ("name", "family", "params", "features", "strides", "input", "timm model")
    rows = [header]
    for name in names:
        d = describe_backbone(name)
        rows.append(
            (
                name,
                d["family"],
                _format_count(d["params"]),
                str(d["num_features"]),
                ",".join(map(str, d["pyramid_strides"])),
                "x".join(map(str, d["img_size"])),
                d["timm_name"],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
