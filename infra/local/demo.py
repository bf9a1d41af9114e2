#!/usr/bin/env python
"""The main job on the embedded default: raw emoji -> shards -> stage 64 -> stage 128 ->
an HTTP endpoint -> images, every step on the local stack and submitted as operators do.

    python infra/local/demo.py --out outputs/demo          # what `make demo` runs
    python3 infra/local/stack.py down                      # stop the stack afterwards

1. start the local stack (S3 server, MLflow server, Ray head; reused when running);
2. ``ray job submit -- python -m pipelines.emoji``: render the emoji raw set into S3;
3. ``ray job submit -- python jobs/preprocess.py``: shards at 64 and 128 px;
4. ``ray job submit -- python jobs/stage_64.py`` then ``jobs/stage_128.py`` (Ray Train +
   DeepSpeed ZeRO-2, 2 CPU workers; registers ``models:/mdm@stage-64`` and ``@stage-128``);
5. ``serve deploy``: the sampler of ``models:/mdm@stage-128`` behind HTTP;
6. POST a few prompts to ``/v1/generate``; PNGs and a grid go to ``--out``.

Re-running starts again from step 2 with fresh run names (the registry keeps every
version). ``--quick`` shrinks every step to a smoke test (the integration test runs it).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "infra" / "local"))
sys.path.insert(0, str(REPO))

import stack  # noqa: E402

PROMPTS = [
    "fox face, noto style",
    "red apple, fluent flat style",
    "rocket, openmoji style",
    "penguin, fluent 3d style",
]


def banner(i: int, n: int, text: str) -> None:
    print(f"\n=== [{i}/{n}] {text}", flush=True)


def submit(env: dict, dashboard: str, args: list[str]) -> None:
    """``ray job submit`` and stream the job's output; raise when it fails."""
    cmd = [
        str(Path(sys.executable).parent / "ray"), "job", "submit",
        "--address", dashboard, "--working-dir", str(REPO), "--", *args,
    ]  # fmt: skip
    print("$ " + " ".join(["ray job submit --working-dir .", "--", *args]), flush=True)
    proc = subprocess.run(cmd, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"demo: the job `{' '.join(args)}` failed (exit {proc.returncode}); its log is above")


