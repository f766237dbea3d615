"""Zero-shot classification and image↔text retrieval with a CLIP checkpoint (library of ``vitssl eval zeroshot``
and ``vitssl eval retrieval``, whose command line lives in :mod:`vitssl.cli.eval`).

Checkpoints: a vitssl engine checkpoint of the ``clip`` objective, or an open_clip one, so a run compares with
public models by the same command: a ``vitssl export open_clip`` folder (``open_clip_config.json`` + weights), or
an open_clip ``.pt`` / ``.safetensors`` state dict with its open_clip model name (``--model ViT-B-16``).

Zero-shot classifier (CLIP / open_clip): for each class, every prompt template is filled with the class name,
the prompts are embedded by the text tower and L2-normalised, their mean is taken and L2-normalised again; an
image is assigned the class whose weight has the largest cosine similarity with its normalised embedding.
Reported: top-1 / top-5 accuracy (percent, top-5 is top-min(5, K)), mean per-class top-1, per-class top-1.

Retrieval (the COCO / Flickr protocol of CLIP and clip_benchmark): every caption is a query against all images
(text→image) and every image against all captions (image→text); recall@k is the share of queries with a correct
item among the k most similar (cosine) ones, ties broken by ``torch.topk``. Rows whose ``sample_id`` is the same
file are one image with several captions: an image→text hit is any of its captions.

Data specs (``--data``) follow :mod:`vitssl.eval.spec`: ``NAME[:key=value,...]``, split ``val`` by default::

    shapes_captions:split=val,num_samples=500
    image_text_csv:root=/data/coco/val.csv,caption_column=caption
    webdataset:root=/data/cc3m/val-{0000..0015}.tar
    imagefolder:root=/data/imagenet,split=val

Template files hold one prompt per line with ``{}`` where the class name goes; class-name files one name per
line, in the order of the dataset's classes. Blank lines and lines starting with ``#`` are ignored. Files are
looked up as given, then among the shipped ones (``zeroshot/shapes_templates.txt``).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import vitssl
from vitssl.config import CONFIG_DIR, ConfigError
from vitssl.distributed import resolve_device
from vitssl.errors import MissingFileError
from vitssl.eval.features import eval_checkpoint_error, extract_rows
from vitssl.eval.metrics import accuracy_report, topk_hits
from vitssl.eval.spec import DEFAULT_SPLIT, build_eval_dataset
from vitssl.io import write_json

_logger = logging.getLogger(__name__)

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)  # CLIP's basic prompt, used without --templates
RECALL_KS: tuple[int, ...] = (1, 5, 10)


# --------------------------------------------------------------------------------------------------------------
# Inputs: template and class-name files, checkpoints (data specs: vitssl.eval.spec)
# --------------------------------------------------------------------------------------------------------------


def resolve_list_file(path: str | os.PathLike) -> Path:
    """A template or class-name file: the path as given, else a shipped one (``zeroshot/shapes_templates.txt``).

    ``configs/zeroshot/...``, the repository path those files had before they moved into the package, still
    finds the shipped file.
    """
    given = Path(path)
    shipped = Path(*given.parts[1:]) if given.parts[:1] == ("configs",) and len(given.parts) > 1 else given
    candidates = list(dict.fromkeys([given, CONFIG_DIR / given, CONFIG_DIR / shipped]))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise MissingFileError(f"file {str(path)!r} not found (tried {', '.join(map(str, candidates))})")


def _read_lines(path: str | os.PathLike) -> tuple[Path, list[tuple[int, str]]]:
    file = resolve_list_file(path)
    lines = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if text and not text.startswith("#"):
            lines.append((number, text))
    if not lines:
        raise ConfigError(f"{file} holds no entries (one per line; blank lines and # comments are ignored)")
    return file, lines


def load_templates(path: str | os.PathLike) -> list[str]:
    """Prompt templates from a file, one per line, each with one ``{}`` for the class name."""
    file, lines = _read_lines(path)
    for number, text in lines:
        if text.count("{}") != 1:
            raise ConfigError(
                f"{file} line {number}: template {text!r} must contain exactly one '{{}}' where the class name goes"
            )
    return [text for _, text in lines]


def load_classnames(path: str | os.PathLike) -> list[str]:
    """Class names from a file, one per line, in the dataset's class order."""
    return [text for _, text in _read_lines(path)[1]]


