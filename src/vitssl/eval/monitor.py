"""Online k-NN monitor: weighted k-NN top-1 of the current backbone on ``data.val`` during training.

It is an engine :class:`~vitssl.engine.Callback` that the command launching training always adds (the engine
itself never imports evaluation code): it votes when ``eval.knn_every_epochs > 0`` and ``data.val`` is set, and
otherwise logs that it is off and why. ``data.val`` must hold the classes of ``data.train`` (same dataset, same
class list): a bank of one dataset's labels voting on another's images gives a number that means nothing, so
such a config is refused before training starts.
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


_OFF_FIX = "turn the monitor off with eval.knn_every_epochs=0"


def _off_reason(cfg: DictConfig) -> str:
    if cfg.eval.knn_every_epochs <= 0:
        return f"eval.knn_every_epochs={cfg.eval.knn_every_epochs} (set it to N > 0 to vote every N epochs on data.val)"
    return (
        f"eval.knn_every_epochs={cfg.eval.knn_every_epochs} but data.val is not set (set data.val to a labelled split)"
    )


def _label_space_datasets(cfg: DictConfig) -> dict[str, Any]:
    """``data.train`` and ``data.val`` built (labels only, no image decoded), refused unless they share classes."""
    from vitssl.data import build_dataset_config

    train, val = cfg.data.train, cfg.data.val
    if train.name != val.name:
        raise ConfigError(
            f"data.val is {val.name!r} but data.train is {train.name!r}: the online k-NN monitor "
            f"(eval.knn_every_epochs={cfg.eval.knn_every_epochs}) would vote with data.train's labels on data.val's "
            f"images, whose classes are others; set data.val to a held-out split of data.train's dataset "
            f"(data.val.name={train.name} and its root/split), or {_OFF_FIX}"
        )
    bases = {}
    for role, dcfg in (("train", train), ("val", val)):
        base = build_dataset_config(dcfg, f"data.{role}")
        if getattr(base, "labels", None) is not None:  # image-text sets carry class labels beside captions
            base = _ClassLabels(base)
        if not getattr(base, "classes", None):
            raise ConfigError(
                f"the online k-NN monitor needs labelled data; data.{role} ({dcfg.name}) has no class labels: "
                f"use a labelled dataset, or {_OFF_FIX}"
            )
        bases[role] = base
    train_classes, val_classes = list(bases["train"].classes), list(bases["val"].classes)
    if train_classes != val_classes:
        only = sorted(set(val_classes) - set(train_classes))[:5]
        if only:
            why = f"it has classes data.train lacks ({', '.join(map(str, only))})"
        else:
            why = "it lacks some of them or orders them otherwise, so the same label id names another class"
        raise ConfigError(
            f"data.val ({val.name}, {len(val_classes)} classes) does not share data.train's {len(train_classes)} "
            f"classes: {why}; the online k-NN monitor would compare unrelated labels. Point data.val at a "
            f"held-out split with the same class folders, or {_OFF_FIX}"
        )
    return bases


class KnnMonitor(Callback):
    """Extracts features of a (capped) train bank and of the val split, each rank a shard, and votes.

    Runs every ``eval.knn_every_epochs`` epochs and logs ``knn_top1``. The bank's labels and the queries'
    labels must name the same classes, so ``data.val`` must be a split of the dataset ``data.train`` names, with
    the same classes in the same order; anything else is refused when the monitor is built, before training.
    A monitor the config turns off (``eval.knn_every_epochs=0``, or no ``data.val``) says so in the log.

    Args:
        cfg: the run config (``data.train``, ``data.val``, ``eval.*``).

    Raises:
        ConfigError: ``data.val`` describes another label space than ``data.train``, or has no labels.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.active = self.wanted(cfg)
        if self.active:
            self.bases = _label_space_datasets(cfg)

    @staticmethod
    def wanted(cfg: DictConfig) -> bool:
        """Whether the run's config asks for the monitor (``eval.knn_every_epochs > 0`` and ``data.val`` set)."""
        return cfg.eval.knn_every_epochs > 0 and cfg.data.val is not None

    def on_train_start(self, objective: torch.nn.Module, device: torch.device) -> None:
        from vitssl import distributed as dist
        from vitssl.data import TransformedDataset

        cfg = self.cfg
        if not self.active:
            if dist.get_rank() == 0:
                _logger.info("online k-NN monitor off: %s", _off_reason(cfg))
            return
        self.objective, self.device = objective, device
        sample_fn = objective.eval_sample_fn(cfg.data)
        splits = {
            role: TransformedDataset(base, sample_fn, seed=cfg.seed, skip_corrupt=cfg.data.skip_corrupt)
            for role, base in self.bases.items()
        }
        bank = splits["train"]
        if len(bank) > cfg.eval.knn_max_train:
            bank = Subset(bank, range(cfg.eval.knn_max_train))
        self.bank, self.queries = bank, splits["val"]
        self.num_classes = len(self.bases["train"].classes)
        if dist.get_rank() == 0:
            _logger.info(
                "online k-NN monitor every %d epoch(s): %d bank images of data.train, %d queries of data.val "
                "(%s, %d classes)",
                cfg.eval.knn_every_epochs, len(bank), len(self.queries), cfg.data.val.name, self.num_classes,
            )  # fmt: skip

    def _features(self, dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
        from vitssl.eval.features import extract_features

        return extract_features(self.objective.eval_features, dataset, self.cfg.eval.knn_batch_size, self.device)

    def on_epoch_end(self, epoch: int, step: int) -> dict[str, float]:
        if not self.active or (epoch + 1) % self.cfg.eval.knn_every_epochs:
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
