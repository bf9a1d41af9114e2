"""Raw image + caption sets as Ray Datasets with one schema.

Every source yields rows ``{source, image, caption, label, read_error, note}``: ``source``
names the source row (a path, ``file#row_group:row`` or ``tar#key``) and is unique, so a
retried task names the same rows again; ``read_error`` is ``""`` or why the row's bytes
could not be read (after retries of transient errors); ``note`` is ``""`` or what was wrong
with its metadata while the row was kept (``bad_label``: label -1, caption kept;
``bad_sidecar``: a JSON sidecar that does not parse, caption empty). A source also counts
what it passed over before decoding (files that are not images) and how many rows it
listed (``None`` where that is unknown before reading). Supported:

- ``folder``: an image folder or bucket prefix, recursively; captions from ``<name>.txt``
  or ``<name>.json`` (``{"caption": ..., "label": ...}``) sidecars (the emoji raw set,
  img2dataset's ``--output_format files``).
- ``parquet``: Parquet with an image-bytes column and a caption column (img2dataset's
  parquet output, Hugging Face image datasets whose image column is ``{bytes, path}``).
- ``webdataset``: tar shards of ``<key>.jpg|png|webp`` + ``<key>.txt|json`` (img2dataset's
  ``--output_format webdataset``, what the reference implementation trains from).
"""

from __future__ import annotations

import json
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mdm.storage import url_to_fs

from .storage import arrow_fs, read_bytes, with_retries

