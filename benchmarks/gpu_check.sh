#!/usr/bin/env bash
# The GPU checks in one script, about 9-12 minutes on one H100/H200 (steps 4-5 can run alone: GPU_CHECK_STEPS=4,5).
# Figures go to benchmarks/results/gpu_*.json.
#
#   1. MoCo v3 ViT-B/16 training throughput and MFU, eager and torch.compile (benchmarks/pretrain_throughput.py)
#   2. exact k-NN on the GPU (faiss GPU index) against the CPU path, same features, same k
#   3. a training smoke run through `vitssl pretrain` on one GPU (engine, bf16 autocast, checkpoint, resume)
#   4. evaluation at ImageNet size: 1.28 M x 768 fp16 store, k-NN k=20 x 50k queries with the store read, and the
#      26-head linear sweep, each against plain PyTorch (benchmarks/gpu_scale.py eval)
#   5. large models: MoCo v3 ViT-H/14 at batch 64 and iGPT-L at batch 16 (FSDP + activation checkpointing), peak
#      memory against the --plan estimate (benchmarks/gpu_scale.py memory)
#
# Without a CUDA GPU it says so and exits 0. Each step has its own time limit, so one slow step cannot eat the
# others' time; a failed step is recorded in its JSON and the script goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
OUT=${OUT_DIR:-benchmarks/results}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is False); nothing to measure"
    exit 0
fi
mkdir -p "$OUT"
"$PY" -c "import torch; print('gpu_check on', torch.cuda.get_device_name(0), 'torch', torch.__version__)"

STEPS=",${GPU_CHECK_STEPS:-1,2,3,4,5},"
want() { [[ $STEPS == *",$1,"* ]]; }

if want 1; then
echo "== 1/5 MoCo v3 ViT-B/16 throughput (eager, compile)"
timeout 300 "$PY" benchmarks/pretrain_throughput.py --batch 128 --steps 20 --json "$OUT/gpu_pretrain_throughput.json" \
    || echo '{"error": "pretrain_throughput failed or timed out"}' > "$OUT/gpu_pretrain_throughput.json"
fi

if want 2; then
echo "== 2/5 exact k-NN: faiss GPU vs CPU"
timeout 150 "$PY" - "$OUT/gpu_knn.json" <<'PYEOF' || echo '{"error": "knn check failed or timed out"}' > "$OUT/gpu_knn.json"
import json, sys, time
import numpy as np
from vitssl._faiss import faiss_info, gpu_available
from vitssl.eval.knn import knn_search

rng = np.random.default_rng(0)
train = rng.standard_normal((100_000, 384), dtype=np.float32)
queries = rng.standard_normal((10_000, 384), dtype=np.float32)
record = {"train": train.shape, "queries": queries.shape, "k": 20, "faiss": faiss_info()}
timings = {}
for name, use_gpu in (("cpu", False), ("gpu", True)):
    if use_gpu and not gpu_available():
        record["gpu_error"] = "this faiss has no GPU support: see the README for the one-faiss-with-GPU install"
        continue
    knn_search(train, queries[:100], 20, use_gpu=use_gpu)  # warm-up (GPU context, BLAS threads)
    t0 = time.perf_counter()
    sims, idx = knn_search(train, queries, 20, use_gpu=use_gpu)
    timings[name] = {"seconds": time.perf_counter() - t0, "idx": idx}
record.update({f"{k}_seconds": v["seconds"] for k, v in timings.items()})
if len(timings) == 2:
    record["speedup"] = timings["cpu"]["seconds"] / timings["gpu"]["seconds"]
    record["top1_agreement"] = float((timings["cpu"]["idx"][:, 0] == timings["gpu"]["idx"][:, 0]).mean())
json.dump(record, open(sys.argv[1], "w"), indent=2, default=str)
print(json.dumps({k: v for k, v in record.items() if k != "faiss"}, default=str))
PYEOF
fi

if want 3; then
echo "== 3/5 training smoke run on one GPU"
RUN=${SMOKE_RUN_DIR:-$OUT/gpu_smoke_run}  # the run folder itself (checkpoints) need not stay beside the figures
rm -rf "$RUN"
start=$(date +%s)
if timeout 150 "$PY" -m vitssl pretrain pretrain/test_tiny device=cuda launch.gpus_per_node=1 \
        "output_dir=$RUN" train.epochs=2 train.stop_after_steps=4 \
    && timeout 150 "$PY" -m vitssl pretrain pretrain/test_tiny device=cuda launch.gpus_per_node=1 \
        "output_dir=$RUN" train.epochs=2; then
    status=ok
else
    status=failed
fi
"$PY" - "$RUN" "$status" "$(( $(date +%s) - start ))" "$OUT/gpu_smoke.json" <<'PYEOF'
import json, sys
from pathlib import Path
run, status, seconds, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
metrics = Path(run, "metrics.jsonl")
lines = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
record = {"status": status, "seconds": seconds, "steps": max((r["step"] for r in lines), default=0),
          "final_loss": next((r["loss"] for r in reversed(lines) if "loss" in r), None)}
json.dump(record, open(out, "w"), indent=2)
print(json.dumps(record))
PYEOF
fi

if want 4; then
echo "== 4/5 evaluation at ImageNet size (1.28 M x 768 store, k-NN, linear sweep)"
timeout 300 "$PY" benchmarks/gpu_scale.py eval --json "$OUT/gpu_eval_scale.json" \
    || echo '{"error": "gpu_scale eval failed or timed out"}' > "$OUT/gpu_eval_scale.json"
fi

if want 5; then
echo "== 5/5 large models: peak memory against --plan"
timeout 300 "$PY" benchmarks/gpu_scale.py memory --json "$OUT/gpu_memory.json" \
    || echo '{"error": "gpu_scale memory failed or timed out"}' > "$OUT/gpu_memory.json"
fi
echo "gpu_check: figures in $OUT/gpu_*.json"
