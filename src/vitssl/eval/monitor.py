"""Online k-NN monitor: weighted k-NN top-1 of the current backbone on ``data.val`` during training.

It is an engine :class:`~vitssl.engine.Callback`: the command that launches training adds it when
``eval.knn_every_epochs > 0`` and ``data.val`` is set (the engine itself never imports evaluation code).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset, Subset

from vitssl.config import ConfigError
from vitssl.engine import Callback

_logger = logging.getLogger(__name__)


class _ClassLabels(Dataset):
    """An image-text dataset seen through its class labels (``labels``) instead of its captions."""

    def __init__(self, base: Any) -> None:
        self.base, self.classes, self.labels = base, base.classes, base.labels

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.base[index][0], int(self.labels[index])


class KnnMonitor(Callback):
    """Extracts features of a (capped) train bank and of the val split, each rank a shard, and votes.

    Runs every ``eval.knn_every_epochs`` epochs and logs ``knn_top1``.

    Args:
        cfg: the run config (``data.train``, ``data.val``, ``eval.*``).
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    @staticmethod
    def wanted(cfg: DictConfig) -> bool:
        """Whether the run's config asks for the monitor."""
        return cfg.eval.knn_every_epochs > 0 and cfg.data.val is not None

    def on_train_start(self, objective: torch.nn.Module, device: torch.device) -> None:
        from vitssl.data import TransformedDataset, build_dataset

        cfg = self.cfg
        self.objective, self.device = objective, device
        sample_fn = objective.eval_sample_fn(cfg.data)
        splits = {}
        for role in ("train", "val"):
            dcfg = cfg.data[role]
            base = build_dataset(dcfg.name, root=dcfg.root, split=dcfg.split, **dict(dcfg.kwargs))
            if getattr(base, "labels", None) is not None:  # image-text sets carry class labels beside captions
                base = _ClassLabels(base)
            if not getattr(base, "classes", None):
                raise ConfigError(f"eval.knn_every_epochs needs labelled data; data.{role} ({dcfg.name}) has no labels")
            splits[role] = TransformedDataset(base, sample_fn, seed=cfg.seed, skip_corrupt=cfg.data.skip_corrupt)
        bank = splits["train"]
        if len(bank) > cfg.eval.knn_max_train:
            bank = Subset(bank, range(cfg.eval.knn_max_train))
        self.bank, self.queries = bank, splits["val"]
        self.num_classes = len(splits["train"].base.classes)

    def _features(self, dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
        from vitssl.eval.features import extract_features

        return extract_features(self.objective.eval_features, dataset, self.cfg.eval.knn_batch_size, self.device)

    def on_epoch_end(self, epoch: int, step: int) -> dict[str, float]:
        if (epoch + 1) % self.cfg.eval.knn_every_epochs:
            return {}
        return self.evaluate()

    def evaluate(self) -> dict[str, float]:
        """k-NN top-1 (percent) of the current backbone; the objective is put back in training mode."""
        from vitssl.eval.knn import knn_predict

        was_training = self.objective.training
        self.objective.eval()
        try:
            train_f, train_l = self._features(self.bank)
            val_f, val_l = self._features(self.queries)
        finally:
            self.objective.train(was_training)
        scores = knn_predict(
            train_f, train_l, val_f, self.cfg.eval.knn_k, self.cfg.eval.knn_temperature, self.num_classes
        )
        top1 = (torch.as_tensor(scores).argmax(1) == val_l).float().mean().item() * 100
        return {"knn_top1": top1}
