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
        (out / f"{split}_{res[-1]}.part{i}.u8.xz").write_bytes(lzma.compress(top[a:b].tobytes(), preset=6))
    (out / f"{split}.json").write_text(json.dumps(meta))
    return meta


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="folder holding one shard set per split (<shards>/<split>)")
    p.add_argument("--splits", default="train,heldout", help="comma list of splits (default train,heldout)")
    p.add_argument("--out", type=Path, required=True, help="where the packed files go")
    p.add_argument("--parts", type=int, default=1, help="pixel files per split, rows split evenly (default 1)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for split in args.splits.split(","):
        meta = pack(args.shards, split, args.out, args.parts if split == "train" else 1)
        size = sum(f.stat().st_size for f in args.out.glob(f"{split}*"))
        print(f"{split}: {meta['rows']} rows at {meta['resolutions']} -> {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
