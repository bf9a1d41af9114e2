"""The ``mdm`` command line: sample, inpaint, edit, train locally, run the demo, evaluate.

SRC (``--checkpoint``/``--init``) is a weights folder, an object-storage URI
(``s3://bucket/prefix``, ``file:///abs/path``) or a registry entry (``models:/mdm@stage-256``).
Every subcommand documents its options under ``mdm <command> --help``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

__all__ = ["main"]


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _add_common_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, metavar="SRC", help="weights folder, s3:// or file:// URI, or models:/NAME@ALIAS"
    )
    p.add_argument("--prompt", default=None, help="text prompt (text-conditioned models)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="on CUDA, torch.compile the denoiser inside its CUDA graph: ~2x faster per step, but the first "
        "call of each batch size compiles for a minute or more (worth it for many images, not one)",
    )
    p.add_argument(
        "--negative_prompt", default=None, help="what to steer away from (replaces the empty caption in guidance)"
    )
    p.add_argument("--label", type=int, default=None, help="class id (class-conditioned models)")
    p.add_argument("--num_samples", type=int, default=1, help="how many images (default 1)")
    p.add_argument(
        "--guidance_scale", type=float, default=5.0, help="classifier-free guidance scale; 1 disables (default 5)"
    )
    p.add_argument("--steps", type=int, default=50, help="sampler steps for a full run (default 50)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm", "dpmpp_2m"], help="sampler (default ddim)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity: 0 deterministic, 1 = DDPM (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first sample; sample j uses seed + j (default 0)")
    p.add_argument("--out", default="outputs", help="output folder (default ./outputs)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")


def _resolutions_arg(value: str, available: list[int]) -> list[int]:
    if value == "all":
        return available
    try:
        r = int(value)
    except ValueError:
        raise SystemExit(f"--resolution must be a number or 'all', got {value!r}") from None
    if r not in available:
        raise SystemExit(f"--resolution {r} is not one of the model's resolutions {available}")
    return [r]


def _save_outputs(
    outs: list[torch.Tensor], resolutions: list[int], wanted: list[int], folder: Path, stem: str
) -> list[Path]:
    from .data import make_grid, to_pil

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for r, x in zip(resolutions, outs):
        if r not in wanted:
            continue
        for j in range(x.shape[0]):
            path = folder / f"{stem}_{r}px_{j:02d}.png"
            to_pil(x[j]).save(path)
            written.append(path)
        if x.shape[0] > 1:
            path = folder / f"{stem}_{r}px_grid.png"
            make_grid(x).save(path)
            written.append(path)
    return written


def _pipeline(args):
    from .pipeline import MDMPipeline

    return MDMPipeline.from_pretrained(args.checkpoint, device=_device(args.device), compile=args.compile)


def cmd_sample(args) -> int:
    pipe = _pipeline(args)
    wanted = _resolutions_arg(args.resolution, pipe.resolutions)
    t0 = time.time()
    outs = pipe.generate(
        prompt=args.prompt,
        num_samples=args.num_samples,
        labels=args.label,
        negative_prompt=args.negative_prompt,
        guidance_scale=args.guidance_scale,
        steps=args.steps,
        sampler=args.sampler,
        eta=args.eta,
        seed=args.seed,
        progress=True,
    )
    paths = _save_outputs(outs, pipe.resolutions, wanted, Path(args.out), "sample")
    print(f"wrote {len(paths)} images to {args.out} in {time.time() - t0:.1f}s")
    return 0


def _load_inputs(args, pipe):
    from .data import load_image, to_tensor

    top = pipe.resolutions[-1]
    return to_tensor(load_image(args.image, top))


def cmd_edit(args) -> int:
    pipe = _pipeline(args)
    image = _load_inputs(args, pipe)
    outs = pipe.edit(
        image,
        prompt=args.prompt,
        strength=args.strength,
        num_samples=args.num_samples,
        steps=args.steps,
        labels=args.label,
        negative_prompt=args.negative_prompt,
        guidance_scale=args.guidance_scale,
        sampler=args.sampler,
        eta=args.eta,
        seed=args.seed,
        progress=True,
    )
    paths = _save_outputs(
        outs, pipe.resolutions, _resolutions_arg(args.resolution, pipe.resolutions), Path(args.out), "edit"
    )
    print(f"wrote {len(paths)} images to {args.out}")
    return 0


def cmd_inpaint(args) -> int:
    import numpy as np
    from PIL import Image

    from .data import load_image, make_grid, to_pil

    pipe = _pipeline(args)
    image = _load_inputs(args, pipe)
    top = pipe.resolutions[-1]
    try:
        m = Image.open(args.mask)
        m.load()
    except Exception as e:  # noqa: BLE001
        raise SystemExit(f"cannot read mask {args.mask}: {e}") from e
    m = load_image(m, top).convert("L")
    mask = (torch.from_numpy(np.array(m)).float() / 255.0 > 0.5).float()[None]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = pipe.resolutions
    # The input and the hole at the finest scale, for reference.
    masked = image * (1 - mask) + mask * torch.ones_like(image)
    to_pil(masked).save(out_dir / "inpaint_input_masked.png")
    stages: list[torch.Tensor] = []

    def on_pass(k: int, outs: list[torch.Tensor]) -> None:
        if k == 0:
            name = f"pass0_coarse_fill_{res[0]}px"
            to_pil(outs[0][0]).save(out_dir / f"{name}.png")
        else:
            up = torch.nn.functional.interpolate(outs[k - 1][:1], size=(top, top), mode="bicubic").clamp(-1, 1)
            to_pil(up[0]).save(out_dir / f"pass{k}_upsampled_from_{res[k - 1]}px.png")
            to_pil(outs[k][0]).save(out_dir / f"pass{k}_refined_{res[k]}px.png")
        stages.append(torch.nn.functional.interpolate(outs[min(k, len(res) - 1)][:1], size=(top, top), mode="nearest"))

    outs = pipe.inpaint(
        image,
        mask,
        prompt=args.prompt,
        num_samples=args.num_samples,
        feather=args.feather,
        progressive=not args.no_progressive,
        refine_strength=args.refine_strength,
        steps=args.steps,
        seed=args.seed,
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        labels=args.label,
        sampler=args.sampler,
        eta=args.eta,
        progress=True,
        on_pass=on_pass,
    )
    _save_outputs(outs, res, [top], out_dir, "inpaint_final")
    strip = torch.cat([masked[None], *stages, outs[-1][:1]])
    make_grid(strip, nrow=strip.shape[0]).save(out_dir / "inpaint_progression.png")
    print(f"wrote the inpainting passes and the final image to {out_dir}")
    return 0


def cmd_train(args) -> int:
    from .conditioning import null_condition
    from .config import apply_overrides, from_dict
    from .data import InMemoryImageSet, demo_images, load_captioned_folder
    from .growth import grow
    from .presets import get_config
    from .training import TrainConfig, train_local
    from .weights import EMA, load_pretrained, save_pretrained

    device = _device(args.device)
    cfg = get_config(args.config)
    if args.set:
        cfg = apply_overrides(cfg, args.set)
    train = from_dict(
        TrainConfig,
        {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup_steps": args.warmup_steps,
            "ema_decay": args.ema_decay,
            "seed": args.seed,
        },
    ).validate()
    torch.manual_seed(args.seed)
    if args.init:
        prev, prev_cfg = load_pretrained(args.init, device)
        if prev_cfg.model.resolutions == cfg.model.resolutions:
            model = prev
            print(f"continuing {args.init} ({prev_cfg.model.resolutions})")
        else:
            model = grow(prev, prev_cfg, cfg, freeze_inner=args.freeze_inner)
            print(
                f"grew {prev_cfg.model.resolutions} from {args.init} into {cfg.model.resolutions}; "
                "inner weights loaded exactly"
            )
    else:
        from .unet import MDMModel

        model = MDMModel(cfg.model)
    top = cfg.model.resolutions[-1]
    images, captions = demo_images(top) if args.images == "demo" else load_captioned_folder(args.images, top)
    data = InMemoryImageSet(images, cfg, captions)
    null = null_condition(cfg.model.conditioning, 1) if cfg.model.conditioning.kind != "none" else None
    ema = EMA(model, train.ema_decay)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"training {cfg.name} {cfg.model.resolutions} ({n_params / 1e6:.2f}M parameters) on {len(captions)} images, "
        f"{train.steps} steps of {train.batch_size} on {device}"
    )
    history = train_local(
        model,
        cfg,
        data.batches(train.batch_size, args.seed),
        train,
        null=null,
        ema=ema,
        device=device,
        log_every=max(1, train.steps // 20),
    )
    ema.copy_to(model)
    out = save_pretrained(model, cfg, args.out)
    (Path(args.out) / "train_log.json").write_text(json.dumps({"loss": history, "config": cfg.name}))
    print(f"loss {history[0]:.4f} -> {history[-1]:.4f}; EMA weights written to {out}")
    return 0


def cmd_demo(args) -> int:
    """Train the inner stage, grow it, train the grown model, sample every resolution."""
    from .presets import chain_of

    out = Path(args.out)
    chain = chain_of(args.config)
    if len(chain) < 2:
        raise SystemExit(
            f"--config {args.config} has one resolution; the demo grows a model, give a chain like tiny-32-64"
        )
    prev = None
    for i, name in enumerate(chain):
        stage_dir = out / f"stage_{name}"
        targs = argparse.Namespace(
            config=name,
            init=prev,
            images="demo",
            steps=args.steps[min(i, len(args.steps) - 1)],
            batch_size=args.batch_size,
            lr=args.lr,
            warmup_steps=20,
            ema_decay=args.ema_decay,
            seed=args.seed,
            device=args.device,
            out=str(stage_dir),
            set=None,
            freeze_inner=False,
        )
        cmd_train(targs)
        prev = str(stage_dir)
    from .data import make_grid
    from .pipeline import MDMPipeline

    assert prev is not None
    pipe = MDMPipeline.from_pretrained(prev, device=_device(args.device))
    from .data import demo_images

    _, captions = demo_images(8)
    prompts = captions[: args.num_samples]
    outs = pipe.generate(
        prompt=prompts,
        num_samples=len(prompts),
        guidance_scale=args.guidance_scale,
        steps=args.sample_steps,
        sampler="dpmpp_2m",
        seed=args.seed,
        progress=True,
    )
    samples = out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    top = pipe.resolutions[-1]
    for r, x in zip(pipe.resolutions, outs):
        make_grid(x, nrow=4).save(samples / f"grid_{r}px.png")
    rows = torch.cat([torch.nn.functional.interpolate(x, size=(top, top), mode="nearest") for x in outs])
    make_grid(rows, nrow=len(prompts)).save(samples / "grid_all_resolutions.png")
    (samples / "prompts.txt").write_text("\n".join(prompts) + "\n")
    print(f"samples at every resolution {pipe.resolutions} written to {samples}")
    return 0


def cmd_eval(args) -> int:
    """FID/KID (and the caption score) at every resolution against a captioned image folder."""
    from .data import demo_images, load_captioned_folder
    from .evaluation import evaluate
    from .pipeline import MDMPipeline

    device = _device(args.device)
    pipe = MDMPipeline.from_pretrained(args.checkpoint, device=device)
    top = pipe.resolutions[-1]
    images, captions = demo_images(top) if args.real == "demo" else load_captioned_folder(args.real, top)
    if args.num_real:
        images, captions = images[: args.num_real], captions[: args.num_real]
    report = evaluate(
        pipe,
        {top: images},
        prompts=captions,
        num_samples=args.num_samples,
        sampler=args.sampler,
        steps=args.steps,
        guidance=args.guidance_scale,
        batch_size=args.batch_size,
        device=device,
        real_captions=captions,
        seed=args.seed,
        kid_subsets=args.kid_subsets,
        progress=not args.no_progress,
    )
    report["model"] = args.checkpoint
    report["real"] = args.real
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    for r, m in report["metrics"].items():
        print(f"{r:>5}px  FID {m['fid']:.2f}  KID {m['kid_mean']:.4f} +- {m['kid_std']:.4f}")
    print(f"report written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mdm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="generate images (every resolution at once)")
    _add_common_sampling(p)
    p.add_argument(
        "--resolution", default="all", help="which resolution to write: one of the model's, or 'all' (default)"
    )
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("edit", help="SDEdit an image at a strength")
    _add_common_sampling(p)
    p.add_argument(
        "--image", required=True, help="input image (PNG/JPEG/WebP); centre-cropped to the model's top resolution"
    )
    p.add_argument(
        "--strength",
        type=float,
        default=0.6,
        help="noise level to start from, in (0, 1]: 1 ignores the image (default 0.6)",
    )
    p.add_argument("--resolution", default="all", help="which resolution to write, or 'all' (default)")
    p.set_defaults(fn=cmd_edit)

    p = sub.add_parser(
        "inpaint", help="progressive multi-scale inpainting: coarse fill, upsample, refine, finest scale"
    )
    _add_common_sampling(p)
    p.add_argument("--image", required=True, help="input image; centre-cropped to the model's top resolution")
    p.add_argument("--mask", required=True, help="mask image of the same framing: white = fill, black = keep")
    p.add_argument(
        "--feather", type=int, default=2, help="soften the mask edge outward by this many pixels (default 2)"
    )
    p.add_argument(
        "--refine_strength", type=float, default=0.6, help="start of each coarse-to-fine refinement pass (default 0.6)"
    )
    p.add_argument("--no_progressive", action="store_true", help="one joint pass only, no coarse-to-fine refinement")
    p.set_defaults(fn=cmd_inpaint)

    p = sub.add_parser("train", help="train one stage in this process (no Ray): for tiny configs and CPU checks")
    p.add_argument("--config", required=True, help="named config, e.g. tiny-32 or tiny-32-64 (see `mdm configs`)")
    p.add_argument(
        "--init", default=None, metavar="SRC", help="previous stage to grow from (or the same config to continue)"
    )
    p.add_argument("--freeze_inner", action="store_true", help="train only the new outer shell")
    p.add_argument(
        "--images", default="demo", help="folder of images with captions.json or .txt sidecars, or 'demo' (default)"
    )
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--batch_size", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3, for tiny models)")
    p.add_argument("--warmup_steps", type=int, default=20, help="linear warm-up steps (default 20)")
    p.add_argument("--ema_decay", type=float, default=0.99, help="EMA decay of the saved weights (default 0.99)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument(
        "--set",
        nargs="*",
        default=None,
        metavar="KEY=VALUE",
        help="config overrides, e.g. diffusion.shift_power=2 model.unets.0.dropout=0.1",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default auto)")
    p.add_argument("--out", required=True, help="folder to write config.json and model.safetensors to")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser(
        "demo", help="train a tiny model on the shipped emoji, grow it one stage, sample every resolution"
    )
    p.add_argument(
        "--config", default="tiny-32-64", help="the grown config; its chain is trained in order (default tiny-32-64)"
    )
    p.add_argument("--steps", type=int, nargs="+", default=[300, 200], help="steps per stage (default 300 200)")
    p.add_argument("--batch_size", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--ema_decay", type=float, default=0.99, help="EMA decay (default 0.99)")
    p.add_argument("--num_samples", type=int, default=8, help="images to sample, one per demo caption (default 8)")
    p.add_argument("--sample_steps", type=int, default=25, help="DPM-Solver++ steps (default 25)")
    p.add_argument("--guidance_scale", type=float, default=3.0, help="guidance scale (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default auto)")
    p.add_argument("--out", default="outputs/demo", help="output folder (default outputs/demo)")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser(
        "eval", help="FID and KID at every resolution (and a caption score) against real captioned images; no Ray"
    )
    p.add_argument(
        "--checkpoint", required=True, metavar="SRC", help="weights folder, s3:// or file:// URI, or models:/NAME@ALIAS"
    )
    p.add_argument(
        "--real",
        default="demo",
        help="folder of real held-out images with captions.json or .txt sidecars, or 'demo' (the shipped emoji); "
        "for Parquet shards use jobs/evaluate.py",
    )
    p.add_argument("--num_real", type=int, default=None, help="use at most this many real images (default all)")
    p.add_argument(
        "--num_samples",
        type=int,
        default=100,
        help="images to generate, prompts cycled over the captions (default 100)",
    )
    p.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm", "dpmpp_2m"], help="sampler (default ddim)")
    p.add_argument(
        "--guidance_scale", type=float, default=5.0, help="classifier-free guidance scale; 1 disables (default 5)"
    )
    p.add_argument("--seed", type=int, default=0, help="sample j is seeded by seed + j (default 0)")
    p.add_argument("--batch_size", type=int, default=16, help="samples generated per batch (default 16)")
    p.add_argument("--kid_subsets", type=int, default=100, help="KID subsets of min(1000, n) images (default 100)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    p.add_argument("--out", default="eval_report.json", help="JSON report path (default eval_report.json)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("configs", help="list the named configs with their resolutions and sizes")
    p.set_defaults(fn=cmd_configs)
    return parser


def cmd_configs(args) -> int:
    from .presets import get_config, list_configs

    for name in list_configs():
        c = get_config(name)
        print(
            f"{name:14s} resolutions={c.model.resolutions} p={c.diffusion.shift_power} "
            f"conditioning={c.model.conditioning.kind}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError

    try:
        return int(args.fn(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"mdm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
