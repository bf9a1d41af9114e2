"""Schemathesis hooks for tests/test_serve.py's contract fuzz (``SCHEMATHESIS_HOOKS=fuzz_hooks``).

Two things the OpenAPI states in words only, because JSON Schema cannot: an image field holds a
decodable PNG/JPEG/WebP (the mask of the image's size), and a prompt fits the model's token
limit (``x-max-tokens``). The fuzzer is told how to make such values; every other field is
generated from the schema alone, valid and invalid.
"""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image
from schemathesis.transport.serialization import Binary


def _png(seed: int, mode: str) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (64, 64, 3) if mode == "RGB" else (64, 64)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


PNGS = [_png(i, mode) for i, mode in enumerate(("RGB", "L", "RGB"))]  # all 64x64: any one is a valid mask
schemathesis.openapi.format("binary", st.sampled_from(PNGS).map(Binary))  # multipart file parts
schemathesis.openapi.format("byte", st.sampled_from([base64.b64encode(p).decode() for p in PNGS]))  # JSON base64

# tokens <= characters + 2 ([CLS], [SEP]) for the WordPiece encoder of the test model
MAX_PROMPT_CHARS = int(os.environ.get("FUZZ_MAX_PROMPT_CHARS", "14"))


@schemathesis.hook
def filter_case(ctx, case) -> bool:
    body = case.body if isinstance(case.body, dict) else {}
    return all(
        not isinstance(body.get(f), str) or len(body[f]) <= MAX_PROMPT_CHARS for f in ("prompt", "negative_prompt")
    )
