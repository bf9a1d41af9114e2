#!/usr/bin/env python
"""The stage jobs' images/s under Ray Train against the per-worker step alone, in one run.

Runs ``jobs/stage_<r>.py`` for each ``--configs`` entry in order (each later one grows the
model the earlier one registered, as ``make demo`` does) on the Ray cluster at
``$RAY_ADDRESS`` (or a local one each job starts), with ``--workers`` workers and GPUs when
the machine has them, then ``bench/zero_step.py`` for the same config, batch and ZeRO
stage (the step without Ray, Ray Data or MLflow, random data on the device). Reads the
jobs' ``... img/s`` log lines (the windows after the first ``--skip`` are timed) and
prints the ratio per config.

    python bench/stage_jobs.py --shards DIR --configs small-64,small-64-128 --steps 200,150 --batch 128

``--set KEY=VALUE`` passes further overrides to every job, ``--set CONFIG:KEY=VALUE`` to that
config's job alone (its ``train.batch_size`` is also the batch its benchmark runs at, and
its ``deepspeed.compile``, ``channels_last_weights`` and ``deepcompile`` the benchmark's
step), so that one command trains every stage with its own settings:

    python bench/stage_jobs.py --shards DIR --configs small-64,small-64-128 --steps 477,319 --batch 128 \
      --set small-64-128:train.batch_size=64 --set small-64-128:train.grad_accum=2

``LABEL=CONFIG`` runs one config more than once, each with its own overrides, and every
job's evaluation (``eval.shards``) is read from its log into the table: the loss targets
side by side, at equal steps on the same data:

    python bench/stage_jobs.py --shards DIR/train --configs v=small-64,eps=small-64 --steps 477,477 --no_bench \
      --set eps:model.diffusion.loss_target=eps --set mlflow.register=false --set eval.shards=DIR/heldout
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STEP_LINE = re.compile(r"step (\d+)/(\d+) loss .* ([0-9.]+) img/s")
WAIT = re.compile(r"data wait ([0-9.]+)/([0-9.]+) s")


FID_LINE = re.compile(r"(\d+)px\s+FID ([0-9.]+)\s+KID ([0-9.]+)")


def entries(spec: str) -> list[tuple[str, str]]:
    """``--configs`` items as (name, config): ``small-64`` or ``LABEL=small-64``, so that one
    config can run twice with different overrides (``v=small-64,eps=small-64``)."""
    out = []
    for item in spec.split(","):
        label, sep, config = item.partition("=")
        name, config = (label, config) if sep else (item, item)
        if not name or not config:
            raise SystemExit(f"--configs: {item!r} is neither CONFIG nor LABEL=CONFIG")
        out.append((name, config))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise SystemExit(f"--configs: names repeat ({','.join(names)}); label repeated configs as LABEL=CONFIG")
    return out


def names_of(args) -> list[str]:
    return [n for n, _ in entries(args.configs)]


def top_resolution(config: str) -> int:
    from mdm.presets import get_config

    return get_config(config).model.resolutions[-1]


def sets_for(config: str, sets: list[str], configs: list[str]) -> list[str]:
    """The ``--set`` overrides for the job named ``config``: every ``KEY=VALUE``, and the
    ``NAME:KEY=VALUE`` ones that name it (prefix dropped). A prefix that names no entry of
    ``configs`` (their names: the labels where given) is an error, not a silent global override."""
    out = []
    for item in sets:
        prefix, sep, rest = item.partition(":")
        if not sep or "=" in prefix:  # a plain KEY=VALUE, maybe with ':' in its value (s3://...)
            out.append(item)
        elif prefix not in configs:
            raise SystemExit(f"--set {item}: {prefix!r} is not one of --configs {','.join(configs)}")
        elif prefix == config:
            out.append(rest)
    return out


def job_config(name: str, args):
    """The stage config the job named ``name`` runs with, read by the jobs' own loader: the
    defaults this script sets, then the ``--set`` overrides for that job."""
    from jobs.stage_config import load_stage_config

    config = dict(entries(args.configs))[name]
    overrides = [f"model={config}", f"train.batch_size={args.batch}", *sets_for(name, args.set, names_of(args))]
    return load_stage_config(config, overrides=overrides)


def batch_for(name: str, args) -> int:
    """The job's ``train.batch_size``: the last ``--set`` for it, else ``--batch``."""
    return job_config(name, args).train.batch_size


# Step settings of a job that its benchmark must share to be side by side (flags of bench/zero_step.py).
BENCH_FLAGS = {
    "compile": "--compile",
    "channels_last_weights": "--channels_last_weights",
    "deepcompile": "--deepcompile",
}


def bench_flags_for(name: str, args) -> list[str]:
    """The ``bench/zero_step.py`` flags for the ``deepspeed.*`` step settings the job runs with."""
    zero = job_config(name, args).deepspeed
    return [flag for field, flag in BENCH_FLAGS.items() if getattr(zero, field)]


