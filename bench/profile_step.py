#!/usr/bin/env python
"""Where a training step's GPU time goes, and a check that the step never syncs with the host.

1. One eager bf16 step under ``torch.cuda.set_sync_debug_mode("error")``: any host
   synchronisation inside TrainStep + backward + clip + AdamW + EMA raises.
2. The compiled, channels-last step profiled with ``torch.profiler``: the kernels that
   take the most GPU time, grouped by kind, and the profiler's own table.

    python bench/profile_step.py --config 64-256 --batch 32
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import REFERENCE_TEXT, BenchStep, make_batch  # noqa: E402

from mdm import get_config  # noqa: E402
from mdm.config import apply_overrides  # noqa: E402


def kind_of(name: str) -> str:
    n = name.lower()
    for key, label in (
        ("flash", "attention"),
        ("fmha", "attention"),
        ("attention", "attention"),
        ("efficient", "attention"),
        ("conv", "convolution"),
        ("cudnn", "convolution"),
        ("xmma", "convolution"),
        ("implicit", "convolution"),
        ("gemm", "matmul"),
        ("cutlass", "matmul"),
        ("nvjet", "matmul"),
        ("sm90", "matmul"),
        ("triton", "fused elementwise/norm (triton)"),
        ("adam", "optimizer"),
        ("foreach", "optimizer/ema"),
        ("reduce", "reductions"),
        ("norm", "normalisation"),
    ):
        if key in n:
            return label
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="64-256", help="named config (default 64-256)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (default 3)")
    p.add_argument("--out", default=None, help="write the profiler's chrome trace here")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    cfg = apply_overrides(get_config(args.config), REFERENCE_TEXT)
    step = BenchStep(cfg, make_batch(cfg, args.batch, "cuda"), "cuda", cl_weights=True, cl_inputs=True)
    step()  # warm-up (cuDNN autotuning, allocator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        print("SYNC CHECK PASS: no host synchronisation in an eager training step")
    except RuntimeError as e:
        print(f"SYNC CHECK FAIL: {e}")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()

    for _ in range(4):
        step(compiled=True)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step(compiled=True)
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    grand = 0.0
    for evt in prof.key_averages():
        t = evt.device_time_total if hasattr(evt, "device_time_total") else evt.cuda_time_total
        if t <= 0:
            continue
        totals[kind_of(evt.key)] += t
        grand += t
    print(f"\nGPU time per step by kind ({args.config}, batch {args.batch}, compiled, channels-last):")
    for k, v in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {k:34s} {v / args.steps / 1000:9.2f} ms  {100 * v / grand:5.1f}%")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=80))
    if args.out:
        prof.export_chrome_trace(args.out)


if __name__ == "__main__":
    main()
