#!/usr/bin/env python
"""Pack a shard set's pixels and captions for a trip to a lent GPU machine.

    python bench/pack_shards.py --shards /data/shards/emoji --splits train,heldout --out .gpu/data

The device tool carries at most 64 MiB a call; the emoji set's PNG shards at 64 and 128 px
are ~150 MB, its top-resolution pixels xz-compressed ~40 MB. For each split this writes
``<split>.json`` (keys, captions, the manifest) and ``<split>_<top>.part<i>.u8.xz``
(``--parts`` files, so that they can travel in several calls): the decoded
uint8 pixels of the top column exactly as the shards hold them (lossless, rows sorted by
key). The lower columns are ``D_r`` of the top (``pipelines.preprocess``: the mean of each
k x k block, rounded half to even, exact in float32), so they are not carried:
:func:`pipelines.preprocess.average_pool` rebuilds them, and packing checks that it gives every lower column bit for bit.

``--unpack`` goes the other way, on the GPU machine: it writes the packed pixels back as a
raw set (``RAW/<split>/<key>.png`` and ``<key>.txt``, the caption), the input of
``jobs/preprocess.py``, so that the stage jobs there read shards that machine preprocessed:

    python bench/pack_shards.py --unpack .gpu/data --raw /tmp/emoji-raw
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.preprocess import average_pool  # noqa: E402
from pipelines.reader import read_manifest, shard_dataset  # noqa: E402


def part_name(split: str, top: int, i: int) -> str:
    """The file of part ``i`` of a split's packed ``top``-px pixels."""
    return f"{split}_{top}.part{i}.u8.xz"


def pack(shards: str, split: str, out: Path, parts: int = 1) -> dict:

    root = f"{shards.rstrip('/')}/{split}"
    manifest = read_manifest(root)
    res = manifest["resolutions"]
    table = shard_dataset(root, manifest).to_table(columns=["key", "caption", *[f"image_{r}" for r in res]])
    table = table.sort_by("key")
    meta = {
        "split": split,
        "rows": table.num_rows,
        "resolutions": res,
        "keys": table["key"].to_pylist(),
        "captions": table["caption"].to_pylist(),
        "manifest": manifest,
    }

    def column(r: int) -> np.ndarray:
        return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in table[f"image_{r}"].to_pylist()])

    top = column(res[-1])
    for r in res[:-1]:
        if not np.array_equal(average_pool(top, r), column(r)):
            raise SystemExit(f"image_{r} is not D_r of image_{res[-1]} in {root}: pack every column instead")
    bounds = np.linspace(0, len(top), parts + 1).round().astype(int)
    meta["parts"] = [int(b - a) for a, b in zip(bounds[:-1], bounds[1:])]
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        (out / part_name(split, res[-1], i)).write_bytes(lzma.compress(top[a:b].tobytes(), preset=6))
    (out / f"{split}.json").write_text(json.dumps(meta))
    return meta


def load_top(data: list[Path], split: str) -> tuple[dict, np.ndarray]:
    """A packed split's metadata and its top-resolution pixels, (N, R, R, 3) uint8, from its parts.

    ``data``: folders holding ``<split>.json`` and the pixel parts (any part in any folder,
    as they arrive in several calls)."""
    meta_path = next((d / f"{split}.json" for d in data if (d / f"{split}.json").exists()), None)
    if meta_path is None:
        raise FileNotFoundError(f"{split}.json is in none of {[str(d) for d in data]}")
    meta = json.loads(meta_path.read_text())
    top_r = meta["resolutions"][-1]
    chunks = []
    for i in range(len(meta["parts"])):
        name = part_name(split, top_r, i)
        path = next((d / name for d in data if (d / name).exists()), None)
        if path is None:
            raise FileNotFoundError(f"{name} is in none of {[str(d) for d in data]}")
        chunks.append(np.frombuffer(lzma.decompress(path.read_bytes()), dtype=np.uint8))
    return meta, np.concatenate(chunks).reshape(meta["rows"], top_r, top_r, 3)


def unpack_raw(data: list[Path], split: str, raw: Path) -> int:
    """Write a packed split as a raw set: ``raw/<split>/<key>.png`` + ``<key>.txt``. Returns the rows."""
    meta, top = load_top(data, split)
    folder = raw / split
    folder.mkdir(parents=True, exist_ok=True)
    for key, caption, pixels in zip(meta["keys"], meta["captions"], top):
        Image.fromarray(pixels).save(folder / f"{key}.png")
        (folder / f"{key}.txt").write_text(caption)
    return meta["rows"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="folder holding one shard set per split (<shards>/<split>)")
    p.add_argument("--splits", default="train,heldout", help="comma list of splits (default train,heldout)")
    p.add_argument("--out", type=Path, help="where the packed files go")
    p.add_argument("--parts", type=int, default=1, help="pixel files per split, rows split evenly (default 1)")
    p.add_argument("--unpack", type=Path, nargs="+", help="folders of packed files: write them back as a raw set")
    p.add_argument("--raw", type=Path, help="with --unpack: where the raw set goes")
    args = p.parse_args()
    if args.unpack:
        if args.raw is None:
            p.error("--unpack needs --raw")
        for split in args.splits.split(","):
            print(f"{split}: {unpack_raw(args.unpack, split, args.raw)} images -> {args.raw / split}")
        return
    if args.shards is None or args.out is None:
        p.error("--shards and --out are required (or --unpack and --raw)")
    args.out.mkdir(parents=True, exist_ok=True)
    for split in args.splits.split(","):
        meta = pack(args.shards, split, args.out, args.parts if split == "train" else 1)
        size = sum(f.stat().st_size for f in args.out.glob(f"{split}*"))
        print(f"{split}: {meta['rows']} rows at {meta['resolutions']} -> {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
