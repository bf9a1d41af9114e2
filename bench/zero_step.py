"""Throughput of the per-worker DeepSpeed step (``mdm.zero.ZeroTrainer``), without Ray.

    torchrun --nproc_per_node 2 bench/zero_step.py --config 64 --batch 32 --stage 2
    python bench/zero_step.py --config 64 --batch 32 --stage 2 --plain   # + the plain step, same run
    python bench/zero_step.py --config 64 --batch 64 --stage 3 --profile 3  # where the engine's time goes
    python bench/zero_step.py --config 64 --batch 64 --compile --channels_last_weights --plain  # the layout lever
    python bench/zero_step.py --config 64 --batch 64 --stage 3 --deepcompile  # ZeRO's hooks as graph passes

Random data at the config's resolutions (the step does not depend on the pixels). Prints
images/s (total and per GPU) and peak memory, then checks the state survives a
save/load round trip and that the exported EMA has every tensor of the model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import BenchStep, make_batch, timed  # noqa: E402

from mdm import MDMModel, get_config  # noqa: E402
from mdm.conditioning import null_condition  # noqa: E402
from mdm.config import apply_overrides  # noqa: E402
from mdm.training import TrainConfig  # noqa: E402
from mdm.zero import PRECISIONS, ZeroConfig, ZeroTrainer  # noqa: E402


def repeat(batch):
    while True:
        yield batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="64")
    p.add_argument("--batch", type=int, default=32, help="per GPU")
    p.add_argument("--stage", type=int, default=2, help="ZeRO stage")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile the model through engine.compile")
    p.add_argument(
        "--deepcompile", action="store_true",
        help="DeepSpeed's DeepCompile (ZeRO 1-3, CUDA): ZeRO's hooks become passes of the compiled graph",
    )  # fmt: skip
    p.add_argument("--no_overlap", action="store_true", help="deepspeed.overlap_comm=false")
    p.add_argument(
        "--channels_last_weights", action="store_true",
        help="deepspeed.channels_last_weights: convolution weights stored (O, kH, kW, I), seen channels-last",
    )  # fmt: skip
    p.add_argument(
        "--precision", default="auto", choices=PRECISIONS,
        help="deepspeed.precision: bf16 (autocast, fp32 weights), bf16-weights (DeepSpeed's bf16 mode); default auto",
    )  # fmt: skip
    p.add_argument(
        "--engine_autocast_off",
        action="store_true",
        help="the step before the fix: no torch_autocast section, so DeepSpeed runs the forward in fp32",
    )
    p.add_argument("--grad_clip", type=float, default=2.0, help="train.grad_clip (0 disables)")
    p.add_argument("--sync_check", action="store_true", help="report where a step first syncs with the host")
    p.add_argument("--plain", action="store_true", help="also time bench/train_step.py's plain step (rank 0 alone)")
    p.add_argument("--mfu", action="store_true", help="count the step's FLOPs and measure the card's bf16 peak")
    p.add_argument(
        "--persistence_threshold", type=int, default=ZeroConfig.stage3_persistence_threshold, metavar="ELEMENTS",
        help="ZeRO-3: deepspeed.stage3_persistence_threshold (parameters this small stay whole; default DeepSpeed's 1e5)",
    )  # fmt: skip
    p.add_argument(
        "--granularity_threshold", type=int, default=ZeroConfig.stage3_module_granularity_threshold, metavar="N",
        help="ZeRO-3: deepspeed.stage3_module_granularity_threshold (fetch fine-grained modules as one unit; 0: off)",
    )  # fmt: skip
    p.add_argument(
        "--plain_linear", action="store_true",
        help="ZeRO-3: deepspeed.stage3_memory_efficient_linear=false (keep torch's own linear)",
    )  # fmt: skip
    p.add_argument(
        "--profile", type=int, default=0, metavar="N",
        help="after timing, profile N engine steps: GPU busy share of the wall time, top host and GPU ops",
    )  # fmt: skip
    p.add_argument(
        "--plain_layouts",
        default="channels_last,contiguous",
        help="weight layouts of the plain step: channels_last, contiguous (what DeepSpeed allows), or both",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="model config overrides, e.g. model.unets.0.channels=[16,32,48] (a narrow copy: the host's share)",
    )  # fmt: skip
    args = p.parse_args()
    compiled = args.compile or args.deepcompile  # DeepCompile compiles the model too
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    device = f"cuda:{local}" if cuda else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if not cuda and args.stage == 3 and args.granularity_threshold:
        # DeepSpeed's ZeRO-3 leaf-module path calls record_stream on gradients, which CPU
        # tensors refuse; the CPU has no streams to record, so skip it there (this bench only).
        record_stream = torch.Tensor.record_stream
        torch.Tensor.record_stream = lambda t, s: None if t.device.type == "cpu" else record_stream(t, s)
    cfg = apply_overrides(get_config(args.config), args.set) if args.set else get_config(args.config)
    torch.manual_seed(0)
    model = MDMModel(cfg.model)
    c = cfg.model.conditioning
    null = null_condition(c, 1) if c.kind == "class" else None
    if c.kind == "text":  # the empty caption's encoding only matters for its shape here
        from mdm.unet import Condition

        mask = torch.zeros(1, c.max_text_tokens, dtype=torch.bool)
        mask[:, :2] = True  # an empty caption still has its start and end tokens
        null = Condition(torch.zeros(1, c.max_text_tokens, c.text_dim), mask)
    if args.engine_autocast_off:
        import mdm.zero

        full = mdm.zero.deepspeed_config
        mdm.zero.deepspeed_config = lambda *a, **k: {n: v for n, v in full(*a, **k).items() if n != "torch_autocast"}
    train = TrainConfig(steps=args.warmup + args.steps, batch_size=args.batch, warmup_steps=0, grad_clip=args.grad_clip)
    trainer = ZeroTrainer(
        model,
        cfg,
        train,
        ZeroConfig(
            stage=args.stage,
            compile=compiled,
            deepcompile=args.deepcompile,
            overlap_comm=not args.no_overlap,
            channels_last_weights=args.channels_last_weights,
            precision=args.precision,
            stage3_persistence_threshold=args.persistence_threshold,
            stage3_module_granularity_threshold=args.granularity_threshold,
            stage3_memory_efficient_linear=not args.plain_linear,
        ),
        null=null,
    )
    batch = make_batch(cfg, args.batch, device, seed=trainer.rank)  # on the device, as BenchStep's
    if trainer.channels_last:
        batch.images = [x.contiguous(memory_format=torch.channels_last) for x in batch.images]
    stream = repeat(batch)
    for _ in range(args.warmup):
        trainer.train_step(stream)
    if cuda and args.sync_check:
        import traceback

        torch.cuda.set_sync_debug_mode("error")
        try:
            trainer.train_step(stream)
            print("SYNC none in one step", flush=True)
        except RuntimeError:
            frames = traceback.extract_tb(sys.exc_info()[2])[-6:]
            print("SYNC " + " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames)))
        torch.cuda.set_sync_debug_mode(0)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    t = time.perf_counter()
    for _ in range(args.steps):
        per = trainer.train_step(stream)
    loss = per.float().mean().item()
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    elapsed = time.perf_counter() - t
    world = trainer.world
    result = {
        "config": args.config,
        "zero_stage": args.stage,
        "compile": compiled,
        "deepcompile": args.deepcompile,
        "overlap_comm": not args.no_overlap,
        "channels_last_weights": args.channels_last_weights,
        "precision": args.precision,
        "engine_autocast": not args.engine_autocast_off,
        "grad_clip": args.grad_clip,
        "stage3_persistence_threshold": args.persistence_threshold if args.stage == 3 else None,
        "stage3_module_granularity_threshold": args.granularity_threshold if args.stage == 3 else None,
        "stage3_memory_efficient_linear": (not args.plain_linear) if args.stage == 3 else None,
        "world": world,
        "batch_per_gpu": args.batch,
        "img_per_s": round(args.batch * world * args.steps / elapsed, 1),
        "img_per_s_per_gpu": round(args.batch * args.steps / elapsed, 1),
        "step_ms": round(1000 * elapsed / args.steps, 2),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "loss_finite": bool(torch.isfinite(torch.tensor(loss))),
        "last_loss": round(loss, 5),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }
    if args.profile:
        result.update(profile_steps(trainer, stream, args.profile, cuda))
    # state round trip: save, train on, load, and the step/EMA/optimizer come back
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ckpt") if world == 1 else "/tmp/mdm-zero-bench-ckpt"
        trainer.save(path)
        saved_step, ema0 = trainer.step, [s.clone() for s in trainer.ema.shadow]
        trainer.train_step(stream)
        trainer.load(path)
        result["resume_ok"] = trainer.step == saved_step and all(
            torch.equal(a, b) for a, b in zip(ema0, trainer.ema.shadow)
        )
    exported = trainer.export_ema()
    if trainer.rank == 0:
        own = MDMModel(cfg.model).state_dict()
        result["export_ok"] = exported.keys() == own.keys() and all(
            exported[k].shape == v.shape for k, v in own.items()
        )
    if args.plain and trainer.rank == 0:
        # the plain step of bench/train_step.py: channels-last weights and inputs, and
        # contiguous weights with channels-last inputs (what DeepSpeed allows)
        layouts = {
            "channels_last": ("plain_img_per_s", True),
            "contiguous": ("plain_contiguous_weights_img_per_s", False),
        }
        for name in args.plain_layouts.split(","):
            key, cl_weights = layouts[name]
            # as the engine runs: bf16 and channels-last inputs on the GPU, fp32 and contiguous on the CPU
            plain = BenchStep(
                cfg, make_batch(cfg, args.batch, device), device, cl_weights=cl_weights, cl_inputs=cuda, bf16=cuda
            )
            for _ in range(args.warmup):
                plain(compiled=compiled)
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.steps):
                plain(compiled=compiled)
            if cuda:
                torch.cuda.synchronize()
            took = time.perf_counter() - t
            result[key] = round(args.batch * args.steps / took, 1)
            result[key.replace("img_per_s", "step_ms")] = round(1000 * took / args.steps, 2)
            del plain
    if args.mfu and trainer.rank == 0:
        result.update(model_flops_utilisation(cfg, args.batch, device, result))
    if trainer.rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: time the GPU ran at least one kernel."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def profile_steps(trainer, stream, n: int, cuda: bool) -> dict:
    """``n`` engine steps under ``torch.profiler``: the wall time a step takes, how much of it
    the GPU was running kernels (the rest is host work the GPU waits for: hooks, launches,
    syncs), and the ops that take the most host and GPU time, printed as the profiler's tables."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(n):
            trainer.train_step(stream)
        if cuda:
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t) * 1e3 / n
    events = prof.events()
    kernels = [(e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA]
    gpu_ms = busy_us(kernels) / 1e3 / n
    table = prof.key_averages()
    if trainer.rank == 0:
        print(
            f"PROFILE {n} steps: {wall_ms:.1f} ms a step, GPU busy {gpu_ms:.1f} ms, {len(kernels) // n} kernels a step"
        )
        print(table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60), flush=True)
        if cuda:
            print(table.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60), flush=True)
    return {
        "profile_step_ms": round(wall_ms, 1),
        "profile_gpu_busy_ms": round(gpu_ms, 1) if cuda else None,
        "profile_gpu_busy_share": round(gpu_ms / wall_ms, 3) if cuda else None,
        "profile_kernels_per_step": len(kernels) // n,
    }


