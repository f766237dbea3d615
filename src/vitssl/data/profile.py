"""Per-stage timing of a training input pipeline, to size a node: how many images/s one CPU core feeds.

:func:`profile_pipeline` runs a dataset and a sample function in this process on one thread, as a loader worker
does, then collates the samples, copies each batch to the device and applies the device-side augmentation and
normalisation (``augment_device=gpu``). Sample functions with a ``timings`` attribute (``MocoV3Views``) report
their own stages (decode, crop, each augmentation); others are timed as one stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from vitssl.data.augment import prepare_view
from vitssl.data.wrappers import collate_skip_none
from vitssl.errors import DataError

# Worker-side stages in pipeline order (sample functions may add others; they follow these).
_ORDER = ("read", "draw", "decode", "crop", "brightness", "contrast", "saturation", "hue", "grayscale", "blur",
          "solarize", "flip", "to_tensor", "sample_fn", "collate")  # fmt: skip


@dataclass
class PipelineProfile:
    """Timings of one profiled pipeline.

    Attributes:
        samples: samples timed.
        batch_size: samples per collated batch.
        worker_ms: milliseconds per sample of each worker-side stage (read, decode, ..., collate).
        device_ms: milliseconds per batch of the device stages (host_to_device, device_augment).
        device: where the device stages ran.
    """

    samples: int
    batch_size: int
    worker_ms: dict[str, float] = field(default_factory=dict)
    device_ms: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"

    @property
    def img_s_per_core(self) -> float:
        """Samples per second one loader worker (one core) produces."""
        total = sum(self.worker_ms.values())
        return 1000.0 / total if total > 0 else float("inf")

    def cores_for(self, img_s: float) -> float:
        """Loader cores needed to feed ``img_s`` samples per second."""
        return img_s / self.img_s_per_core

    def format(self, target_img_s: float | None = None) -> str:
        """A table of the stages, the per-core rate and, given a target rate, the cores it needs."""
        total = sum(self.worker_ms.values())
        lines = [f"{'stage':<16}{'ms/sample':>10}{'share':>8}"]
        for name, ms in self.worker_ms.items():
            lines.append(f"{name:<16}{ms:>10.3f}{100 * ms / total if total else 0:>7.1f}%")
        lines.append(f"{'worker total':<16}{total:>10.3f}   -> {self.img_s_per_core:.1f} img/s per core")
        for name, ms in self.device_ms.items():
            lines.append(f"{name:<16}{ms:>10.3f} ms/batch of {self.batch_size} on {self.device}")
        if target_img_s:
            lines.append(f"{target_img_s:.0f} img/s needs {self.cores_for(target_img_s):.1f} loader cores")
        return "\n".join(lines)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_stage(batch: Any, mean: Sequence[float], std: Sequence[float]) -> None:
    views = batch[0] if isinstance(batch, (list, tuple)) and batch else None
    if isinstance(views, list):
        for view in views:
            if isinstance(view, (dict, torch.Tensor)):
                prepare_view(view, mean, std)


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def profile_pipeline(
    dataset: Dataset,
    sample_fn: Callable[[Any, Any], Any],
    num_samples: int = 256,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
) -> PipelineProfile:
    """Time ``sample_fn(*dataset[i])`` for the first ``num_samples`` items, one thread, stage by stage.

    Args:
        dataset: a map-style dataset of ``(image, target)`` items.
        sample_fn: the objective's training sample function.
        num_samples: items to time (the dataset's length if smaller); a warm-up sample is not counted.
        batch_size: samples per collated batch (collate, host-to-device and device stages run per batch).
        device: where the device stages run.
        mean: normalisation mean of the device stage.
        std: normalisation std of the device stage.

    Raises:
        DataError: ``num_samples`` or ``batch_size`` is not positive, or the dataset is empty.
    """
    if num_samples < 1 or batch_size < 1:
        raise DataError(f"num_samples and batch_size must be positive, got {num_samples} and {batch_size}")
    n = min(num_samples, len(dataset))  # type: ignore[arg-type]
    if n == 0:
        raise DataError("the dataset is empty: nothing to profile")
    device = torch.device(device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loader worker's budget: one core
    timings: dict[str, float] = {}
    own = hasattr(sample_fn, "timings")
    try:
        sample_fn(*dataset[0])  # warm-up (imports, first allocations)
        if own:
            sample_fn.timings = timings  # type: ignore[attr-defined]
        device_s = {"host_to_device": 0.0, "device_augment": 0.0}
        batch: list[Any] = []
        batches = 0
        for i in range(n):
            t0 = time.perf_counter()
            item = dataset[i]
            t1 = time.perf_counter()
            batch.append(sample_fn(*item))
            t2 = time.perf_counter()
            timings["read"] = timings.get("read", 0.0) + t1 - t0
            if not own:
                timings["sample_fn"] = timings.get("sample_fn", 0.0) + t2 - t1
            if len(batch) == batch_size or i == n - 1:
                t0 = time.perf_counter()
                collated, _ = collate_skip_none(batch)
                t1 = time.perf_counter()
                on_device = _to(collated, device)
                _sync(device)
                t2 = time.perf_counter()
                _device_stage(on_device, mean, std)
                _sync(device)
                t3 = time.perf_counter()
                timings["collate"] = timings.get("collate", 0.0) + t1 - t0
                device_s["host_to_device"] += t2 - t1
                device_s["device_augment"] += t3 - t2
                batches += 1
                batch = []
    finally:
        if own:
            sample_fn.timings = None  # type: ignore[attr-defined]
        torch.set_num_threads(threads)
    rank = {name: i for i, name in enumerate(_ORDER)}
    worker = {k: 1000.0 * timings[k] / n for k in sorted(timings, key=lambda k: rank.get(k, len(_ORDER)))}
    return PipelineProfile(
        samples=n,
        batch_size=batch_size,
        worker_ms=worker,
        device_ms={k: 1000.0 * v / batches for k, v in device_s.items()},
        device=str(device),
    )


__all__ = ["PipelineProfile", "profile_pipeline"]
