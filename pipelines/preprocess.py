"""Raw images + captions -> multi-resolution Parquet shards (the DESIGN.md shard contract).

Per image: decode (EXIF orientation; palette, CMYK, grey, 16-bit and alpha to RGB, alpha
on white), filter (undecodable, empty, truncated, decompression bomb, too small, wrong
aspect), centre-crop, resize to the top resolution with antialiasing (Lanczos), then every
lower resolution is the average pooling ``D_r`` of the top, and each is encoded losslessly
into ``image_<R>``. The key is a content hash of the top image, so duplicates (even
re-encoded ones) are written once. Streaming end to end: Ray Data reads, transforms and
writes block by block; one small actor counts rows and remembers keys.

Every row is accounted for: ``rows_listed = rows_read = rows + sum(skipped.values())``
(``rows_listed`` where the source knows it before reading), checked against the rows in the
written files before anything is published.

Publishing: a run writes its shards into a fresh folder ``<out>/run-<id>/``; only when they
are all written and counted does ``<out>/_manifest.json`` (which names them) replace the
previous one, in one step; the files the previous manifest named are removed after that. A
run that fails leaves the previous shard set published and untouched.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from mdm.storage import url_to_fs

from .storage import arrow_fs, join, write_atomic

__all__ = [
    "PreprocessConfig",
    "PreprocessError",
    "check_out",
    "process_image",
    "preprocess",
    "SCHEMA_VERSION",
    "MANIFEST",
    "SKIP_REASONS",
]

SCHEMA_VERSION = 1
MANIFEST = "_manifest.json"
RUN_PREFIX = "run-"  # shards of one run: <out>/run-<UTC time>-<random>/
SKIP_REASONS = (
    "read_error",
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
    max_read_errors: int = 0  # rows whose bytes cannot be read (after retries) before the run fails

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
        if self.max_read_errors < 0:
            raise ValueError("max_read_errors: must be >= 0")

    @property
    def top(self) -> int:
        return self.resolutions[-1]


class PreprocessError(RuntimeError):
    """The run did not publish: its input overlaps its output, too many rows could not be
    read, or the rows do not add up. The previous shard set at ``--out`` is unchanged."""


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
        """Deduplication and the row counts, idempotent per source row.

        Each content key remembers the source row that first claimed it, and each source row
        its outcome; a retried task reports the same rows again and gets the same answers, so
        nothing is counted twice and no row becomes a duplicate of itself. About 100 bytes
        per row."""

        def __init__(self) -> None:
            self.owner: dict[bytes, bytes] = {}  # content key -> source row that claimed it
            self.outcome: dict[bytes, str] = {}  # source row -> "" (written) or a skip reason
            self.notes: dict[bytes, tuple[str, ...]] = {}  # source row -> notes, when it has any
            self.read_errors: dict[str, str] = {}  # a few examples: source -> error

        def admit(self, rows: list[tuple[str, str | None, str | None, tuple[str, ...], str]]) -> list[bool]:
            """``rows``: (source, key or None, skip reason or None, notes, read error) each;
            returns, for every row with a key, whether this row is the one to write."""
            mask = []
            for source, key, reason, notes, error in rows:
                row = hashlib.blake2b(source.encode("utf-8", "surrogatepass"), digest_size=12).digest()
                if key is not None:
                    new = self.owner.setdefault(bytes.fromhex(key), row) == row
                    reason = None if new else "duplicate"
                    mask.append(new)
                self.outcome[row] = reason or ""
                if notes:
                    self.notes[row] = tuple(notes)
                else:
                    self.notes.pop(row, None)
                if error and len(self.read_errors) < 10:
                    self.read_errors[source] = error
            return mask

        def snapshot(self) -> dict:
            outcomes = Counter(self.outcome.values())
            notes = Counter(n for ns in self.notes.values() for n in ns)
            return {
                "rows_read": len(self.outcome),
                "rows": outcomes.pop("", 0),
                "skipped": dict(outcomes),
                "captions_missing": notes.pop("caption_missing", 0),
                "row_notes": dict(notes),
                "read_errors": dict(self.read_errors),
            }

    return PreprocessStats.remote()


def _process_batch(batch: dict[str, np.ndarray], cfg: PreprocessConfig, stats: Any) -> dict[str, np.ndarray]:
    import ray

    n = len(batch["image"])
    blank = np.array([""] * n, dtype=object)
    read_errors, source_notes = batch.get("read_error", blank), batch.get("note", blank)
    cols: dict[str, list] = {"key": [], "caption": [], "label": [], "source_width": [], "source_height": []}
    for r in cfg.resolutions:
        cols[f"image_{r}"] = []
    report, outputs = [], []
    for source, data, caption, label, error, note in zip(
        batch["source"], batch["image"], batch["caption"], batch["label"], read_errors, source_notes
    ):
        notes = [str(note)] if note else []
        out, reason = None, None
        caption = "" if caption is None else str(caption)
        if error:
            reason = "read_error"
        elif not caption.strip() and cfg.require_captions:
            reason = "missing_caption"
        else:
            if not caption.strip():
                notes.append("caption_missing")
            out, reason = process_image(bytes(data) if data is not None else b"", cfg)
        report.append((str(source), out["key"] if out else None, reason, tuple(notes), str(error or "")))
        if out is not None:
            outputs.append((out, caption, int(label)))
    keep = ray.get(stats.admit.remote(report))
    for (out, caption, label), k in zip(outputs, keep):
        if not k:
            continue
        for name, v in out.items():
            cols[name].append(v)
        cols["caption"].append(caption)
        cols["label"].append(label)
    result = {}
    for name, values in cols.items():
        if name in ("label", "source_width", "source_height"):
            result[name] = np.array(values, dtype=np.int64)
        else:
            result[name] = np.array(values, dtype=object)
    return result


class _TextEmbedder:
    """Adds ``text_emb`` (float16 bytes, max_tokens x dim) and ``text_len`` per row."""

    def __init__(self, name: str, max_tokens: int, threads: int = 1):
        import torch

        from mdm.conditioning import TextEncoder

        torch.set_num_threads(threads)  # as many as the actor reserved CPUs
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


def embedder_threads(cluster_cpus: float) -> int:
    """CPUs (and torch threads) of the caption encoder's actor: a quarter of the cluster's,
    1 to 4, so that the image tasks keep the rest."""
    return int(min(4, max(1, cluster_cpus // 4)))


def check_out(source_uri: str, out_uri: str) -> None:
    """Refuse an ``out_uri`` that is ``source_uri``, lies inside it or holds it."""
    from .storage import uris_overlap

    if uris_overlap(source_uri, out_uri):
        raise PreprocessError(
            f"--out {out_uri} overlaps --source {source_uri} (the same folder, or one inside the other): "
            "a run would write its shards among the raw files it reads. Choose an --out outside the source, "
            "e.g. a sibling folder."
        )


def _previous_files(fs: Any, path: str) -> list[str]:
    """The files the published manifest at ``path`` names (removed once a new one is published)."""
    mpath = join(path, MANIFEST)
    fs.invalidate_cache(path)
    if not fs.exists(mpath):
        return []
    try:
        with fs.open(mpath, "r") as f:
            files = json.load(f).get("files") or []
    except (ValueError, AttributeError) as e:
        raise PreprocessError(f"{mpath} is not a shard manifest ({e}); move it away or choose another --out") from e
    return [f for f in files if isinstance(f, str) and _safe_relative(f)]


def _safe_relative(name: str) -> bool:
    return bool(name) and not name.startswith("/") and ".." not in name.split("/")


def _remove(fs: Any, paths: list[str]) -> list[str]:
    """Remove files one by one (S3 servers without bulk delete too); the ones that failed."""
    failed = []
    for p in paths:
        try:
            fs.rm_file(p)
        except FileNotFoundError:
            pass
        except Exception:  # noqa: BLE001 - left behind, reported by the caller
            failed.append(p)
    return failed


def _remove_run_folder(fs: Any, run_path: str) -> None:
    """Remove what a failed run wrote into its own folder (nothing else is touched)."""
    try:
        fs.invalidate_cache(run_path)
        files = fs.find(run_path) if fs.exists(run_path) else []
    except Exception:  # noqa: BLE001
        return
    _remove(fs, files)
    try:
        fs.rmdir(run_path)
    except Exception:  # noqa: BLE001 - object stores have no folders
        pass


def _rows_in_files(paths: list[str], out_uri: str) -> int:
    import pyarrow.parquet as pq

    afs, _ = arrow_fs(out_uri)
    return sum(pq.read_metadata(p, filesystem=afs).num_rows for p in paths)


def preprocess(source, out_uri: str, cfg: PreprocessConfig, progress: bool = True) -> dict:
    """Run the whole pipeline: ``source`` (a :class:`pipelines.sources.Source`) -> shards +
    manifest at ``out_uri``. Returns the manifest.

    Raises :class:`PreprocessError`, publishing nothing, when ``out_uri`` overlaps the
    source, when more than ``cfg.max_read_errors`` rows cannot be read, or when the rows do
    not add up; the shard set published before stays as it was."""
    import ray
    import ray.data

    check_out(source.uri, out_uri)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    started = time.time()
    lfs, lpath = url_to_fs(out_uri)
    previous = _previous_files(lfs, lpath)
    run = f"{RUN_PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    run_path = join(lpath, run)
    stats = _stats_actor()
    try:
        ds = source.dataset.map_batches(_process_batch, batch_size=16, fn_kwargs={"cfg": cfg, "stats": stats})
        if cfg.text_encoder:
            # One encoder actor with a quarter of the cluster's CPUs (at most 4) as torch threads:
            # with Ray's default of one CPU it ran one thread, 32 MiniLM captions/s, and on 16
            # cores spent 318 of the emoji set's 342 s encoding.
            threads = embedder_threads(ray.cluster_resources().get("CPU", 1))
            ds = ds.map_batches(
                _TextEmbedder,
                batch_size=64,
                concurrency=1,
                num_cpus=threads,
                fn_constructor_kwargs={"name": cfg.text_encoder, "max_tokens": cfg.max_text_tokens, "threads": threads},
            )
        fs, path = arrow_fs(out_uri)
        fs.create_dir(join(path, run), recursive=True)
        # Image columns are PNG/WebP already: Parquet compression would only burn CPU on them.
        ds.write_parquet(
            join(path, run),
            filesystem=fs,
            min_rows_per_file=cfg.shard_rows,
            max_rows_per_file=cfg.shard_rows,
            compression="none",
        )
        snap = ray.get(stats.snapshot.remote())
        lfs.invalidate_cache(run_path)
        written = sorted(f for f in lfs.find(run_path) if f.endswith(".parquet")) if lfs.exists(run_path) else []
        files = [f"{run}/{f.rsplit('/', 1)[-1]}" for f in written]
        manifest = _manifest(source, cfg, snap, files, previous, started)
        _check_counts(manifest, _rows_in_files([join(path, f) for f in files], out_uri), out_uri)
    except BaseException:
        _remove_run_folder(lfs, run_path)
        raise
    finally:
        ray.kill(stats)
    write_atomic(lfs, join(lpath, MANIFEST), json.dumps(manifest, indent=2).encode())
    left = _remove(lfs, [join(lpath, f) for f in previous if f not in files])
    if left:
        warnings.warn(
            f"published {out_uri}, but could not remove {len(left)} old shard file(s), e.g. {left[0]}", stacklevel=2
        )
    return manifest


def _manifest(source, cfg: PreprocessConfig, snap: dict, files: list[str], previous: list[str], started: float) -> dict:
    skipped = Counter(snap["skipped"])
    skipped.update(source.skipped)
    rows_read = snap["rows_read"] + sum(source.skipped.values())
    listed = None if source.listed is None else source.listed + sum(source.skipped.values())
    return {
        "schema_version": SCHEMA_VERSION,
        "resolutions": cfg.resolutions,
        "columns": ["key", "caption", "label", "source_width", "source_height"]
        + [f"image_{r}" for r in cfg.resolutions]
        + (["text_emb", "text_len"] if cfg.text_encoder else []),
        "encoding": cfg.encoding,
        "rows": snap["rows"],
        "rows_listed": listed,
        "rows_read": rows_read,
        "skipped": dict(sorted(skipped.items())),
        "captions_missing": snap["captions_missing"],
        "row_notes": dict(sorted(snap["row_notes"].items())),  # kept rows with a metadata problem
        "read_errors": snap["read_errors"],  # examples, source -> error
        "source": {"uri": source.uri, "kind": source.kind},
        "files": files,
        "text_encoder": ({"name": cfg.text_encoder, "max_tokens": cfg.max_text_tokens} if cfg.text_encoder else None),
        "config": asdict(cfg),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 2),
        "replaced_files": len(previous),
    }


def _check_counts(manifest: dict, rows_in_files: int, out_uri: str) -> None:
    """Refuse to publish a run whose rows do not add up or that could not read its input."""
    read, rows, listed = manifest["rows_read"], manifest["rows"], manifest["rows_listed"]
    skipped = sum(manifest["skipped"].values())
    problems = []
    if listed is not None and listed != read:
        problems.append(f"the source listed {listed} rows but {read} were read")
    if read != rows + skipped:
        problems.append(f"{read} rows read but {rows} written + {skipped} skipped")
    if rows_in_files != rows:
        problems.append(f"{rows} rows counted as written but the files hold {rows_in_files}")
    if problems:
        raise PreprocessError(
            f"row accounting failed ({'; '.join(problems)}); nothing was published at {out_uri}, "
            "its previous shards are unchanged. This is a bug or a source that changed while it was read: re-run."
        )
    errors = manifest["skipped"].get("read_error", 0)
    if errors > manifest["config"]["max_read_errors"]:
        examples = "; ".join(f"{v}" for v in list(manifest["read_errors"].values())[:3])
        raise PreprocessError(
            f"{errors} row(s) could not be read after retries (allowed: --max_read_errors "
            f"{manifest['config']['max_read_errors']}), e.g. {examples}. Nothing was published at {out_uri}, "
            "its previous shards are unchanged; fix the storage or allow the errors with --max_read_errors."
        )
