#!/usr/bin/env python
"""Sampling speed as users get it: ``MDMPipeline.generate``, plain path vs fast path.

For ``--config`` (random weights, every one perturbed so zero-initialised layers matter)
this times ``generate`` exactly as ``mdm sample`` and Serve call it: prompt encoding,
noise, the guided sampler loop and the final clamp. Rows: DDIM at ``--steps`` steps with
guidance ``--guidance`` at each ``--batch`` size, then DPM-Solver++(2M) at
``--solver-steps``; each row times the plain path (eager) and the fast path
(``fast=True``: the guided 2B-sample forward replayed from a CUDA graph), median of
``--repeats`` runs after ``--warmup`` warm-up calls, and prints the largest absolute
difference between the two paths' images. On a CPU the fast path is the plain path.

    python bench/sample.py                                   # 64-256, CUDA
    python bench/sample.py --config tiny-32-64 --steps 5 --device cpu   # smoke test

The text encoder is the model's own (MiniLM, offline); where its package is missing, a
stub of the same width gives fixed random tokens (``--stub-text`` forces it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "a red fox in the snow, fluent 3d style"


class StubTextEncoder:
    """Fixed random token features of the configured width (no model to load)."""

    def __init__(self, dim: int, max_length: int):
        self.name, self.dim, self.max_length = "stub", dim, max_length

    def encode(self, prompts):
        import torch

        g = torch.Generator().manual_seed(len(prompts))
        tokens = torch.randn(len(prompts), self.max_length, self.dim, generator=g)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        mask[:, :8] = True
        return tokens, mask


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="64-256", help="named config (default 64-256)")
    ap.add_argument("--device", default=None, help="cuda if available, else cpu")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    ap.add_argument("--solver-steps", type=int, default=20, help="DPM-Solver++(2M) steps (default 20)")
    ap.add_argument("--guidance", type=float, default=3.0, help="guidance scale (default 3)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes (default 1 16)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per cell; the median is shown")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls first (graph capture happens here)")
    ap.add_argument("--stub-text", action="store_true", help="use a stub text encoder instead of MiniLM")
    return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse(argv)
    import torch

    from mdm import MDMModel, MDMPipeline, get_config

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = get_config(args.config)
    ccfg = cfg.model.conditioning
    encoder, text = None, "MiniLM"
    if ccfg.kind == "text":
        if not args.stub_text:
            try:
                from mdm.conditioning import get_text_encoder

                encoder = get_text_encoder(ccfg.text_encoder, ccfg.max_text_tokens, "cpu")
            except Exception as e:  # noqa: BLE001 - report and fall back
                print(f"text encoder unavailable ({e}); using a stub", file=sys.stderr)
        if encoder is None:
            encoder, text = StubTextEncoder(ccfg.text_dim, ccfg.max_text_tokens), "stub"
    torch.manual_seed(0)
    model = MDMModel(cfg.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    pipe = MDMPipeline(model, cfg, device=device, text_encoder=encoder)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(**kw) -> tuple[float, list[torch.Tensor]]:
        for _ in range(args.warmup):
            pipe.generate(**kw)
        times, out = [], None
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            out = pipe.generate(**kw)
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    cells = [("ddim", args.steps, b) for b in args.batch] + [("dpmpp_2m", args.solver_steps, args.batch[0])]
    rows = []
    nparams = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"{args.config} ({nparams:.1f}M parameters), {device}, autocast {pipe.autocast_dtype}, "
        f"guidance {args.guidance}, text {text}, median of {args.repeats} after {args.warmup} warm-up"
    )
    print(
        f"{'sampler':>9} {'steps':>5} {'batch':>5} {'plain s':>9} {'fast s':>9} {'speed-up':>8} {'img/s fast':>10} {'max |diff|':>10}"
    )
    for sampler, steps, b in cells:
        kw = dict(prompt=PROMPT, num_samples=b, steps=steps, sampler=sampler, guidance_scale=args.guidance, seed=0)
        t_plain, plain = timed(fast=False, **kw)
        t_fast, fast = timed(fast=True, **kw)
        diff = max(float((a.float() - f.float()).abs().max()) for a, f in zip(plain, fast))
        row = dict(sampler=sampler, steps=steps, batch=b, plain_s=t_plain, fast_s=t_fast, max_abs_diff=diff)
        rows.append(row)
        print(
            f"{sampler:>9} {steps:>5} {b:>5} {t_plain:>9.3f} {t_fast:>9.3f} {t_plain / t_fast:>7.2f}x "
            f"{b / t_fast:>10.1f} {diff:>10.2e}"
        )
    return rows


if __name__ == "__main__":
    main()
