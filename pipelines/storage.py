"""Storage URIs for Ray Data: the pyarrow filesystem of ``s3://``, ``file://`` or local paths.

Ray Data's readers and writers take a pyarrow filesystem; fsspec (``mdm.storage``) serves
everything that runs inside our own functions. Both read the S3 endpoint from
``AWS_ENDPOINT_URL`` so a local S3-compatible server works the same as AWS.

Also the small storage rules the data pipeline relies on: reads retried on transient
errors (:func:`read_bytes`), whether two URIs overlap (:func:`uris_overlap`), and a file
replaced in one step (:func:`write_atomic`).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from mdm.storage import s3_endpoint, url_to_fs

__all__ = [
    "arrow_fs",
    "url_to_fs",
    "join",
    "read_bytes",
    "with_retries",
    "uris_overlap",
    "write_atomic",
    "PERMANENT_ERRORS",
]

# Errors that another attempt cannot fix: the object is gone or access is refused.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
T = TypeVar("T")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


def arrow_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for ``uri``."""
    if uri.startswith("s3://"):
        endpoint = s3_endpoint()
        kwargs = {}
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), uri[len("s3://") :]
    if uri.startswith("file://"):
        return pafs.LocalFileSystem(), uri[len("file://") :]
    if "://" in uri:
        fs, path = url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def with_retries(fn: Callable[[], T], attempts: int = 4, backoff_s: float = 0.2) -> T:
    """``fn()``, retried on transient storage errors (connection resets, timeouts,
    throttling): ``attempts`` tries in all, waiting ``backoff_s``, then twice as long each
    time. A missing object or refused access (:data:`PERMANENT_ERRORS`) is not retried. The
    last error is raised: the caller decides how to count it."""
    for attempt in range(attempts):
        try:
            return fn()
        except PERMANENT_ERRORS:
            raise
        except Exception:  # noqa: BLE001 - botocore/aiohttp/fsspec raise many kinds
            if attempt == attempts - 1:
                raise
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def read_bytes(fs: Any, path: str, attempts: int = 4, backoff_s: float = 0.2) -> bytes:
    """The whole file at ``path`` through fsspec ``fs``, with :func:`with_retries`."""

    def read() -> bytes:
        with fs.open(path, "rb") as f:
            return f.read()

    return with_retries(read, attempts, backoff_s)


def _location(uri: str) -> tuple[str, str]:
    """(namespace, normalised path) of a URI: local paths resolve symlinks."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return scheme, "/" + rest.strip("/")
    return "local", os.path.realpath(os.path.abspath(os.path.expanduser(uri))).rstrip("/") or "/"


def uris_overlap(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` are the same folder or one lies inside the other."""
    (sa, pa_), (sb, pb) = _location(a), _location(b)
    if sa != sb:
        return False
    if pa_ == pb:
        return True
    return pa_.startswith(pb.rstrip("/") + "/") or pb.startswith(pa_.rstrip("/") + "/")


def write_atomic(fs: Any, path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step: a reader sees the old file or the new one,
    never a part. Local files: a temporary file beside it, then a rename. Object stores: one
    PUT, which an S3-compatible store makes visible whole."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    fs.pipe_file(path, data)
