"""Storage URIs: ``s3://bucket/prefix``, ``file:///abs/path`` or a plain local path.

``url_to_fs`` is the one place a URI becomes a filesystem; for ``s3://`` the endpoint
comes from ``AWS_ENDPOINT_URL`` when set (a local S3-compatible server, MinIO, ...).
"""

from __future__ import annotations

import os
from pathlib import Path

import fsspec

__all__ = ["url_to_fs", "is_remote", "s3_endpoint", "state_dir", "default_tracking_uri", "use_default_registry"]


def state_dir() -> Path:
    """The local state folder of the embedded default: ``$MDM_STATE_DIR``, else ``~/.mdm``.

    ``make`` sets it to the checkout's ``.state``; a Ray job inherits it from the
    environment the Ray head was started in (its working dir is a temporary copy).
    """
    return Path(os.environ.get("MDM_STATE_DIR") or Path.home() / ".mdm").expanduser().resolve()


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else SQLite in the local state folder: where the stage jobs
    register models, and so where ``models:/...`` is looked up when nothing else is set."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    folder = state_dir() / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def use_default_registry() -> str:
    """Before a ``models:/`` lookup: with no tracking URI chosen (``mlflow.set_tracking_uri``
    sets ``$MLFLOW_TRACKING_URI`` too), point MLflow at the state folder's SQLite, where the
    stage jobs register by default, instead of MLflow's own default in the current folder.
    Returns the registry URI the lookup will use."""
    import mlflow

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(default_tracking_uri())
    return mlflow.get_registry_uri()


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
