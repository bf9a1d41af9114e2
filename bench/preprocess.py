#!/usr/bin/env python
"""Preprocessing throughput per CPU core: the Ray Data pipeline vs a plain PIL loop.

Makes N 1024-px JPEG sources (the shipped emoji, upscaled, with grain so JPEG has real
work), then, in one run on the same files:

- plain: one process, for each file read bytes -> ``process_image`` (decode, crop, resize
  with antialiasing, average-pool, PNG-encode every resolution) -> one Parquet file;
- ray: ``jobs/preprocess.py``'s pipeline (``open_source`` + ``preprocess``) on a local Ray
  with C CPUs for each C of ``--cpus`` (Ray started, and its workers warmed, before the
  clock), on ``--images_per_cpu`` x C of the files when that is given (so every arm runs
  long enough to time), else on all of them.

Prints images/s and images/s per core for both and their ratio. Goal: ray per core >= 1.0x
plain (Ray adds parallelism, not overhead) and total images/s growing with cores.

    python bench/preprocess.py --images 240 --cpus 2
    python bench/preprocess.py --images 1920 --plain_images 240 --images_per_cpu 120 --cpus 1 4 8 16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdm.data import ASSETS  # noqa: E402
from pipelines.preprocess import PreprocessConfig, preprocess, process_image  # noqa: E402
from pipelines.sources import open_source  # noqa: E402


def _make_source(job: tuple[Path, int, int, list[Path]]) -> None:
    folder, i, size, emoji = job
    rng = np.random.default_rng(i)
    base = Image.open(emoji[i % len(emoji)]).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(base, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    img.save(folder / f"{i:05d}.jpg", quality=90)
    (folder / f"{i:05d}.txt").write_text(emoji[i % len(emoji)].stem.replace("_", " "))


def make_sources(folder: Path, n: int, size: int = 1024) -> None:
    """n JPEGs of the shipped emoji with grain, made on every core (not part of any timing)."""
    import os
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        emoji = sorted((ASSETS / "emoji").glob("*.png"))
        list(pool.map(_make_source, [(folder, i, size, emoji) for i in range(n)], chunksize=8))


def plain_loop(
    folder: Path, out: Path, cfg: PreprocessConfig, limit: int | None = None, part: tuple[int, int] = (0, 1)
) -> tuple[float, int]:
    """The plain loop over the first ``limit`` files, or over slice ``part[0]`` of ``part[1]``."""
    t0 = time.perf_counter()
    rows: dict[str, list] = {}
    for path in sorted(folder.glob("*.jpg"))[:limit][part[0] :: part[1]]:
        result, reason = process_image(path.read_bytes(), cfg)
        if result is None:
            continue
        result["caption"] = path.with_suffix(".txt").read_text()
        for k, v in result.items():
            rows.setdefault(k, []).append(v)
    name = "plain.parquet" if part == (0, 1) else f"plain-{part[0]:03d}.parquet"
    pq.write_table(pa.table(rows), out / name, compression="none")  # as the pipeline writes
    return time.perf_counter() - t0, len(rows.get("key", []))


def _plain_part(job: tuple) -> tuple[float, int]:
    return plain_loop(*job)


def plain_processes(folder: Path, out: Path, cfg: PreprocessConfig, limit: int, procs: int) -> float:
    """images/s of ``procs`` plain loops side by side on disjoint files: what the machine's
    cores give without Ray (the ceiling for Ray's per-core ratio on this machine)."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=procs) as pool:
        t0 = time.perf_counter()
        done = list(pool.map(_plain_part, [(folder, out, cfg, limit, (i, procs)) for i in range(procs)]))
        wall = time.perf_counter() - t0
    return sum(n for _, n in done) / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=240, help="number of 1024-px JPEG sources (default 240)")
    p.add_argument("--resolutions", default="64,128,256,512", help="output resolutions (default 64,128,256,512)")
    p.add_argument(
        "--cpus", type=int, nargs="+", default=[2], help="CPUs given to the local Ray, one arm each (default 2)"
    )
    p.add_argument("--plain_images", type=int, default=None, help="files the plain loop times (default: all)")
    p.add_argument(
        "--plain_procs",
        type=int,
        nargs="*",
        default=[],
        help="also run the plain loop in this many processes at once, on --images_per_cpu files each",
    )
    p.add_argument("--images_per_cpu", type=int, default=None, help="files per CPU in each Ray arm (default: all)")
    p.add_argument("--shard_rows", type=int, default=64, help="rows per shard (default 64)")
    p.add_argument("--workdir", default=None, help="where to put sources and outputs (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args()

    import ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="mdm-bench-pre-"))
    src = work / "sources"
    if len(list(src.glob("*.jpg"))) < args.images:
        make_sources(src, args.images)
    cfg = PreprocessConfig([int(r) for r in args.resolutions.split(",")], shard_rows=args.shard_rows)
    (work / "plain").mkdir(exist_ok=True)
    plain_s, plain_n = plain_loop(src, work / "plain", cfg, args.plain_images)
    plain_rate = plain_n / plain_s
    print(f"plain loop (1 core): {plain_n} images, {plain_rate:.2f} img/s", flush=True)

    results = []
    for procs in args.plain_procs:
        n = min(args.images, (args.images_per_cpu or args.plain_images or 240) * procs)
        rate = plain_processes(src, work / "plain", cfg, n, procs)
        res = {"plain_processes": procs, "images": n, "plain_images_per_s": round(rate, 2)}
        res["per_core_ratio"] = round(rate / procs / plain_rate, 2)
        results.append(res)
        print(json.dumps(res))
        print(
            f"plain loop x {procs} processes: {rate:.2f} img/s -> {res['per_core_ratio']}x one loop per core",
            flush=True,
        )
    for cpus in args.cpus:
        n = min(args.images, args.images_per_cpu * cpus) if args.images_per_cpu else args.images
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        preprocess(open_source(str(src), limit=min(n, 4 * cpus)), str(work / f"warm{cpus}"), cfg, progress=False)
        t0 = time.perf_counter()
        manifest = preprocess(open_source(str(src), limit=n), str(work / f"ray{cpus}"), cfg, progress=False)
        ray_s = time.perf_counter() - t0
        ray.shutdown()
        res = {
            "images": manifest["rows"],
            "resolutions": cfg.resolutions,
            "cpus": cpus,
            "shard_rows": args.shard_rows,
            "plain_images_per_s": round(plain_rate, 2),
            "ray_images_per_s": round(manifest["rows"] / ray_s, 2),
        }
        res["ray_images_per_s_per_core"] = round(res["ray_images_per_s"] / cpus, 2)
        res["per_core_ratio"] = round(res["ray_images_per_s_per_core"] / plain_rate, 2)
        res["speedup_total"] = round(res["ray_images_per_s"] / plain_rate, 2)
        results.append(res)
        print(json.dumps(res))
        print(
            f"ray ({cpus} CPUs, {res['images']} images): {res['ray_images_per_s']} img/s "
            f"= {res['ray_images_per_s_per_core']} img/s/core -> {res['per_core_ratio']}x plain per core, "
            f"{res['speedup_total']}x total",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results if len(results) > 1 else results[0], indent=2))


if __name__ == "__main__":
    main()
