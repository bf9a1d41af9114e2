"""Storage URIs: ``s3://bucket/prefix``, ``file:///abs/path`` or a plain local path.

``url_to_fs`` is the one place a URI becomes a filesystem; for ``s3://`` the endpoint
comes from ``AWS_ENDPOINT_URL`` when set (a local S3-compatible server, MinIO, ...).
"""

from __future__ import annotations

import os

import fsspec

__all__ = ["url_to_fs", "is_remote", "s3_endpoint"]


def s3_endpoint() -> str | None:
    """The S3 endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (None: AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path of ``uri``."""
    if uri.startswith("s3://") or uri.startswith("s3a://"):
        try:
            import s3fs
        except ImportError as e:
            raise RuntimeError("s3:// URIs need s3fs (pip install 'mdm[ray]' or pip install s3fs)") from e
        kwargs = {}
        endpoint = s3_endpoint()
        if endpoint:
            kwargs["client_kwargs"] = {"endpoint_url": endpoint}
        fs = s3fs.S3FileSystem(**kwargs)
        return fs, uri.split("://", 1)[1]
    if uri.startswith("file://"):
        return fsspec.filesystem("file"), uri[len("file://") :]
    if "://" in uri:
        return fsspec.core.url_to_fs(uri)
    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(uri))