__all__ = ["Source", "SourceError", "open_source", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SIDECAR_EXTENSIONS = (".txt", ".json")
IGNORED_NAMES = ("_manifest.json", "captions.json", "LICENSES.md", "LICENSE.md", "LICENSE", "README.md", ".DS_Store")


class SourceError(RuntimeError):
    """The source as a whole cannot be read (missing bucket, wrong credentials, no files)."""


@dataclass
class Source:
    dataset: Any  # ray.data.Dataset
    uri: str
    kind: str
    listed: int | None  # candidate rows handed to the dataset; None: unknown until read
    skipped: dict[str, int] = field(default_factory=dict)  # passed over before decoding


def _listing_error(uri: str, e: Exception) -> SourceError:
    text = f"{type(e).__name__}: {e}"
    hint = "check the URI"
    low = text.lower()
    if "nosuchbucket" in low or "does not exist" in low or "not found" in low:
        hint = "the bucket or prefix does not exist; create it or fix the URI"
    elif "accessdenied" in low or "forbidden" in low or "invalidaccesskeyid" in low or "signature" in low:
        hint = "the credentials were refused; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
    elif "connect" in low or "endpoint" in low:
        hint = "the storage endpoint is unreachable; check AWS_ENDPOINT_URL"
    return SourceError(f"cannot list {uri}: {text} ({hint})")


def _list_files(uri: str) -> tuple[Any, list[str]]:
    fs, root = url_to_fs(uri)
    try:
        if not fs.exists(root):
            raise FileNotFoundError(f"{uri} does not exist")
        files = sorted(fs.find(root))
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - botocore/fsspec raise many kinds
        raise _listing_error(uri, e) from e
    return fs, files


def _scheme_prefix(uri: str) -> str:
    return uri.split("://", 1)[0] + "://" if "://" in uri and not uri.startswith("file://") else ""


def parse_label(value: Any) -> int | None:
    """An integer class label from metadata: ints and integer strings; ``None`` when absent
    (label -1); raises ``ValueError`` for anything else (``"cat"``, ``2.5``, ``true``)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"label {value!r} is not an integer")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise ValueError(f"label {value!r} is not an integer")


def _caption_from_json(meta: Any) -> tuple[str, int, str]:
    """(caption, label, note) of a parsed JSON sidecar; a bad label keeps the caption."""
    if not isinstance(meta, dict):
        return "", -1, "bad_sidecar"
    caption = str(meta.get("caption") or meta.get("text") or "")
    try:
        label = parse_label(meta.get("label"))
    except ValueError:
        return caption, -1, "bad_label"
    return caption, -1 if label is None else label, ""


def read_folder_row(fs: Any, path: str, caption_path: str, folder_caption: str) -> dict[str, Any]:
    """One image of a folder source and its caption: ``{image, caption, label, read_error,
    note}``. Storage errors are retried (:func:`pipelines.storage.read_bytes`); what still
    fails is returned in ``read_error``, never turned into an empty image or caption."""
    row: dict[str, Any] = {
        "image": b"",
        "caption": str(folder_caption or ""),
        "label": -1,
        "read_error": "",
        "note": "",
    }
    try:
        row["image"] = read_bytes(fs, path)
    except Exception as e:  # noqa: BLE001 - counted as read_error by the pipeline
        row["read_error"] = f"{path}: {type(e).__name__}: {e}"
        return row
    if caption_path:
        try:
            text = read_bytes(fs, caption_path).decode("utf-8", errors="replace")
        except Exception as e:  # noqa: BLE001
            row["image"] = b""
            row["read_error"] = f"{caption_path}: {type(e).__name__}: {e}"
            return row
        if caption_path.endswith(".json"):
            try:
                meta = json.loads(text)
            except ValueError:
                meta = None
            row["caption"], row["label"], row["note"] = _caption_from_json(meta)
        else:
            row["caption"] = text.strip()
    return row


def _read_folder_batch(batch: dict[str, np.ndarray], scheme: str) -> dict[str, np.ndarray]:
    paths = [str(p) for p in batch["source"]]
    fs, _ = url_to_fs(scheme + paths[0] if scheme else paths[0])
    rows = [
        read_folder_row(fs, path, str(cap_path), str(folder_caption or ""))
        for path, cap_path, folder_caption in zip(paths, batch["caption_path"], batch["caption"])
    ]
    return {
        "source": np.array([scheme + p if scheme else p for p in paths], dtype=object),
        "image": np.array([r["image"] for r in rows], dtype=object),
        "caption": np.array([r["caption"] for r in rows], dtype=object),
        "label": np.array([r["label"] for r in rows], dtype=np.int64),
        "read_error": np.array([r["read_error"] for r in rows], dtype=object),
        "note": np.array([r["note"] for r in rows], dtype=object),
    }


def folder_source(uri: str, limit: int | None = None, listing: tuple[Any, list[str]] | None = None) -> Source:
    """``listing``: the (filesystem, files) of ``uri`` when the caller already listed it."""
    import ray.data

    fs, files = listing or _list_files(uri)
    by_stem: dict[str, str] = {}
    for f in files:  # sorted, so <name>.json comes before <name>.txt and wins (it may carry a label)
        stem, ext = posixpath.splitext(f)
        if ext.lower() in SIDECAR_EXTENSIONS and posixpath.basename(f) not in IGNORED_NAMES:
            by_stem.setdefault(stem, f)
    # A folder-level captions.json ({"images": {file: caption}} or {file: caption}) also works.
    folder_captions: dict[str, str] = {}
    for f in files:
        if posixpath.basename(f) == "captions.json":
            try:  # an unreadable captions.json would blank every caption of its folder: stop here
                data = json.loads(read_bytes(fs, f))
            except Exception as e:  # noqa: BLE001
                raise SourceError(
                    f"cannot read the captions of {f}: {type(e).__name__}: {e} (fix or remove the file)"
                ) from e
            mapping = data.get("images", data) if isinstance(data, dict) else {}
            d = posixpath.dirname(f)
            folder_captions.update({posixpath.join(d, k): str(v) for k, v in mapping.items() if isinstance(v, str)})
    items, skipped = [], {}
    for f in files:
        base = posixpath.basename(f)
        stem, ext = posixpath.splitext(f)
        if ext.lower() in SIDECAR_EXTENSIONS or base in IGNORED_NAMES:
            continue
        if ext.lower() not in IMAGE_EXTENSIONS:
            skipped["not_an_image"] = skipped.get("not_an_image", 0) + 1
            continue
        items.append({"source": f, "caption_path": by_stem.get(stem, ""), "caption": folder_captions.get(f, "")})
    if limit is not None:
        items = items[:limit]
    if not items:
        raise SourceError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {uri}")
    scheme = _scheme_prefix(uri)
    # Small blocks (~16 rows) keep every CPU busy to the end; decoding dominates, not scheduling.
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // 16, 2000)))
    ds = ds.map_batches(_read_folder_batch, batch_size=16, fn_kwargs={"scheme": scheme})
    return Source(ds, uri, "folder", len(items), skipped)


def _parquet_rows(
    table: Any, image_column: str, caption_column: str | None, label_column: str | None
) -> list[dict[str, Any]]:
    """Rows of one Parquet row group in the common schema (without ``source``)."""
    n = table.num_rows
    images = table.column(image_column).to_pylist()
    captions = table.column(caption_column).to_pylist() if caption_column else [None] * n
    labels = table.column(label_column).to_pylist() if label_column else [None] * n
    rows = []
    for image, caption, label in zip(images, captions, labels):
        if isinstance(image, dict):  # Hugging Face image columns: {bytes, path}
            image = image.get("bytes")
        note = ""
        try:
            parsed = parse_label(label)
        except ValueError:
            parsed, note = None, "bad_label"
        rows.append(
            {
                "image": bytes(image) if image is not None else b"",
                "caption": str(caption) if caption is not None else "",
                "label": -1 if parsed is None else parsed,
                "read_error": "",
                "note": note,
            }
        )
    return rows


def _read_parquet_groups(
    batch: dict[str, np.ndarray], scheme: str, image_column: str, caption_column: str | None, label_column: str | None
) -> dict[str, np.ndarray]:
    """Row groups listed by :func:`parquet_source` -> rows named ``file#row_group:row``."""
    cols = [c for c in (image_column, caption_column, label_column) if c]
    out: dict[str, list] = {k: [] for k in ("source", "image", "caption", "label", "read_error", "note")}
    for path, group, take in zip(batch["file"], batch["row_group"], batch["take"]):
        path, group, take = str(path), int(group), int(take)
        fs, _ = url_to_fs(scheme + path if scheme else path)
        try:
            table = _read_row_group(fs, path, group, cols)
            rows = _parquet_rows(table.slice(0, take), image_column, caption_column, label_column)
        except Exception as e:  # noqa: BLE001 - every row of the group is counted as read_error
            error = f"{path} row group {group}: {type(e).__name__}: {e}"
            rows = [{"image": b"", "caption": "", "label": -1, "read_error": error, "note": ""}] * take
        for i, row in enumerate(rows):
            out["source"].append(f"{scheme}{path}#{group}:{i}")
            for k, v in row.items():
                out[k].append(v)
    return {k: np.array(v, dtype=np.int64) if k == "label" else np.array(v, dtype=object) for k, v in out.items()}


def _read_row_group(fs: Any, path: str, group: int, columns: list[str]) -> Any:
    import pyarrow.parquet as pq

    def read() -> Any:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).read_row_group(group, columns=columns)

    return with_retries(read)