def model_flops_utilisation(cfg, batch_size: int, device: str, result: dict) -> dict:
    """FLOPs of one training step (forward + backward, counted by ``FlopCounterMode`` on the
    model's matmuls, convolutions and attention), the card's bf16 peak measured with an
    8192^3 matmul, and the utilisation of each timed path in ``result``."""
    from torch.utils.flop_counter import FlopCounterMode

    step = BenchStep(cfg, make_batch(cfg, batch_size, device), device, cl_weights=False, cl_inputs=False)
    with FlopCounterMode(display=False) as counter:
        with step.amp:
            loss, _ = step.steps[False].loss(step.batch, step.gen)
        loss.backward()
    flops = counter.get_total_flops()
    del step
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    peak = 2 * 8192**3 / statistics.median(timed(lambda: a @ b, 10, 3, device))
    per_image = flops / batch_size
    out = {"train_flops_per_image": per_image, "peak_bf16_tflops": round(peak / 1e12, 1)}
    paths = {
        "img_per_s_per_gpu": "mfu_zero",
        "plain_img_per_s": "mfu_plain",
        "plain_contiguous_weights_img_per_s": "mfu_plain_contiguous_weights",
    }
    for key, name in paths.items():
        if key in result:
            out[name] = round(result[key] * per_image / peak, 3)
    return out


if __name__ == "__main__":
    main()
