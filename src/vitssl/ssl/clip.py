"""CLIP (Radford et al., 2021) as open_clip trains it: an image tower and a text tower matched contrastively.

- Image tower: any vitssl backbone's pooled embedding + a linear projection (no bias) into the joint space.
- Text tower: open_clip's BPE tokens (context 77, vocabulary shipped inside ``open_clip``, never downloaded)
  → token + learned position embedding → a pre-norm causal transformer → final LayerNorm → the feature at the
  end-of-text token (the largest id in each row, as open_clip's ``argmax`` pooling) → a linear projection.
- Loss: :func:`vitssl.ssl.losses.clip_loss`, the symmetric cross-entropy over the image–text similarities of
  L2-normalised features times a learned ``exp(logit_scale)``; ``logit_scale`` starts at ln(1/0.07) and is
  clamped to [0, ln 100] after every optimizer step (``on_step_end``), as open_clip's training loop does.
  Features of all ranks are gathered *with* gradient by default, so a DDP run has exactly the gradients of one
  process on the global batch; ``local_loss`` scores each rank's rows only (N × N·W logits instead of (N·W)²).

Samples are ``(image tensor, token ids)``: the training transform is open_clip's (RandomResizedCrop with scale
0.9–1, bicubic, no flip: a flip would contradict captions that say "on the left"), then the caption is
tokenised in the data-loading worker.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from vitssl.config import ConfigError, DataConfig, ObjectiveConfig
from vitssl.ssl.base import ImageTransform, Objective, register_objective
from vitssl.ssl.losses import clip_loss

_logger = logging.getLogger(__name__)

# CLIP's (and open_clip's) image normalisation; the recipes set data.mean / data.std to these.
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@functools.lru_cache(maxsize=1)
def _simple_tokenizer() -> Any:
    """open_clip's ``SimpleTokenizer`` over its bundled ``bpe_simple_vocab_16e6.txt.gz`` (loaded once per process).

    It is built directly rather than through ``open_clip.get_tokenizer``, which may resolve a model name to a
    Hugging Face tokenizer; this one only reads the file inside the installed package.
    """
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


class ClipTokenizer:
    """CLIP's byte-pair-encoding tokenizer: captions to ``(N, context_length)`` token ids and back.

    Each row is ``<start_of_text> tokens <end_of_text>`` followed by zeros; text is lower-cased and
    whitespace-cleaned first; a caption longer than the context is truncated and still ends with
    ``<end_of_text>`` (open_clip's behaviour). Pickles without its vocabulary tables, so sample functions
    holding one are cheap to send to data-loading workers.

    Args:
        context_length: tokens per row including the start and end tokens (CLIP: 77).
    """

    def __init__(self, context_length: int = 77) -> None:
        if context_length < 3:
            raise ConfigError(f"objective.context_length must be >= 3 (start, a token, end), got {context_length}")
        self.context_length = int(context_length)

    @property
    def vocab_size(self) -> int:
        return len(_simple_tokenizer().encoder)

    @property
    def sot_token_id(self) -> int:
        return int(_simple_tokenizer().sot_token_id)

    @property
    def eot_token_id(self) -> int:
        return int(_simple_tokenizer().eot_token_id)

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids ``(N, context_length)`` int64 of one caption or a list of captions."""
        if isinstance(texts, str):
            texts = [texts]
        return _simple_tokenizer()(list(texts), context_length=self.context_length)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """The cleaned text of one row of token ids, without the start / end tokens and the padding."""
        tok = _simple_tokenizer()
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if ids and ids[0] == tok.sot_token_id:
            ids = ids[1:]
        if tok.eot_token_id in ids:  # padding follows it (id 0 is also a real token, "!", so cut here)
            ids = ids[: ids.index(tok.eot_token_id)]
        return tok.decode(ids).strip()

    def __repr__(self) -> str:
        return f"ClipTokenizer(context_length={self.context_length})"


@dataclass
class ClipConfig(ObjectiveConfig):
    name: str = "clip"
    embed_dim: int = 512  # width of the joint image-text embedding space
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


class _TextBlock(nn.Module):
    """Pre-norm transformer block with causal self-attention (GELU MLP), as open_clip's ResidualAttentionBlock."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.fc = nn.Linear(width, hidden)
        self.fc_out = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape  # (B, L, C)
        qkv = self.qkv(self.ln_1(x)).view(b, n, 3, self.heads, c // self.heads)  # (B, L, 3, h, C/h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, h, L, C/h)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, h, L, C/h)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, c))  # (B, L, C)
        return x + self.fc_out(F.gelu(self.fc(self.ln_2(x))))  # (B, L, C)


class TextTransformer(nn.Module):
    """CLIP's text tower: causal transformer over BPE tokens, end-of-text feature, linear projection.

    Args:
        vocab_size: number of token ids (49408 for CLIP's BPE).
        context_length: longest token sequence.
        width: transformer width.
        depth: number of blocks.
        heads: attention heads per block.
        mlp_ratio: MLP hidden width / width.
        embed_dim: output width (the joint embedding).
        trim_padding: run only up to the last end-of-text column of the batch. Exact under the causal mask
            (no position attends to later ones), and ~6× cheaper on short captions padded to 77 tokens.
    """

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        embed_dim: int,
        trim_padding: bool = True,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ConfigError(f"objective.text_width={width} must be divisible by objective.text_heads={heads}")
        self.context_length = context_length
        self.trim_padding = trim_padding
        self.token_embedding = nn.Embedding(vocab_size, width)
        # no weight decay, like every position embedding: Clip.param_groups names it
        self.pos_embed = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList([_TextBlock(width, heads, mlp_ratio) for _ in range(depth)])
        self.ln_final = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        self._init_weights(width, depth)

    def _init_weights(self, width: int, depth: int) -> None:
        # open_clip's TextTransformer.init_parameters: residual projections scaled down by sqrt(2·depth).
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        attn_std = width**-0.5
        proj_std = attn_std * (2 * depth) ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.qkv.weight, std=attn_std)
            nn.init.normal_(block.proj.weight, std=proj_std)
            nn.init.normal_(block.fc.weight, std=fc_std)
            nn.init.normal_(block.fc_out.weight, std=proj_std)
            for linear in (block.qkv, block.proj, block.fc, block.fc_out):
                nn.init.zeros_(linear.bias)
        nn.init.normal_(self.proj.weight, std=width**-0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Projected end-of-text features ``(B, embed_dim)`` of token ids ``(B, L)``, L ≤ context_length."""
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(
                f"text tokens must be (B, L) with L <= context_length={self.context_length}, got {tuple(tokens.shape)}"
            )
        eot = tokens.argmax(dim=-1)  # (B,) end-of-text has the largest id of the vocabulary
        if self.trim_padding:
            tokens = tokens[:, : int(eot.max()) + 1]  # (B, L') the rest is padding no kept position can see
        x = self.token_embedding(tokens) + self.pos_embed[: tokens.shape[1]]  # (B, L', C)
        for block in self.blocks:
            x = block(x)  # (B, L', C)
        x = self.ln_final(x)  # (B, L', C)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]  # (B, C)
        return self.proj(pooled)  # (B, embed_dim)


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


@register_objective("clip")
class Clip(Objective):
    """Image tower (backbone + projection) and text tower trained with CLIP's symmetric contrastive loss.

    ``backbone`` is the image encoder that frozen-feature evaluation uses; ``encode_image`` / ``encode_text``
    give the joint-space embeddings that zero-shot classification and image–text retrieval use.
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
        self.backbone = backbone_factory()
        self.image_proj = nn.Linear(self.backbone.num_features, cfg.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=self.backbone.num_features**-0.5)
        self.tokenizer = ClipTokenizer(cfg.context_length)
        self.text = TextTransformer(
            vocab_size=self.tokenizer.vocab_size,
            context_length=cfg.context_length,
            width=cfg.text_width,
            depth=cfg.text_depth,
            heads=cfg.text_heads,
            mlp_ratio=cfg.text_mlp_ratio,
            embed_dim=cfg.embed_dim,
            trim_padding=cfg.trim_padding,
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        self.max_log_scale = math.log(cfg.max_logit_scale)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Joint-space image embeddings ``(B, embed_dim)`` of ``(B, 3, H, W)`` images."""
        x = self.image_proj(self.backbone(images))  # (B, embed_dim)
        return F.normalize(x, dim=-1) if normalize else x

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

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """Clamp ``logit_scale`` to [0, ln max_logit_scale] (open_clip clamps after every optimizer step)."""
        self.logit_scale.clamp_(0.0, self.max_log_scale)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """timm's rule for the image backbone, plus no decay on the temperature (open_clip exempts it) and on the
        text tower's position table (a position embedding, as the backbones' are)."""
        from vitssl.ssl.base import backbone_no_decay, split_decay

        own = {"logit_scale", "text.pos_embed"}
        return split_decay(self.named_parameters(), weight_decay, backbone_no_decay(self) | own)

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
    "CaptionSample",
    "Clip",
    "ClipConfig",
    "ClipTokenizer",
    "TextTransformer",
    "clip_train_transform",
]