def load_clip_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[Any, Any, int]:
    """Rebuild a CLIP objective from an engine checkpoint, in eval mode on ``device``.

    A checkpoint of the vitssl releases before the towers were open_clip's loads too: its ViT image tower was
    timm's, so it is rebuilt with ``objective.vision_tower=timm`` and its text weights renamed.

    Returns:
        ``(model, cfg, step)``: the :class:`vitssl.ssl.clip.Clip` module, the run's validated config and the
        optimizer step the checkpoint was written at.
    """
    from vitssl.engine import CheckpointError, load_objective
    from vitssl.ssl.clip import LegacyCheckpointError

    def only_clip(cfg: Any, vision_tower: str | None = None) -> None:
        if cfg.objective.name != "clip":
            raise ConfigError(
                f"checkpoint {path} was trained with objective '{cfg.objective.name}'; zero-shot and image-text "
                "retrieval need a 'clip' checkpoint (for other objectives use `vitssl eval knn` or `linear`)"
            )
        if vision_tower is not None:
            cfg.objective.vision_tower = vision_tower

    try:
        try:
            model, cfg, state = load_objective(path, device, check=only_clip)
        except LegacyCheckpointError:
            model, cfg, state = load_objective(path, device, check=lambda c: only_clip(c, "timm"))
    except CheckpointError as err:
        raise eval_checkpoint_error(err, path) from None
    return model, cfg, int(state["step"])


def is_open_clip_checkpoint(path: str | os.PathLike, model_name: str | None = None) -> bool:
    """Whether ``path`` is open_clip's rather than a vitssl engine checkpoint: a folder (``vitssl export
    open_clip``), a ``.safetensors`` file, or any file given with an open_clip model name."""
    p = Path(path)
    return bool(model_name) or p.is_dir() or p.suffix == ".safetensors"


def load_clip_model(
    path: str | os.PathLike, device: torch.device | str = "cpu", model_name: str | None = None
) -> tuple[Any, Callable[[Any, Any], Any], int | None]:
    """A CLIP model for zero-shot / retrieval evaluation: a vitssl checkpoint, or an open_clip one (an export folder,
    or a state dict with its open_clip ``model_name``).

    Returns:
        ``(model, evaluation sample function, step)``; step is None for open_clip checkpoints.
    """
    if is_open_clip_checkpoint(path, model_name):
        from vitssl.ssl.open_clip_io import load_open_clip_model

        model = load_open_clip_model(path, model_name, device)
        return model, model.eval_sample_fn(), None
    model, cfg, step = load_clip_checkpoint(path, device)
    return model, model.eval_sample_fn(cfg.data), step