def run_job(name: str, config: str, steps: int, args, log_path: Path) -> dict:
    gpu = args.gpu
    sets = {
        "model": config,
        "data.shards": args.shards,
        "scaling.num_workers": args.workers,
        "scaling.use_gpu": str(gpu).lower(),
        "scaling.cpus_per_worker": args.cpus_per_worker,
        "train.batch_size": args.batch,
        "train.steps": steps,
        "deepspeed.stage": args.stage,
        "run.log_every": args.log_every,
        "run.checkpoint_every": steps,
        "mlflow.sample_every": 0,
    }
    cmd = [sys.executable, str(ROOT / "jobs" / f"stage_{top_resolution(config)}.py")]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    for s in sets_for(name, args.set, names_of(args)):
        cmd += ["--set", s]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    rates: dict[int, float] = {}  # by step: Ray may echo a worker's line twice
    waits: dict[int, tuple[float, float]] = {}  # by step: (seconds waiting for data, window seconds)
    scores: dict[str, dict[str, float]] = {}  # the stage's evaluation (eval.shards): by resolution
    lines = []
    with open(log_path, "w", buffering=1) as log:  # line by line: a killed run keeps its log
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            since = time.perf_counter() - t0
            log.write(f"[{since:7.1f}s] {line}")  # where a job's start-up time goes
            m = STEP_LINE.search(line)
            if m and int(m.group(1)) not in rates:
                rates[int(m.group(1))] = float(m.group(3))
                w = WAIT.search(line)
                if w:
                    waits[int(m.group(1))] = (float(w.group(1)), float(w.group(2)))
                print(f"  [{name} {since:.0f}s] {line.strip()[-140:]}", flush=True)
            elif any(k in line for k in ("registered models:/", "Error", "error:", "FID", "finished at step")):
                print(f"  [{name} {since:.0f}s] {line.strip()[-200:]}", flush=True)
                f = FID_LINE.search(line)
                if f:
                    scores[f.group(1)] = {"fid": float(f.group(2)), "kid": float(f.group(3))}
            lines.append(line)
        rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        print("".join(lines[-60:]), flush=True)
        raise SystemExit(f"stage job {name} ({config}) failed (exit {rc}); log in {log_path}")
    windows = [rates[k] for k in sorted(rates)]
    timed = windows[args.skip :]  # the first windows hold compilation, cuDNN autotuning, data warm-up
    timed_waits = [waits[k] for k in sorted(rates)[args.skip :] if k in waits]
    return {
        "name": name,
        "config": config,
        "steps": steps,
        "job_wall_s": round(wall, 1),
        "windows": len(timed),
        "job_images_per_s": round(statistics.median(timed), 1) if timed else None,
        "job_images_per_s_all": windows,
        "eval": scores or None,
        # the share of the timed windows the step spent waiting for batches (not hidden by read-ahead)
        "job_data_wait_share": (
            round(sum(w for w, _ in timed_waits) / sum(e for _, e in timed_waits), 3) if timed_waits else None
        ),
    }


def run_bench(name: str, config: str, args) -> dict:
    cmd = [
        sys.executable, str(ROOT / "bench" / "zero_step.py"), "--config", config, "--batch", str(batch_for(name, args)),
        "--stage", str(args.stage), "--steps", str(args.bench_steps), "--warmup", "5", *bench_flags_for(name, args),
    ]  # fmt: skip
    print("$ " + " ".join(cmd), flush=True)
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    result = None
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
    if out.returncode != 0 or result is None:
        print(out.stdout[-3000:], out.stderr[-3000:], flush=True)
        raise SystemExit(f"bench/zero_step.py for {name} ({config}) failed (exit {out.returncode})")
    return result


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", required=True, help="shard set (jobs/preprocess.py --out) at the configs' resolutions")
    ap.add_argument(
        "--configs",
        default="small-64,small-64-128",
        help="comma-separated CONFIG or LABEL=CONFIG, trained in this order",
    )
    ap.add_argument("--steps", default="200,150", help="train.steps per config (comma-separated)")
    ap.add_argument("--batch", type=int, default=128, help="train.batch_size per worker")
    ap.add_argument("--stage", type=int, default=2, help="ZeRO stage")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--cpus_per_worker", type=float, default=4.0)
    ap.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None, help="default: if CUDA is there")
    ap.add_argument("--log_every", type=int, default=20)
    ap.add_argument("--skip", type=int, default=2, help="log windows left out of the median (warm-up)")
    ap.add_argument("--bench_steps", type=int, default=30)
    ap.add_argument("--no_bench", action="store_true", help="only the jobs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides for every job")
    ap.add_argument("--out", default=None, help="folder for the jobs' logs and results.json")
    args = ap.parse_args(argv)
    if args.gpu is None:
        import torch

        args.gpu = torch.cuda.is_available()
    jobs = entries(args.configs)
    for name, _ in jobs:
        sets_for(name, args.set, names_of(args))  # a --set naming no entry fails before any job runs
    steps = [int(s) for s in args.steps.split(",")]
    if len(steps) != len(jobs):
        raise SystemExit("--steps: one value per config")
    out = Path(args.out or "stage-jobs-bench")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for (name, config), n in zip(jobs, steps):
        rows.append(run_job(name, config, n, args, out / f"job-{name}.log"))
    if not args.no_bench:
        for row in rows:
            b = run_bench(row["name"], row["config"], args)
            row["bench_images_per_s"] = b["img_per_s"]
            row["bench_peak_gib"] = b.get("peak_mem_gib")
            if row["job_images_per_s"]:
                row["job_vs_bench"] = round(row["job_images_per_s"] / b["img_per_s"], 3)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(
        f"{'job':>14} {'steps':>6} {'job img/s':>10} {'bench img/s':>12} {'job/bench':>10} {'job wall s':>11}  FID/KID"
    )
    for r in rows:
        scores = "  ".join(f"{res}px {v['fid']:.1f}/{v['kid']:.4f}" for res, v in (r["eval"] or {}).items())
        print(
            f"{r['name']:>14} {r['steps']:>6} {r['job_images_per_s'] or float('nan'):>10.1f} "
            f"{r.get('bench_images_per_s', float('nan')):>12.1f} {r.get('job_vs_bench', float('nan')):>10.3f} "
            f"{r['job_wall_s']:>11.1f}  {scores}"
        )
    print("RESULTS " + json.dumps(rows), flush=True)
    return rows


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
