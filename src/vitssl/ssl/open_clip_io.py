"""The CLIP objective and open_clip, both ways: model configs, state-dict key maps, export folders, starting a run
from an open_clip checkpoint, and open_clip models for zero-shot / retrieval evaluation.

An objective's state dict maps one-to-one onto open_clip's ``CLIP`` (the flat text layout of its public
checkpoints)::

    backbone.model.*    <->  visual.*              (image tower open_clip: its VisionTransformer)
    backbone.model.*    <->  visual.trunk.*        (image tower timm: open_clip's TimmModel trunk)
    image_proj.weight   <->  visual.head.proj.weight
    text.*              <->  *                     (token_embedding, positional_embedding, transformer,
                                                    ln_final, text_projection)
    logit_scale         <->  logit_scale

An export folder holds ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) and
``open_clip_model.safetensors``; ``open_clip.create_model_and_transforms("local-dir:DIR")`` loads it. A timm
image tower names its trunk by a timm model name; the tiny ``test_*`` variants are registered with timm under
``vitssl_<name>`` when :mod:`vitssl.ssl._timm_names` is imported (this module does), and PVT v1 by
:mod:`vitssl.backbones`, so a process that loads such a folder imports ``vitssl.ssl.open_clip_io`` first.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from vitssl.backbones import create_backbone
from vitssl.config import ConfigError
from vitssl.errors import MissingFileError
from vitssl.io import atomic_dir, atomic_write, write_json
from vitssl.ssl._timm_names import timm_model_name
from vitssl.ssl.base import ImageTransform
from vitssl.ssl.clip_tokenizer import ClipTokenizer

if TYPE_CHECKING:  # the objective calls load_open_clip_weights: a runtime import back would be a cycle
    from vitssl.ssl.clip import Clip

_logger = logging.getLogger(__name__)

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# options that change no weight shape or key and are not part of a timm model name (open_clip's timm tower passes
# drop_path_rate itself, as timm_drop_path)
_RUNTIME_OPTIONS = frozenset(
    {"img_size", "drop_path_rate", "drop_rate", "proj_drop_rate", "attn_drop_rate", "pos_drop_rate", "patch_drop_rate"}
)


def _show(keys: list[str], limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "") if keys else "none"


def _plain(value: Any) -> Any:
    """Sequences as tuples, recursively (OmegaConf and JSON give lists where the model code was given tuples)."""
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return tuple(_plain(v) for v in value)
    return value


# --------------------------------------------------------------------------------------------------------------
# Model config
# --------------------------------------------------------------------------------------------------------------


def timm_tower_name(backbone: Any) -> str:
    """The timm model name open_clip's timm tower builds ``backbone``'s trunk with.

    open_clip passes a timm tower nothing but the name and the drop-path rate, so the backbone's architecture
    must be its registered variant's; anything else fails, naming the options that differ.
    """
    import timm

    name = timm_model_name(backbone.name)
    ours = {k: _plain(v) for k, v in backbone.timm_kwargs.items() if k not in _RUNTIME_OPTIONS}
    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False, num_classes=0)
        theirs = {
            k: _plain(v) for k, v in create_backbone(backbone.name).timm_kwargs.items() if k not in _RUNTIME_OPTIONS
        }
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    own = {k: tuple(v.shape) for k, v in backbone.model.state_dict().items()}
    ref = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    if differ or own != ref:
        shapes = sorted(k for k in own.keys() | ref.keys() if own.get(k) != ref.get(k))
        what = ", ".join(f"{k}={ours.get(k)!r}" for k in differ) or f"img_size={list(backbone.img_size)}"
        raise ConfigError(
            f"backbone {backbone.name!r} with {what} is not timm model {name!r} (weights differ at {_show(shapes)}), "
            "and open_clip's timm tower builds its trunk from a timm model name alone; export a run whose "
            "model.backbone_kwargs keep the variant's architecture (or register that architecture with timm)"
        )
    return name


def open_clip_model_cfg(model: Clip) -> dict[str, Any]:
    """open_clip's model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) of a CLIP objective."""
    cfg = model.cfg
    if model.vision_tower == "open_clip":
        vision_cfg = dict(model.backbone.open_clip_cfg)
    else:
        backbone = model.backbone
        size = tuple(int(s) for s in backbone.img_size)
        vision_cfg = {
            "timm_model_name": timm_tower_name(backbone),
            "timm_model_pretrained": False,
            "timm_pool": "",  # the trunk's own pooling, as the backbone's pooled embedding
            "timm_proj": "linear",
            "timm_proj_bias": False,
            "image_size": size[0] if size[0] == size[1] else list(size),
        }
        drop_path = backbone.timm_kwargs.get("drop_path_rate")
        if drop_path:
            vision_cfg["timm_drop_path"] = float(drop_path)
    text_cfg = {
        "context_length": int(cfg.context_length),
        "vocab_size": int(model.text.vocab_size),
        "width": int(cfg.text_width),
        "heads": int(cfg.text_heads),
        "layers": int(cfg.text_depth),
        "mlp_ratio": float(cfg.text_mlp_ratio),
    }
    return {"embed_dim": int(cfg.embed_dim), "vision_cfg": vision_cfg, "text_cfg": text_cfg}


