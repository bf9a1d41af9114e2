#!/usr/bin/env python
"""Training-step throughput of mdm, optionally side by side with the reference code.

Times forward + backward + optimizer step (+ EMA) of ``mdm.training.TrainStep`` on
random data shaped like a real batch (images in [-1, 1], 128 text tokens of 2048-d as the
reference's flan-t5-xl gives), in several variants, and prints images/s and peak memory.

With ``--reference DIR`` (a local, uncommitted checkout adapter exposing
``ref_mdm.build_reference_model`` and ``ref_mdm.forward_loss``) it times the reference
NestedUNet on the same batch in the same process, so the ratio is measured side by side.

    python bench/train_step.py --config 64-256 --batch 16 --variants eager,compiled
    python bench/train_step.py --config tiny-32-64 --device cpu --steps 3   # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdm import MDMModel, get_config  # noqa: E402
from mdm.config import apply_overrides  # noqa: E402
from mdm.training import Batch, TrainConfig, TrainStep, make_optimizer  # noqa: E402
from mdm.unet import Condition  # noqa: E402
from mdm.weights import EMA  # noqa: E402

# The reference's text input: 128 tokens of flan-t5-xl's 2048-d features, projected to 2048.
REFERENCE_TEXT = [
    "model.conditioning.text_dim=2048",
    "model.conditioning.max_text_tokens=128",
    "model.conditioning.context_dim=2048",
]


def make_batch(cfg, batch: int, device: str, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    res = cfg.model.resolutions
    top = torch.rand(batch, 3, res[-1], res[-1], generator=g) * 2 - 1
    from mdm.diffusion import image_pyramid

    c = cfg.model.conditioning
    tokens = torch.randn(batch, c.max_text_tokens, c.text_dim, generator=g)
    mask = torch.zeros(batch, c.max_text_tokens, dtype=torch.bool)
    lengths = torch.randint(4, c.max_text_tokens, (batch,), generator=g)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    cond = Condition(tokens, mask, None, torch.full((batch,), float(res[-1])))
    return Batch(image_pyramid(top, res), cond).to(device)


def timed(fn, steps: int, warmup: int, device: str) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        for _ in range(steps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1000)
    else:
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


class BenchStep:
    """One mdm training step on a fixed batch: loss, backward, clip (2.0), fused AdamW, EMA.

    ``step()`` runs it eagerly, ``step(compiled=True)`` through ``torch.compile`` of the same
    model, optimizer and EMA (compiled on first use).
    """

    def __init__(self, cfg, batch: Batch, device: str, cl_weights: bool, cl_inputs: bool, bf16: bool = True):
        torch.manual_seed(0)
        self.cfg = cfg
        self.model = MDMModel(cfg.model).to(device)
        if cl_weights:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cl_inputs:
            batch = Batch([x.contiguous(memory_format=torch.channels_last) for x in batch.images], batch.cond)
        self.batch = batch
        self.opt = make_optimizer(self.model, TrainConfig(lr=1e-4))
        self.ema = EMA(self.model, 0.9999)
        self.null = Condition(batch.cond.text_tokens[:1] * 0, batch.cond.text_mask[:1], None, None)
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.amp = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)
        self.steps = {False: TrainStep(self.model, cfg, self.null)}

    def __call__(self, compiled: bool = False) -> None:
        if compiled not in self.steps:
            self.steps[compiled] = TrainStep(torch.compile(self.model), self.cfg, self.null)
        with self.amp:
            loss, _ = self.steps[compiled].loss(self.batch, self.gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 2.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.model)


def bench_mdm(cfg, batch: Batch, args, variant: str) -> dict:
    device = args.device
    step = BenchStep(
        cfg,
        batch,
        device,
        cl_weights=variant in ("cl", "compiled"),
        cl_inputs=variant in ("cl", "compiled", "compiled_incl"),
        bf16=args.dtype == "bf16",
    )
    compiled = "compiled" in variant
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    times = timed(lambda: step(compiled), args.steps, args.warmup, device)
    total = time.perf_counter() - t0
    out = _summary(f"mdm:{variant}", times, batch.images[0].shape[0], device)
    out["wall_incl_warmup_s"] = round(total, 1)
    out["params_M"] = round(sum(p.numel() for p in step.model.parameters()) / 1e6, 2)
    return out


def bench_reference(cfg, batch: Batch, args, variant: str) -> dict:
    """The reference NestedUNet's training step: ``tf32`` as it trains (fp32 weights and
    activations, TF32 matmuls), or ``bf16`` under the same autocast as mdm."""
    sys.path.insert(0, args.reference)
    import ref_mdm  # type: ignore  # noqa: PLC0415 - uncommitted local adapter

    device = args.device
    torch.manual_seed(0)
    model, _ = ref_mdm.build_reference_model(args.reference_config)
    model = model.to(device)
    opt = ref_mdm.make_optimizer(model, args.reference_config)
    amp = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=variant == "bf16")
    b = batch.images[0].shape[0]
    t = torch.randint(0, 1000, (b,), device=device, generator=torch.Generator(device=device).manual_seed(0))
    mask = batch.cond.text_mask.float()
    tokens = batch.cond.text_tokens * mask[..., None]

    def one():
        with amp:
            loss = ref_mdm.forward_loss(model, batch.images[-1], tokens, mask, t)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = timed(one, args.steps, args.warmup, device)
    out = _summary(f"reference:{variant}", times, b, device)
    out["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    return out


def _summary(name: str, times: list[float], batch: int, device: str) -> dict:
    med = statistics.median(times)
    out = {
        "variant": name,
        "median_step_s": round(med, 4),
        "spread_s": round(max(times) - min(times), 4),
        "images_per_s": round(batch / med, 2),
    }
    if device.startswith("cuda"):
        out["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config", default="64-256", help="named mdm config (default 64-256, the reference cc12m_256 shape)"
    )
    p.add_argument("--set", nargs="*", default=[], help="config overrides KEY=VALUE")
    p.add_argument(
        "--reference_text",
        action="store_true",
        default=True,
        help="use 128 tokens of 2048-d text features like the reference's flan-t5-xl (default on)",
    )
    p.add_argument("--batch", type=int, default=16, help="images per step (default 16)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps, compilation included (default 5)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="autocast precision (default bf16)")
    p.add_argument(
        "--variants",
        default="eager,cl,compiled",
        help="comma list of mdm variants: eager, cl (channels-last), compiled (channels-last + torch.compile)",
    )
    p.add_argument("--reference", default=None, help="folder with the uncommitted reference adapter ref_mdm.py")
    p.add_argument("--reference_config", default="cc12m_256", help="reference config name for the adapter")
    p.add_argument(
        "--reference_variants",
        default="tf32,bf16",
        help="comma list: tf32 (as the reference trains), bf16 (same autocast as mdm)",
    )
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device (default cuda if present)"
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args()

    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    overrides = list(args.set)
    if args.reference_text and not args.config.startswith("tiny"):
        overrides += REFERENCE_TEXT
    cfg = apply_overrides(get_config(args.config), overrides) if overrides else get_config(args.config)
    batch = make_batch(cfg, args.batch, args.device)
    info = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "config": args.config,
        "batch": args.batch,
        "dtype": args.dtype,
    }
    print(json.dumps(info), flush=True)
    results = []
    if args.reference:
        for v in args.reference_variants.split(","):
            r = bench_reference(cfg, batch, args, v)
            print(json.dumps(r), flush=True)
            results.append(r)
    for v in args.variants.split(","):
        r = bench_mdm(cfg, batch, args, v)
        print(json.dumps(r), flush=True)
        results.append(r)
    base = next((r for r in results if r["variant"].startswith("reference")), results[0])
    print(f"\n{'variant':28s} {'step s':>8s} {'img/s':>8s} {'vs ' + base['variant']:>22s} {'mem GiB':>8s}")
    for r in results:
        print(
            f"{r['variant']:28s} {r['median_step_s']:8.4f} {r['images_per_s']:8.2f} "
            f"{r['images_per_s'] / base['images_per_s']:21.2f}x {r.get('peak_mem_GiB', float('nan')):8.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "results": results}, indent=2))


if __name__ == "__main__":
    main()