def _parquet_footer(fs: Any, path: str) -> Any:
    import pyarrow.parquet as pq

    def read() -> Any:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata

    return with_retries(read)


def parquet_source(
    uri: str,
    image_column: str = "image",
    caption_column: str | None = "caption",
    label_column: str | None = None,
    limit: int | None = None,
) -> Source:
    """Parquet files under ``uri`` (or one file). Their footers are read here, so the row
    count is known before the job starts and every row gets a stable name; the rows are read
    by row group inside Ray Data's tasks."""
    import ray.data

    fs, files = _list_files(uri)
    files = [f for f in files if f.endswith(".parquet")]
    if not files:
        raise SourceError(f"no .parquet files under {uri}")
    try:
        with ThreadPoolExecutor(8) as pool:
            footers = list(pool.map(lambda f: _parquet_footer(fs, f), files))
    except Exception as e:  # noqa: BLE001
        raise _listing_error(uri, e) from e
    cols = [c for c in (image_column, caption_column, label_column) if c]
    for f, meta in zip(files, footers):
        names = meta.schema.to_arrow_schema().names
        missing = [c for c in cols if c not in names]
        if missing:
            raise SourceError(f"{f} has no column {missing} (it has {names}); set --image_column/--caption_column")
    items, budget = [], limit
    for f, meta in zip(files, footers):
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            take = n if budget is None else min(n, budget)
            if take > 0:
                items.append({"file": f, "row_group": g, "take": take})
            if budget is not None:
                budget -= take
    listed = sum(i["take"] for i in items)
    if not listed:
        raise SourceError(f"no rows in the Parquet files under {uri}")
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 2000)))
    ds = ds.map_batches(
        _read_parquet_groups,
        batch_size=1,
        fn_kwargs={
            "scheme": _scheme_prefix(uri),
            "image_column": image_column,
            "caption_column": caption_column,
            "label_column": label_column,
        },
    )
    return Source(ds, uri, "parquet", listed, {})


