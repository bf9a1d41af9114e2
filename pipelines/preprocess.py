"""Raw images + captions -> multi-resolution Parquet shards (the DESIGN.md shard contract).

Per image: decode (EXIF orientation; palette, CMYK, grey, 16-bit and alpha to RGB, alpha
on white), filter (undecodable, empty, truncated, decompression bomb, too small, wrong
aspect), centre-crop, resize to the top resolution with antialiasing (Lanczos), then every
lower resolution is the average pooling ``D_r`` of the top, and each is encoded losslessly
into ``image_<R>``. The key is a content hash of the top image, so duplicates (even
re-encoded ones) are written once. Streaming end to end: Ray Data reads, transforms and
writes block by block; one small actor counts rows and remembers keys.

Every row read is accounted for: ``rows_read = rows + sum(skipped.values())``.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from mdm.storage import url_to_fs

from .storage import arrow_fs, join

__all__ = [
    "PreprocessConfig",
    "process_image",
    "preprocess",
    "SCHEMA_VERSION",
    "MANIFEST",
    "SKIP_REASONS",
]

SCHEMA_VERSION = 1
MANIFEST = "_manifest.json"
SKIP_REASONS = (
    "empty_file",
    "undecodable",
    "truncated",
    "decompression_bomb",
    "too_small",
    "bad_aspect",
    "duplicate",
    "not_an_image",
    "missing_caption",
)


@dataclass
class PreprocessConfig:
    """What the shards hold and which images are kept."""

    resolutions: list[int]
    min_size: int | None = None  # shorter source side; None = the top resolution
    max_aspect: float = 2.0  # longer / shorter side
    max_pixels: int = 64_000_000  # decoding more is treated as a decompression bomb
    encoding: str = "png"  # lossless: png or webp
    png_compress_level: int = 1  # fast; the pixels are identical at any level
    require_captions: bool = False  # skip rows without a caption instead of keeping them
    shard_rows: int = 1024  # rows per Parquet file (at least)
    text_encoder: str | None = None  # precompute text_emb with this frozen encoder
    max_text_tokens: int = 64

    def __post_init__(self) -> None:
        self.resolutions = sorted(int(r) for r in self.resolutions)
        if not self.resolutions:
            raise ValueError("resolutions: give at least one, e.g. 64,128,256")
        top = self.resolutions[-1]
        for r in self.resolutions:
            if r <= 0 or top % r:
                raise ValueError(f"resolutions: {r} must divide the top resolution {top} (average pooling)")
        if self.encoding not in ("png", "webp"):
            raise ValueError(f"encoding: {self.encoding!r} is not lossless png or webp")
        if self.max_aspect < 1:
            raise ValueError("max_aspect: must be >= 1")
        if self.shard_rows < 1:
            raise ValueError("shard_rows: must be >= 1")

    @property
    def top(self) -> int:
        return self.resolutions[-1]


def _to_rgb(img: Image.Image) -> Image.Image:
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((arr / max(arr.max(), 1.0) * 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


def _encode(arr: np.ndarray, cfg: PreprocessConfig) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr, "RGB")
    if cfg.encoding == "png":
        img.save(buf, format="PNG", compress_level=cfg.png_compress_level)
    else:
        img.save(buf, format="WEBP", lossless=True, quality=100, method=0)
    return buf.getvalue()


def process_image(data: bytes, cfg: PreprocessConfig) -> tuple[dict[str, Any] | None, str | None]:
    """One raw image -> ``({image_<R>: bytes, key, source_width, source_height}, None)``
    or ``(None, skip_reason)``. Never raises on bad input."""
    if not data:
        return None, "empty_file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > cfg.max_pixels:
                return None, "decompression_bomb"
            top = cfg.top
            if img.format == "JPEG":  # decode at the smallest DCT scale that keeps the short side >= top
                s = max(min(w, h), 1)
                img.draft("RGB", (-(-top * w // s), -(-top * h // s)))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "decompression_bomb"
    except OSError as e:
        return None, "truncated" if "truncated" in str(e).lower() else "undecodable"
    except Exception:  # noqa: BLE001 - PIL raises many kinds on garbage
        return None, "undecodable"
    min_size = cfg.min_size if cfg.min_size is not None else cfg.top
    if min(w, h) < min_size:
        return None, "too_small"
    if max(w, h) / max(min(w, h), 1) > cfg.max_aspect:
        return None, "bad_aspect"
    try:
        img = _to_rgb(img)
    except Exception:  # noqa: BLE001
        return None, "undecodable"
    cw, ch = img.size
    s = min(cw, ch)
    left, upper = (cw - s) // 2, (ch - s) // 2
    img = img.crop((left, upper, left + s, upper + s))
    top = cfg.top
    if s != top:
        img = img.resize((top, top), Image.Resampling.LANCZOS, reducing_gap=3.0 if s >= 3 * top else None)
    arr = np.asarray(img, dtype=np.uint8)
    out: dict[str, Any] = {
        "key": hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest(),
        "source_width": w,
        "source_height": h,
    }
    for r in cfg.resolutions:
        out[f"image_{r}"] = _encode(arr if r == top else average_pool(arr, r), cfg)
    return out, None


def average_pool(images: np.ndarray, r: int) -> np.ndarray:
    """``D_r`` of uint8 images (..., R, R, 3): the mean of each k x k block (k = R / r),
    rounded half to even; exact in float32, so every consumer gets the same bytes."""
    big = images.shape[-3]
    k = big // r
    blocks = images.astype(np.float32).reshape(*images.shape[:-3], r, k, r, k, 3)
    return np.rint(blocks.mean(axis=(-4, -2))).astype(np.uint8)


# --------------------------------------------------------------------------- Ray parts


def _stats_actor():
    import ray

    @ray.remote(num_cpus=0)
    class PreprocessStats:
        """Counts rows and remembers content keys (16 bytes each) for deduplication."""

        def __init__(self) -> None:
            self.seen: set[str] = set()
            self.read = 0
            self.written = 0
            self.skipped: Counter = Counter()
            self.captions_missing = 0

        def admit(self, keys: list[str], n_read: int, skipped: dict[str, int], captions_missing: int) -> list[bool]:
            self.read += n_read
            self.skipped.update(skipped)
            self.captions_missing += captions_missing
            mask = []
            for k in keys:
                new = k not in self.seen
                if new:
                    self.seen.add(k)
                    self.written += 1
                else:
                    self.skipped["duplicate"] += 1
                mask.append(new)
            return mask

        def snapshot(self) -> dict:
            return {
                "rows_read": self.read,
                "rows": self.written,
                "skipped": dict(self.skipped),
                "captions_missing": self.captions_missing,
            }

    return PreprocessStats.remote()


def _process_batch(batch: dict[str, np.ndarray], cfg: PreprocessConfig, stats: Any) -> dict[str, np.ndarray]:
    import ray

    cols: dict[str, list] = {"key": [], "caption": [], "label": [], "source_width": [], "source_height": []}
    for r in cfg.resolutions:
        cols[f"image_{r}"] = []
    skipped: Counter = Counter()
    missing = 0
    for data, caption, label in zip(batch["image"], batch["caption"], batch["label"]):
        caption = "" if caption is None else str(caption)
        if not caption.strip():
            if cfg.require_captions:
                skipped["missing_caption"] += 1
                continue
            missing += 1
        out, reason = process_image(bytes(data) if data is not None else b"", cfg)
        if out is None:
            skipped[reason] += 1
            continue
        for k, v in out.items():
            cols[k].append(v)
        cols["caption"].append(caption)
        cols["label"].append(int(label))
    keep = ray.get(stats.admit.remote(cols["key"], len(batch["image"]), dict(skipped), missing))
    idx = [i for i, k in enumerate(keep) if k]
    result = {}
    for name, values in cols.items():
        vals = [values[i] for i in idx]
        if name in ("label", "source_width", "source_height"):
            result[name] = np.array(vals, dtype=np.int64)
        else:
            result[name] = np.array(vals, dtype=object)
    return result


class _TextEmbedder:
    """Adds ``text_emb`` (float16 bytes, max_tokens x dim) and ``text_len`` per row."""

    def __init__(self, name: str, max_tokens: int):
        from mdm.conditioning import TextEncoder

        self.encoder = TextEncoder(name, max_tokens)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        if len(batch["caption"]) == 0:
            batch["text_emb"] = np.array([], dtype=object)
            batch["text_len"] = np.array([], dtype=np.int64)
            return batch
        tokens, mask = self.encoder.encode([str(c) for c in batch["caption"]])
        arr = tokens.to(dtype=torch.float16).numpy()
        batch["text_emb"] = np.array([a.tobytes() for a in arr], dtype=object)
        batch["text_len"] = mask.sum(1).numpy().astype(np.int64)
        return batch


def _clear_previous(out_uri: str) -> int:
    """Remove shards and manifest of an earlier run at ``out_uri`` (re-running is safe)."""
    fs, path = url_to_fs(out_uri)
    removed = 0
    if fs.exists(path):
        for f in fs.find(path):
            if f.endswith(".parquet") or f.endswith(MANIFEST):
                fs.rm(f)
                removed += 1
    return removed


def preprocess(source, out_uri: str, cfg: PreprocessConfig, progress: bool = True) -> dict:
    """Run the whole pipeline: ``source`` (a :class:`pipelines.sources.Source`) -> shards +
    manifest at ``out_uri``. Returns the manifest."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    started = time.time()
    removed = _clear_previous(out_uri)
    stats = _stats_actor()
    ds = source.dataset.map_batches(_process_batch, batch_size=16, fn_kwargs={"cfg": cfg, "stats": stats})
    if cfg.text_encoder:
        ds = ds.map_batches(
            _TextEmbedder,
            batch_size=64,
            concurrency=1,
            fn_constructor_kwargs={"name": cfg.text_encoder, "max_tokens": cfg.max_text_tokens},
        )
    fs, path = arrow_fs(out_uri)
    fs.create_dir(path, recursive=True)
    # Image columns are PNG/WebP already: Parquet compression would only burn CPU on them.
    ds.write_parquet(
        path, filesystem=fs, min_rows_per_file=cfg.shard_rows, max_rows_per_file=cfg.shard_rows, compression="none"
    )
    snap = ray.get(stats.snapshot.remote())
    ray.kill(stats)
    for reason, n in source.skipped.items():
        snap["skipped"][reason] = snap["skipped"].get(reason, 0) + n
        snap["rows_read"] += n
    lfs, lpath = url_to_fs(out_uri)
    files = sorted(f.rsplit("/", 1)[-1] for f in lfs.find(lpath) if f.endswith(".parquet"))
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "resolutions": cfg.resolutions,
        "columns": ["key", "caption", "label", "source_width", "source_height"]
        + [f"image_{r}" for r in cfg.resolutions]
        + (["text_emb", "text_len"] if cfg.text_encoder else []),
        "encoding": cfg.encoding,
        "rows": snap["rows"],
        "rows_read": snap["rows_read"],
        "skipped": dict(sorted(snap["skipped"].items())),
        "captions_missing": snap["captions_missing"],
        "source": {"uri": source.uri, "kind": source.kind},
        "files": files,
        "text_encoder": ({"name": cfg.text_encoder, "max_tokens": cfg.max_text_tokens} if cfg.text_encoder else None),
        "config": asdict(cfg),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 2),
        "replaced_files": removed,
    }
    if manifest["rows_read"] != manifest["rows"] + sum(manifest["skipped"].values()):
        raise RuntimeError(f"row accounting broke: {manifest}")  # never expected; refuse to write a wrong manifest
    with lfs.open(join(lpath, MANIFEST), "w") as f:
        f.write(json.dumps(manifest, indent=2))
    return manifest
