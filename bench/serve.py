#!/usr/bin/env python
"""Serving cost and batching gain: ``POST /v1/generate`` over Ray Serve against the sampler
called directly in the same process, in one run on one machine.

A local Ray runs two deployments of ``serve/`` side by side (same model, device and torch
threads), one with batching on (``max_batch_images`` 32) and one with it off (1), behind
Serve's proxy on 127.0.0.1. This process also loads the model itself. Measured in
interleaved rounds, so that drifting background load touches every arm alike:

- latency of one image: a direct call of the replica's own sampler function
  (``serve.engine.run_jobs``: ``MDMPipeline.generate``, images copied to the host, which
  waits for the GPU), then the same request over
  HTTP from one client (the difference is Serve's overhead: proxy, routing, batching wait,
  PNG encoding); the replica reports its sampler time, which splits that difference into
  the HTTP path and the sampler's own speed in the replica; ``GET /healthz`` round trips
  give the bare HTTP path;
- throughput: ``--clients`` clients in a closed loop of ``--requests`` one-image requests
  each, against the batched and the unbatched deployment, and one direct call of
  ``--clients`` images (what perfect batching could reach).

    python bench/serve.py --config tiny-32-64 --steps 10 --clients 8 --requests 4
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["fox face, fluent 3d style", "red apple, fluent 3d style", "rocket, fluent 3d style", "penguin"]


def model_folder(config: str, root: Path) -> str:
    """A randomly initialised model of ``config`` (every weight perturbed, so no layer is a
    zero no-op); sampling costs the same whatever the weights."""
    import torch

    from mdm import MDMModel, get_config, save_pretrained

    cfg = get_config(config)
    model = MDMModel(cfg.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    save_pretrained(model, cfg, root / config)
    return str(root / config)


def stats(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"median": statistics.median(s), "p90": s[min(len(s) - 1, int(0.9 * len(s)))], "n": len(s)}


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def direct_call(pipe, prompts: list[str], seeds: list[int], steps: int, sampler: str, guidance_scale: float):
    """One sampler call as a replica makes it, in this process: ``run_jobs`` on one job.

    Its images come back on the host, so the call has waited for the GPU; timing
    ``pipe.generate`` alone would stop the clock while CUDA still runs the queued steps."""
    from serve.engine import Job, run_jobs

    (result,) = run_jobs(pipe, [Job("generate", list(seeds), (sampler, steps, guidance_scale, None), prompts=prompts)])
    if isinstance(result, Exception):
        raise result
    return result.images


def closed_loop(url: str, clients: int, requests_each: int, body: dict, offset: int) -> dict:
    """``clients`` threads, each sending ``requests_each`` one-image requests back to back."""
    import requests

    def client(c: int) -> list[tuple[float, int, float]]:
        out = []
        with requests.Session() as s:
            for k in range(requests_each):
                i = offset + c * requests_each + k
                t0 = time.perf_counter()
                r = s.post(f"{url}/v1/generate", json={**body, "prompt": PROMPTS[i % 4], "seed": i}, timeout=600)
                r.raise_for_status()
                out.append(
                    (time.perf_counter() - t0, int(r.headers["X-Batch-Images"]), float(r.headers["X-Sampler-Seconds"]))
                )
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for part in pool.map(client, range(clients)) for x in part]
    wall = time.perf_counter() - t0
    return {
        "img_per_s": len(results) / wall,
        "wall_s": wall,
        "latency_s": stats([r[0] for r in results]),
        "mean_batch_images": statistics.fmean(r[1] for r in results),
        "median_sampler_call_s": statistics.median(r[2] for r in results),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="weights source (folder, s3://, models:/...); default: --config")
    ap.add_argument("--config", default="tiny-32-64", help="named config to initialise randomly when no --model")
    ap.add_argument("--device", default="cpu", help="cpu or cuda, for every arm")
    ap.add_argument("--steps", type=int, default=10, help="sampler steps a request")
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--guidance_scale", type=float, default=3.0)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="the app's precision, here too")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads of this process and of each replica")
    ap.add_argument("--repeats", type=int, default=8, help="rounds of one-image latency (direct, then HTTP)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients in the throughput runs")
    ap.add_argument("--requests", type=int, default=4, help="requests per client in one throughput run")
    ap.add_argument("--rounds", type=int, default=2, help="throughput runs per arm, interleaved")
    ap.add_argument("--out", default=None, help="also write the results as JSON to this file")
    args = ap.parse_args()

    import ray
    import requests
    import torch
    from ray import serve

    from mdm import MDMPipeline
    from serve.app import MDMServer
    from serve.engine import set_precision

    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="mdm-bench-serve-")
    src = args.model or model_folder(args.config, Path(tmp.name))
    kw = dict(steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance_scale)
    body = {"steps": args.steps, "sampler": args.sampler, "guidance_scale": args.guidance_scale}

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    # Each replica gets the same torch threads as this process (Ray would set OMP_NUM_THREADS
    # from num_cpus); num_cpus 0 so both fit beside each other on a small machine.
    options = {"num_cpus": 0, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(args.threads)}}}
    if args.device == "cuda":
        options["num_gpus"] = 0.5
    urls = {}
    try:
        for name, cap in (("on", 32), ("off", 1)):
            app = MDMServer.options(ray_actor_options=options).bind(
                model=src, device=args.device, max_batch_images=cap, batch_wait_timeout_s=0.01, precision=args.precision
            )
            serve.run(app, name=f"bench-{name}", route_prefix=f"/{name}")
            urls[name] = f"{base}/{name}"
        pipe = MDMPipeline.from_pretrained(src, device=args.device)
        set_precision(pipe, args.precision)  # as each replica does
        http = requests.Session()
        threads = {n: http.get(f"{u}/v1/model").json()["threads"] for n, u in urls.items()}
        for i in range(3):  # warm every path
            direct_call(pipe, [PROMPTS[i]], [i], **kw)
            for u in urls.values():
                http.post(f"{u}/v1/generate", json={**body, "prompt": PROMPTS[i], "seed": i}).raise_for_status()

        health = []
        for _ in range(50):
            t0 = time.perf_counter()
            http.get(f"{urls['on']}/healthz").raise_for_status()
            health.append(time.perf_counter() - t0)
        direct, served, replica_sampler = [], [], []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            direct_call(pipe, [PROMPTS[r % 4]], [r], **kw)
            direct.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            resp = http.post(f"{urls['on']}/v1/generate", json={**body, "prompt": PROMPTS[r % 4], "seed": r})
            resp.raise_for_status()
            served.append(time.perf_counter() - t0)
            replica_sampler.append(float(resp.headers["X-Sampler-Seconds"]))

        # Throughput rounds: direct (two one-image calls, one call of `clients` images), then the
        # batched and the unbatched deployment under `clients` clients. Ratios are taken within
        # a round, whose arms run back to back, so a drifting machine speed cancels out.
        n = args.clients
        rounds = []
        for k in range(args.rounds):
            t0 = time.perf_counter()
            for i in range(2):
                direct_call(pipe, [PROMPTS[i]], [k * n + i], **kw)
            single = (time.perf_counter() - t0) / 2
            t0 = time.perf_counter()
            direct_call(pipe, [PROMPTS[i % 4] for i in range(n)], [k * n + i for i in range(n)], **kw)
            batch = time.perf_counter() - t0
            on = closed_loop(urls["on"], n, args.requests, body, offset=k * n * args.requests)
            off = closed_loop(urls["off"], n, args.requests, body, offset=k * n * args.requests)
            rounds.append({"direct_one_image_s": single, "direct_batch_s": batch, "on": on, "off": off})
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()

    def med(*path: str) -> float:
        """Median over rounds of ``round[path[0]][path[1]]...``."""
        values = []
        for r in rounds:
            for key in path:
                r = r[key]
            values.append(r)
        return statistics.median(values)

    pairs = list(zip(direct, served))
    overhead = statistics.median(s - d for d, s in pairs)
    outside = statistics.median(s - r for s, r in zip(served, replica_sampler))
    d1, s1 = statistics.median(direct), statistics.median(served)
    result = {
        "args": vars(args),
        "replica_threads": threads,
        "healthz_s": stats(health),
        "direct_one_image_s": stats(direct),
        "serve_one_image_s": stats(served),
        "replica_sampler_one_image_s": stats(replica_sampler),
        "rounds": rounds,
    }
    print(f"device {args.device}, {args.threads} torch threads here and in each replica {threads}; steps {args.steps}")
    print("| arm | median latency (ms) | images/s | images a sampler call |\n|---|---:|---:|---:|")
    print(f"| direct, 1 image a call | {d1 * 1e3:.1f} | {1 / d1:.2f} | 1 |")
    print(f"| serve, GET /healthz | {statistics.median(health) * 1e3:.1f} | | |")
    print(f"| serve, 1 client | {s1 * 1e3:.1f} | {1 / s1:.2f} | 1 |")
    print(
        f"| direct, {n} images in one call | {med('direct_batch_s') * 1e3:.1f} | "
        f"{n / med('direct_batch_s'):.2f} | {n} |"
    )
    for name, label in (("on", "batching on"), ("off", "batching off")):
        print(
            f"| serve, {n} clients, {label} | {med(name, 'latency_s', 'median') * 1e3:.1f} | "
            f"{med(name, 'img_per_s'):.2f} | {med(name, 'mean_batch_images'):.2f} |"
        )
    print(
        f"\nServe's overhead per one-image request (median of {len(pairs)} interleaved pairs): {overhead * 1e3:.1f} ms "
        f"({s1 / d1:.3f}x the direct call); outside the replica's sampler call: {outside * 1e3:.1f} ms"
    )
    gain = [r["on"]["img_per_s"] / r["off"]["img_per_s"] for r in rounds]
    direct_gain = [r["direct_one_image_s"] * n / r["direct_batch_s"] for r in rounds]
    reach = [r["on"]["img_per_s"] * r["direct_batch_s"] / n for r in rounds]
    print(
        f"Gain from batching with {n} clients (per round, on / off): "
        f"{', '.join(f'{g:.2f}' for g in gain)} -> median {statistics.median(gain):.2f}x images/s; "
        f"the sampler's own gain from a batch of {n} (direct, same rounds): median {statistics.median(direct_gain):.2f}x; "
        f"batched serving reaches median {statistics.median(reach):.2f}x of the direct batched call"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