def sets(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def post(url: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return
        except (OSError, urllib.error.HTTPError):
            if time.time() > deadline:
                raise SystemExit(
                    f"demo: {url} did not answer within {timeout:.0f} s (serve status shows why)"
                ) from None
            time.sleep(2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "demo", help="where images and the grid go")
    p.add_argument("--state", type=Path, default=None, help="stack state folder (default $MDM_STATE_DIR/stack)")
    p.add_argument("--ports", choices=["default", "auto"], default="default", help="stack ports (see stack.py)")
    p.add_argument("--npm_prefix", type=Path, default=REPO / ".state" / "npm", help="where the emoji packages are")
    p.add_argument("--per_style", type=int, default=80, help="emoji per style in the raw set (default 80)")
    p.add_argument("--steps_64", type=int, default=400, help="training steps of stage 64 (default 400)")
    p.add_argument("--steps_128", type=int, default=200, help="training steps of stage 128 (default 200)")
    p.add_argument("--sample_steps", type=int, default=25, help="sampler steps of the requests (default 25)")
    p.add_argument("--quick", action="store_true", help="a smoke-test size of every step (minutes, not quality)")
    p.add_argument("--down", action="store_true", help="stop the stack at the end")
    args = p.parse_args(argv)
    if args.quick:
        args.per_style, args.steps_64, args.steps_128, args.sample_steps = 6, 6, 4, 4
    t_start = time.time()
    state = (args.state or stack.default_state()).resolve()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    n = 6

    banner(1, n, "local stack: S3 server, MLflow server, Ray head")
    info = stack.up(state, args.ports, num_cpus=2)
    print(stack.describe(info), flush=True)
    env = dict(os.environ, **stack.stack_env(info), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    dash = info["urls"]["dashboard"]
    bucket = f"s3://{info['bucket']}"
    tag = time.strftime("%Y%m%d-%H%M%S")
    raw, shards = f"{bucket}/raw/emoji", f"{bucket}/shards/emoji-64-128"

    banner(2, n, f"emoji raw set ({args.per_style} per style) -> {raw}")
    submit(
        env,
        dash,
        ["python", "-m", "pipelines.emoji", "--out", raw, "--size", "128",
         "--limit_per_style", str(args.per_style), "--prefix", str(args.npm_prefix.resolve())],
    )  # fmt: skip

    banner(3, n, f"preprocessing job -> {shards}")
    submit(
        env,
        dash,
        ["python", "jobs/preprocess.py", "--source", f"{raw}/train", "--out", shards,
         "--resolutions", "64,128", "--shard_rows", "64", "--require_captions"],
    )  # fmt: skip

    common = {
        "data.shards": shards,
        "data.cache": "true",
        "run.storage_path": f"{bucket}/runs",
        "scaling.num_workers": 2,
        "scaling.cpus_per_worker": 0.5,
        "mlflow.sample_steps": 10 if args.quick else 25,
        "deepspeed.stage": 2,
    }

    def stage(resolution: int, model: str, steps: int, batch: int, lr: float, ema: float, warmup: int) -> None:
        values = dict(
            common,
            **{
                "model": model,
                "train.steps": steps,
                "train.batch_size": batch,
                "train.lr": lr,
                "train.warmup_steps": min(warmup, steps // 4),
                "train.ema_decay": ema,
                "run.checkpoint_every": max(2, steps // 2),
                "run.log_every": max(1, steps // 20),
                "mlflow.sample_every": max(2, steps // 2),
                "run.name": f"demo-{resolution}-{tag}",
            },
        )
        submit(env, dash, ["python", f"jobs/stage_{resolution}.py", *sets(values)])

    banner(4, n, "stage 64 (Ray Train + DeepSpeed ZeRO-2, 2 workers) -> models:/mdm@stage-64")
    stage(64, "tiny-64", args.steps_64, batch=8, lr=2e-3, ema=0.99, warmup=50)
    banner(4, n, "stage 128, grown from stage 64 -> models:/mdm@stage-128")
    stage(128, "tiny-64-128", args.steps_128, batch=4, lr=1e-3, ema=0.98, warmup=20)

    banner(5, n, "Ray Serve: the sampler of models:/mdm@stage-128 over HTTP")
    serve_port = info["ports"]["serve"]
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": serve_port},
        "applications": [
            {
                "name": "mdm",
                "route_prefix": "/",
                "import_path": "serve.app:build_app",
                "args": {"model": "models:/mdm@stage-128"},
                "deployments": [{"name": "MDMServer", "num_replicas": 1, "ray_actor_options": {"num_cpus": 1}}],
            }
        ],
    }
    cfg_file = state / "serve-demo.yaml"
    cfg_file.write_text(json.dumps(config, indent=2))  # JSON is YAML
    serve_cli = str(Path(sys.executable).parent / "serve")
    print(f"$ serve deploy {cfg_file} --address {dash}", flush=True)
    subprocess.run([serve_cli, "deploy", str(cfg_file), "--address", dash], env=env, check=True)
    endpoint = info["urls"]["serve"]
    wait_http(f"{endpoint}/healthz", 600)
    with urllib.request.urlopen(f"{endpoint}/v1/model", timeout=30) as r:
        model = json.loads(r.read())
    print(f"serving {model.get('name')} version {model.get('version')} ({model.get('config')}) at {endpoint}")

    banner(6, n, f"{len(PROMPTS)} prompts -> {out}")
    from PIL import Image

    from mdm.data import make_grid, to_tensor

    rows = []
    for i, prompt in enumerate(PROMPTS):
        body = {"prompt": prompt, "num_images": 4, "seed": 0, "steps": args.sample_steps, "resolution": "all"}
        t = time.time()
        res = post(f"{endpoint}/v1/generate", body)
        by_res: dict[int, list] = {}
        for item in res["images"]:
            img = Image.open(io.BytesIO(base64.b64decode(item["png"]))).convert("RGB")
            img.save(out / f"prompt{i}_seed{item['seed']}_{item['resolution']}px.png")
            by_res.setdefault(item["resolution"], []).append(img)
        top = max(by_res)
        rows.extend(to_tensor(img) for img in by_res[top])
        print(f"  {prompt!r}: {len(res['images'])} images in {time.time() - t:.1f} s", flush=True)
    import torch

    grid = make_grid(torch.stack(rows), nrow=4)
    grid.save(out / "grid.png")
    (out / "prompts.json").write_text(json.dumps(PROMPTS, indent=2))

    minutes = (time.time() - t_start) / 60
    print(
        f"\nDone in {minutes:.1f} min. Look at:\n"
        f"  images           {out}  (grid.png: one row per prompt, 128 px)\n"
        f"  MLflow UI        {info['urls']['mlflow']}  (experiment mdm: loss per resolution, sample grids; "
        f"Models: mdm @stage-64, @stage-128)\n"
        f"  Ray dashboard    {dash}  (jobs and their logs)\n"
        f"  endpoint         {endpoint}/docs  (try POST /v1/generate)\n"
        f"Use the stack from a shell: eval \"$({stack.stack_command(state, 'env')})\"\n"
        f"Stop the stack with: {stack.stack_command(state, 'down')}",
        flush=True,
    )
    if args.down:
        stack.down(state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