def _normalise_webdataset(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(batch["__key__"])
    images, captions, labels, notes = [], [], [], []
    for i in range(n):
        img = b""
        for ext in ("jpg", "jpeg", "png", "webp"):
            col = batch.get(ext)
            if col is not None and col[i] is not None:
                img = bytes(col[i])
                break
        caption, label, note = "", -1, ""
        txt = batch.get("txt")
        if txt is not None and txt[i] is not None:
            caption = txt[i].decode("utf-8", "replace").strip() if isinstance(txt[i], bytes) else str(txt[i])
        meta = batch.get("json")
        if meta is not None and meta[i] is not None:
            try:
                m = json.loads(meta[i]) if isinstance(meta[i], (bytes, str)) else dict(meta[i])
            except (ValueError, TypeError):
                m = None
            json_caption, label, note = _caption_from_json(m)
            caption = caption or json_caption
        images.append(img)
        captions.append(caption)
        labels.append(label)
        notes.append(note)
    url = batch.get("__url__")
    sources = [f"{url[i] if url is not None else ''}#{batch['__key__'][i]}" for i in range(n)]
    return {
        "source": np.array(sources, dtype=object),
        "image": np.array(images, dtype=object),
        "caption": np.array(captions, dtype=object),
        "label": np.array(labels, dtype=np.int64),
        "read_error": np.array([""] * n, dtype=object),
        "note": np.array(notes, dtype=object),
    }


def webdataset_source(uri: str, limit: int | None = None, listing: tuple[Any, list[str]] | None = None) -> Source:
    import ray.data

    _, files = listing or _list_files(uri)
    tars = [f for f in files if f.endswith(".tar")]
    if not tars:
        raise SourceError(f"no .tar shards under {uri}")
    fs, _ = arrow_fs(uri)
    ds = ray.data.read_webdataset(tars, filesystem=fs, decoder=None, include_paths=False)
    if limit is not None:
        ds = ds.limit(limit)
    ds = ds.map_batches(_normalise_webdataset, batch_size=64)
    # Members are counted as they are read (a tar has no index); a tar that cannot be read
    # fails the job (Ray Data retries transient errors first).
    return Source(ds, uri, "webdataset", None, {})


def open_source(uri: str, kind: str = "auto", limit: int | None = None, **kwargs) -> Source:
    """Open a raw set; ``kind`` is folder, parquet, webdataset or auto (by file extensions)."""
    listing = None
    if kind == "auto":  # the listing is reused below: a bucket is listed once
        listing = _list_files(uri)
        exts = {posixpath.splitext(f)[1].lower() for f in listing[1]}
        kind = "webdataset" if ".tar" in exts else "parquet" if ".parquet" in exts else "folder"
    if kind == "folder":
        return folder_source(uri, limit, listing)
    if kind == "parquet":
        return parquet_source(uri, limit=limit, **kwargs)
    if kind == "webdataset":
        return webdataset_source(uri, limit, listing)
    raise SourceError(f"unknown source kind {kind!r}; use folder, parquet, webdataset or auto")
