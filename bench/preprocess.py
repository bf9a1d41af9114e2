#!/usr/bin/env python
"""Preprocessing throughput per CPU core: the Ray Data pipeline vs a plain PIL loop.

Makes N 1024-px JPEG sources (the shipped emoji, upscaled, with grain so JPEG has real
work), then, in one run on the same files:

- plain: one process, for each file read bytes -> ``process_image`` (decode, crop, resize
  with antialiasing, average-pool, PNG-encode every resolution) -> one Parquet file;
- ray: ``jobs/preprocess.py``'s pipeline (``open_source`` + ``preprocess``) on a local Ray
  with ``--cpus`` CPUs (Ray started before the clock).

Prints images/s and images/s per core for both and their ratio. Goal: ray per core >= 1.0x
plain (Ray adds parallelism, not overhead) and total images/s growing with cores.

    python bench/preprocess.py --images 240 --cpus 2
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


def make_sources(folder: Path, n: int, size: int = 1024) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    emoji = sorted((ASSETS / "emoji").glob("*.png"))
    rng = np.random.default_rng(0)
    for i in range(n):
        base = Image.open(emoji[i % len(emoji)]).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        arr = np.asarray(base, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        img.save(folder / f"{i:05d}.jpg", quality=90)
        (folder / f"{i:05d}.txt").write_text(emoji[i % len(emoji)].stem.replace("_", " "))


def plain_loop(folder: Path, out: Path, cfg: PreprocessConfig) -> tuple[float, int]:
    t0 = time.perf_counter()
    rows: dict[str, list] = {}
    for path in sorted(folder.glob("*.jpg")):
        result, reason = process_image(path.read_bytes(), cfg)
        if result is None:
            continue
        result["caption"] = path.with_suffix(".txt").read_text()
        for k, v in result.items():
            rows.setdefault(k, []).append(v)
    pq.write_table(pa.table(rows), out / "plain.parquet", compression="none")  # as the pipeline writes
    return time.perf_counter() - t0, len(rows.get("key", []))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=240, help="number of 1024-px JPEG sources (default 240)")
    p.add_argument("--resolutions", default="64,128,256,512", help="output resolutions (default 64,128,256,512)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs given to the local Ray (default 2)")
    p.add_argument("--shard_rows", type=int, default=64, help="rows per shard (default 64)")
    p.add_argument("--workdir", default=None, help="where to put sources and outputs (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args()

    import ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="mdm-bench-pre-"))
    src = work / "sources"
    if not src.exists():
        make_sources(src, args.images)
    cfg = PreprocessConfig([int(r) for r in args.resolutions.split(",")], shard_rows=args.shard_rows)
    (work / "plain").mkdir(exist_ok=True)
    plain_s, plain_n = plain_loop(src, work / "plain", cfg)

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    preprocess(open_source(str(src), limit=8), str(work / "warm"), cfg, progress=False)  # warm the workers
    t0 = time.perf_counter()
    manifest = preprocess(open_source(str(src)), str(work / "ray"), cfg, progress=False)
    ray_s = time.perf_counter() - t0
    ray.shutdown()

    res = {
        "images": args.images,
        "resolutions": cfg.resolutions,
        "cpus": args.cpus,
        "shard_rows": args.shard_rows,
        "plain_images_per_s": round(plain_n / plain_s, 2),
        "ray_images_per_s": round(manifest["rows"] / ray_s, 2),
    }
    res["ray_images_per_s_per_core"] = round(res["ray_images_per_s"] / args.cpus, 2)
    res["per_core_ratio"] = round(res["ray_images_per_s_per_core"] / res["plain_images_per_s"], 2)
    res["speedup_total"] = round(res["ray_images_per_s"] / res["plain_images_per_s"], 2)
    print(json.dumps(res))
    print(
        f"plain loop (1 core): {res['plain_images_per_s']} img/s | ray ({args.cpus} CPUs): {res['ray_images_per_s']} img/s "
        f"= {res['ray_images_per_s_per_core']} img/s/core -> {res['per_core_ratio']}x plain per core, "
        f"{res['speedup_total']}x total"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