# --------------------------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------------------------


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_texts(model: Any, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings ``(N, D)`` (float32, CPU) of captions or prompts.

    Args:
        model: a :class:`vitssl.ssl.clip.Clip` (or anything with ``tokenize`` and ``encode_text``).
        texts: the strings.
        batch_size: texts per forward pass.
    """
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = model.tokenize(list(texts[start : start + batch_size]))  # (b, L)
        out.append(model.encode_text(tokens, normalize=True).float().cpu())  # (b, D)
    if not out:
        raise ValueError("encode_texts needs at least one text")
    return torch.cat(out)  # (N, D)


def encode_images(
    model: Any,
    dataset: Dataset,
    sample_fn: Callable[[Any, Any], Any],
    batch_size: int = 256,
    num_workers: int = 0,
    skip_corrupt: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """L2-normalised image embeddings of a dataset, in dataset order (the extraction loop of
    :func:`vitssl.eval.features.extract_rows`, with CLIP's image tower).

    Args:
        model: a CLIP objective (``encode_image``).
        dataset: items ``(PIL image, target)``.
        sample_fn: ``(image, target) -> (tensor, target)``, e.g. ``model.eval_sample_fn(cfg.data)``.
        batch_size: images per forward pass.
        num_workers: data-loading processes.
        skip_corrupt: skip unreadable samples (and count them) instead of failing with the sample's name.

    Returns:
        ``(features (M, D) float32 CPU, indices (M,) of the rows embedded, number skipped)``; M = N - skipped.

    Raises:
        CorruptSampleError: an unreadable sample (without ``skip_corrupt``), or no readable one at all.
    """

    def embed(images: torch.Tensor) -> torch.Tensor:
        return model.encode_image(images, normalize=True)  # (b, D)

    feats, rows = extract_rows(
        embed,
        dataset,
        sample_fn,
        None,
        batch_size,
        _model_device(model),
        num_workers,
        skip_corrupt,
        desc=f"image embeddings of {type(dataset).__name__}",
    )
    skipped = len(dataset) - len(rows)  # type: ignore[arg-type]
    if skipped:
        _logger.warning("skipped %d unreadable samples of %d", skipped, len(dataset))  # type: ignore[arg-type]
    return torch.from_numpy(feats), torch.from_numpy(rows).long(), skipped


# --------------------------------------------------------------------------------------------------------------
# Zero-shot classification
# --------------------------------------------------------------------------------------------------------------


def fill_templates(classname: str, templates: Sequence[str]) -> list[str]:
    """The prompts of one class: each template with ``{}`` replaced by the class name."""
    return [t.replace("{}", classname) for t in templates]


@torch.no_grad()
def zeroshot_classifier(
    model: Any, classnames: Sequence[str], templates: Sequence[str], batch_size: int = 256
) -> torch.Tensor:
    """Class weights ``(K, D)``: per class, the re-normalised mean of its L2-normalised prompt embeddings.

    Args:
        model: a CLIP objective.
        classnames: K class names.
        templates: prompt templates with ``{}``.
        batch_size: prompts per forward pass.
    """
    if not classnames or not templates:
        raise ValueError("a zero-shot classifier needs at least one class name and one template")
    prompts = [p for name in classnames for p in fill_templates(name, templates)]
    emb = encode_texts(model, prompts, batch_size).view(len(classnames), len(templates), -1)  # (K, T, D)
    return F.normalize(emb.mean(dim=1), dim=-1)  # (K, D)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Top-1, top-5 (top-min(5, K)), mean per-class and per-class top-1 accuracy in percent.

    Args:
        logits: ``(N, K)`` class scores.
        labels: ``(N,)`` true classes in ``[0, K)``.
    """
    scores, truth = logits.float().cpu().numpy(), labels.cpu().numpy().astype(np.int64)
    num_classes = scores.shape[1]
    pred, hit_top = topk_hits(scores, truth, min(5, num_classes))
    return accuracy_report(pred == truth, hit_top, truth, num_classes)


def dataset_labels(dataset: Dataset) -> list[int]:
    """Integer class labels of a labelled dataset (``labels`` when targets are captions, else ``targets``)."""
    classes = getattr(dataset, "classes", None)
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = getattr(dataset, "targets", None)
    if not classes or labels is None or any(isinstance(x, str) for x in labels[:1]):
        raise ConfigError(
            f"{type(dataset).__name__} has no class labels; zero-shot classification needs a labelled dataset "
            "(imagefolder, cifar10, shapes, shapes_captions, ...)"
        )
    return [int(x) for x in labels]


def zeroshot_evaluate(
    model: Any,
    dataset: Dataset,
    classnames: Sequence[str],
    templates: Sequence[str],
    sample_fn: Callable[[Any, Any], Any],
    batch_size: int = 256,
    num_workers: int = 0,
    skip_corrupt: bool = False,
) -> dict[str, Any]:
    """Zero-shot accuracy of a CLIP model on a labelled dataset.

    Args:
        model: a CLIP objective in eval mode.
        dataset: labelled dataset (see :func:`dataset_labels`).
        classnames: one name per class of the dataset, in class order.
        templates: prompt templates with ``{}``.
        sample_fn: the eval image transform as a sample function.
        batch_size: images / prompts per forward pass.
        num_workers: data-loading processes.
        skip_corrupt: skip unreadable images (counted in ``skipped_corrupt``).

    Returns:
        ``top1``, ``top5``, ``mean_per_class_top1``, ``per_class_top1`` (percent), ``num_samples``,
        ``num_classes``, ``num_templates``, ``skipped_corrupt``.
    """
    labels = torch.tensor(dataset_labels(dataset))
    num_classes = len(dataset.classes)  # type: ignore[attr-defined]
    if len(classnames) != num_classes:
        raise ConfigError(f"{len(classnames)} class names given for a dataset with {num_classes} classes")
    weights = zeroshot_classifier(model, classnames, templates, batch_size)  # (K, D)
    feats, rows, skipped = encode_images(model, dataset, sample_fn, batch_size, num_workers, skip_corrupt)
    logits = feats @ weights.T  # (N, K) cosine similarities; the logit scale does not change the ranking
    return {
        **topk_accuracy(logits, labels[rows]),
        "num_samples": len(rows),
        "num_classes": num_classes,
        "num_templates": len(templates),
        "skipped_corrupt": skipped,
    }


# --------------------------------------------------------------------------------------------------------------
# Image–text retrieval
# --------------------------------------------------------------------------------------------------------------


def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = RECALL_KS,
    chunk_size: int = 4096,
) -> dict[str, dict[str, float]]:
    """Image→text and text→image recall@k (percent) from L2-normalised embeddings.

    Args:
        image_features: ``(I, D)`` one row per distinct image.
        text_features: ``(N, D)`` one row per caption.
        text_to_image: ``(N,)`` the image row each caption describes.
        ks: cut-offs (each clipped to the number of candidates).
        chunk_size: queries per similarity block (bounds memory at ``chunk_size × max(I, N)`` floats).

    Returns:
        ``{"image_to_text": {"R@1": ..., ...}, "text_to_image": {...}}``.
    """
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    if text_to_image.shape != (n_txt,) or (n_txt and int(text_to_image.max()) >= n_img):
        raise ValueError(f"text_to_image must be ({n_txt},) with values < {n_img}, got shape {text_to_image.shape}")
    k_i2t, k_t2i = min(max(ks), n_txt), min(max(ks), n_img)
    # image→text: rank of the best caption of each image among all captions
    i2t_rank = torch.empty(n_img, dtype=torch.long)
    for start in range(0, n_img, chunk_size):
        sims = image_features[start : start + chunk_size] @ text_features.T  # (c, N)
        top = sims.topk(k_i2t, dim=1).indices  # (c, k)
        owner = torch.arange(start, start + len(sims))[:, None]  # (c, 1)
        hit = text_to_image[top] == owner  # (c, k)
        i2t_rank[start : start + len(sims)] = torch.where(hit.any(1), hit.float().argmax(1), k_i2t)
    # text→image: rank of each caption's image among all images
    t2i_rank = torch.empty(n_txt, dtype=torch.long)
    for start in range(0, n_txt, chunk_size):
        sims = text_features[start : start + chunk_size] @ image_features.T  # (c, I)
        top = sims.topk(k_t2i, dim=1).indices  # (c, k)
        hit = top == text_to_image[start : start + len(sims), None]  # (c, k)
        t2i_rank[start : start + len(sims)] = torch.where(hit.any(1), hit.float().argmax(1), k_t2i)
    return {
        "image_to_text": {f"R@{k}": float((i2t_rank < k).double().mean() * 100) for k in ks},
        "text_to_image": {f"R@{k}": float((t2i_rank < k).double().mean() * 100) for k in ks},
    }


def retrieval_evaluate(
    model: Any,
    dataset: Dataset,
    sample_fn: Callable[[Any, Any], Any],
    batch_size: int = 256,
    num_workers: int = 0,
    skip_corrupt: bool = False,
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, Any]:
    """Image↔text recall@k of a CLIP model on an image-caption dataset.

    Rows with the same ``sample_id`` (the same image file listed with several captions) count as one image.

    Args:
        model: a CLIP objective in eval mode.
        dataset: items ``(image, caption)``; ``targets`` holds the captions.
        sample_fn: the eval image transform as a sample function.
        batch_size: images / captions per forward pass.
        num_workers: data-loading processes.
        skip_corrupt: skip unreadable samples (their captions are left out too).
        ks: recall cut-offs.

    Returns:
        :func:`retrieval_recall`'s result plus ``num_images``, ``num_texts``, ``skipped_corrupt``.
    """
    captions = list(getattr(dataset, "targets", []))
    if not captions or not all(isinstance(c, str) for c in captions):
        raise ConfigError(
            f"{type(dataset).__name__} does not hold captions; image-text retrieval needs an image-caption dataset "
            "(image_text_csv, webdataset, shapes_captions)"
        )
    feats, rows, skipped = encode_images(model, dataset, sample_fn, batch_size, num_workers, skip_corrupt)
    image_of: dict[str, int] = {}  # sample id -> image row
    first_rows: list[int] = []  # the first embedded row of each distinct image
    text_to_image = []
    for pos, row in enumerate(rows.tolist()):
        sid = dataset.sample_id(row)  # type: ignore[attr-defined]
        if sid not in image_of:
            image_of[sid] = len(first_rows)
            first_rows.append(pos)
        text_to_image.append(image_of[sid])
    image_features = feats[first_rows]  # (I, D)
    text_features = encode_texts(model, [captions[int(r)] for r in rows], batch_size)  # (N, D)
    result = retrieval_recall(image_features, text_features, torch.tensor(text_to_image), ks)
    return {**result, "num_images": len(first_rows), "num_texts": len(rows), "skipped_corrupt": skipped}


# --------------------------------------------------------------------------------------------------------------
# Whole evaluations: checkpoint + data spec -> JSON result (the `vitssl eval zeroshot|retrieval` commands)
# --------------------------------------------------------------------------------------------------------------


def _default_output(checkpoint: str | os.PathLike, task: str, name: str, options: dict[str, Any]) -> Path:
    split = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(options.get("split", DEFAULT_SPLIT)))
    path = Path(checkpoint).resolve()
    return (path if path.is_dir() else path.parent) / f"{task}-{name}-{split}.json"


