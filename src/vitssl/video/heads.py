"""Video classification heads over per-frame embeddings of an image backbone, ``(B, T, D) -> (B, num_classes)``.

- :class:`MeanHead`: TSN's consensus (Wang et al., 2016): average the frame embeddings, then a linear layer. It
  cannot tell frame order apart, so it sees appearance, not motion.
- :class:`TemporalHead`: the temporal transformer of ViViT's factorised encoder (Arnab et al., 2021, model 2): a
  temporal CLS token and a learned time embedding, pre-norm encoder layers over ``(B, 1 + T, D)``, a final
  LayerNorm and a linear classifier on the CLS output.

Both expose ``forward_features`` (the pre-logit embedding, ``(B, D)``) for frozen-feature evaluation.
"""

from __future__ import annotations

import torch
from torch import nn


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


class TemporalHead(nn.Module):
    """ViViT factorised-encoder temporal transformer over per-frame embeddings.

    The time embedding starts at zero: at initialisation the head is exactly order-blind (a transformer without
    position information is permutation-equivariant, and the CLS token pools symmetrically), so any use of frame
    order is learnt from the data rather than imposed by a random embedding.

    Args:
        dim: frame embedding width D.
        num_classes: output classes.
        depth: transformer encoder layers.
        heads: attention heads; None picks ``max(1, dim // 64)`` (ViT's 64-wide heads).
        mlp_ratio: MLP hidden width as a multiple of D.
        num_frames_max: longest clip the time embedding covers (T <= num_frames_max).
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
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.time_embed = nn.Parameter(torch.zeros(1, num_frames_max, dim))  # zero: order is learnt, see above
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim,
                heads,
                dim_feedforward=int(dim * mlp_ratio),
                dropout=dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,  # pre-norm, as in ViT / ViViT
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.fc.bias)

    def no_weight_decay(self) -> set[str]:
        """Tokens and embeddings get no weight decay (timm's rule), by name for ``backbone_no_decay``."""
        return {"cls_token", "time_embed"}

    def forward_features(self, frames: torch.Tensor) -> torch.Tensor:
        """Pre-logit embedding (B, D): the normed CLS output over frame embeddings (B, T, D)."""
        b, t, _ = frames.shape
        if t > self.num_frames_max:
            raise ValueError(f"TemporalHead: {t} frames, but the time embedding covers {self.num_frames_max}")
        x = frames + self.time_embed[:, :t]  # (B, T, D)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)  # (B, 1 + T, D)
        for layer in self.layers:
            x = layer(x)  # (B, 1 + T, D)
        return self.norm(x[:, 0])  # (B, D)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of frame embeddings (B, T, D)."""
        return self.fc(self.dropout(self.forward_features(frames)))  # (B, K)
