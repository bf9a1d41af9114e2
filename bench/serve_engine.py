#!/usr/bin/env python
"""The serving engine without Serve, on any device: does batching change a request's image,
and what does a batched sampler call gain?

For ``--config`` (class-conditioned here, so no text encoder is needed; random weights,
every one perturbed), ``--batch`` one-image jobs with their own labels and seeds run
through ``serve.engine.run_jobs`` once together and once each alone. Prints the largest
float difference between a job's image in the two runs, how many 8-bit pixel values differ
and by how much, the time of both runs (images/s and the gain of batching), and checks that
edit and inpaint jobs run on the device too.

    python bench/serve_engine.py --config 64-256 --device cuda --steps 25 --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="tiny-32-64")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=8, help="one-image jobs batched together")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="as the app's precision arg")
    args = ap.parse_args()

    import torch

    from mdm import MDMModel, MDMPipeline, get_config
    from mdm.config import ConditioningConfig
    from mdm.pipeline import feather_mask
    from serve.engine import Job, run_jobs, set_precision

    cfg = get_config(args.config)
    cfg.model.conditioning = ConditioningConfig(kind="class", num_classes=16)
    model = MDMModel(cfg.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    pipe = MDMPipeline(model, cfg, device=args.device)
    set_precision(pipe, args.precision)
    n, top = args.batch, cfg.model.resolutions[-1]
    opts = ("dpmpp_2m", args.steps, 3.0, None)
    jobs = [Job("generate", [100 + i], opts, labels=[i % 16]) for i in range(n)]

    def sync() -> None:
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()

    run_jobs(pipe, jobs[:2])  # warm-up
    run_jobs(pipe, jobs[:1])
    together_s, alone_s = [], []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        together = run_jobs(pipe, jobs, max_images=n)
        sync()
        together_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        alone = [run_jobs(pipe, [j])[0] for j in jobs]
        sync()
        alone_s.append(time.perf_counter() - t0)
    assert all(r.batch_images == n for r in together) and all(r.batch_images == 1 for r in alone)

    def u8(x: torch.Tensor) -> torch.Tensor:
        return ((x.float().clamp(-1, 1) + 1) * 127.5).round()

    print(
        f"{args.config} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), {pipe.device}, "
        f"precision {args.precision} (autocast {pipe.autocast_dtype}), {args.steps} steps, {n} one-image jobs"
    )
    for k, res in enumerate(cfg.model.resolutions):
        diff = max((a.images[k] - b.images[k]).abs().max().item() for a, b in zip(together, alone))
        d8 = torch.cat([(u8(a.images[k]) - u8(b.images[k])).abs().flatten() for a, b in zip(together, alone)])
        print(
            f"  {res}px: max |float diff| {diff:.2e}; 8-bit values differing {(d8 > 0).float().mean().item():.4%}, "
            f"by at most {int(d8.max().item())} levels (mean {d8.mean().item():.4f})"
        )
    t_all, t_one = statistics.median(together_s), statistics.median(alone_s)
    print(
        f"  together: {t_all:.3f} s ({n / t_all:.2f} img/s); each alone: {t_one:.3f} s ({n / t_one:.2f} img/s); "
        f"batching gain {t_one / t_all:.2f}x"
    )

    image = torch.rand(1, 3, top, top) * 2 - 1
    mask = torch.zeros(1, 1, top, top)
    mask[..., top // 4 : top // 2, top // 4 : top // 2] = 1
    edit = Job("edit", [1, 2], ("ddim", 4, 3.0, 0.5), labels=[1, 1], image=image)
    inpaint = Job("inpaint", [3], ("ddim", 4, 3.0, 2), labels=[2], image=image, mask=mask)
    out = run_jobs(pipe, [edit, inpaint, Job("edit", [4], ("ddim", 4, 3.0, 0.5), labels=[3], image=image)])
    assert not any(isinstance(o, Exception) for o in out), out
    keep = feather_mask(mask, 2)[0, 0] == 0
    kept = (out[1].images[-1][0][:, keep] - image[0][:, keep]).abs().max().item()
    print(
        f"  edit + inpaint on {pipe.device}: ok (batch sizes {[o.batch_images for o in out]}; inpaint's "
        f"known pixels off by {kept:.1e} beyond the feathered hole)"
    )


if __name__ == "__main__":
    main()