def _run_clip_eval(
    task: str,
    checkpoint: str | os.PathLike,
    data: str,
    output: str | os.PathLike | None,
    device: str,
    evaluate: Callable[[Any, Dataset, Callable[[Any, Any], Any]], dict[str, Any]],
    model_name: str | None = None,
) -> dict[str, Any]:
    """Load a CLIP checkpoint and a dataset, run ``evaluate`` on them and write the result as JSON.

    Args:
        task: ``zeroshot`` or ``retrieval``: the result's ``task`` and the default file name's prefix.
        checkpoint: an engine checkpoint of the ``clip`` objective, or an open_clip one (see
            :func:`load_clip_model`).
        data: data spec.
        output: JSON path; default ``<task>-<dataset>-<split>.json`` next to the checkpoint.
        device: auto | cpu | cuda.
        evaluate: ``(model, dataset, eval sample function) -> metrics``, placed in the result after what was
            evaluated and before the version, time and path.
        model_name: open_clip model name of a state-dict checkpoint.
    """
    start = time.perf_counter()
    model, sample_fn, step = load_clip_model(checkpoint, resolve_device(device), model_name)
    dataset, name, options = build_eval_dataset(data)
    metrics = evaluate(model, dataset, sample_fn)
    path = Path(output) if output is not None else _default_output(checkpoint, task, name, options)
    result = {
        "task": task,
        "checkpoint": str(checkpoint),
        "format": "open_clip" if step is None else "vitssl",
        "open_clip_model": model_name,
        "step": step,
        "data": data,
        "dataset": name,
        "options": options,
        **metrics,
        "vitssl_version": vitssl.__version__,
        "seconds": round(time.perf_counter() - start, 3),
        "output": str(path),
    }
    write_json(result, path)
    return result


