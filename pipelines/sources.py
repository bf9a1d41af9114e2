"""Raw image + caption sets as Ray Datasets with one schema.

Every source yields rows ``{source: str, image: bytes, caption: str, label: int}`` and a
count of what it passed over before decoding (files that are not images, captions that
could not be read). Supported:

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mdm.storage import url_to_fs

from .storage import arrow_fs

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
    listed: int  # candidate rows handed to the dataset
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


def _read_folder_batch(batch: dict[str, np.ndarray], scheme: str) -> dict[str, np.ndarray]:
    paths = [str(p) for p in batch["source"]]
    fs, _ = url_to_fs(scheme + paths[0] if scheme else paths[0])
    images, captions, labels = [], [], []
    for path, cap_path, folder_caption in zip(paths, batch["caption_path"], batch["caption"]):
        try:
            with fs.open(path, "rb") as f:
                images.append(f.read())
        except Exception:  # noqa: BLE001 - unreadable file: decoded later as empty -> skipped
            images.append(b"")
        caption, label = str(folder_caption or ""), -1
        cap_path = str(cap_path)
        if cap_path:
            try:
                with fs.open(cap_path, "rb") as f:
                    text = f.read().decode("utf-8", errors="replace")
                if cap_path.endswith(".json"):
                    meta = json.loads(text)
                    caption = str(meta.get("caption") or meta.get("text") or "")
                    label = int(meta.get("label", -1))
                else:
                    caption = text.strip()
            except Exception:  # noqa: BLE001 - unreadable sidecar: treated as no caption
                caption, label = "", -1
        captions.append(caption)
        labels.append(label)
    return {
        "source": np.array([scheme + p if scheme else p for p in paths], dtype=object),
        "image": np.array(images, dtype=object),
        "caption": np.array(captions, dtype=object),
        "label": np.array(labels, dtype=np.int64),
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
            try:
                with fs.open(f, "rb") as fh:
                    data = json.load(fh)
                mapping = data.get("images", data) if isinstance(data, dict) else {}
                d = posixpath.dirname(f)
                folder_captions.update({posixpath.join(d, k): str(v) for k, v in mapping.items() if isinstance(v, str)})
            except Exception:  # noqa: BLE001 - a broken captions.json leaves the images uncaptioned
                pass
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


def _normalise_parquet(
    batch: dict[str, np.ndarray], image_column: str, caption_column: str | None, label_column: str | None, uri: str
) -> dict[str, np.ndarray]:
    n = len(batch[image_column])
    images = []
    for v in batch[image_column]:
        if isinstance(v, dict):
            v = v.get("bytes") or b""
        images.append(bytes(v) if v is not None else b"")
    captions = [str(c) if c is not None else "" for c in batch[caption_column]] if caption_column else [""] * n
    labels = [int(x) if x is not None else -1 for x in batch[label_column]] if label_column else [-1] * n
    return {
        "source": np.array([f"{uri}#{i}" for i in range(n)], dtype=object),
        "image": np.array(images, dtype=object),
        "caption": np.array(captions, dtype=object),
        "label": np.array(labels, dtype=np.int64),
    }


def parquet_source(
    uri: str,
    image_column: str = "image",
    caption_column: str | None = "caption",
    label_column: str | None = None,
    limit: int | None = None,
) -> Source:
    import ray.data

    fs, path = arrow_fs(uri)
    cols = [c for c in (image_column, caption_column, label_column) if c]
    try:
        ds = ray.data.read_parquet(path, filesystem=fs, columns=cols)
        listed = ds.count()
    except Exception as e:  # noqa: BLE001
        raise _listing_error(uri, e) from e
    if limit is not None:
        ds = ds.limit(limit)
        listed = min(listed, limit)
    ds = ds.map_batches(
        _normalise_parquet,
        batch_size=64,
        fn_kwargs={
            "image_column": image_column,
            "caption_column": caption_column,
            "label_column": label_column,
            "uri": uri,
        },
    )
    return Source(ds, uri, "parquet", listed, {})


def _normalise_webdataset(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(batch["__key__"])
    images, captions, labels = [], [], []
    for i in range(n):
        img = b""
        for ext in ("jpg", "jpeg", "png", "webp"):
            col = batch.get(ext)
            if col is not None and col[i] is not None:
                img = bytes(col[i])
                break
        caption, label = "", -1
        txt = batch.get("txt")
        if txt is not None and txt[i] is not None:
            caption = txt[i].decode("utf-8", "replace").strip() if isinstance(txt[i], bytes) else str(txt[i])
        meta = batch.get("json")
        if meta is not None and meta[i] is not None:
            try:
                m = json.loads(meta[i]) if isinstance(meta[i], (bytes, str)) else dict(meta[i])
                caption = caption or str(m.get("caption") or "")
                label = int(m.get("label", -1))
            except Exception:  # noqa: BLE001
                pass
        images.append(img)
        captions.append(caption)
        labels.append(label)
    url = batch.get("__url__")
    sources = [f"{url[i] if url is not None else ''}#{batch['__key__'][i]}" for i in range(n)]
    return {
        "source": np.array(sources, dtype=object),
        "image": np.array(images, dtype=object),
        "caption": np.array(captions, dtype=object),
        "label": np.array(labels, dtype=np.int64),
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
    return Source(ds, uri, "webdataset", -1, {})


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
