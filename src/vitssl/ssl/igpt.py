"""iGPT (Chen et al., 2020): generative pretraining on palette tokens, autoregressive (AR) or masked (BERT).

Images are downsampled to the token grid (``data.img_size``, 32 by default) and every pixel becomes the id of its
nearest colour in a k-means palette (``ssl/palette.py``; 512 colours, 9 bits). An input adapter embeds the token
grid (``nn.Embedding``) into a ``token_dim``-channel map that the backbone takes in place of RGB pixels
(``in_chans=token_dim``), so every backbone family trains on tokens unchanged.

- ``mode=ar``: next-token prediction in raster order under a causal attention mask. The input map is shifted by
  one position and starts with a learned start-of-image token, so the output at position ``i`` has seen tokens
  ``< i`` only and predicts token ``i``. ViT only, with ``patch_size=1`` (one token per position, 1024 positions
  at 32×32 as in iGPT): Swin's windows / patch merging and PVT's spatial-reduction attention mix later positions
  into every output, so no mask can make them causal.
- ``mode=bert``: each position is masked with probability ``mask_ratio`` (0.15) and replaced by a learned mask
  embedding; cross-entropy on the masked positions only. Any backbone: a ViT with ``patch_size=1`` classifies
  its tokens directly, the others go through a light FPN-style head on ``forward_pyramid`` that predicts the
  token of every position at full token resolution.

The loss is reported in nats and in bits per token. Probe features (``eval_features``) are the layer-normed,
average-pooled output of block ``probe_layer`` (a stage of the pyramid for hierarchical backbones), by default
the middle one, where iGPT's linear probes peak.

Images reach the objective as RGB in [0, 1] at the token resolution (``data.mean`` / ``data.std`` are unused: the
palette works on raw colours) and become tokens inside ``forward`` / ``eval_features``, on the model's device.

The palette is a buffer of the objective, so it is saved in every checkpoint; a run also writes it to
``<output_dir>/palette.npy`` (``setup``). A resumed run reads that file instead of fitting again, and then loads
the checkpoint's copy, which is the same array; without the file the fit is repeated (it is deterministic in
``palette_seed`` and the data) and the checkpoint's copy still wins, because the engine restores the checkpoint
after building the data pipeline, and images are only turned into tokens inside ``forward``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitssl import distributed as dist
from vitssl.config import ConfigError, DataConfig, ObjectiveConfig
from vitssl.ssl import palette as pal
from vitssl.ssl.base import ImageTransform, Objective, register_objective

_logger = logging.getLogger(__name__)

_MODES = ("ar", "bert")
PALETTE_FILE = "palette.npy"  # written into the run folder
# Families whose attention can run under a causal mask; why the others cannot, for the error message.
_CAUSAL_FAMILIES = ("vit",)
_NOT_CAUSAL_WHY = {
    "swin": "Swin attends within (shifted) windows and merges 2×2 patches, so every output mixes later positions",
    "pvt": "PVT's spatial-reduction attention pools keys and values over patches, so every query sees later positions",
    "pvt_v2": "PVT v2's spatial-reduction attention and overlapping patch embeddings mix later positions into "
    "every output",
}


@dataclass
class IGPTConfig(ObjectiveConfig):
    name: str = "igpt"
    mode: str = "ar"  # ar: causal next-token prediction (ViT, patch_size 1) | bert: masked-token prediction (any)
    palette_size: int = 512  # colours of the k-means palette = vocabulary size (iGPT: 512, i.e. 9 bits)
    palette_path: str | None = None  # .npy (K, 3) RGB palette in [0, 1] to use instead of fitting one on data.train
    palette_images: int = 1000  # training images whose pixels (at the token resolution) the k-means fit uses
    palette_iters: int = 20  # k-means iterations
    palette_seed: int = 0  # seed of the image draw and of the k-means initialisation
    token_dim: int = 128  # D: width of the token-embedding map the backbone takes as input channels
    mask_ratio: float = 0.15  # bert: probability that a position is masked (iGPT / BERT: 0.15)
    probe_layer: int | None = None  # block (ViT) or pyramid stage (Swin, PVT) whose pooled output is the feature;
    #                                 0-based, negative counts from the end; null = the middle one
    head_dim: int = 256  # bert on hierarchical backbones (or ViT patch > 1): width of the pyramid token head
    # training augmentation, applied before quantisation (iGPT pretrains on downsampled images)
    crop_scale: list[float] = field(default_factory=lambda: [0.25, 1.0])  # RandomResizedCrop area range
    flip: bool = True  # random horizontal flip


def draw_mask(batch: int, num_tokens: int, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """BERT mask ``(batch, num_tokens)`` bool: each position independently with probability ``ratio``.

    An image whose draw masked nothing gets one random position masked, so every image contributes to the loss.

    Args:
        batch: images.
        num_tokens: positions per image.
        ratio: masking probability.
        generator: CPU random generator (None: the global one).
    """
    mask = torch.rand(batch, num_tokens, generator=generator) < ratio  # (B, N)
    empty = ~mask.any(1)  # (B,)
    if empty.any():
        pick = torch.randint(num_tokens, (int(empty.sum()),), generator=generator)
        mask[empty.nonzero()[:, 0], pick] = True
    return mask


def bert_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) over the masked positions only.

    Args:
        logits: ``(B, N, V)``.
        targets: ``(B, N)`` token ids.
        mask: ``(B, N)`` bool, True where the input was masked.
    """
    return F.cross_entropy(logits[mask].float(), targets[mask])