def run_zeroshot(
    checkpoint: str | os.PathLike,
    data: str,
    classnames: str | os.PathLike | None = None,
    templates: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str = "auto",
    skip_corrupt: bool = False,
    model_name: str | None = None,
) -> dict[str, Any]:
    """``vitssl eval zeroshot``: evaluate a CLIP checkpoint zero-shot and write the result as JSON.

    Args:
        checkpoint: an engine checkpoint of the ``clip`` objective, or an open_clip export folder or state dict.
        data: data spec of a labelled dataset (split ``val`` by default).
        classnames: class-name file; default: the dataset's ``classes``.
        templates: template file; default: :data:`DEFAULT_TEMPLATES`.
        output: JSON path; default ``zeroshot-<dataset>-<split>.json`` next to the checkpoint.
        batch_size: images / prompts per forward pass.
        num_workers: data-loading processes.
        device: auto | cpu | cuda.
        skip_corrupt: skip and count unreadable images instead of failing.
        model_name: open_clip model name of a state-dict checkpoint (e.g. ``ViT-B-16``).

    Returns:
        The result written to ``output`` (its path under ``output``).
    """

    def evaluate(model: Any, dataset: Dataset, sample_fn: Callable[[Any, Any], Any]) -> dict[str, Any]:
        names = load_classnames(classnames) if classnames is not None else list(getattr(dataset, "classes", []))
        prompts = load_templates(templates) if templates is not None else list(DEFAULT_TEMPLATES)
        if classnames is not None and len(names) != len(getattr(dataset, "classes", [])):
            raise ConfigError(
                f"{classnames} lists {len(names)} class names but {data!r} has "
                f"{len(getattr(dataset, 'classes', []))} classes; give one name per class, in class order"
            )
        metrics = zeroshot_evaluate(model, dataset, names, prompts, sample_fn, batch_size, num_workers, skip_corrupt)
        return {**metrics, "classnames": names, "templates": prompts}

    return _run_clip_eval("zeroshot", checkpoint, data, output, device, evaluate, model_name)


