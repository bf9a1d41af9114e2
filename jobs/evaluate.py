#!/usr/bin/env python
"""Job: FID, KID and a caption score of a model at every resolution, on held-out shards.

    python jobs/evaluate.py --model models:/mdm@stage-256 --shards s3://shards/emoji-heldout \\
        --num_samples 1000 --steps 50 --out report.json
    ray job submit --working-dir . -- ./jobs/evaluate.py --model ... --shards ...

Held-out images come from a shard set (Parquet + _manifest.json, written by
jobs/preprocess.py from the raw set's held-out split, e.g. ``--source raw/emoji/heldout``).
If SHARDS holds no manifest but a ``heldout/`` or ``val/`` subfolder does, that split is used.
Rows are read with pyarrow alone (no Ray): the NUM_REAL rows with the smallest keys
(content hashes, so a fixed pseudo-random subset). Samples use the held-out captions as
prompts (cycled), sample j seeded by SEED + j. Lower resolutions missing from the shards are
average-pooled from the top one, as preprocessing does.

With a ``models:/`` model (and mlflow installed) or --mlflow_run_id, the metrics fid_<R>,
kid_<R> (and caption_similarity_<R>) and the report (evaluation/report.json) are logged to
that run: by default the run that registered the model version. A sample grid of
--grid_prompts held-out prompts x --grid_seeds seeds at every resolution is written beside
the report (``<report>_grid_<R>.png``) and logged there too. Runs on this process's
device (cuda when present, or --device); Ray is never started.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SPLITS = ("heldout", "val")


def resolve_split(uri: str) -> str:
    """``uri`` if it holds a manifest, else its ``heldout/`` or ``val/`` split that does."""
    from mdm.storage import url_to_fs
    from pipelines.preprocess import MANIFEST
    from pipelines.storage import join

    fs, path = url_to_fs(uri)
    if fs.exists(join(path, MANIFEST)):
        return uri
    for split in SPLITS:
        if fs.exists(join(path, split, MANIFEST)):
            return join(uri, split)
    raise FileNotFoundError(
        f"{uri} holds no {MANIFEST}, nor do its {'/ or '.join(SPLITS)}/ splits: point --shards at the shards "
        "preprocessed from the held-out images (jobs/preprocess.py --source RAW/heldout --out URI)"
    )


def read_heldout(
    uri: str, resolutions: list[int], limit: int | None = None
) -> tuple[dict[int, torch.Tensor], list[str], dict[str, Any]]:
    """uint8 (N, 3, R, R) images per stored resolution, captions and the manifest.

    Reads ``image_<R>`` for each of ``resolutions`` the shards hold (the top one is
    required), taking the ``limit`` rows with the smallest ``key``.
    """
    import pyarrow.compute as pc
    from PIL import Image

    from pipelines.reader import read_manifest, shard_dataset

    manifest = read_manifest(uri)
    stored = [r for r in resolutions if r in manifest["resolutions"]]
    top = max(resolutions)
    if top not in stored:
        raise ValueError(
            f"{uri} holds resolutions {manifest['resolutions']}, not the model's top resolution {top}; "
            f"preprocess the held-out images with --resolutions including {top}"
        )
    ds = shard_dataset(uri, manifest)
    keys = ds.to_table(columns=["key"]).column("key").to_pylist()
    if not keys:
        raise ValueError(f"{uri} has no rows")
    chosen = sorted(keys)[:limit] if limit else sorted(keys)
    table = ds.to_table(
        columns=["key", "caption", *[f"image_{r}" for r in stored]], filter=pc.field("key").isin(chosen)
    ).sort_by("key")
    captions = [c or "" for c in table.column("caption").to_pylist()]
    images = {}
    for r in stored:
        arrs = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in table.column(f"image_{r}").to_pylist()]
        images[r] = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()
    return images, captions, manifest


def mlflow_run_for(model: str, run_id: str | None) -> str | None:
    """The run to log to: ``run_id``, else the run that registered a ``models:/`` version."""
    if run_id:
        return run_id
    if not model.startswith("models:/"):
        return None
    from mlflow import MlflowClient

    from jobs.registry import resolve_version

    name, version = resolve_version(model)
    return MlflowClient().get_model_version(name, version).run_id or None


def log_to_mlflow(run_id: str, report: dict[str, Any], grids: dict[str, Any] | None = None) -> None:
    """Metrics ``fid_<R>``, ``kid_<R>`` (and ``caption_similarity_<R>``), the report as
    ``evaluation/report.json`` and ``grids`` (file name -> PIL image) under ``evaluation/``."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for name, image in sorted((grids or {}).items()):
        client.log_image(run_id, image, f"evaluation/{name}")
    for r, m in report["metrics"].items():
        client.log_metric(run_id, f"fid_{r}", m["fid"])
        client.log_metric(run_id, f"kid_{r}", m["kid_mean"])
        if "caption_similarity" in m:
            client.log_metric(run_id, f"caption_similarity_{r}", m["caption_similarity"])
    client.log_dict(run_id, report, "evaluation/report.json")


def grid_uri(report_uri: str, resolution: int) -> str:
    """Where the grid of ``resolution`` goes: beside the report, ``<report stem>_grid_<R>.png``."""
    stem = report_uri[: -len(".json")] if report_uri.endswith(".json") else report_uri
    return f"{stem}_grid_{resolution}.png"


