"""Stream shards into training: only the columns a stage needs, shuffled, split per worker.

    ds = open_shards("s3://bucket/shards", resolutions=[64, 128])
    for batch in iter_training_batches(ds, batch_size=32):      # or a Ray Train dataset shard
        images = to_tensors(batch, [64, 128], device="cuda")      # float in [-1, 1], NCHW

Decoding PNG/WebP happens inside Ray Data's workers (``map_batches``), overlapped with the
training step by Ray's prefetching, so the step never waits on a decoder; the trainer
receives uint8 arrays and converts on the device. Each new epoch restarts Ray Data's
executor, which took 8-12 s on an H200 machine; :func:`endless_batches` starts the next
epoch in a thread while the step still trains on batches already queued.
"""

from __future__ import annotations

import io
import json
import posixpath
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from PIL import Image

from mdm.storage import url_to_fs

from .preprocess import MANIFEST, SCHEMA_VERSION
from .storage import arrow_fs, join

__all__ = [
    "read_manifest",
    "shard_files",
    "shard_dataset",
    "open_shards",
    "iter_training_batches",
    "endless_batches",
    "EmptyEpochError",
    "pixel_tensors",
    "to_tensors",
]


def read_manifest(uri: str) -> dict:
    fs, path = url_to_fs(uri)
    mpath = join(path, MANIFEST)
    if not fs.exists(mpath):
        raise FileNotFoundError(
            f"{uri} has no {MANIFEST}: not a shard folder, or its preprocessing job did not finish "
            f"(run jobs/preprocess.py --out {uri})"
        )
    with fs.open(mpath, "r") as f:
        manifest = json.load(f)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{uri}: shard schema {manifest.get('schema_version')} but this code reads {SCHEMA_VERSION}")
    return manifest


def shard_files(uri: str, manifest: dict | None = None) -> list[str]:
    """The paths (inside the filesystem of :func:`pipelines.storage.arrow_fs`) of exactly the
    Parquet files the manifest at ``uri`` names: files beside them that it does not name (an
    unfinished run's, anybody else's) are never read. Raises if one it names is missing."""
    manifest = manifest if manifest is not None else read_manifest(uri)
    names = manifest.get("files")
    if not isinstance(names, list) or not names:
        raise ValueError(
            f"{uri}/{MANIFEST} names no shard files: it was written by another tool or an older version; "
            f"re-run jobs/preprocess.py --out {uri}"
        )
    bad = [n for n in names if not isinstance(n, str) or not n or n.startswith("/") or ".." in n.split("/")]
    if bad:
        raise ValueError(f"{uri}/{MANIFEST} names files outside its folder: {bad[:3]}")
    fs, path = url_to_fs(uri)
    present: set[str] = set()
    for folder in sorted({posixpath.dirname(n) for n in names}):
        where = join(path, folder) if folder else path
        fs.invalidate_cache(where)
        if fs.exists(where):
            present.update(fs.find(where, maxdepth=None if folder else 1))
    missing = [n for n in names if join(path, n) not in present]
    if missing:
        raise FileNotFoundError(
            f"{uri}: {len(missing)} shard file(s) its {MANIFEST} names are missing, e.g. {missing[0]}; "
            f"the shard set was damaged: re-run jobs/preprocess.py --out {uri}"
        )
    _, apath = arrow_fs(uri)
    return [join(apath, n) for n in names]


def shard_dataset(uri: str, manifest: dict | None = None) -> Any:
    """A ``pyarrow.dataset`` of exactly the files the manifest at ``uri`` names
    (:func:`shard_files`), for readers that need no Ray."""
    import pyarrow.dataset as pads

    fs, _ = arrow_fs(uri)
    return pads.dataset(shard_files(uri, manifest), filesystem=fs, format="parquet")


def _decode(batch: dict[str, np.ndarray], columns: list[str]) -> dict[str, np.ndarray]:
    for col in columns:
        batch[col] = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in batch[col]])
    return batch


