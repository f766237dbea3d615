"""Video classification heads over per-frame embeddings of an image backbone, ``(B, T, D) -> (B, num_classes)``.

- :class:`MeanHead`: TSN's consensus (Wang et al., 2016): average the frame embeddings, then a linear layer. It
  cannot tell frame order apart, so it sees appearance, not motion.
- :class:`TemporalHead`: the temporal transformer of ViViT's factorised encoder (Arnab et al., 2021, model 2), as
  the official (scenic) ``SpaceTimeViViT`` builds it with its ``token`` classifier: a temporal CLS token, a learned
  position embedding over CLS + frames, pre-norm encoder layers over ``(B, 1 + T, D)``, a final LayerNorm and a
  linear classifier on the CLS output, with scenic's initialisation and flax's LayerNorm epsilon (1e-6).

Both expose ``forward_features`` (the pre-logit embedding, ``(B, D)``) for frozen-feature evaluation.

Heads are chosen by name (``objective.head``) from :data:`VIDEO_HEADS`. A new temporal head (a TimeSformer-style
one, say) is a module with ``forward(frames (B, T, D)) -> (B, num_classes)`` and ``forward_features(frames) ->
(B, D')``, registered in one line with a builder that takes the frame width and the objective's config::

    register_head("lstm", lambda dim, cfg: LSTMHead(dim, cfg.num_classes, **cfg.head_kwargs))

after which ``objective.head=lstm`` (options in ``objective.head_kwargs``) trains it; an unknown name fails with
the list of registered ones.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitssl.config import ConfigError
from vitssl.registry import Registry

HeadBuilder = Callable[[int, Any], nn.Module]
"""``builder(dim, cfg) -> head``: the frame embedding width D and the ``video_action`` objective's config
(``num_classes``, ``num_frames``, ``depth``, ``num_heads``, ``mlp_ratio``, ``dropout``, ``head_kwargs``)."""

# The heads of ``objective.head``; this module registers the built-in ones, others register from anywhere.
VIDEO_HEADS: Registry[HeadBuilder] = Registry("video head", providers=("vitssl.video.heads",))


def register_head(name: str, builder: HeadBuilder | None = None) -> Any:
    """Register a head builder under ``name``: ``register_head("x", builder)`` or ``@register_head("x")``.

    Args:
        name: the value of ``objective.head`` that selects it.
        builder: ``builder(dim, cfg) -> nn.Module`` (see :data:`HeadBuilder`); omitted when used as a decorator.
    """
    return VIDEO_HEADS.register(name, builder)


def build_head(name: str, dim: int, cfg: Any) -> nn.Module:
    """The head registered as ``name`` for frame embeddings of width ``dim``, configured by ``cfg``.

    Raises:
        ConfigError: an unknown name (the message lists the registered heads), or a builder's bad option.
    """
    if name not in VIDEO_HEADS:
        raise ConfigError(f"objective.head={name!r}: {VIDEO_HEADS.unknown_message(name)}")
    return VIDEO_HEADS.get(name)(dim, cfg)


_LN_EPS = 1e-6  # flax's nn.LayerNorm default, which scenic's ViViT uses throughout


class MeanHead(nn.Module):
    """TSN-style head: the mean of the per-frame embeddings through a linear classifier.

    Args:
        dim: frame embedding width D (the backbone's ``num_features``).
        num_classes: output classes.
        dropout: dropout on the pooled embedding before the classifier.
    """

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.fc.bias)

    def forward_features(self, frames: torch.Tensor) -> torch.Tensor:
        """Pre-logit embedding (B, D) of frame embeddings (B, T, D)."""
        return frames.mean(dim=1)  # (B, D)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of frame embeddings (B, T, D)."""
        return self.fc(self.dropout(self.forward_features(frames)))  # (B, K)


def _xavier_uniform_rows(weight: torch.Tensor, chunks: int) -> None:
    """Glorot-uniform init of each of ``chunks`` equal row blocks of ``weight`` on its own (fan of one block).

    flax's attention has separate query / key / value projections, each ``xavier_uniform`` over ``D x D``;
    PyTorch packs them into one ``(3D, D)`` matrix, whose own fan would give a bound ``sqrt(2)`` times smaller.
    """
    with torch.no_grad():
        for block in weight.chunk(chunks, dim=0):
            nn.init.xavier_uniform_(block)


class TemporalHead(nn.Module):
    """ViViT factorised-encoder temporal transformer over per-frame embeddings (scenic's, initialised as there).

    Initialisation (scenic ``SpaceTimeViViT`` / ``Encoder`` / ``EncoderBlock`` / ``MlpBlock``): CLS token zero;
    position embedding over the ``1 + T`` tokens ``normal(0, 0.02)``; attention query / key / value and output
    kernels Glorot-uniform each, biases zero; MLP kernels Glorot-uniform, biases ``normal(0, 1e-6)``; LayerNorms
    (two per layer and the encoder's output norm) scale 1, bias 0, epsilon 1e-6; the classifier zero (weights and
    bias), so every logit is 0 at initialisation. The MLP's GELU is flax's default, the tanh approximation.

    Args:
        dim: frame embedding width D.
        num_classes: output classes.
        depth: transformer encoder layers.
        heads: attention heads; None picks ``max(1, dim // 64)`` (ViT's 64-wide heads).
        mlp_ratio: MLP hidden width as a multiple of D.
        num_frames_max: longest clip the position embedding covers (T <= num_frames_max).
        dropout: dropout inside the encoder layers and before the classifier.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        depth: int = 2,
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        num_frames_max: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        heads = heads or max(1, dim // 64)
        if dim % heads:
            raise ValueError(f"TemporalHead: dim={dim} must be divisible by heads={heads}")
        self.dim, self.num_classes, self.num_frames_max = dim, num_classes, num_frames_max
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))  # (1, 1, D)
        self.time_embed = nn.Parameter(torch.empty(1, 1 + num_frames_max, dim).normal_(std=0.02))  # (1, 1 + F, D)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim,
                heads,
                dim_feedforward=int(dim * mlp_ratio),
                dropout=dropout,
                # flax's gelu is the tanh approximation; a partial (not F.gelu itself or an nn.GELU) also keeps
                # PyTorch's inference fast path, which would compute the exact GELU, switched off
                activation=functools.partial(F.gelu, approximate="tanh"),
                layer_norm_eps=_LN_EPS,
                batch_first=True,
                norm_first=True,  # pre-norm, as in ViT / ViViT
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)
        self._init_as_scenic()

    def _init_as_scenic(self) -> None:
        """scenic's initialisers (see the class docstring) on the encoder layers and the classifier."""
        for layer in self.layers:
            attn = layer.self_attn
            _xavier_uniform_rows(attn.in_proj_weight, 3)  # q, k, v
            nn.init.zeros_(attn.in_proj_bias)
            nn.init.xavier_uniform_(attn.out_proj.weight)
            nn.init.zeros_(attn.out_proj.bias)
            for linear in (layer.linear1, layer.linear2):
                nn.init.xavier_uniform_(linear.weight)
                nn.init.normal_(linear.bias, std=1e-6)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def no_weight_decay(self) -> set[str]:
        """Tokens and embeddings get no weight decay (timm's rule), by name for ``backbone_no_decay``."""
        return {"cls_token", "time_embed"}

    def forward_features(self, frames: torch.Tensor) -> torch.Tensor:
        """Pre-logit embedding (B, D): the normed CLS output over frame embeddings (B, T, D)."""
        b, t, _ = frames.shape
        if t > self.num_frames_max:
            raise ValueError(f"TemporalHead: {t} frames, but the position embedding covers {self.num_frames_max}")
        x = torch.cat([self.cls_token.expand(b, -1, -1), frames], dim=1)  # (B, 1 + T, D)
        x = x + self.time_embed[:, : 1 + t]  # (B, 1 + T, D); scenic adds it after the CLS token, to both
        for layer in self.layers:
            x = layer(x)  # (B, 1 + T, D)
        return self.norm(x[:, 0])  # (B, D)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of frame embeddings (B, T, D)."""
        return self.fc(self.dropout(self.forward_features(frames)))  # (B, K)


def _no_head_kwargs(name: str, cfg: Any, keys: str) -> None:
    """The built-in heads take their options from the objective's own keys, not ``head_kwargs``."""
    if cfg.head_kwargs:
        raise ConfigError(
            f"objective.head_kwargs={dict(cfg.head_kwargs)}: the {name} head takes none (its options: {keys}); "
            "head_kwargs are for registered heads of your own"
        )


@register_head("mean")
def _build_mean(dim: int, cfg: Any) -> nn.Module:
    _no_head_kwargs("mean", cfg, "objective.dropout")
    return MeanHead(dim, cfg.num_classes, dropout=cfg.dropout)


@register_head("temporal")
def _build_temporal(dim: int, cfg: Any) -> nn.Module:
    _no_head_kwargs("temporal", cfg, "objective.depth, num_heads, mlp_ratio, dropout, num_frames")
    if cfg.depth < 1:
        raise ConfigError(f"objective.depth={cfg.depth}: the temporal head needs at least one layer")
    if cfg.num_heads is not None and (cfg.num_heads < 1 or dim % cfg.num_heads):
        raise ConfigError(f"objective.num_heads={cfg.num_heads} must divide the backbone width {dim}")
    return TemporalHead(
        dim,
        cfg.num_classes,
        depth=cfg.depth,
        heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        num_frames_max=cfg.num_frames,
        dropout=cfg.dropout,
    )
