#!/usr/bin/env python
"""Sampling speed as users get it: ``MDMPipeline.generate``, plain path vs fast path.

For ``--config`` (random weights, every one perturbed so zero-initialised layers matter)
this times ``generate`` exactly as ``mdm sample`` and Serve call it: prompt encoding,
noise, the guided sampler loop and the final clamp. Rows: DDIM at ``--steps`` steps with
guidance ``--guidance`` at each ``--batch`` size, then DPM-Solver++(2M) at
``--solver-steps``; each row times the arms of ``--arms``: ``plain`` (eager,
``fast=False``), ``fast`` (the guided 2B-sample forward replayed from a CUDA graph: what
``mdm sample`` and Serve run on a GPU) and ``compiled`` (``compile=True``: the graph
replays ``torch.compile``'s kernels), median of ``--repeats`` runs after ``--warmup``
warm-up calls, and prints the largest absolute difference of each arm's images from the
plain path's. On a CPU the fast path is the plain path.

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
    ap.add_argument("--arms", default="plain,fast", help="comma-separated: plain, fast, compiled (default plain,fast)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
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

                encoder = get_text_encoder(ccfg.text_encoder, ccfg.max_text_tokens, str(device))
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
    arms = args.arms.split(",")
    unknown = set(arms) - {"plain", "fast", "compiled"}
    if unknown or arms[0] != "plain":
        raise SystemExit(f"--arms: plain first, then any of fast, compiled; got {args.arms!r}")
    pipe = MDMPipeline(model, cfg, device=device, text_encoder=encoder)
    pipes = {"plain": (pipe, False), "fast": (pipe, True)}
    if "compiled" in arms:
        pipes["compiled"] = (MDMPipeline(model, cfg, device=device, text_encoder=encoder, compile=True), True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(arm: str, **kw) -> tuple[float, list[torch.Tensor]]:
        p, fast = pipes[arm]
        for _ in range(args.warmup):
            p.generate(fast=fast, **kw)
        times, out = [], None
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            out = p.generate(fast=fast, **kw)
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
    head = f"{'sampler':>9} {'steps':>5} {'batch':>5}" + "".join(f" {a + ' s':>11}" for a in arms)
    head += "".join(f" {a + ' x':>11} {'|diff| ' + a:>14}" for a in arms[1:]) + f" {'img/s best':>10}"
    print(head)
    for sampler, steps, b in cells:
        kw = dict(prompt=PROMPT, num_samples=b, steps=steps, sampler=sampler, guidance_scale=args.guidance, seed=0)
        row = dict(sampler=sampler, steps=steps, batch=b)
        outs = {}
        for arm in arms:
            row[f"{arm}_s"], outs[arm] = timed(arm, **kw)
        for arm in arms[1:]:
            row[f"{arm}_speedup"] = row["plain_s"] / row[f"{arm}_s"]
            row[f"{arm}_max_abs_diff"] = max(
                float((a.float() - f.float()).abs().max()) for a, f in zip(outs["plain"], outs[arm])
            )
        best = min(row[f"{a}_s"] for a in arms)
        rows.append(row)
        line = f"{sampler:>9} {steps:>5} {b:>5}" + "".join(f" {row[a + '_s']:>11.3f}" for a in arms)
        line += "".join(f" {row[a + '_speedup']:>10.2f}x {row[a + '_max_abs_diff']:>14.2e}" for a in arms[1:])
        print(line + f" {b / best:>10.1f}", flush=True)
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
