"""CLIP (Radford et al., 2021) built from open_clip's own modules: an image tower and a text tower matched
contrastively, with state dicts that map one-to-one onto open_clip's ``CLIP`` model.

- Image tower (``objective.vision_tower``):

  * ``open_clip``: open_clip's ``VisionTransformer`` (patch conv without bias, class token, learned position
    table, ``ln_pre``, pre-norm blocks, ``ln_post`` on the class token, projection ``proj``), sized from the
    ``vit_*`` backbone the run names, so ``clip_vit_base`` *is* open_clip's ViT-B-16. It sits in
    :class:`OpenClipViT`, which gives it the backbone contract (pooled / token / pyramid features) that
    frozen-feature evaluation uses.
  * ``timm``: the registered backbone (any family: PVT, Swin, ViT as timm builds it) as the trunk of open_clip's
    timm tower (``TimmModel``: trunk, its own pooling, a linear projection without bias, ``image_proj``).
  * ``auto`` (default): ``open_clip`` for ``vit`` backbones, ``timm`` for the others.

- Text tower: open_clip's ``TextTransformer`` (BPE tokens, context 77, vocabulary shipped inside ``open_clip``,
  never downloaded; token + learned position embedding, pre-norm causal blocks, ``ln_final``, the feature at the
  end-of-text token, ``text_projection``), run only up to the batch's last end-of-text column (exact under the
  causal mask).
- Loss: :func:`vitssl.ssl.losses.clip_loss`, the symmetric cross-entropy over the image–text similarities of
  L2-normalised features times a learned ``exp(logit_scale)`` (open_clip's ``ClipLoss``, checked against it in
  the tests, single-process and on 2 ranks); ``logit_scale`` starts at ln(1/0.07) and is clamped to
  [0, ln 100] after every optimizer step (``on_step_end``), as open_clip's training loop does. Features of all
  ranks are gathered *with* gradient by default, so a DDP run has exactly the gradients of one process on the
  global batch; ``local_loss`` scores each rank's rows only (N × N·W logits instead of (N·W)²).

``objective.init_from`` starts a run from an open_clip checkpoint of the same architecture (a ``vitssl export
open_clip`` folder, or an open_clip ``.pt`` / ``.safetensors`` state dict); :mod:`vitssl.ssl.open_clip_io` maps
the keys both ways.

Samples are ``(image tensor, token ids)``: the training transform is open_clip's (RandomResizedCrop with scale
0.9–1, bicubic, no flip: a flip would contradict captions that say "on the left"), then the caption is
tokenised in the data-loading worker.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer as _OpenClipTextTransformer
from open_clip.transformer import VisionTransformer as _OpenClipVisionTransformer
from open_clip.transformer import text_global_pool
from torch import nn
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from vitssl.config import ConfigError, DataConfig, ObjectiveConfig
from vitssl.ssl.base import ImageTransform, Objective, register_objective
from vitssl.ssl.clip_tokenizer import ClipTokenizer
from vitssl.ssl.losses import clip_loss

_logger = logging.getLogger(__name__)

# CLIP's (and open_clip's) image normalisation; the recipes set data.mean / data.std to these.
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


VISION_TOWERS = ("auto", "open_clip", "timm")


@dataclass
class ClipConfig(ObjectiveConfig):
    name: str = "clip"
    embed_dim: int = 512  # width of the joint image-text embedding space
    # image tower: open_clip (its VisionTransformer, vit_* backbones only), timm (the registered backbone as
    # open_clip's timm-tower trunk), auto (open_clip for vit_* backbones, timm for the other families)
    vision_tower: str = "auto"
    context_length: int = 77  # text tokens per caption, start and end tokens included (CLIP: 77)
    text_width: int = 512  # text transformer width
    text_depth: int = 12  # text transformer blocks
    text_heads: int = 8  # attention heads (text_width must be divisible by them)
    text_mlp_ratio: float = 4.0  # MLP hidden width / text_width
    init_temperature: float = 0.07  # logit_scale starts at ln(1 / init_temperature)
    max_logit_scale: float = 100.0  # exp(logit_scale) is clamped to at most this after every optimizer step
    gather_with_grad: bool = True  # gather other ranks' features with gradient (exact global-batch gradients)
    local_loss: bool = False  # each rank scores only its own rows against all columns (less memory)
    trim_padding: bool = True  # drop padding columns past the last end-of-text token (exact; false for compile)
    crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])  # RandomResizedCrop area (open_clip)
    # open_clip checkpoint of this architecture to start from (strict): a `vitssl export open_clip` folder, or an
    # open_clip .pt/.pth/.bin/.safetensors state dict; a resumed run then loads its own weights over it
    init_from: str | None = None


# vit_* backbone options open_clip's VisionTransformer has a counterpart for (the rest would be silently lost)
_VIT_OPTIONS = frozenset({"img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "in_chans"})
_ZERO_OPTIONS = ("drop_path_rate", "drop_rate", "proj_drop_rate", "attn_drop_rate", "pos_drop_rate")


def resolve_vision_tower(cfg: ClipConfig, family: str) -> str:
    """``open_clip`` or ``timm``: the image tower ``cfg.vision_tower`` gives a backbone of ``family``."""
    if cfg.vision_tower not in VISION_TOWERS:
        raise ConfigError(
            f"objective.vision_tower={cfg.vision_tower!r}; choose one of {', '.join(VISION_TOWERS)} (auto: open_clip's"
            " VisionTransformer for vit_* backbones, open_clip's timm tower for the others)"
        )
    if cfg.vision_tower == "auto":
        return "open_clip" if family == "vit" else "timm"
    if cfg.vision_tower == "open_clip" and family != "vit":
        raise ConfigError(
            f"objective.vision_tower=open_clip builds open_clip's VisionTransformer, which needs a vit_* backbone "
            f"(model.backbone is a {family} one); use objective.vision_tower=timm (or auto)"
        )
    return cfg.vision_tower


class OpenClipViT(nn.Module):
    """open_clip's ``VisionTransformer`` (kept as ``model``, projection ``model.proj`` included) with the backbone
    contract: ``forward`` is the pooled embedding *before* the projection, as every vitssl backbone's.

    Its weights are open_clip's layout, not timm's, so the engine's ``backbone.safetensors`` export skips it
    (``timm_state_dict`` raises TypeError); ``vitssl export open_clip`` writes the whole model instead.

    Args:
        name: the ``vit_*`` registry name the run named (kept for messages and the feature cache).
        kwargs: that backbone's options as the run gave them.
        img_size: input (height, width).
        patch_size: square patch side.
        width: token width.
        depth: transformer blocks.
        heads: attention heads.
        mlp_ratio: MLP hidden width / width.
        embed_dim: output width of ``model.proj`` (the joint embedding).
    """

    family = "vit"

    def __init__(
        self,
        name: str,
        kwargs: dict[str, Any],
        img_size: tuple[int, int],
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        embed_dim: int,
    ) -> None:
        super().__init__()
        self.name, self.kwargs = name, dict(kwargs)
        self.timm_name, self.timm_kwargs = "", {}
        self.model = _OpenClipVisionTransformer(
            image_size=img_size,
            patch_size=patch_size,
            width=width,
            layers=depth,
            heads=heads,
            mlp_ratio=mlp_ratio,
            output_dim=embed_dim,
        )
        self.img_size = tuple(int(s) for s in img_size)
        self.patch_size = int(patch_size)
        self.in_chans = 3
        self.num_features = width
        self.num_prefix_tokens = 1
        self.depth = depth
        self.dynamic_img_size = False
        self.pyramid_strides = [self.patch_size]
        self.pyramid_channels = [width]
        self.open_clip_cfg = {
            "image_size": list(self.img_size) if self.img_size[0] != self.img_size[1] else self.img_size[0],
            "patch_size": self.patch_size,
            "width": width,
            "layers": depth,
            "head_width": width // heads,
            "mlp_ratio": mlp_ratio,
        }

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"backbone {self.name!r} (open_clip's VisionTransformer) takes (B, 3, {self.img_size[0]}, "
                f"{self.img_size[1]}) images, got {tuple(x.shape)}"
            )

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """Block outputs (B, 1 + N, C) before ``ln_post`` (open_clip's embedding step, then its blocks)."""
        self._check(x)
        return self.model.transformer(self.model._embeds(x))  # (B, 1 + N, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (B, C): the class token after ``ln_post``, before the projection."""
        pooled, _ = self.model._pool(self._run(x))  # (B, C)
        return pooled

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Joint-space embedding (B, embed_dim) of pooled features (B, C): open_clip's ``pooled @ proj``."""
        return pooled @ self.model.proj  # (B, embed_dim)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after ``ln_post``, class token first (B, 1 + N, C)."""
        return self.model.ln_post(self._run(x))  # (B, 1 + N, C)

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One map (B, C, H / p, W / p) of the normed patch tokens."""
        tokens = self.forward_tokens(x)[:, 1:]  # (B, N, C)
        gh, gw = self.model.grid_size
        return [tokens.reshape(x.shape[0], gh, gw, -1).permute(0, 3, 1, 2).contiguous()]  # [(B, C, gh, gw)]

    def forward_intermediate(self, x: torch.Tensor, n: int) -> list[torch.Tensor]:
        """Tokens (B, 1 + N, C) of the last ``n`` blocks, each through ``ln_post``, oldest first."""
        if not 1 <= n <= self.depth:
            raise ValueError(f"backbone {self.name!r}: forward_intermediate(x, n={n}) needs 1 <= n <= {self.depth}")
        self._check(x)
        _, outs = self.model.transformer.forward_intermediates(self.model._embeds(x), indices=n)
        return [self.model.ln_post(t) for t in outs]  # n x (B, 1 + N, C)

    def no_weight_decay(self) -> set[str]:
        """The class token and the position table (open_clip's own list)."""
        return {f"model.{n}" for n in self.model.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        raise TypeError(
            f"backbone {self.name!r} is open_clip's VisionTransformer (open_clip's key layout, not timm's); "
            "export the run with `vitssl export open_clip RUN --out DIR`"
        )

    def extra_repr(self) -> str:
        return f"name={self.name!r}, open_clip VisionTransformer {self.open_clip_cfg}"


def _build_open_clip_vit(ref: Any, embed_dim: int) -> OpenClipViT:
    """open_clip's VisionTransformer sized as the configured ``vit_*`` backbone ``ref`` (built on the meta device),
    refusing options open_clip's model has no counterpart for."""
    name, kwargs = getattr(ref, "name", "?"), dict(getattr(ref, "kwargs", {}))
    unknown = sorted(k for k in kwargs if k not in _VIT_OPTIONS and k not in _ZERO_OPTIONS)
    nonzero = sorted(k for k in _ZERO_OPTIONS if kwargs.get(k))
    if unknown or nonzero or ref.in_chans != 3:
        what = ", ".join([*unknown, *(f"{k}={kwargs[k]}" for k in nonzero)] or [f"in_chans={ref.in_chans}"])
        raise ConfigError(
            f"model.backbone_kwargs {what}: open_clip's VisionTransformer (objective.vision_tower=open_clip, the "
            f"default for vit_* backbones) has no such option; remove it, or set objective.vision_tower=timm to train "
            f"the timm {name!r} itself"
        )
    block = ref.model.blocks[0]
    return OpenClipViT(
        name,
        kwargs,
        tuple(ref.img_size),
        int(ref.patch_size[0]),
        int(ref.num_features),
        int(ref.depth),
        int(block.attn.num_heads),
        block.mlp.fc1.out_features / ref.num_features,
        embed_dim,
    )


class TextTransformer(_OpenClipTextTransformer):
    """open_clip's ``TextTransformer``, run only up to the batch's last end-of-text column.

    Exact under the causal mask (no kept position attends to a later one), and ~6× cheaper on short captions
    padded to 77 tokens; ``trim_padding = False`` runs every column, as open_clip does.
    """

    trim_padding: bool = True

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Projected end-of-text features ``(B, embed_dim)`` of token ids ``(B, L)``, L ≤ context_length."""
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(
                f"text tokens must be (B, L) with L <= context_length={self.context_length}, got {tuple(tokens.shape)}"
            )
        if self.trim_padding:
            eot = tokens.argmax(dim=-1)  # (B,) end-of-text has the largest id of the vocabulary
            tokens = tokens[:, : int(eot.max()) + 1]  # (B, L') the rest is padding no kept position can see
        n = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:n]  # (B, L', C)
        x = self.transformer(x, attn_mask=self.attn_mask[:n, :n])  # (B, L', C)
        x = self.ln_final(x)  # (B, L', C)
        pooled = text_global_pool(x, tokens, self.pool_type)  # (B, C): argmax pooling, the end-of-text column
        return pooled @ self.text_projection  # (B, embed_dim)


class CaptionSample:
    """Picklable sample function: ``(PIL image, caption) -> (image tensor (3, S, S), token ids (L,))``.

    Args:
        transform: the image transform.
        tokenizer: turns the caption into token ids.
    """

    def __init__(self, transform: Callable[[Any], torch.Tensor], tokenizer: ClipTokenizer) -> None:
        self.transform = transform
        self.tokenizer = tokenizer

    def __call__(self, image: Any, caption: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(caption, str):
            raise TypeError(
                f"the clip objective trains on image-caption pairs, but the dataset gave a {type(caption).__name__} "
                f"target ({caption!r}); use an image-text dataset: image_text_csv, webdataset or shapes_captions"
            )
        if not caption.strip():
            # The image-text datasets reject empty captions while indexing; this guards any other dataset.
            raise ValueError("empty caption: every training image needs a non-empty caption")
        return self.transform(image), self.tokenizer(caption)[0]

    def __repr__(self) -> str:
        return f"CaptionSample({self.transform!r}, {self.tokenizer!r})"


def clip_train_transform(
    img_size: int, crop_scale: Sequence[float], mean: Sequence[float], std: Sequence[float]
) -> T.Compose:
    """open_clip's training image transform: bicubic RandomResizedCrop, tensor, normalise (no flip).

    Args:
        img_size: output side in pixels.
        crop_scale: RandomResizedCrop area range (open_clip: 0.9–1).
        mean: normalisation mean.
        std: normalisation std.
    """
    if len(crop_scale) != 2 or not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
        raise ConfigError(f"objective.crop_scale must be [min, max] with 0 < min <= max <= 1, got {list(crop_scale)}")
    return T.Compose(
        [
            T.RandomResizedCrop(
                img_size, scale=tuple(crop_scale), interpolation=InterpolationMode.BICUBIC, antialias=True
            ),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


# key prefixes of the layout vitssl wrote before its towers were open_clip's (own text blocks)
_LEGACY_TEXT_KEYS = ("text.pos_embed", "text.proj.weight")
_LEGACY_BLOCK = {"qkv": "attn.in_proj_", "proj": "attn.out_proj.", "fc": "mlp.c_fc.", "fc_out": "mlp.c_proj."}


class LegacyCheckpointError(ConfigError):
    """A checkpoint of an older vitssl CLIP (own text tower) that this objective's image tower cannot hold."""


def is_legacy_state_dict(state_dict: Any) -> bool:
    """Whether ``state_dict`` is a CLIP objective's from the vitssl releases with their own text tower."""
    return all(k in state_dict for k in _LEGACY_TEXT_KEYS)


def convert_legacy_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An old CLIP objective state dict (own text blocks, timm image tower) in this module's layout with the timm
    image tower: text keys renamed to open_clip's (``qkv`` is already open_clip's packed [q; k; v]
    ``in_proj``), the text projection transposed; image keys (``backbone.model.*``, ``image_proj``) unchanged."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "text.pos_embed":
            out["text.positional_embedding"] = value
        elif key == "text.proj.weight":
            out["text.text_projection"] = value.t().contiguous()  # Linear (D, C) -> open_clip's (C, D) matrix
        elif key.startswith("text.blocks."):
            index, module, leaf = key[len("text.blocks.") :].split(".", 2)
            if module in _LEGACY_BLOCK:
                out[f"text.transformer.resblocks.{index}.{_LEGACY_BLOCK[module]}{leaf}"] = value
            else:  # ln_1, ln_2
                out[f"text.transformer.resblocks.{index}.{module}.{leaf}"] = value
        else:
            out[key] = value
    return out


@register_objective("clip")
class Clip(Objective):
    """Image tower and text tower (open_clip's modules) trained with CLIP's symmetric contrastive loss.

    ``backbone`` is the image encoder that frozen-feature evaluation uses (pooled features before the
    projection); ``encode_image`` / ``encode_text`` give the joint-space embeddings that zero-shot classification
    and image–text retrieval use. ``vision_tower`` says which image tower was built (``open_clip`` or ``timm``).
    """

    Config = ClipConfig
    supports_accumulation = False  # negatives are the rest of the batch: see Objective.supports_accumulation

    def __init__(self, cfg: ClipConfig, backbone_factory: Callable[..., nn.Module]) -> None:
        super().__init__(cfg, backbone_factory)
        if cfg.init_temperature <= 0 or cfg.max_logit_scale < 1:
            raise ConfigError(
                f"objective.init_temperature must be > 0 (got {cfg.init_temperature}) and objective.max_logit_scale"
                f" >= 1 (got {cfg.max_logit_scale})"
            )
        if cfg.text_width % cfg.text_heads:
            raise ConfigError(
                f"objective.text_width={cfg.text_width} must be divisible by objective.text_heads={cfg.text_heads}"
            )
        with torch.device("meta"):  # the configured backbone's family and sizes, without allocating it
            ref = backbone_factory()
        self.vision_tower = resolve_vision_tower(cfg, getattr(ref, "family", ""))
        if self.vision_tower == "open_clip":
            self.backbone: nn.Module = _build_open_clip_vit(ref, cfg.embed_dim)
        else:  # open_clip's timm tower: the registered backbone is the trunk, image_proj its linear head
            self.backbone = backbone_factory()
            self.image_proj = nn.Linear(self.backbone.num_features, cfg.embed_dim, bias=False)
            nn.init.normal_(self.image_proj.weight, std=self.backbone.num_features**-0.5)
        self.tokenizer = ClipTokenizer(cfg.context_length)
        self.text = TextTransformer(
            context_length=cfg.context_length,
            vocab_size=self.tokenizer.vocab_size,
            width=cfg.text_width,
            heads=cfg.text_heads,
            layers=cfg.text_depth,
            mlp_ratio=cfg.text_mlp_ratio,
            output_dim=cfg.embed_dim,
        )
        self.text.trim_padding = bool(cfg.trim_padding)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        self.max_log_scale = math.log(cfg.max_logit_scale)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Joint-space image embeddings ``(B, embed_dim)`` of ``(B, 3, H, W)`` images."""
        pooled = self.backbone(images)  # (B, C)
        x = self.backbone.project(pooled) if self.vision_tower == "open_clip" else self.image_proj(pooled)
        return F.normalize(x, dim=-1) if normalize else x  # (B, embed_dim)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Joint-space text embeddings ``(B, embed_dim)`` of token ids ``(B, L)`` (see :meth:`tokenize`)."""
        x = self.text(tokens)  # (B, embed_dim)
        return F.normalize(x, dim=-1) if normalize else x

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids ``(N, context_length)`` on the model's device."""
        return self.tokenizer(texts).to(self.logit_scale.device)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        images, tokens = batch  # (B, 3, H, W), (B, L)
        image_features = self.encode_image(images, normalize=True)  # (B, D)
        text_features = self.encode_text(tokens, normalize=True)  # (B, D)
        scale = self.logit_scale.exp()
        loss = clip_loss(
            image_features,
            text_features,
            scale,
            gather_with_grad=self.cfg.gather_with_grad,
            local_loss=self.cfg.local_loss,
        )
        with torch.no_grad():  # in-batch image→text top-1 on this rank: a cheap sign of learning
            hits = (image_features @ text_features.T).argmax(dim=1) == torch.arange(len(images), device=images.device)
        return {"loss": loss, "logit_scale": scale.detach(), "batch_acc": hits.float().mean()}

    def setup(self, cfg: Any) -> None:
        """Load ``objective.init_from`` (an open_clip checkpoint; a resumed run then loads its own weights over it)."""
        if self.cfg.init_from:
            from vitssl.ssl.open_clip_io import load_open_clip_weights

            load_open_clip_weights(self, self.cfg.init_from)
            _logger.info("CLIP weights initialised from open_clip checkpoint %s", self.cfg.init_from)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load this objective's weights; a state dict in the layout of older vitssl releases (own text tower) is
        converted when its image tower fits, else refused in one line saying how to convert it."""
        if is_legacy_state_dict(state_dict):
            if self.vision_tower != "timm":
                raise LegacyCheckpointError(
                    "the checkpoint holds a CLIP from an older vitssl (timm ViT image tower, own text tower), which "
                    "open_clip's VisionTransformer cannot hold; convert it with `vitssl export open_clip CHECKPOINT "
                    "--out DIR`, then evaluate DIR or train from it with objective.init_from=DIR "
                    "objective.vision_tower=timm"
                )
            state_dict = convert_legacy_state_dict(dict(state_dict))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """Clamp ``logit_scale`` to [0, ln max_logit_scale] (open_clip clamps after every optimizer step)."""
        self.logit_scale.clamp_(0.0, self.max_log_scale)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """timm's rule: no decay on 0-/1-D parameters and on what the towers' ``no_weight_decay()`` list (the image
        backbone's tokens and position tables, the text tower's position table), nor on the temperature."""
        from vitssl.ssl.base import backbone_no_decay, split_decay

        return split_decay(self.named_parameters(), weight_decay, backbone_no_decay(self) | {"logit_scale"})

    def train_sample_fn(self, data_cfg: DataConfig) -> Callable[[Any, Any], Any]:
        transform = clip_train_transform(data_cfg.img_size, self.cfg.crop_scale, data_cfg.mean, data_cfg.std)
        return CaptionSample(transform, self.tokenizer)

    def eval_sample_fn(self, data_cfg: DataConfig) -> Callable[[Any, Any], Any]:
        """CLIP's preprocessing: bicubic resize of the short side to ``img_size``, centre crop, normalise."""
        from vitssl.data.transforms import eval_transform

        transform = eval_transform(data_cfg.img_size, 1.0, data_cfg.mean, data_cfg.std, interpolation="bicubic")
        return ImageTransform(transform)


__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "VISION_TOWERS",
    "CaptionSample",
    "Clip",
    "ClipConfig",
    "ClipTokenizer",
    "LegacyCheckpointError",
    "OpenClipViT",
    "TextTransformer",
    "clip_train_transform",
    "convert_legacy_state_dict",
    "is_legacy_state_dict",
    "resolve_vision_tower",
]
