"""bench/offline_bundle.py: files laid across size-limited bundles come back whole, checked and
installed, in whatever order the bundles arrive; training's files come before evaluation's."""

import io
import json
import lzma
import tarfile

import numpy as np
import pytest
import torch
from conftest import load_module
from safetensors.torch import load_file, save_file


def bench():
    return load_module("bench/offline_bundle.py", "bench_offline_bundle")


@pytest.fixture
def files(tmp_path):
    """What `site` writes (a package tarball, fp16 MiniLM, fp16 TorchScript Inception) and two
    data files, small enough to cut into bundles of a few hundred bytes."""
    src = tmp_path / "src"
    src.mkdir()
    pkg = tmp_path / "pkg" / "somepkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("VALUE = 42\n" + "# padding\n" * 40)
    with lzma.open(src / "site-rest.tar.xz", "wb") as xz, tarfile.open(fileobj=xz, mode="w") as t:
        t.add(pkg, arcname="somepkg")
    g = torch.Generator().manual_seed(0)
    weights = {"w": torch.randn(20, 8, generator=g), "ids": torch.arange(5)}
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, str(tmp_path / "m.st"))
    (src / "minilm.fp16.safetensors.xz").write_bytes(lzma.compress((tmp_path / "m.st").read_bytes()))
    net = torch.jit.script(torch.nn.Linear(6, 3))
    buf = io.BytesIO()
    torch.jit.save(net.half(), buf)
    (src / "inception.fp16.pt.xz").write_bytes(lzma.compress(buf.getvalue()))
    rng = np.random.default_rng(1)
    (src / "train_128.part0.u8.xz").write_bytes(rng.integers(0, 256, 1500, dtype=np.uint8).tobytes())
    (src / "train.json").write_text(json.dumps({"rows": 3}))
    return src, weights, net


def unpack_dirs(tmp_path):
    return {"state": tmp_path / "state", "site": tmp_path / "site", "data": tmp_path / "data"}


def test_bundles_hold_at_most_their_capacity_and_come_back_whole_in_any_order(tmp_path, files):
    b = bench()
    src, weights, net = files
    capacity = 700
    plan = b.write_bundles(sorted(src.iterdir()), tmp_path / "out", capacity)
    folders = [tmp_path / "out" / f"b{i}" for i in range(1, plan["bundles"] + 1)]
    total = sum(p.stat().st_size for p in src.iterdir())
    assert plan["bundles"] == -(-total // capacity), "no bundle is left part empty but the last"
    for folder in folders:
        pieces = [p for p in folder.iterdir() if p.name != "bundle.json"]
        assert sum(p.stat().st_size for p in pieces) <= capacity
    # training's files (packages, MiniLM, data) fill the first bundles; Inception comes last
    last = {e["name"]: max(bundle for bundle, *_ in e["pieces"]) for e in plan["files"]}
    first_inception = min(bundle for e in plan["files"] if e["kind"] == "inception" for bundle, *_ in e["pieces"])
    assert all(last[n] <= first_inception for n in last if not n.startswith("inception"))
    assert "training can start once b1..b" in b.describe(plan)

    dirs = unpack_dirs(tmp_path)
    seen = set()
    for folder in reversed(folders):  # the order of arrival must not matter
        report = b.unpack([folder], **dirs)
        seen |= set(report["installed"])
        for name in report["missing"]:
            assert name not in seen
    assert seen == {p.name for p in src.iterdir()}
    assert b.unpack([folders[0]], **dirs)["installed"] == [], "a file is installed once"

    assert (dirs["site"] / "somepkg" / "__init__.py").read_text().startswith("VALUE = 42")
    got = load_file(str(dirs["site"] / b.MINILM))
    assert got["w"].dtype == torch.float32 and torch.equal(got["w"], weights["w"].half().float())
    assert torch.equal(got["ids"], weights["ids"])
    inception = torch.jit.load(str(dirs["site"] / b.INCEPTION))
    x = torch.randn(4, 6)
    assert next(inception.parameters()).dtype == torch.float32
    torch.testing.assert_close(inception(x), net.float()(x), rtol=0, atol=0)  # `net` was halved in place
    for name in ("train_128.part0.u8.xz", "train.json"):
        assert (dirs["data"] / name).read_bytes() == (src / name).read_bytes()


def test_a_damaged_piece_is_refused_and_what_was_installed_stays(tmp_path, files):
    b = bench()
    src, _, _ = files
    plan = b.write_bundles(sorted(src.iterdir()), tmp_path / "out", 700)
    dirs = unpack_dirs(tmp_path)
    b.unpack([tmp_path / "out" / "b1"], **dirs)
    before = sorted(p.relative_to(tmp_path) for p in dirs["site"].rglob("*"))
    data = next(e for e in plan["files"] if e["name"] == "train_128.part0.u8.xz")
    bundle, offset, _ = data["pieces"][-1]
    piece = tmp_path / "out" / f"b{bundle}" / b.piece_name(data["name"], offset)
    good = piece.read_bytes()
    piece.write_bytes(bytes(255 - x for x in good))
    with pytest.raises(ValueError, match="SHA-256"):
        b.unpack([tmp_path / "out" / f"b{i}" for i in range(2, plan["bundles"] + 1)], **dirs)
    assert not (dirs["data"] / data["name"]).exists()
    assert set(before) <= {p.relative_to(tmp_path) for p in dirs["site"].rglob("*")}, "nothing installed is lost"
    piece.write_bytes(good)  # the bundle carried again
    b.unpack([tmp_path / "out" / f"b{bundle}"], **dirs)
    assert (dirs["data"] / data["name"]).read_bytes() == (src / data["name"]).read_bytes()


def test_bundles_of_two_builds_are_not_mixed(tmp_path, files):
    b = bench()
    src, _, _ = files
    b.write_bundles(sorted(src.iterdir()), tmp_path / "one", 700)
    b.write_bundles(sorted(src.iterdir()), tmp_path / "two", 900)
    with pytest.raises(ValueError, match="another build"):
        b.unpack([tmp_path / "one" / "b1", tmp_path / "two" / "b2"], **unpack_dirs(tmp_path))
    with pytest.raises(ValueError, match="must be positive"):
        b.layout(sorted(src.iterdir()), 0)
    assert b.parse_size("64MiB") == 64 * 2**20 and b.parse_size("3MB") == 3_000_000
