"""The GPU items of evaluation at scale and of large-model training, at the sizes users run, on one GPU.

``eval``: a 1.28 M x 768 float16 feature store (ImageNet-train size, synthetic clustered features, 1000 classes),
then k-NN (k = 20, 50 k queries) through ``vitssl.eval.knn.knn_evaluate`` timed including the store read, against
plain PyTorch's matmul + top-k with the float16 bank resident on the GPU (its best set-up); then the linear sweep
(13 lrs x 2 wds = 26 heads) for a few epochs, against plain PyTorch training one head, per epoch, with the
100-epoch time extrapolated (the issue's target: <= 15 min on one H100).

``memory``: a recipe's first steps on one GPU with synthetic images at the recipe's size (MoCo v3 ViT-H/14 at
batch 64, iGPT-L at batch 16; FSDP on one rank + activation checkpointing, as the recipes set), the peak memory
the engine logs (``mem_gb``: ``torch.cuda.max_memory_allocated``) against the ``--plan`` estimate for the same
settings at world size 1.

Usage (``benchmarks/gpu_check.sh`` runs both)::

    python benchmarks/gpu_scale.py eval --json benchmarks/results/gpu_eval_scale.json
    python benchmarks/gpu_scale.py memory --json benchmarks/results/gpu_memory.json

``--rows`` / ``--queries`` / ``--epochs`` and ``memory --recipes`` / ``--extra`` shrink it for a CPU dry run.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from knn_vs_sklearn import clustered_features

# (recipe, batch per GPU): the checks
MEMORY_CASES = {"mocov3_vit_huge": 64, "igpt_ar_large": 16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def eval_part(rows: int, queries: int, dim: int, epochs: int, device: torch.device) -> dict:
    import torch.nn.functional as F

    from vitssl.eval import knn
    from vitssl.eval.store import FeatureStore, write_store
    from vitssl.eval.sweep import train_linear_sweep

    classes = 1000
    out: dict = {"rows": rows, "queries": queries, "dim": dim, "device": str(device)}
    t0 = time.perf_counter()
    train, tl = clustered_features(rows, dim, classes, 0, 1, superclasses=100)
    val, vl = clustered_features(queries, dim, classes, 0, 2, superclasses=100)
    out["generate_s"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_store(tmp, {"bench": "gpu"}, train, tl, np.arange(rows), [str(i) for i in range(rows)], (0, rows), {},
                    "float16")  # fmt: skip
        out["store_write_s"] = time.perf_counter() - t0
        del train
        store = FeatureStore(tmp)
        knn.knn_evaluate(store.features[:10_000], store.labels[:10_000], val[:256], vl[:256], ks=[20],
                         num_classes=classes)  # warm-up: CUDA context and kernels  # fmt: skip
        _sync(device)
        t0 = time.perf_counter()
        res = knn.knn_evaluate(store.features, store.labels, val, vl, ks=[20], num_classes=classes)
        _sync(device)
        out["knn_s"] = time.perf_counter() - t0  # includes reading the memory-mapped store block by block
        out["knn_backend"], out["knn_top1"] = res["backend"], res["results"]["20"]["top1"]
        # plain PyTorch: the whole float16 bank resident on the device, matmul + top-k per 8192 queries
        t0 = time.perf_counter()
        bank = torch.from_numpy(np.array(store.features)).to(device)
        bank = F.normalize(bank.float(), dim=1).to(torch.float16 if device.type == "cuda" else torch.float32)
        q = F.normalize(torch.from_numpy(val).to(device), dim=1).to(bank.dtype)
        for a in range(0, queries, 8192):
            (q[a : a + 8192] @ bank.T).topk(20, dim=1)
        _sync(device)
        out["bare_torch_knn_s"] = time.perf_counter() - t0  # includes the copy of the bank to the device
        del bank
        print(f"k-NN {rows} x {dim} fp16 store, {queries} queries, k=20: {out['knn_s']:.1f} s "
              f"({out['knn_backend']}, top-1 {out['knn_top1']:.2f}); plain torch with the bank resident "
              f"{out['bare_torch_knn_s']:.1f} s", flush=True)  # fmt: skip

        lrs, wds = tuple(np.geomspace(1e-3, 10, 13)), (0.0, 1e-4)
        t0 = time.perf_counter()
        sweep = train_linear_sweep(store.features, store.labels, val, vl, classes, lrs, wds, epochs=epochs,
                                   batch_size=1024, device=device)  # fmt: skip
        out["sweep_train_s"], out["sweep_s"] = sweep["train_seconds"], time.perf_counter() - t0
        out["sweep_streamed"], out["sweep_top1"] = sweep["streamed"], sweep["top1"]
        out["sweep_epochs"] = epochs
        out["sweep_100_epochs_min"] = sweep["train_seconds"] / epochs * 100 / 60
        # plain PyTorch: one head, torch.optim.SGD, features resident as float16, one epoch
        x = torch.from_numpy(np.array(store.features)).to(device)
        y = torch.from_numpy(np.asarray(store.labels)).to(device)
        head = torch.nn.Linear(dim, classes).to(device)
        bn = torch.nn.BatchNorm1d(dim, affine=False).to(device)
        opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-5)
        _sync(device)
        t0 = time.perf_counter()
        order = torch.randperm(rows, device=device)
        for s in range(rows // 1024):
            idx = order[s * 1024 : (s + 1) * 1024]
            loss = F.cross_entropy(head(bn(x[idx].float())), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(device)
        one = time.perf_counter() - t0
        out["plain_one_head_epoch_s"] = one
        out["plain_26_heads_100_epochs_min"] = one * 26 * 100 / 60
        out["sweep_speedup"] = one * 26 * epochs / sweep["train_seconds"]
        print(f"linear sweep 26 heads, {epochs} epoch(s): {sweep['train_seconds']:.1f} s "
              f"(100 epochs ~{out['sweep_100_epochs_min']:.1f} min); plain PyTorch one head one epoch {one:.1f} s "
              f"(26 heads x 100 epochs ~{out['plain_26_heads_100_epochs_min']:.1f} min; "
              f"{out['sweep_speedup']:.1f}x)", flush=True)  # fmt: skip
    return out


def _synthetic() -> list[str]:
    """Overrides that feed a recipe generated images at its own size, no validation set, no k-NN monitor."""
    return ["data.train.name=shapes", "data.train.root=null", "~data.val", "eval.knn_every_epochs=0",
            "data.train.kwargs={num_samples: 2048}"]  # fmt: skip


def memory_part(recipes: dict[str, int], extra: list[str], memory_gb: float) -> dict:
    out: dict = {}
    for recipe, batch in recipes.items():
        common = [*_synthetic(), f"train.batch_size={batch}", *extra]
        plan = subprocess.run(
            [sys.executable, "-m", "vitssl", "pretrain", f"pretrain/{recipe}", "--plan", "--world-size", "1",
             "--gpu-memory-gb", str(memory_gb), *common], capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        with tempfile.TemporaryDirectory() as run:
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "vitssl", "pretrain", f"pretrain/{recipe}", f"output_dir={run}",
                 "train.stop_after_steps=3", "train.log_every_steps=1", "launch.nodes=1", "launch.gpus_per_node=1",
                 *common], capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            log = (Path(run) / "train.log").read_text() if (Path(run) / "train.log").is_file() else ""
        measured = [float(m) for m in re.findall(r"mem_gb=([0-9.]+)", log)]
        record = {
            "batch": batch,
            "plan": plan.stdout.strip().splitlines(),
            "plan_rc": plan.returncode,
            "run_rc": proc.returncode,
            "run_seconds": time.perf_counter() - t0,
            "peak_mem_gib": max(measured) if measured else None,
            "losses": [float(v) for v in re.findall(r" loss=([0-9.e+-]+|nan)", log)],
        }
        if proc.returncode:
            record["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        out[recipe] = record
        print(f"{recipe} batch {batch}: rc {proc.returncode}, peak {record['peak_mem_gib']} GiB; plan:", flush=True)
        print("\n".join(record["plan"]), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="part", required=True)
    e = sub.add_parser("eval")
    e.add_argument("--rows", type=int, default=1_281_167)
    e.add_argument("--queries", type=int, default=50_000)
    e.add_argument("--dim", type=int, default=768)
    e.add_argument("--epochs", type=int, default=2, help="linear-sweep epochs timed (100 are extrapolated)")
    m = sub.add_parser("memory")
    m.add_argument("--recipes", default=",".join(f"{r}:{b}" for r, b in MEMORY_CASES.items()), help="RECIPE:BATCH,...")
    m.add_argument("--extra", nargs="*", default=[], help="more overrides (a CPU dry run shrinks the model)")
    m.add_argument("--gpu-memory-gb", type=float, default=80.0)
    for q in (e, m):
        q.add_argument("--json", required=True)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine = torch.cuda.get_device_name(0) if device.type == "cuda" else "no GPU (dry run)"
    if args.part == "eval":
        result = eval_part(args.rows, args.queries, args.dim, args.epochs, device)
    else:
        cases = {r: int(b) for r, b in (item.split(":") for item in args.recipes.split(","))}
        result = memory_part(cases, args.extra, args.gpu_memory_gb)
    result = {"machine": machine, "torch": torch.__version__, **result}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
