"""bench/pack_shards.py: packed pixels come back whole, in order, from parts in several folders."""

import json
import lzma

import numpy as np
import pytest
from conftest import load_module
from PIL import Image


def load_bench():
    return load_module("bench/pack_shards.py", "bench_pack_shards")


def packed(tmp_path, rows=5, parts=(2, 3)):
    """A packed split as pack() writes it, its two parts in two folders (two device calls)."""
    pixels = np.random.default_rng(0).integers(0, 256, (rows, 8, 8, 3), dtype=np.uint8)
    a, b = tmp_path / "call1", tmp_path / "call2"
    a.mkdir(), b.mkdir()
    meta = {
        "split": "train",
        "rows": rows,
        "resolutions": [4, 8],
        "keys": [f"k{i}" for i in range(rows)],
        "captions": [f"caption {i}" for i in range(rows)],
        "parts": list(parts),
    }
    (a / "train.json").write_text(json.dumps(meta))
    (a / "train_8.part0.u8.xz").write_bytes(lzma.compress(pixels[: parts[0]].tobytes()))
    (b / "train_8.part1.u8.xz").write_bytes(lzma.compress(pixels[parts[0] :].tobytes()))
    return pixels, meta, [a, b]


def test_load_top_joins_the_parts_in_order(tmp_path):
    pixels, meta, folders = packed(tmp_path)
    got_meta, top = load_bench().load_top(folders[::-1], "train")  # folder order must not matter
    assert got_meta["keys"] == meta["keys"]
    np.testing.assert_array_equal(top, pixels)


def test_load_top_names_a_missing_part(tmp_path):
    _, _, folders = packed(tmp_path)
    with pytest.raises(FileNotFoundError, match="train_8.part1.u8.xz"):
        load_bench().load_top(folders[:1], "train")


def test_unpack_writes_a_raw_set_of_the_same_pixels_and_captions(tmp_path):
    pixels, meta, folders = packed(tmp_path)
    raw = tmp_path / "raw"
    assert load_bench().unpack_raw(folders, "train", raw) == 5
    for key, caption, want in zip(meta["keys"], meta["captions"], pixels):
        np.testing.assert_array_equal(np.asarray(Image.open(raw / "train" / f"{key}.png")), want)
        assert (raw / "train" / f"{key}.txt").read_text() == caption
