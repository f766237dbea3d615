"""MoCo v3 training-step throughput and model FLOP utilisation (MFU), eager vs ``torch.compile``.

One training step = query encoder on both views (backbone + projector + predictor), momentum encoder on
both views (no grad), the symmetrised loss, backward, a fused AdamW step and the EMA update, in bf16
autocast with timm's fused attention (``scaled_dot_product_attention``). Inputs are synthetic tensors
already on the device, so the figure is the model's, not the data pipeline's.

FLOPs per step are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one step (matmuls,
convolutions, attention); MFU = FLOPs per step × steps/s ÷ the device's dense bf16 peak.

    python benchmarks/pretrain_throughput.py                       # ViT-B/16, 224 px, batch 128, GPU
    python benchmarks/pretrain_throughput.py --backbone test_vit --img-size 32 --batch 16 --device cpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from vitssl.backbones import create_backbone
from vitssl.ssl.moco_v3 import MocoV3, MocoV3Config

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0}


def _peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def _build(args: argparse.Namespace, device: torch.device) -> tuple[MocoV3, torch.optim.Optimizer]:
    cfg = MocoV3Config()
    objective = MocoV3(cfg, lambda **kw: create_backbone(args.backbone, img_size=args.img_size, **kw)).to(device)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(objective.param_groups(0.1), lr=1e-4, fused=fused)
    return objective, optimizer


def _step_fn(objective: MocoV3, optimizer: torch.optim.Optimizer, device: torch.device, dtype: torch.dtype):
    def step(batch: tuple[list[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype):
            loss = objective(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.on_step_end(1, 100)
        return loss.detach()

    return step


def measure(args: argparse.Namespace, compiled: bool) -> dict[str, float]:
    """Images/s (counted once per image, both views included) and MFU of one configuration."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    objective, optimizer = _build(args, device)
    if compiled:
        objective.forward = torch.compile(objective.forward)
    dtype = torch.bfloat16
    views = [torch.randn(args.batch, 3, args.img_size, args.img_size, device=device) for _ in range(2)]
    batch = (views, torch.zeros(args.batch, device=device))
    step = _step_fn(objective, optimizer, device, dtype)
    for _ in range(args.warmup):
        step(batch)
    with FlopCounterMode(display=False) as counter:
        step(batch)
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    peak = _peak_tflops(device, args.peak_tflops)
    result = {
        "images_per_s": args.batch / seconds,
        "step_ms": 1000 * seconds,
        "tflop_per_step": flops / 1e12,
        "achieved_tflops": flops / seconds / 1e12,
        "mfu_percent": 100 * flops / seconds / (peak * 1e12) if peak else float("nan"),
    }
    if device.type == "cuda":
        result["max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128, help="images per step (each gives two views)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", choices=("off", "on", "both"), default="both")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak; default by device name")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.backbone} {args.img_size}px batch {args.batch} bf16 on {name}, torch {torch.__version__}")
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    record: dict = {"backbone": args.backbone, "img_size": args.img_size, "batch": args.batch, "device": name,
                    "torch": torch.__version__, "runs": {}}  # fmt: skip
    for compiled in modes:
        r = measure(args, compiled)
        record["runs"]["compile" if compiled else "eager"] = r
        label = "compile" if compiled else "eager  "
        mem = f" mem {r['max_mem_gb']:.1f} GB" if "max_mem_gb" in r else ""
        print(
            f"{label}: {r['images_per_s']:8.1f} img/s  {r['step_ms']:7.1f} ms/step  "
            f"{r['tflop_per_step']:.2f} TFLOP/step  {r['achieved_tflops']:6.1f} TFLOP/s  "
            f"MFU {r['mfu_percent']:.1f}%{mem}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