# --------------------------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------------------------


def _visual_prefix(model: Clip) -> str:
    return "visual." if model.vision_tower == "open_clip" else "visual.trunk."


def to_open_clip_state_dict(model: Clip) -> dict[str, torch.Tensor]:
    """The objective's weights under open_clip ``CLIP``'s keys (detached, CPU, contiguous)."""
    visual = _visual_prefix(model)
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("backbone.model."):
            name = visual + key[len("backbone.model.") :]
        elif key == "image_proj.weight":
            name = "visual.head.proj.weight"
        elif key.startswith("text."):
            name = key[len("text.") :]
        elif key == "logit_scale":
            name = key
        else:
            raise KeyError(f"no open_clip key for CLIP objective weight {key!r}")
        out[name] = value.detach().to("cpu").contiguous()
    return out


def from_open_clip_state_dict(model: Clip, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip weights (``CLIP``'s flat text layout or ``CustomTextCLIP``'s ``text.*``) under the objective's
    keys; keys that belong to neither tower are kept as they are, so a strict load names them."""
    visual = _visual_prefix(model)
    text_keys = {k[len("text.") :] for k in model.state_dict() if k.startswith("text.")}
    out = {}
    for key, value in state_dict.items():
        key = key[len("module.") :] if key.startswith("module.") else key  # saved from a DDP-wrapped model
        if key.startswith(visual):
            name = "backbone.model." + key[len(visual) :]
        elif key == "visual.head.proj.weight" and model.vision_tower == "timm":
            name = "image_proj.weight"
        elif key == "logit_scale":
            name = key
            value = value.reshape(())  # some checkpoints hold it as a 1-element vector
        elif key.startswith("text.") and key[len("text.") :] in text_keys:
            name = key  # CustomTextCLIP's layout is ours
        elif key in text_keys:
            name = "text." + key
        else:
            name = f"<open_clip>{key}"  # belongs nowhere here: reported as unexpected
        out[name] = value
    return out


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """An open_clip state dict from a ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` file, or the weights file of
    an export folder (``open_clip_model.safetensors`` or the one open_clip would pick)."""
    from open_clip.factory import _find_checkpoint_in_dir
    from open_clip.factory import load_state_dict as open_clip_load

    path = Path(path)
    if path.is_dir():
        found = _find_checkpoint_in_dir(path)
        if found is None:
            raise MissingFileError(
                f"{path} holds no open_clip weights (*.safetensors, *.bin or *.pth); export one with "
                "`vitssl export open_clip RUN --out DIR`"
            )
        path = Path(found)
    elif not path.is_file():
        raise MissingFileError(
            f"open_clip checkpoint {str(path)!r} not found: give an export folder or a .safetensors/.pt state dict"
        )
    try:
        state = open_clip_load(str(path))
    except Exception as err:  # pickle, zip and safetensors readers raise many kinds
        raise ConfigError(f"{path} is not a readable open_clip state dict ({type(err).__name__}: {err})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} is not an open_clip state dict (a mapping of names to tensors)")
    return dict(state)


def check_config_matches(model: Clip, folder: Path) -> None:
    """Refuse an export folder whose ``open_clip_config.json`` describes another architecture, naming the keys."""
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        return
    theirs = json.loads(config_path.read_text(encoding="utf-8"))
    theirs = theirs.get("model_cfg", theirs)
    ours = open_clip_model_cfg(model)
    from dataclasses import asdict

    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    differ = []
    for part, defaults in (("vision_cfg", asdict(CLIPVisionCfg())), ("text_cfg", asdict(CLIPTextCfg()))):
        mine = {**defaults, **ours.get(part, {})}  # a key left out means open_clip's default
        other = {**defaults, **theirs.get(part, {})}
        differ += [
            f"{part}.{k}: {other.get(k)!r} (here {mine.get(k)!r})"
            for k in sorted(mine.keys() | other.keys())
            if _plain(mine.get(k)) != _plain(other.get(k)) and k not in ("timm_drop_path", "timm_model_pretrained")
        ]
    if ours["embed_dim"] != theirs.get("embed_dim"):
        differ.insert(0, f"embed_dim: {theirs.get('embed_dim')!r} (here {ours['embed_dim']!r})")
    if theirs.get("quick_gelu"):  # OpenAI-trained weights: an activation no state dict shows
        differ.insert(0, "quick_gelu: True (here False: the towers use GELU)")
    if differ:
        raise ConfigError(
            f"{config_path} is another architecture than this run's CLIP: {'; '.join(differ[:4])}"
            f"{f' (+{len(differ) - 4} more)' if len(differ) > 4 else ''}; set model.* / objective.* to match it"
        )


def load_open_clip_weights(model: Clip, path: str | os.PathLike) -> None:
    """Load an open_clip checkpoint into a CLIP objective, strictly: every key of both sides used, shapes equal.

    Args:
        model: the objective.
        path: an export folder (its config is compared too) or an open_clip state-dict file.

    Raises:
        ConfigError: one line naming the missing, unexpected and mis-shaped keys (open_clip's names).
    """
    path = Path(path)
    if path.is_dir():
        check_config_matches(model, path)
    converted = from_open_clip_state_dict(model, load_state_dict_file(path))
    own = model.state_dict()
    back = dict(zip(own, to_open_clip_state_dict(model)))  # our key -> open_clip key, for the message
    missing = [back[k] for k in own if k not in converted]
    unexpected = [k.removeprefix("<open_clip>") for k in converted if k not in own]
    shapes = [
        f"{back[k]} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in converted.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise ConfigError(
            f"open_clip checkpoint {path} does not match this CLIP ({model.vision_tower} image tower, "
            f"model.backbone={getattr(model.backbone, 'name', '?')!r}): missing {_show(missing)}; unexpected "
            f"{_show(unexpected)}; shapes {_show(shapes, 2)}. Configure the same architecture (model.backbone, "
            "model.backbone_kwargs, objective.embed_dim, objective.text_*, objective.vision_tower)"
        )
    with torch.no_grad():
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in converted.items()})


# --------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------


def export_open_clip(
    model: Clip, out_dir: str | os.PathLike, data_cfg: Any, source: str | None = None, step: int | None = None
) -> Path:
    """Write an open_clip folder (config + safetensors weights) that ``create_model_and_transforms('local-dir:')``
    loads; it replaces ``out_dir`` as a whole, or not at all.

    Args:
        model: a CLIP objective.
        out_dir: the folder.
        data_cfg: the run's ``data`` block: image size, mean and std of the evaluation preprocessing.
        source: what was exported (recorded in the config).
        step: the optimizer step of the checkpoint (recorded).
    """
    size = int(data_cfg.img_size)
    config: dict[str, Any] = {
        "model_cfg": open_clip_model_cfg(model),
        "preprocess_cfg": {
            "size": size,
            "mean": [float(m) for m in data_cfg.mean],
            "std": [float(s) for s in data_cfg.std],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    import vitssl

    config["vitssl"] = {"version": vitssl.__version__, "source": source, "step": step}
    tensors = to_open_clip_state_dict(model)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        write_json(config, tmp / CONFIG_FILE)
        atomic_write(tmp / WEIGHTS_FILE, safetensors_bytes(tensors, metadata={"format": "pt"}))
    _logger.info("exported CLIP (%d tensors) to %s", len(tensors), out)
    return out


# --------------------------------------------------------------------------------------------------------------
# open_clip models for evaluation
# --------------------------------------------------------------------------------------------------------------


class OpenClipModel(nn.Module):
    """An open_clip model with the interface zero-shot / retrieval evaluation uses (``tokenize``,
    ``encode_image``, ``encode_text``, ``eval_sample_fn``), tokenised by CLIP's BPE tokenizer.

    Args:
        model: the open_clip model.
        preprocess: its evaluation image transform.
        name: what was loaded, for messages.
    """

    def __init__(self, model: nn.Module, preprocess: Any, name: str) -> None:
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        self.name = name
        self.tokenizer = ClipTokenizer(int(getattr(model, "context_length", 77)))

    def tokenize(self, texts: Any) -> torch.Tensor:
        return self.tokenizer(texts).to(next(self.model.parameters()).device)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_image(images, normalize=normalize)  # (B, D)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=normalize)  # (B, D)

    def eval_sample_fn(self, data_cfg: Any = None) -> ImageTransform:
        """open_clip's own evaluation transform (the folder's or model's preprocessing; ``data_cfg`` is unused)."""
        return ImageTransform(self.preprocess)


def _refuse_downloads(model_cfg: Mapping[str, Any], what: str) -> None:
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        raise ConfigError(
            f"{what} has a Hugging Face text tower or tokenizer (hf_model_name / hf_tokenizer_name), which would be "
            "downloaded and vitssl never downloads; evaluate a CLIP with open_clip's own text tower"
        )


def load_open_clip_model(
    path: str | os.PathLike, model_name: str | None = None, device: torch.device | str = "cpu"
) -> OpenClipModel:
    """An open_clip model for evaluation: an export folder (``local-dir:``), or a state-dict file with the
    open_clip model name of its architecture (``ViT-B-16``, or a model config ``.json`` file, which open_clip
    then knows by the file's stem).

    Args:
        path: the folder or file.
        model_name: open_clip model name or config file; needed for a file, not allowed with a folder.
        device: where the model goes.
    """
    import open_clip
    from open_clip.factory import get_model_config

    path = Path(path)
    if path.is_dir():
        if model_name:
            raise ConfigError(f"{path} is an open_clip folder with its own config; drop --model {model_name}")
        if not (path / CONFIG_FILE).is_file():
            raise MissingFileError(
                f"{path} has no {CONFIG_FILE}: give a `vitssl export open_clip` folder, or a weights file with --model"
            )
        _refuse_downloads(json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")).get("model_cfg", {}), str(path))
        load_state_dict_file(path)  # a clear message when the folder holds no readable weights
        name, pretrained = f"local-dir:{path}", None
    else:
        if not path.is_file():
            raise MissingFileError(f"open_clip checkpoint {str(path)!r} not found")
        if not model_name:
            raise ConfigError(
                f"{path}: an open_clip state dict needs --model NAME, its open_clip architecture (e.g. ViT-B-16)"
            )
        if model_name.endswith(".json"):  # a model config file of one's own: open_clip registers it by its stem
            if not Path(model_name).is_file():
                raise MissingFileError(f"--model {model_name}: no such open_clip model config file")
            open_clip.add_model_config(model_name)
            model_name = Path(model_name).stem
        model_cfg = get_model_config(model_name)
        if model_cfg is None:
            import difflib

            close = difflib.get_close_matches(model_name, open_clip.list_models(), n=3)
            raise ConfigError(
                f"--model {model_name!r} is not an open_clip model name"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + "; see open_clip.list_models(), or pass local-dir:DIR of a folder holding open_clip_config.json"
            )
        _refuse_downloads(model_cfg, f"open_clip model {model_name!r}")
        name, pretrained = model_name, str(path)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, pretrained_text=False
        )
    except RuntimeError as err:  # open_clip's strict load: missing / unexpected keys, shape mismatches
        first = " ".join(str(err).split())[:400]
        raise ConfigError(f"open_clip cannot load {path} as {model_name or 'its folder config'}: {first}") from None
    return OpenClipModel(model.eval(), preprocess, str(path))


__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "OpenClipModel",
    "export_open_clip",
    "from_open_clip_state_dict",
    "load_open_clip_model",
    "load_open_clip_weights",
    "load_state_dict_file",
    "open_clip_model_cfg",
    "timm_tower_name",
    "to_open_clip_state_dict",
]
