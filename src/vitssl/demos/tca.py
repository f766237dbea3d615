"""``python -m vitssl.demo tca [key=value ...]``: train ``video_tca`` on a generated near-duplicate benchmark and
score it against baselines.

:func:`run_tca_demo` writes the benchmark (:func:`vitssl.video.neardup.make_neardup_benchmark`: source clips,
seven edited copies of each, distractors; sources split into train and held-out test), exports a frame backbone,
trains TCA on the train split (edited copies of the train sources grouped by the ground truth) and indexes the
held-out split four ways with the video index of :mod:`vitssl.index.video`:

- ``tca``: TCA video vectors (cosine), ``tca_chamfer``: the same index with every database video re-scored by
  chamfer similarity of TCA's frame outputs (TCA_f);
- ``mean_frames``: the mean of the L2-normalised frame features of the same frozen frame backbone (no training);
- ``thumbnails``: the mean of raw 8x8 thumbnails (no network);
- ``whitened_mean_frames``: the mean of TCA's input (the PCA-whitened frame features, no encoder), to tell the
  encoder's share of TCA's gain from the whitening's.

mAP is over the held-out sources as queries and their copies as positives, the whole held-out split (copies and
distractors) as the database. The frame backbone of the demo is a randomly initialised small ViT (no pretrained
weights can be downloaded here): a fixed random feature map shared by TCA and the mean-of-frames baseline. Writes
``runs/demo_tca/results.json`` (``runs/demo_tca-<overrides>`` with overrides).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from vitssl.config import load_config
from vitssl.demos.common import demo_root, train_or_reuse
from vitssl.io import write_json

_logger = logging.getLogger(__name__)

RECIPE = "video/tca_demo"
TCA_OUTPUT = "runs/demo_tca"
METHODS = ("tca", "tca_chamfer", "mean_frames", "thumbnails")
BENCHMARK = {"num_sources": 32, "num_distractors": 32, "size": 64}  # 16 sources per split, 7 copies each


def export_frame_backbone(cfg: Any, path: Path) -> Path:
    """Write the recipe's frame backbone (``model.*``, random init under ``cfg.seed``) as ``.safetensors``."""
    import torch

    from vitssl.backbones import create_backbone, save_backbone

    if path.is_file():
        return path
    torch.manual_seed(cfg.seed)
    backbone = create_backbone(cfg.model.backbone, img_size=cfg.data.img_size, **dict(cfg.model.backbone_kwargs))
    return save_backbone(backbone, path)


def evaluate_methods(benchmark: Path, models: dict[str, str], out: Path, fps: float = 1.0) -> dict[str, dict[str, Any]]:
    """Index the benchmark's test split with each model and score it against the ground truth.

    Args:
        benchmark: the benchmark folder (``test.txt``, ``ground_truth.jsonl``).
        models: method name -> what :meth:`VideoEmbedder.open` takes; ``tca`` also gives ``tca_chamfer``.
        out: folder for the index folders (``<out>/index_<method>``).
        fps: frames sampled per second for the frame models (a TCA checkpoint uses its own rate).

    Returns:
        Per method ``mAP``, ``recall@k``, ``num_queries``, ``database`` and ``seconds`` (index build + search).
    """
    from vitssl.eval.retrieval_metrics import read_ground_truth
    from vitssl.index.video import VideoEmbedder, build_video_index, evaluate_video_index, load_video_index

    paths = [p for p in (benchmark / "test.txt").read_text().splitlines() if p.strip()]
    gt = read_ground_truth(benchmark / "ground_truth.jsonl")
    results: dict[str, dict[str, Any]] = {}
    for method, model in models.items():
        start = time.perf_counter()
        embedder = VideoEmbedder.open(model, fps=fps, cache_dir=out / "frame_cache")
        embedded = embedder.embed(paths, desc=f"held-out videos ({method})")
        directory = out / f"index_{method}"
        build_video_index(directory, embedded, paths, embedder, overwrite=True)  # a rerun rebuilds it
        index, query_embedder = load_video_index(directory)
        reranks = [(method, None)] + ([("tca_chamfer", "chamfer")] if method == "tca" else [])
        for name, rerank in reranks:
            metrics = evaluate_video_index(index, query_embedder, gt, rerank=rerank, rerank_k=len(paths))
            keep = {k: v for k, v in metrics.items() if k.startswith(("mAP", "recall@"))}
            results[name] = {
                **{k: round(float(v), 4) for k, v in keep.items()},
                "num_queries": metrics["num_queries"],
                "database": metrics["database"],
                "seconds": round(time.perf_counter() - start, 1),
            }
            _logger.info("%s: mAP %.4f", name, results[name]["mAP"])
    return results


