"""Image–text shards: start-up and memory flat in the number of shards, loader throughput against open_clip's.

1. Start-up. For a corpus of 2 shards and one of 200 shards (``--per-shard`` generated captioned shapes each),
   the wall time from starting ``vitssl pretrain`` (a fresh process, a tiny CLIP, one loader process) to the end
   of its first optimizer step, and the peak resident memory of that process, for the streamed dataset
   (``webdataset_stream``) and the map-style one it replaces (``webdataset``, which indexes every shard first).
   Goal: the streamed set's 200-shard figures within 1.3x of its 2-shard ones.
2. Throughput. Samples/s (decode, CLIP augmentation and tokenisation included, batches collated) of the
   streamed set's DataLoader against a bare ``webdataset`` pipeline built the way open_clip's
   ``training/data.py:get_wds_dataset`` builds it (shard shuffle, ``split_by_node``, ``split_by_worker``,
   ``tarfile_to_samples``, a 5000-sample shuffle buffer, ``decode("pilrgb")``, ``rename``, ``map_dict``,
   ``to_tuple``, ``batched``, a ``WebLoader``), both with the same workers, buffer, transform and batch size.
   Runs alternate (bare, ours, bare, ours, ...) and the median counts. Goal: within 10 % of the bare pipeline.

    python benchmarks/shards_startup.py [--per-shard 300] [--repeats 2] [--json benchmarks/results/shards_startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import vitssl.ssl  # noqa: F401  (registers the objectives)
from vitssl.config import build_config
from vitssl.data import collate_skip_none
from vitssl.data.shards import ShardStream, list_shards, shapes_samples, write_shards
from vitssl.engine import build_objective
from vitssl.io import write_json

RECIPE = """
seed: 0
model: {{backbone: test_vit}}
objective: {{name: clip, embed_dim: 16, text_width: 16, text_depth: 1, text_heads: 2, context_length: 32}}
data:
  train: {{name: {name}, root: {root}, kwargs: {kwargs}}}
  img_size: 32
  num_workers: 0
train: {{epochs: 1, batch_size: 32, stop_after_steps: 1, checkpoint_every_steps: 1000, log_every_steps: 1}}
optim: {{name: adamw, lr: 1.0e-3, lr_scaling: none}}
"""


def make_corpus(folder: Path, shards: int, per_shard: int, img_size: int) -> Path:
    """``shards`` tars of ``per_shard`` samples; the same generated images repeat under new keys in each."""
    base = list(shapes_samples(per_shard, img_size=img_size))

    def samples():
        for s in range(shards):
            for key, jpg, caption, meta in base:
                yield f"{s:05d}{key}", jpg, caption, meta

    write_shards(folder, samples(), per_shard)
    return folder


def startup(root: Path, name: str, num_samples: int, out: Path) -> dict[str, float]:
    """Seconds from process start to the end of the first optimizer step, and the process's peak RSS."""
    kwargs = f"{{num_samples: {num_samples}}}" if name == "webdataset_stream" else "{}"
    recipe = out.with_suffix(".yaml")
    recipe.write_text(RECIPE.format(name=name, root=root, kwargs=kwargs))
    cmd = [sys.executable, "-m", "vitssl", "pretrain", str(recipe), f"output_dir={out}", "resume=none"]
    log = out.with_suffix(".log")
    with open(log, "wb") as err:
        start = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss in KiB on Linux)
    if status != 0:
        raise RuntimeError(f"{cmd} failed: {log.read_text()[-2000:]}")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r["time"] for r in records if r.get("step") == 1)
    return {"first_step_s": round(first - start, 3), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def _clip_sample_fn():
    cfg = build_config(
        {
            "model": {"backbone": "test_vit"},
            "objective": {"name": "clip", "embed_dim": 16, "text_width": 16, "text_depth": 1, "text_heads": 2},
            "data": {"img_size": 32},
        }
    )
    return build_objective(cfg).train_sample_fn(cfg.data)


def _has_caption_and_image(sample: dict) -> bool:  # open_clip's filter_no_caption_or_no_image
    return "txt" in sample and any(k in sample for k in ("png", "jpg", "jpeg", "webp"))


def bare_open_clip_loader(shards: list[str], sample_fn, batch: int, workers: int, seed: int):
    """open_clip's training pipeline (``get_wds_dataset``, not resampled), on the same transform and tokenizer."""
    import webdataset as wds

    transform, tokenizer = sample_fn.transform, sample_fn.tokenizer
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shards),
        wds.shuffle(bufsize=2000, initial=500, seed=seed),  # open_clip: detshuffle2 over the shard list
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(bufsize=5000, initial=1000),
        wds.select(_has_caption_and_image),
        wds.decode("pilrgb", handler=wds.warn_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=transform, text=lambda text: tokenizer(text)[0]),
        wds.to_tuple("image", "text"),
        wds.batched(batch, partial=False),
    )
    return wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=workers, persistent_workers=False)


