"""Storage URIs for Ray Data: the pyarrow filesystem of ``s3://``, ``file://`` or local paths.

Ray Data's readers and writers take a pyarrow filesystem; fsspec (``mdm.storage``) serves
everything that runs inside our own functions. Both read the S3 endpoint from
``AWS_ENDPOINT_URL`` so a local S3-compatible server works the same as AWS.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

import pyarrow.fs as pafs

from mdm.storage import s3_endpoint, url_to_fs

__all__ = ["arrow_fs", "url_to_fs", "join"]


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