def whitened_mean_baseline(checkpoint: str, benchmark: Path, cache_dir: Path) -> dict[str, Any]:
    """mAP of the mean of PCA-whitened frame features (TCA's input, no encoder): what the training adds.

    Uses the checkpoint's frame backbone and whitening; ranks the held-out split by cosine, the query left out.
    """
    import numpy as np
    import torch

    from vitssl.eval.retrieval_metrics import evaluate_ranking, read_ground_truth
    from vitssl.video.tca import TCAEmbedder

    paths = [p for p in (benchmark / "test.txt").read_text().splitlines() if p.strip()]
    embedder = TCAEmbedder.from_checkpoint(checkpoint)
    raw = embedder.frame_features(paths, cache_dir=cache_dir)
    vectors = []
    with torch.no_grad():
        for f in raw:
            white = torch.nn.functional.normalize(embedder.objective.whiten(torch.as_tensor(f)), dim=1)  # (n, P)
            vectors.append(torch.nn.functional.normalize(white.mean(0), dim=0).numpy())
    sim = np.stack(vectors) @ np.stack(vectors).T  # (N, N)
    gt = read_ground_truth(benchmark / "ground_truth.jsonl")
    row = {p: i for i, p in enumerate(paths)}
    results = {}
    for q in gt.queries:
        if q in row:
            order = [paths[j] for j in np.argsort(-sim[row[q]], kind="stable") if j != row[q]]
            results[q] = order
    metrics = evaluate_ranking(results, {q: gt.positives[q] for q in results})
    return {k: round(float(v), 4) for k, v in metrics.items() if k.startswith(("mAP", "recall@"))}


def run_tca_demo(overrides: list[str]) -> dict[str, Any]:
    """Benchmark, frame backbone, TCA training, evaluation; writes ``<demo folder>/results.json`` and returns it.

    Args:
        overrides: ``key=value`` overrides of the ``video/tca_demo`` recipe; ``output_dir=`` names the demo folder
            (``runs/demo_tca`` by default).
    """
    from vitssl.engine.checkpoint import LAST_NAME
    from vitssl.video.neardup import make_neardup_benchmark

    root, settings = demo_root(overrides, TCA_OUTPUT)
    start = time.perf_counter()
    benchmark = root / "benchmark"
    backbone_file = root / "frame_backbone.safetensors"
    overrides = [
        *settings,
        f"output_dir={root / 'tca'}",
        f"data.train.root={benchmark}",
        f"data.train.kwargs.ground_truth={benchmark / 'ground_truth.jsonl'}",
        f"objective.frame_backbone={backbone_file}",
    ]
    cfg = load_config(RECIPE, overrides)
    print(f"writing the near-duplicate benchmark to {benchmark} (reused when it exists)")
    make_neardup_benchmark(benchmark, seed=int(cfg.seed), **BENCHMARK)
    export_frame_backbone(cfg, backbone_file)
    run_dir = root / "tca"
    trained = time.perf_counter()
    train_or_reuse(cfg)
    train_seconds = time.perf_counter() - trained
    models = {"tca": str(run_dir / LAST_NAME), "mean_frames": str(backbone_file), "thumbnails": "thumbnails"}
    results: dict[str, Any] = evaluate_methods(benchmark, models, root, fps=float(cfg.objective.fps))
    results = {m: results[m] for m in METHODS}
    results["whitened_mean_frames"] = whitened_mean_baseline(models["tca"], benchmark, root / "frame_cache")
    results["train_seconds"] = round(train_seconds, 1)
    results["seconds"] = round(time.perf_counter() - start, 1)
    write_json(results, root / "results.json")
    return results


def format_tca_table(results: dict[str, Any]) -> str:
    """The demo's table: held-out mAP and recall@5 / @10 of each method (7 positives a query: R@5 is at most 5/7)."""
    names = {
        "tca": "TCA (video vectors)",
        "tca_chamfer": "TCA_f (chamfer)",
        "mean_frames": "mean of frames",
        "thumbnails": "thumbnails (8x8)",
        "whitened_mean_frames": "whitened mean of frames",
    }
    first = results[METHODS[0]]
    lines = [
        f"held-out near-duplicate retrieval: {first['num_queries']} query sources, {first['database']} videos",
        f"{'method':<26}{'mAP':>8}{'R@5':>8}{'R@10':>8}",
        "-" * 50,
    ]
    for m in (*METHODS, "whitened_mean_frames"):
        if m in results:
            r = results[m]
            lines.append(f"{names[m]:<26}{r['mAP']:>8.3f}{r['recall@5']:>8.3f}{r['recall@10']:>8.3f}")
    return "\n".join(lines)


__all__ = [
    "BENCHMARK",
    "METHODS",
    "RECIPE",
    "TCA_OUTPUT",
    "evaluate_methods",
    "export_frame_backbone",
    "format_tca_table",
    "run_tca_demo",
    "whitened_mean_baseline",
]