def ours_loader(root: Path, sample_fn, batch: int, workers: int, batches: int, seed: int):
    ds = ShardStream(root, num_samples=batch * batches, shuffle_buffer=5000, shuffle_initial=1000)
    ds.bind(sample_fn, seed=seed, rank=0, world_size=1, skip_corrupt=False)
    ds.check_slots(workers)
    ds.set_epoch(0, batch, batches)
    return DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate_skip_none)


def samples_per_second(loader, batches: int, warmup: int, unpack) -> float:
    """Samples/s over ``batches`` batches after ``warmup`` batches (buffers filled, workers started)."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    start, n = time.perf_counter(), 0
    for item in islice(it, batches):
        n += unpack(item)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-shard", type=int, default=300, help="samples per shard")
    parser.add_argument("--img-size", type=int, default=64, help="side of the generated JPEGs, pixels")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each start-up measurement")
    parser.add_argument("--throughput-repeats", type=int, default=3, help="runs of each loader")
    parser.add_argument("--workers", type=int, default=2, help="loader workers in the throughput runs")
    parser.add_argument("--batch", type=int, default=64, help="batch size in the throughput runs")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per throughput run")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="vitssl_shards_") as tmp:
        tmp_path = Path(tmp)
        corpora = {n: make_corpus(tmp_path / f"c{n}", n, args.per_shard, args.img_size) for n in (2, 200)}
        rows = []
        for n, root in corpora.items():
            for name in ("webdataset", "webdataset_stream"):
                runs = [
                    startup(root, name, 2 * args.per_shard, tmp_path / f"run-{n}-{name}-{r}")
                    for r in range(args.repeats)
                ]
                row = {
                    "shards": n,
                    "samples": n * args.per_shard,
                    "dataset": name,
                    "first_step_s": [r["first_step_s"] for r in runs],
                    "peak_rss_mb": [r["peak_rss_mb"] for r in runs],
                }
                row["median_first_step_s"] = statistics.median(row["first_step_s"])
                row["median_peak_rss_mb"] = statistics.median(row["peak_rss_mb"])
                rows.append(row)
                print(json.dumps(row), flush=True)

        sample_fn = _clip_sample_fn()
        shards = list_shards(corpora[200])
        bare, ours = [], []
        for r in range(args.throughput_repeats):
            loader = bare_open_clip_loader(shards, sample_fn, args.batch, args.workers, seed=r)
            bare.append(samples_per_second(loader, args.batches, 3, lambda b: len(b[0])))
            loader = ours_loader(corpora[200], sample_fn, args.batch, args.workers, args.batches + 3, seed=r)
            ours.append(samples_per_second(loader, args.batches, 3, lambda b: len(b[0][0])))
            print(json.dumps({"bare_samples_per_s": bare[-1], "ours_samples_per_s": ours[-1]}), flush=True)

    def ratio(dataset: str, key: str) -> float:
        by_n = {row["shards"]: row[key] for row in rows if row["dataset"] == dataset}
        return round(by_n[200] / by_n[2], 3)

    result = {
        "per_shard": args.per_shard,
        "img_size": args.img_size,
        "repeats": args.repeats,
        "throughput_repeats": args.throughput_repeats,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "baseline_startup": "webdataset (map-style: indexes every shard before the first step)",
        "baseline_throughput": "bare webdataset pipeline as open_clip's get_wds_dataset builds it",
        "startup": rows,
        "first_step_ratio_200_vs_2": {d: ratio(d, "median_first_step_s") for d in ("webdataset", "webdataset_stream")},
        "peak_rss_ratio_200_vs_2": {d: ratio(d, "median_peak_rss_mb") for d in ("webdataset", "webdataset_stream")},
        "throughput": {
            "workers": args.workers,
            "batch": args.batch,
            "batches": args.batches,
            "bare_samples_per_s": [round(x, 1) for x in bare],
            "ours_samples_per_s": [round(x, 1) for x in ours],
            "ours_vs_bare": round(statistics.median(ours) / statistics.median(bare), 3),
        },
    }
    print(json.dumps(result, indent=2))
    if args.json is not None:
        write_json(result, args.json)


if __name__ == "__main__":
    main()
