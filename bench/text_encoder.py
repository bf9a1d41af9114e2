#!/usr/bin/env python
"""Captions per second of ``mdm.conditioning.TextEncoder.encode`` against the same network
run on ``max_length`` padded tokens (what encode did before 2026-12-04), side by side.

    python bench/text_encoder.py --captions DIR --n 1024 --batch 64 --threads 1,2

``--captions``: a raw set's folder of ``<key>.txt`` caption files (e.g. the emoji set's
``train/``); without it the shipped demo captions are cycled.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdm.conditioning import TextEncoder  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", type=Path, default=None, help="folder of <key>.txt captions (default: demo captions)")
    p.add_argument("--n", type=int, default=1024, help="captions to encode (default 1024)")
    p.add_argument("--batch", type=int, default=64, help="captions per encode call (default 64)")
    p.add_argument("--max_tokens", type=int, default=64, help="max_length of the encoder (default 64)")
    p.add_argument("--threads", default="1", help="comma list of torch CPU thread counts (default 1)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.captions:
        texts = [f.read_text().strip() for f in sorted(args.captions.glob("*.txt"))[: args.n]]
    else:
        from mdm.data import demo_images

        texts = demo_images(32)[1]
    texts = list(itertools.islice(itertools.cycle(texts), args.n))
    enc = TextEncoder(max_length=args.max_tokens, device=args.device)
    lengths = [enc.count_tokens(t) for t in texts]
    print(f"{len(texts)} captions, tokens mean {sum(lengths) / len(lengths):.1f} max {max(lengths)}; "
          f"max_length {args.max_tokens}, batch {args.batch}")  # fmt: skip

    @torch.no_grad()
    def padded(batch):
        b = enc.tokenizer(batch, padding="max_length", truncation=True, max_length=enc.max_length, return_tensors="pt")
        b = b.to(enc.device)
        return enc.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state

    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        row = {}
        for name, fn in (("max_length padding (before)", padded), ("encode (longest in batch)", enc.encode)):
            fn(texts[: args.batch])  # warm-up
            t = time.perf_counter()
            for i in range(0, len(texts), args.batch):
                fn(texts[i : i + args.batch])
            if enc.device.type == "cuda":
                torch.cuda.synchronize()
            row[name] = len(texts) / (time.perf_counter() - t)
        before, after = row.values()
        print(f"threads {threads}: " + ", ".join(f"{k} {v:.0f}/s" for k, v in row.items()) + f"; {after / before:.2f}x")


if __name__ == "__main__":
    main()