def write_grids(
    pipe: Any, captions: list[str], args: argparse.Namespace
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Draw the sample grid of ``--grid_prompts`` held-out prompts and write one PNG per
    resolution beside the report; returns the report's ``grid`` entry and the pictures by
    file name (for MLflow)."""
    from mdm.evaluation import grid_prompts, sample_grid

    text = pipe.config.model.conditioning.kind == "text"
    prompts = grid_prompts(captions, args.grid_prompts) if text else None
    if text and not prompts:
        print("no sample grid: the held-out rows have no captions to draw it from", file=sys.stderr)
        return None, None
    grids = sample_grid(
        pipe, prompts, rows=args.grid_prompts, per_row=args.grid_seeds, seed=args.seed, sampler=args.sampler,
        steps=args.steps, guidance=args.guidance_scale, batch_size=args.batch_size,
    )  # fmt: skip
    files, images = {}, {}
    for r, image in grids.items():
        uri = grid_uri(args.out, r)
        with _open_for_write(uri, "wb") as f:
            image.save(f, format="PNG")
        files[str(r)] = uri
        images[uri.rsplit("/", 1)[-1]] = image
    entry = {"prompts": prompts, "seeds": list(range(args.seed, args.seed + args.grid_seeds)), "files": files}
    return entry, images


def _open_for_write(uri: str, mode: str):
    """Open a local path or storage URI for writing, its parent folder made first."""
    from mdm.storage import url_to_fs

    fs, path = url_to_fs(uri)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.makedirs(parent, exist_ok=True)
    return fs.open(path, mode)


def write_report(uri: str, report: dict[str, Any]) -> None:
    """Write the JSON report to a local path or a storage URI."""
    with _open_for_write(uri, "w") as f:
        json.dump(report, f, indent=2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", required=True, help="model folder, s3:// or file:// URI, or models:/NAME@ALIAS (or /VERSION)"
    )
    p.add_argument(
        "--shards", required=True, help="held-out shard set URI (Parquet + _manifest.json), or a folder with heldout/"
    )
    p.add_argument("--num_samples", type=int, default=1000, help="images to generate (default 1000)")
    p.add_argument(
        "--num_real", type=int, default=None, help="held-out images to compare with (default: every row of the shards)"
    )
    p.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm", "dpmpp_2m"], help="sampler (default ddim)")
    p.add_argument(
        "--guidance_scale", type=float, default=5.0, help="classifier-free guidance scale; 1 disables (default 5)"
    )
    p.add_argument("--seed", type=int, default=0, help="sample j is seeded by SEED + j (default 0)")
    p.add_argument("--batch_size", type=int, default=16, help="samples generated per batch (default 16)")
    p.add_argument("--kid_subsets", type=int, default=100, help="KID subsets of min(1000, n) images (default 100)")
    p.add_argument(
        "--out",
        default="report.json",
        help="where to write the JSON report: a path or storage URI (default report.json)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument(
        "--mlflow_run_id",
        default=None,
        help="log metrics and the report to this MLflow run (default: the run that registered a models:/ version)",
    )
    p.add_argument(
        "--tracking_uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else SQLite in the state folder)",
    )
    p.add_argument(
        "--grid_prompts",
        type=int,
        default=8,
        help="also draw a sample grid of this many held-out prompts (rows) at every resolution, "
        "written beside the report as <report>_grid_<R>.png; 0 skips it (default 8)",
    )
    p.add_argument("--grid_seeds", type=int, default=4, help="columns of the grid: seeds SEED.. per prompt (default 4)")
    p.add_argument("--no_mlflow", action="store_true", help="never log to MLflow")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.grid_prompts < 0 or args.grid_seeds < 1:
        parser.error(
            f"--grid_prompts must be >= 0 and --grid_seeds >= 1, got {args.grid_prompts} and {args.grid_seeds}"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mdm.evaluation import evaluate
    from mdm.pipeline import MDMPipeline

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        import mlflow
    except ImportError:
        mlflow = None
    use_mlflow = mlflow is not None and not args.no_mlflow
    if use_mlflow and (args.model.startswith("models:/") or args.mlflow_run_id):
        from jobs.registry import default_tracking_uri

        mlflow.set_tracking_uri(args.tracking_uri or default_tracking_uri())
    try:
        pipe = MDMPipeline.from_pretrained(args.model, device=device)
        shards = resolve_split(args.shards)
        real, captions, _ = read_heldout(shards, pipe.resolutions, args.num_real)
        n_real = len(captions)
        print(f"evaluating {args.model} {pipe.resolutions} on {n_real} held-out images of {shards}")
        report = evaluate(
            pipe,
            real,
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
        grid, grids = write_grids(pipe, captions, args) if args.grid_prompts > 0 else (None, None)
        if grid is not None:
            report["grid"] = grid
    except (FileNotFoundError, ValueError, LookupError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    report["model"] = args.model
    report["shards"] = shards
    run_id = mlflow_run_for(args.model, args.mlflow_run_id) if use_mlflow else None
    if run_id:
        log_to_mlflow(run_id, report, grids)
        report["mlflow_run_id"] = run_id
    write_report(args.out, report)
    for r, m in report["metrics"].items():
        print(f"{r:>5}px  FID {m['fid']:.2f}  KID {m['kid_mean']:.4f} ± {m['kid_std']:.4f}")
    if grids is not None:
        print(f"sample grids written beside it: {', '.join(report['grid']['files'].values())}")
    print(f"report written to {args.out}" + (f"; logged to MLflow run {run_id}" if run_id else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
