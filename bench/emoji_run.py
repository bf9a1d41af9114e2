#!/usr/bin/env python
"""The emoji run on one GPU (stage 64 -> stage 128), and the paper's claim at equal GPU time.

    python bench/emoji_run.py --data packed/ --out runs/emoji --phase all --seconds 150

Phases (each trains for ``--seconds`` of GPU time, the baseline for twice that):

- ``stage64``: ``small-64`` from scratch;
- ``stage128``: ``small-64-128`` grown from stage 64's EMA (``mdm.grow``: inner weights
  copied, new shell at zero), trained on;
- ``baseline128``: ``small-128``, a single-resolution 128 px UNet of about the same size
  and the same optimiser, from scratch, for the time of stage 64 + stage 128.

Every phase runs the stage jobs' own per-worker step, ``mdm.zero.ZeroTrainer`` (DeepSpeed
ZeRO-2, bf16 autocast, compiled), with the stage job's ``TrainConfig``; what differs from
``jobs/stage_64.py`` is the data path: the GPU machine has no Ray and no object store, so
the shards' pixels arrive packed (``bench/pack_shards.py``) and stay on the GPU, and the
captions are encoded once there. Every ``--eval_every`` seconds of training the EMA model
samples one image per held-out caption (DDIM, guidance) at every resolution; the samples,
a grid of 8 held-out prompts and the loss curve are written to ``--out`` for FID/KID
(``mdm.evaluation``) against the held-out images. GPU seconds count training steps only
(synchronised wall time), not evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdm import MDMModel, MDMPipeline, get_config, grow, load_pretrained, save_pretrained  # noqa: E402
from mdm.conditioning import get_text_encoder  # noqa: E402
from mdm.data import make_grid  # noqa: E402
from mdm.training import Batch, TrainConfig  # noqa: E402
from mdm.unet import Condition  # noqa: E402
from mdm.zero import ZeroConfig, ZeroTrainer  # noqa: E402
from pipelines.preprocess import average_pool  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack_shards import load_top  # noqa: E402

GRID_PROMPTS = 8
SEEDS = {"stage64": 1, "stage128": 2, "baseline128": 3}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class GPUSet:
    """A packed split on the device: uint8 pixels per resolution and encoded captions."""

    def __init__(self, data: list[Path], split: str, encoder, device: str, limit: int = 0):
        """``data``: folders holding ``<split>.json`` and the pixel parts (any folder each)."""
        meta, top = load_top(data, split)
        n = meta["rows"]
        keep = min(limit, n) if limit else n
        self.captions, self.keys = meta["captions"][:keep], meta["keys"][:keep]
        res = meta["resolutions"]
        top = top[:keep]
        self.pixels = {r: torch.from_numpy(average_pool(top, r) if r != res[-1] else top.copy()) for r in res}
        self.pixels = {r: x.to(device).permute(0, 3, 1, 2) for r, x in self.pixels.items()}
        n = keep
        tokens, masks = [], []
        for i in range(0, n, 1024):
            t, m = encoder.encode(self.captions[i : i + 1024])
            tokens.append(t.to(device, torch.bfloat16 if device != "cpu" else torch.float32))
            masks.append(m.to(device))
        self.tokens, self.mask, self.n = torch.cat(tokens), torch.cat(masks), n
        self.device = device

    def images(self, idx: torch.Tensor, resolutions: list[int]) -> list[torch.Tensor]:
        return [
            self.pixels[r][idx].float().div_(127.5).sub_(1.0).contiguous(memory_format=torch.channels_last)
            for r in resolutions
        ]

    def batches(self, batch: int, resolutions: list[int], seed: int):
        g = torch.Generator(self.device).manual_seed(seed)
        size = torch.full((batch,), float(max(self.pixels)), device=self.device)
        while True:
            idx = torch.randint(self.n, (batch,), device=self.device, generator=g)
            yield Batch(self.images(idx, resolutions), Condition(self.tokens[idx].float(), self.mask[idx], None, size))


def null_for(encoder, device) -> Condition:
    t, m = encoder.encode([""])
    return Condition(t.to(device), m.to(device))


@torch.no_grad()
def evaluate_point(model, cfg, encoder, heldout: GPUSet, out: Path, tag: str, args) -> dict:
    """One image per held-out caption at every resolution, and the 8-prompt grid."""
    model.eval()
    device = next(model.parameters()).device
    pipe = MDMPipeline(model, cfg, device, text_encoder=encoder)
    res = cfg.model.resolutions
    samples = {r: [] for r in res}
    t = time.perf_counter()
    for i in range(0, heldout.n, args.eval_batch):
        caps = heldout.captions[i : i + args.eval_batch]
        imgs = pipe.generate(
            caps, num_samples=len(caps), guidance_scale=args.guidance, steps=args.sample_steps, sampler="ddim",
            seeds=list(range(i, i + len(caps))), source_size=args.source_size,
        )  # fmt: skip
        for r, x in zip(res, imgs):
            samples[r].append(((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
    seconds = time.perf_counter() - t
    for r in res:
        arr = torch.cat(samples[r]).numpy()
        np.save(out / f"{tag}_samples_{r}.npy", arr)
    # the grid: 8 held-out prompts (one per row) x 4 seeds, top resolution
    prompts = heldout.captions[:: max(1, heldout.n // GRID_PROMPTS)][:GRID_PROMPTS]
    rows = pipe.generate(
        [p for p in prompts for _ in range(4)], num_samples=4 * len(prompts), guidance_scale=args.guidance,
        steps=args.sample_steps, sampler="ddim", seeds=[s for _ in prompts for s in range(4)],
        source_size=args.source_size,
    )  # fmt: skip
    make_grid(rows[-1].float().cpu(), nrow=4).save(out / f"{tag}_grid.png")
    (out / f"{tag}_grid_prompts.json").write_text(json.dumps(prompts, indent=1))
    model.train()
    return {"sample_seconds": round(seconds, 2), "n": heldout.n}


def train_phase(name, cfg, model, train_set, heldout, encoder, args, seconds: float, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    train = TrainConfig(
        steps=10**9, batch_size=args.batch, lr=args.lr, warmup_steps=args.warmup, ema_decay=args.ema, grad_clip=1.0
    )
    device = torch.device(args.device)
    null = null_for(encoder, device)
    trainer = ZeroTrainer(model, cfg, train, ZeroConfig(stage=2, compile=not args.eager), null=null, device=device)
    res = cfg.model.resolutions
    stream = train_set.batches(args.batch, res, seed=SEEDS[name])
    log(f"{name}: {cfg.name}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, batch {args.batch}")
    # warm-up (compilation) outside the timed budget
    t0 = time.perf_counter()
    for _ in range(args.warmup_steps):
        trainer.train_step(stream)
    sync(device)
    log(f"{name}: warm-up {args.warmup_steps} steps {time.perf_counter() - t0:.1f} s")
    history, evals = [], []
    gpu_s, next_eval, step_t = 0.0, args.eval_every, time.perf_counter()
    steps_since = 0
    while gpu_s < seconds:
        per = trainer.train_step(stream)
        steps_since += 1
        if trainer.step % 50 == 0 or gpu_s + (time.perf_counter() - step_t) >= min(next_eval, seconds):
            losses = per.float().tolist()  # syncs
            now = time.perf_counter()
            gpu_s += now - step_t
            ips = steps_since * args.batch / (now - step_t)
            history.append({"step": trainer.step, "gpu_s": round(gpu_s, 2), "loss": losses, "img_per_s": round(ips, 1)})
            if trainer.step % 200 == 0:
                log(
                    f"{name}: step {trainer.step} gpu {gpu_s:.0f}s loss {[round(v, 4) for v in losses]} {ips:.0f} img/s"
                )
            if gpu_s >= min(next_eval, seconds):
                ema = trainer.export_ema()
                eval_model = MDMModel(cfg.model).to(device)
                eval_model.load_state_dict(ema)
                tag = f"{name}_{int(round(gpu_s))}s"
                info = evaluate_point(eval_model, cfg, encoder, heldout, out, tag, args)
                evals.append({"tag": tag, "gpu_s": round(gpu_s, 2), "step": trainer.step, **info})
                log(f"{name}: evaluated {tag} ({info['sample_seconds']} s sampling)")
                next_eval += args.eval_every
                (out / f"{name}_log.json").write_text(json.dumps({"history": history, "evals": evals}, indent=1))
                del eval_model
            steps_since = 0
            step_t = time.perf_counter()
    ema = trainer.export_ema()
    final = MDMModel(cfg.model)
    final.load_state_dict(ema)
    save_pretrained(final, cfg, out / f"{name}_model")
    summary = {
        "phase": name,
        "config": cfg.name,
        "steps": trainer.step,
        "gpu_s": round(gpu_s, 2),
        "img_per_s": round(trainer.step * args.batch / max(gpu_s, 1e-9), 1),
        "history": history,
        "evals": evals,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }
    (out / f"{name}_log.json").write_text(json.dumps(summary, indent=1))
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, nargs="+", required=True, help="folders of bench/pack_shards.py output")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--phase", default="all", choices=["all", "stage64", "stage128", "baseline128", "mdm"])
    p.add_argument("--seconds", type=float, default=150, help="GPU seconds of training per MDM stage")
    p.add_argument("--eval_every", type=float, default=75, help="GPU seconds between evaluations")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--warmup", type=int, default=200, help="LR warm-up steps")
    p.add_argument("--warmup_steps", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--eval_batch", type=int, default=160)
    p.add_argument("--sample_steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--source_size", type=float, default=128.0, help="micro-conditioning at sampling (the data's)")
    p.add_argument("--eager", action="store_true", help="do not compile the model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--eval_limit", type=int, default=0, help="evaluate on the first N held-out rows (0: all)")
    p.add_argument("--configs", default="small-64,small-64-128,small-128", help="stage 64, stage 128, baseline")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    names = dict(zip(["stage64", "stage128", "baseline128"], args.configs.split(",")))
    ccfg = get_config(names["stage64"]).model.conditioning
    encoder = get_text_encoder(ccfg.text_encoder, ccfg.max_text_tokens, args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    train_set = GPUSet(args.data, "train", encoder, args.device)
    heldout = GPUSet(args.data, "heldout", encoder, args.device, limit=args.eval_limit)
    log(f"data on the GPU: {train_set.n} train, {heldout.n} held-out rows in {time.perf_counter() - t:.1f} s")
    # reference images for FID/KID: the held-out split at every resolution
    for r, x in heldout.pixels.items():
        np.save(args.out / f"heldout_real_{r}.npy", x.permute(0, 2, 3, 1).cpu().numpy())
    phases = ["stage64", "stage128", "baseline128"] if args.phase == "all" else (
        ["stage64", "stage128"] if args.phase == "mdm" else [args.phase]
    )  # fmt: skip
    results = {}
    for phase in phases:
        cfg = get_config(names[phase])
        if phase == "stage128":
            parent, parent_cfg = load_pretrained(args.out / "stage64" / "stage64_model")
            model = grow(parent, parent_cfg, cfg)
        else:
            torch.manual_seed(0)
            model = MDMModel(cfg.model)
        seconds = args.seconds * (2 if phase == "baseline128" else 1)
        results[phase] = train_phase(phase, cfg, model, train_set, heldout, encoder, args, seconds, args.out / phase)
        r = results[phase]
        log(f"{phase}: {r['steps']} steps in {r['gpu_s']} GPU s, {r['img_per_s']} img/s, peak {r['peak_mem_gib']} GiB")
    (args.out / "summary.json").write_text(
        json.dumps({k: {kk: v for kk, v in r.items() if kk != "history"} for k, r in results.items()}, indent=1)
    )
    log("done")


if __name__ == "__main__":
    main()
