#!/usr/bin/env python
"""The local stack's S3-protocol server: objects kept as plain files under a folder.

    python infra/local/s3_server.py DATA_ROOT --port 9000 [--bucket mdm]

It is ``localbucket`` (PyPI, MIT, pinned in pyproject.toml), a small standard-library-only
server that stores each bucket as a folder and each object as a file, so what the stack
stores survives ``stack.py down``/``up`` and can be looked at with ``ls``. moto, which the
stack used before, keeps objects in memory only; MinIO is not installable here; ``s3rver``
(npm) corrupted Parquet files written through pyarrow.

localbucket lacks two operations our clients send, added here on its request handler:

- ``DeleteObjects`` (``POST /bucket?delete``): s3fs's ``rm`` and pyarrow's ``delete_dir``
  (Ray Train pruning old checkpoints) delete in bulk;
- folder markers (keys ending in ``/``, empty body): pyarrow's ``create_dir`` writes them.
  A marker is stored as the folder itself; listings show only objects, as on S3 where a
  marker-only prefix lists as empty in most clients.
"""

from __future__ import annotations

import argparse
import logging
import sys
import xml.etree.ElementTree as ET
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from pathlib import Path
from xml.sax.saxutils import escape

import localbucket
from localbucket import S3_NAMESPACE, S3Error, S3Handler

EMPTY_MD5 = "d41d8cd98f00b204e9800998ecf8427e"


class Handler(S3Handler):
    """localbucket's handler plus DeleteObjects and folder markers."""

    def _post_request(self, bucket: str, key: str):
        if bucket and not key and "delete" in self.query:
            self._check_query("DeleteObjects", {"delete"})
            self._delete_objects(bucket, self._read_body())
            return
        super()._post_request(bucket, key)

    def _delete_objects(self, bucket: str, body: bytes) -> None:
        self._bucket_dir(bucket)
        try:
            root = ET.fromstring(body)
        except ET.ParseError:
            raise self._malformed_xml_error() from None
        ns = {"s3": S3_NAMESPACE}
        keys = [el.text or "" for el in root.iterfind(".//s3:Object/s3:Key", ns)]
        keys += [el.text or "" for el in root.iterfind(".//Object/Key")]
        quiet = (root.findtext("s3:Quiet", default="", namespaces=ns) or root.findtext("Quiet") or "").lower()
        deleted, errors = [], []
        for key in keys:
            try:
                self._remove(bucket, key)
                deleted.append(key)
            except S3Error as e:
                errors.append((key, e))
        parts = [f'<?xml version="1.0" encoding="UTF-8"?><DeleteResult xmlns="{S3_NAMESPACE}">']
        if quiet != "true":
            parts += [f"<Deleted><Key>{escape(k)}</Key></Deleted>" for k in deleted]
        parts += [
            f"<Error><Key>{escape(k)}</Key><Code>{e.code}</Code><Message>{escape(e.message)}</Message></Error>"
            for k, e in errors
        ]
        parts.append("</DeleteResult>")
        self._send(HTTPStatus.OK, "".join(parts).encode(), {"Content-Type": "application/xml"})

    def _remove(self, bucket: str, key: str) -> None:
        """Delete one object (or folder marker) and the folders it leaves empty."""
        bucket_dir = self._bucket_dir(bucket).resolve()
        target = self._marker_path(bucket, key) if key.endswith("/") else self._object_path(bucket, key)
        if target.is_file():
            target.unlink(missing_ok=True)
        elif target.is_dir() and key.endswith("/"):
            try:
                target.rmdir()
            except OSError:
                pass  # a marker over objects: S3 deletes only the marker
        parent = target.parent
        while parent != bucket_dir and parent.is_relative_to(bucket_dir):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def _marker_path(self, bucket: str, key: str) -> Path:
        """The folder a marker key ``a/b/`` stands for (the bare ``/`` is refused as a key)."""
        return self._object_path(bucket, key.rstrip("/") or key)

    # folder markers -------------------------------------------------------------------
    def _put(self, bucket: str, key: str):
        if key.endswith("/") and "uploadId" not in self.query and "x-amz-copy-source" not in self.headers:
            self._check_query("PutObject")
            if self._read_body():
                raise S3Error(HTTPStatus.BAD_REQUEST, "InvalidArgument", "Keys ending in '/' must be empty.")
            self._marker_path(bucket, key).mkdir(parents=True, exist_ok=True)
            self._send(HTTPStatus.OK, headers={"ETag": f'"{EMPTY_MD5}"'})
            return
        super()._put(bucket, key)

    def _head_request(self, bucket: str, key: str):
        if key.endswith("/"):
            if not self._marker_path(bucket, key).is_dir():
                raise S3Error(HTTPStatus.NOT_FOUND, "NoSuchKey", "The specified key does not exist.")
            self._send(HTTPStatus.OK, headers={"ETag": f'"{EMPTY_MD5}"'})
            return
        super()._head_request(bucket, key)

    def _delete_request(self, bucket: str, key: str):
        if key.endswith("/") and "uploadId" not in self.query:
            self._check_query("DeleteObject")
            self._remove(bucket, key)
            self._send(HTTPStatus.NO_CONTENT)
            return
        super()._delete_request(bucket, key)


def serve(data_root: Path, host: str, port: int, buckets: list[str]) -> None:
    data_root = data_root.resolve()
    data_root.mkdir(parents=True, exist_ok=True)
    for bucket in buckets:
        (data_root / bucket).mkdir(exist_ok=True)
    Handler.data_root = data_root
    server = ThreadingHTTPServer((host, port), Handler)
    logging.getLogger("localbucket").info(
        "localbucket %s (+DeleteObjects, folder markers) serving %s on http://%s:%s",
        localbucket.__version__,
        data_root,
        host,
        port,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_root", type=Path, help="folder that holds the buckets (one sub-folder each)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9000, help="port (default 9000)")
    p.add_argument("--bucket", action="append", default=[], help="create this bucket if missing (repeatable)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    serve(args.data_root, args.host, args.port, args.bucket)
    return 0


if __name__ == "__main__":
    sys.exit(main())