class PyramidTokenHead(nn.Module):
    """Light FPN-style head: pyramid maps → one feature per token position, at full token resolution.

    Every level is projected to ``width`` channels (1×1 conv) and upsampled bilinearly to the token grid; the
    levels are summed, and a learned embedding of a position's place inside its finest-level cell is added, so
    the positions one cell covers get different predictions.

    Args:
        in_channels: channels of the pyramid levels.
        cell: stride of the finest level, in tokens.
        width: feature width.
    """

    def __init__(self, in_channels: Sequence[int], cell: int, width: int) -> None:
        super().__init__()
        self.cell = cell
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, kernel_size=1) for c in in_channels)
        self.cell_pos_embed = nn.Parameter(torch.zeros(cell * cell, width))
        nn.init.trunc_normal_(self.cell_pos_embed, std=0.02)

    def forward(self, maps: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        """Features ``(B, H, W, width)`` of the ``grid = (H, W)`` token positions."""
        h, w = grid
        fused = sum(
            F.interpolate(lat(m), size=(h, w), mode="bilinear", align_corners=False)  # (B, width, H, W)
            for lat, m in zip(self.lateral, maps)
        )
        rows = torch.arange(h, device=fused.device) % self.cell  # (H,)
        cols = torch.arange(w, device=fused.device) % self.cell  # (W,)
        place = self.cell_pos_embed[rows[:, None] * self.cell + cols[None, :]]  # (H, W, width)
        return fused.permute(0, 2, 3, 1) + place  # (B, H, W, width)


@register_objective("igpt")
class IGPT(Objective):
    """Palette-token generative pretraining (AR or BERT) of any backbone fed a token-embedding map."""

    Config = IGPTConfig

    def __init__(self, cfg: IGPTConfig, backbone_factory: Callable[..., nn.Module]) -> None:
        super().__init__(cfg, backbone_factory)
        if cfg.mode not in _MODES:
            raise ConfigError(f"objective.mode={cfg.mode!r}; choose one of {', '.join(_MODES)}")
        if cfg.palette_size < 2:
            raise ConfigError(f"objective.palette_size={cfg.palette_size}: a palette needs at least 2 colours")
        if cfg.token_dim < 1:
            raise ConfigError(f"objective.token_dim={cfg.token_dim} must be positive")
        if cfg.mode == "bert" and not 0.0 < cfg.mask_ratio < 1.0:
            raise ConfigError(f"objective.mask_ratio={cfg.mask_ratio} must lie in (0, 1)")
        self.mode = cfg.mode
        self.backbone = backbone_factory(in_chans=cfg.token_dim)
        family = getattr(self.backbone, "family", "")
        name = getattr(self.backbone, "name", family)
        strides = list(self.backbone.pyramid_strides)
        if self.mode == "ar" and family not in _CAUSAL_FAMILIES:
            why = _NOT_CAUSAL_WHY.get(family, "its attention mixes later positions into every output")
            raise ConfigError(
                f"objective.mode=ar needs attention that can be made causal, and model.backbone={name!r} "
                f"({family}) cannot: {why}. Use objective.mode=bert with this backbone, or a ViT with "
                "model.backbone_kwargs.patch_size=1 for ar"
            )
        if self.mode == "ar" and strides != [1]:
            raise ConfigError(
                f"objective.mode=ar predicts one token per position, so the ViT needs patch_size=1 (it has "
                f"patch_size={strides[0]}); set model.backbone_kwargs.patch_size=1"
            )
        self.grid = tuple(int(s) for s in self.backbone.img_size)
        self.num_tokens = self.grid[0] * self.grid[1]
        k, d = cfg.palette_size, cfg.token_dim

        self.register_buffer("palette", torch.zeros(k, 3))  # (K, 3) RGB in [0, 1]; set by setup / a checkpoint
        self._palette_set = False
        self.register_load_state_dict_post_hook(self._after_load)
        self.token_embed = nn.Embedding(k, d)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        if self.mode == "ar":
            self.sos_token = nn.Parameter(torch.zeros(1, 1, d))  # learned start-of-image input
            nn.init.normal_(self.sos_token, std=0.02)
        else:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, d))  # learned input of masked positions
            nn.init.normal_(self.mask_token, std=0.02)

        # ViT with one token per position: its (final-normed) tokens are classified directly, as in iGPT.
        self.flat = family == "vit" and strides == [1]
        if self.flat:
            self.decoder = None
            self.classifier: nn.Module = nn.Linear(self.backbone.num_features, k)
        else:
            channels = list(self.backbone.pyramid_channels)
            self.decoder = PyramidTokenHead(channels, strides[0], cfg.head_dim)
            self.classifier = nn.Sequential(nn.GELU(), nn.LayerNorm(cfg.head_dim), nn.Linear(cfg.head_dim, k))
        self.probe_layer = self._resolve_probe_layer(cfg.probe_layer, family)

    # ------------------------------------------------------------------------------------------------ palette
    def _after_load(self, module: nn.Module, incompatible: Any) -> None:
        if "palette" not in incompatible.missing_keys:
            self._palette_set = True

    def set_palette(self, palette: np.ndarray | torch.Tensor) -> None:
        """Use ``palette`` ``(K, 3)`` (RGB in [0, 1]) from now on."""
        value = torch.as_tensor(np.asarray(palette), dtype=torch.float32)
        if tuple(value.shape) != tuple(self.palette.shape):
            raise ValueError(
                f"palette of shape {tuple(value.shape)} given; this objective has objective.palette_size="
                f"{self.palette.shape[0]} colours"
            )
        self.palette.copy_(value)
        self._palette_set = True

    def setup(self, cfg: Any) -> None:
        """Load or fit the palette and write it to ``<output_dir>/palette.npy`` (rank 0).

        Order: ``objective.palette_path`` if set; else the run folder's ``palette.npy`` (a resumed run); else a
        k-means fit on ``data.train``, computed on rank 0 and broadcast, so every rank holds the same palette.

        Args:
            cfg: the full run config (``output_dir``, ``data``, ``seed``).
        """
        run_file = Path(cfg.output_dir) / PALETTE_FILE
        if self.cfg.palette_path is None and run_file.is_file():
            try:
                self.set_palette(pal.load_palette(run_file, self.cfg.palette_size))
                _logger.info("palette: reusing %s", run_file)
                return
            except ValueError as err:
                _logger.warning("palette: %s; fitting a new one", err)
        self._prepare_palette(cfg.data)
        if dist.get_rank() == 0:
            pal.save_palette(self.palette, run_file)

    def _prepare_palette(self, data_cfg: DataConfig) -> None:
        if self.cfg.palette_path is not None:
            try:
                self.set_palette(pal.load_palette(self.cfg.palette_path, self.cfg.palette_size))
            except (FileNotFoundError, ValueError) as err:
                raise ConfigError(f"objective.palette_path: {err}") from None
            return
        palette = None
        if dist.get_rank() == 0:
            palette, _ = self.fit_palette(data_cfg)
        self.set_palette(dist.broadcast_object(palette))

    def fit_palette(self, data_cfg: DataConfig) -> tuple[np.ndarray, float]:
        """k-means palette of ``data.train`` at the token resolution, and its quantisation error on the sample.

        Args:
            data_cfg: the run's ``data`` block (``train``, ``img_size``, ``skip_corrupt``).
        """
        from vitssl.data import build_dataset

        d = data_cfg.train
        dataset = build_dataset(d.name, root=d.root, split=d.split, **dict(d.kwargs))
        pixels = pal.sample_pixels(
            dataset, data_cfg.img_size, self.cfg.palette_images, self.cfg.palette_seed, data_cfg.skip_corrupt
        )
        try:
            return pal.fit_palette(pixels, self.cfg.palette_size, self.cfg.palette_seed, self.cfg.palette_iters)
        except ValueError as err:
            raise ConfigError(f"data.train ({d.name}): {err}") from None

    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` (RGB in [0, 1] or uint8) → tokens ``(B, H*W)`` in raster order."""
        if not self._palette_set:
            raise RuntimeError(
                "the iGPT palette is not set: the engine fits it (setup / train_sample_fn); elsewhere load a "
                "checkpoint into the objective or call set_palette"
            )
        if tuple(images.shape[-2:]) != self.grid:
            raise ValueError(
                f"iGPT images must be {self.grid[0]}x{self.grid[1]} (data.img_size, the token grid), got "
                f"{tuple(images.shape[-2:])}"
            )
        return pal.quantize(images, self.palette).flatten(1)  # (B, N)

    def detokenize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, H*W)`` → palette images ``(B, 3, H, W)`` in [0, 1]."""
        return pal.dequantize(tokens.reshape(-1, *self.grid), self.palette)  # (B, 3, H, W)

    # ---------------------------------------------------------------------------------------------- network
    def _resolve_probe_layer(self, layer: int | None, family: str) -> int:
        count = self.backbone.depth if family == "vit" else len(self.backbone.pyramid_strides)
        what = "blocks" if family == "vit" else "pyramid stages"
        if layer is None:
            return count // 2
        if not -count <= layer < count:
            raise ConfigError(
                f"objective.probe_layer={layer}: model.backbone has {count} {what}; use 0..{count - 1} "
                "(negative counts from the end) or null for the middle one"
            )
        return layer % count

    def embed_tokens(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone's input map ``(B, D, H, W)``: shifted for ar, masked positions replaced for bert.

        Args:
            tokens: ``(B, N)`` ids.
            mask: bert: ``(B, N)`` bool, True where the mask embedding replaces the token.
        """
        b = tokens.shape[0]
        emb = self.token_embed(tokens)  # (B, N, D)
        if self.mode == "ar":
            # position i holds token i-1 (the start token at 0): its output has seen tokens < i only
            emb = torch.cat([self.sos_token.expand(b, 1, -1).to(emb.dtype), emb[:, :-1]], dim=1)  # (B, N, D)
        elif mask is not None:
            emb = torch.where(mask[..., None], self.mask_token.to(emb.dtype), emb)  # (B, N, D)
        return emb.transpose(1, 2).reshape(b, -1, *self.grid)  # (B, D, H, W)

    def hidden(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Features ``(B, N, C)`` of every position that the classifier turns into token logits.

        Args:
            tokens: ``(B, N)`` ids.
            mask: bert: ``(B, N)`` masked positions.
        """
        x = self.embed_tokens(tokens, mask)  # (B, D, H, W)
        if self.flat:
            causal = {"is_causal": True} if self.mode == "ar" else {}
            out = self.backbone.forward_tokens(x, **causal)  # (B, P + N, C)
            return out[:, self.backbone.num_prefix_tokens :]  # (B, N, C)
        maps = self.backbone.forward_pyramid(x)  # [(B, C_i, H_i, W_i)]
        return self.decoder(maps, self.grid).flatten(1, 2)  # (B, N, head_dim)

    def logits(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token logits ``(B, N, K)`` at every position: of token i given tokens < i (ar), or given the unmasked
        tokens (bert).

        Args:
            tokens: ``(B, N)`` ids.
            mask: bert: ``(B, N)`` masked positions.
        """
        return self.classifier(self.hidden(tokens, mask))  # (B, N, K)

    def token_loss(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Loss dict of a token batch: ``loss`` (nats per predicted token), ``bits_per_token``, ``token_acc``.

        Args:
            tokens: ``(B, N)`` ids.
            mask: bert: the masked positions; None draws them with the global generator.
        """
        if self.mode == "ar":
            logits = self.logits(tokens)  # (B, N, K)
            targets = tokens  # (B, N)
        else:
            if mask is None:
                mask = draw_mask(tokens.shape[0], self.num_tokens, self.cfg.mask_ratio).to(tokens.device)
            # classify the masked positions only: the others carry no loss
            logits = self.classifier(self.hidden(tokens, mask)[mask])  # (M, K)
            targets = tokens[mask]  # (M,)
        logits = logits.reshape(-1, logits.shape[-1]).float()  # (T, K)
        targets = targets.reshape(-1)  # (T,)
        loss = F.cross_entropy(logits, targets)
        acc = (logits.detach().argmax(-1) == targets).float().mean()
        return {"loss": loss, "bits_per_token": loss.detach() / math.log(2.0), "token_acc": acc}

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        images, _ = batch  # (B, 3, H, W) RGB in [0, 1]; labels unused
        return self.token_loss(self.tokenize(images))

    # --------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def complete(
        self,
        tokens: torch.Tensor,
        num_given: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample tokens ``num_given..N-1`` one at a time, keeping the first ``num_given`` (ar only).

        Each step re-runs the whole sequence (timm's blocks keep no key/value cache); causality makes the
        positions after the one being sampled irrelevant.

        Args:
            tokens: ``(B, N)`` ids; positions ``>= num_given`` are overwritten.
            num_given: raster positions kept as the prompt (N/2 = the top half).
            temperature: softmax temperature (> 0).
            top_k: sample among the k likeliest tokens; None or 0 = all.
            generator: random generator on the tokens' device (None: the global one).
        """
        if self.mode != "ar":
            raise ValueError("sampling needs an autoregressive model (objective.mode=ar); this one is bert")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0 <= num_given <= self.num_tokens:
            raise ValueError(f"num_given={num_given} must lie in 0..{self.num_tokens}")
        out = tokens.clone()  # (B, N)
        for i in range(num_given, self.num_tokens):
            logits = self.classifier(self.hidden(out)[:, i]).float() / temperature  # (B, K)
            if top_k:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = logits.softmax(-1)  # (B, K)
            out[:, i] = torch.multinomial(probs, 1, generator=generator)[:, 0]
        return out

    # ------------------------------------------------------------------------------------ engine contract
    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """timm's rule for the backbone, plus no decay on the learned input tokens (start-of-image, mask) and the
        pyramid head's in-cell position table; the token embedding and the heads' weights decay."""
        from vitssl.ssl.base import backbone_no_decay, split_decay

        own = {"sos_token", "mask_token", "decoder.cell_pos_embed"}
        return split_decay(self.named_parameters(), weight_decay, backbone_no_decay(self) | own)

    def train_sample_fn(self, data_cfg: DataConfig) -> Callable[[Any, Any], Any]:
        """Random-resized crop to the token grid + flip, as RGB in [0, 1]; tokens are made in ``forward``."""
        from torchvision.transforms import v2 as T

        if not self._palette_set:  # the engine did not call setup(): fit now, without writing the run folder
            self._prepare_palette(data_cfg)
        ops: list[Any] = [
            T.ToImage(),
            T.RandomResizedCrop(data_cfg.img_size, scale=tuple(self.cfg.crop_scale), antialias=True),
        ]
        if self.cfg.flip:
            ops.append(T.RandomHorizontalFlip())
        ops.append(T.ToDtype(torch.float32, scale=True))
        return ImageTransform(T.Compose(ops))

    def eval_sample_fn(self, data_cfg: DataConfig) -> Callable[[Any, Any], Any]:
        """Resize + centre crop to the token grid, as RGB in [0, 1] (``eval_features`` quantises)."""
        from torchvision.transforms import v2 as T

        transform = T.Compose([pal.low_res_transform(data_cfg.img_size), T.ToDtype(torch.float32, scale=True)])
        return ImageTransform(transform)

    def eval_features(self, images: torch.Tensor) -> torch.Tensor:
        """Probe features ``(B, C)``: block (or stage) ``probe_layer``'s output, layer-normed, averaged."""
        tokens = self.tokenize(images)  # (B, N)
        x = self.embed_tokens(tokens)  # (B, D, H, W), nothing masked
        bb = self.backbone
        if bb.family == "vit":
            causal = {"is_causal": True} if self.mode == "ar" else {}
            out = bb.forward_intermediate(x, bb.depth - self.probe_layer, **causal)[0]  # (B, P + N', C)
            return out[:, bb.num_prefix_tokens :].mean(1)  # (B, C)
        fmap = bb.forward_pyramid(x)[self.probe_layer]  # (B, C_l, H_l, W_l)
        fmap = fmap.flatten(2).transpose(1, 2)  # (B, N_l, C_l)
        return F.layer_norm(fmap, fmap.shape[-1:]).mean(1)  # (B, C_l)


@torch.no_grad()
def evaluate_bits_per_token(
    objective: IGPT,
    dataset: torch.utils.data.Dataset,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    seed: int = 0,
    num_workers: int = 0,
) -> dict[str, float]:
    """Validation loss of an iGPT objective: bits and nats per predicted token, over a whole dataset.

    bert masks come from a generator seeded with ``seed``, so the figure is reproducible.

    Args:
        objective: the model (put in eval mode for the duration).
        dataset: items ``(image tensor, target)`` from ``objective.eval_sample_fn``.
        batch_size: images per forward pass.
        device: where the model runs.
        seed: seed of the bert masks.
        num_workers: data-loading processes.

    Returns:
        ``{"bits_per_token", "nats_per_token", "tokens", "images"}``.
    """
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    generator = torch.Generator().manual_seed(seed)
    was_training = objective.training
    objective.eval()
    total, count, images = 0.0, 0, 0
    try:
        for batch, _ in loader:
            tokens = objective.tokenize(batch.to(device))  # (B, N)
            mask = None
            if objective.mode == "bert":
                mask = draw_mask(tokens.shape[0], objective.num_tokens, objective.cfg.mask_ratio, generator)
                mask = mask.to(device)
            out = objective.token_loss(tokens, mask)
            predicted = tokens.numel() if mask is None else int(mask.sum())
            total += float(out["loss"]) * predicted
            count += predicted
            images += tokens.shape[0]
    finally:
        objective.train(was_training)
    if count == 0:
        raise ValueError("evaluate_bits_per_token: the dataset is empty")
    nats = total / count
    return {"bits_per_token": nats / math.log(2.0), "nats_per_token": nats, "tokens": count, "images": images}


__all__ = [
    "IGPT",
    "PALETTE_FILE",
    "IGPTConfig",
    "PyramidTokenHead",
    "bert_loss",
    "draw_mask",
    "evaluate_bits_per_token",
]