def open_shards(
    uri: str,
    resolutions: list[int],
    *,
    with_text_emb: bool = False,
    shuffle_files: bool = True,
    extra_columns: tuple[str, ...] = ("key", "caption", "label", "source_width", "source_height"),
) -> Any:
    """A Ray Dataset of the shards at ``uri`` reading only ``image_<R>`` for ``resolutions``
    (plus caption/label/size and optionally the text embedding), decoded to uint8 (N, R, R, 3).
    Reads exactly the files its manifest names (:func:`shard_files`)."""
    import ray.data

    manifest = read_manifest(uri)
    missing = [r for r in resolutions if r not in manifest["resolutions"]]
    if missing:
        raise ValueError(
            f"{uri} holds resolutions {manifest['resolutions']}, not {missing}; re-run preprocessing with "
            f"--resolutions {','.join(str(r) for r in sorted(set(manifest['resolutions']) | set(resolutions)))}"
        )
    if with_text_emb and manifest.get("text_encoder") is None:
        raise ValueError(f"{uri} has no precomputed text_emb; preprocess with --text_encoder")
    image_cols = [f"image_{r}" for r in resolutions]
    cols = image_cols + list(extra_columns) + (["text_emb", "text_len"] if with_text_emb else [])
    fs, _ = arrow_fs(uri)
    paths = shard_files(uri, manifest)
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=cols, shuffle="files" if shuffle_files else None)
    return ds.map_batches(_decode, batch_size=64, fn_kwargs={"columns": image_cols})


def iter_training_batches(
    ds_or_shard: Any, batch_size: int, shuffle_buffer: int = 256, seed: int | None = None, drop_last: bool = True
) -> Iterator[dict[str, np.ndarray]]:
    """Numpy batches from a Dataset or a Ray Train dataset shard, with a local shuffle buffer."""
    yield from ds_or_shard.iter_batches(
        batch_size=batch_size,
        batch_format="numpy",
        local_shuffle_buffer_size=shuffle_buffer or None,
        local_shuffle_seed=seed,
        drop_last=drop_last,
        prefetch_batches=2,
    )


class EmptyEpochError(RuntimeError):
    """An epoch of :func:`endless_batches` gave no batch (fewer rows than one batch)."""


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def endless_batches(
    epoch_batches: Callable[[int], Iterator[Any]], depth: int = 16, transform: Callable[[Any], Any] | None = None
) -> Iterator[tuple[int, Any]]:
    """``(epoch, transform(batch))`` for epoch 0, 1, 2, ... of ``epoch_batches(epoch)``, read
    ahead by a thread into a queue of ``depth`` batches.

    ``transform`` runs in that thread (the conversion to tensors, pinning), off the
    consumer's critical path.

    The thread moves on to the next epoch as soon as the last batch of the current one is
    queued, so that epoch's start-up (Ray Data restarts its executor per epoch) overlaps
    the consumer's work on the batches still queued. An epoch with no batches raises
    :class:`EmptyEpochError` in the consumer, as does any error of the iteration itself. Closing
    the generator stops the thread. ``depth=0`` reads in the consumer's thread.
    """

    def epochs() -> Iterator[tuple[int, Any]]:
        epoch = 0
        while True:
            got = 0
            for b in epoch_batches(epoch):
                got += 1
                yield epoch, (b if transform is None else transform(b))
            if got == 0:
                raise EmptyEpochError(f"epoch {epoch} has no batches")
            epoch += 1

    if depth <= 0:
        yield from epochs()
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in epochs():
                if not put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            put(_Failed(e))

    thread = threading.Thread(target=run, name="mdm-batch-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def to_tensors(
    batch: dict[str, np.ndarray], resolutions: list[int], device: Any = "cpu", channels_last: bool = False
) -> list[Any]:
    """uint8 (N, R, R, 3) columns -> float tensors in [-1, 1], (N, 3, R, R), on ``device``.

    The uint8 copy crosses to the device (4x fewer bytes than float) and is converted there.
    """
    from mdm.training import pixels_to_unit

    return [pixels_to_unit(x.to(device, non_blocking=True), channels_last) for x in pixel_tensors(batch, resolutions)]


def pixel_tensors(batch: dict[str, np.ndarray], resolutions: list[int]) -> list[Any]:
    """The uint8 (N, R, R, 3) columns as CPU tensors (sharing the batch's memory)."""
    import torch

    return [torch.from_numpy(np.ascontiguousarray(batch[f"image_{r}"])) for r in resolutions]