def run_retrieval(
    checkpoint: str | os.PathLike,
    data: str,
    output: str | os.PathLike | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str = "auto",
    skip_corrupt: bool = False,
    model_name: str | None = None,
) -> dict[str, Any]:
    """``vitssl eval retrieval``: image↔text recall@1/5/10 of a CLIP checkpoint, written as JSON.

    Args:
        checkpoint: an engine checkpoint of the ``clip`` objective, or an open_clip export folder or state dict.
        data: data spec of an image-caption dataset (split ``val`` by default).
        output: JSON path; default ``retrieval-<dataset>-<split>.json`` next to the checkpoint.
        batch_size: images / captions per forward pass.
        num_workers: data-loading processes.
        device: auto | cpu | cuda.
        skip_corrupt: skip and count unreadable samples instead of failing.
        model_name: open_clip model name of a state-dict checkpoint (e.g. ``ViT-B-16``).
    """

    def evaluate(model: Any, dataset: Dataset, sample_fn: Callable[[Any, Any], Any]) -> dict[str, Any]:
        return retrieval_evaluate(model, dataset, sample_fn, batch_size, num_workers, skip_corrupt)

    return _run_clip_eval("retrieval", checkpoint, data, output, device, evaluate, model_name)


__all__ = [
    "DEFAULT_TEMPLATES",
    "dataset_labels",
    "encode_images",
    "encode_texts",
    "fill_templates",
    "is_open_clip_checkpoint",
    "load_classnames",
    "load_clip_checkpoint",
    "load_clip_model",
    "load_templates",
    "resolve_list_file",
    "retrieval_evaluate",
    "retrieval_recall",
    "run_retrieval",
    "run_zeroshot",
    "topk_accuracy",
    "zeroshot_classifier",
    "zeroshot_evaluate",
]
