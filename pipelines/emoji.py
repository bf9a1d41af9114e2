"""The emoji raw image set: four real, openly licensed emoji styles, captioned.

Four npm packages draw the same Unicode emoji in four styles (style: package, licence, images):

- ``noto``: ``@iconify-json/noto@1.2.9``, Apache-2.0, SVG bodies in one Iconify ``icons.json``
- ``fluent-flat``: ``@iconify-json/fluent-emoji-flat@1.2.6``, MIT, the same
- ``openmoji``: ``openmoji@17.0.0``, CC-BY-SA-4.0, ``color/svg/<HEX>.svg`` files
- ``fluent-3d``: ``@lobehub/fluent-emoji-3d@1.1.0``, MIT, ``assets/<hex>.webp`` files, 256x256

Every image is identified by its codepoint sequence, normalised (lowercase hex joined by
``-``, variation selectors U+FE0E/U+FE0F dropped, tag sequences closed by U+E007F), so the
same emoji has the same sequence in every style. Its *concept* is a function of that
sequence alone, hence shared by all styles: the Unicode name (``unicodedata``) for a
single codepoint, else the OpenMoji annotation (CLDR name), else the Iconify icon name
(``fox-face`` -> ``fox face``). The caption is ``"<concept>, <style words> style"``.

The raw set written by :func:`write_raw_set` / :func:`build_with_ray` is
``OUT/<split>/<key>.png`` (RGB, alpha composited onto white) plus ``OUT/<split>/<key>.txt``
(the caption) and ``OUT/LICENSES.md``; the split (``train`` / ``heldout``) hashes the
concept, so a concept is held out in all four styles at once.

Command line: ``python -m pipelines.emoji --out URI`` (``--help`` lists the options).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import time
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mdm.storage import url_to_fs

__all__ = [
    "PACKAGES",
    "STYLES",
    "STYLE_WORDS",
    "LICENSES",
    "EmojiRecord",
    "install_packages",
    "iter_emoji",
    "render",
    "split_of",
    "write_raw_set",
    "build_with_ray",
    "main",
]

PACKAGES: dict[str, str] = {
    "noto": "@iconify-json/noto@1.2.9",
    "fluent-flat": "@iconify-json/fluent-emoji-flat@1.2.6",
    "openmoji": "openmoji@17.0.0",
    "fluent-3d": "@lobehub/fluent-emoji-3d@1.1.0",
}
STYLES: tuple[str, ...] = tuple(PACKAGES)

# The words a caption uses for each style: "fox face, fluent 3d style".
STYLE_WORDS: dict[str, str] = {
    "noto": "noto",
    "fluent-flat": "fluent flat",
    "openmoji": "openmoji",
    "fluent-3d": "fluent 3d",
}
# Licence and attribution of each pinned package, for LICENSES.md.
LICENSES: dict[str, tuple[str, str]] = {
    "noto": ("Apache-2.0", "Noto Emoji by Google Inc., https://github.com/googlefonts/noto-emoji"),
    "fluent-flat": ("MIT", "Fluent Emoji (flat) by Microsoft Corporation, https://github.com/microsoft/fluentui-emoji"),
    "openmoji": (
        "CC-BY-SA-4.0",
        "OpenMoji, the open-source emoji and icon project, https://openmoji.org "
        "(share adaptations under the same licence)",
    ),
    "fluent-3d": (
        "MIT",
        "Fluent Emoji (3D) by Microsoft Corporation, packaged by LobeHub, https://github.com/lobehub/fluent-emoji",
    ),
}

_NPM_TIMEOUT_S = 900
_VARIATION_SELECTORS = (0xFE0E, 0xFE0F)
_BLACK_FLAG, _TAG_FIRST, _TAG_LAST, _CANCEL_TAG = 0x1F3F4, 0xE0020, 0xE007E, 0xE007F


def _split_spec(spec: str) -> tuple[str, str]:
    """``"@scope/name@1.2.3"`` -> ``("@scope/name", "1.2.3")``."""
    name, _, version = spec.rpartition("@")
    return name, version


def _package_dir(node_modules: Path, style: str) -> Path:
    return node_modules / _split_spec(PACKAGES[style])[0]


def _installed_version(node_modules: Path, style: str) -> str | None:
    try:
        return json.loads((_package_dir(node_modules, style) / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def install_packages(prefix: str | Path) -> Path:
    """Install the four pinned emoji packages under ``prefix``; return ``prefix/node_modules``.

    Runs ``npm install --no-audit --no-fund --prefix PREFIX <the four pinned specs>`` unless
    all four are already there at their pinned versions. Raises ``RuntimeError`` if npm is
    missing, fails (the tail of its stderr is in the message) or leaves a package missing.
    """
    prefix = Path(prefix).expanduser().resolve()
    node_modules = prefix / "node_modules"
    missing = [s for s in STYLES if _installed_version(node_modules, s) != _split_spec(PACKAGES[s])[1]]
    if not missing:
        return node_modules
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            "npm is not on PATH, and it is needed to install the emoji packages "
            f"({', '.join(PACKAGES.values())}); install Node.js and npm (e.g. `apt-get install npm`) and retry"
        )
    prefix.mkdir(parents=True, exist_ok=True)
    cmd = [npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix), *PACKAGES.values()]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_NPM_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(
            f"`{' '.join(cmd)}` did not finish in {_NPM_TIMEOUT_S} s; is the npm registry reachable?"
        ) from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
        raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}:\n{tail}")
    still_missing = [PACKAGES[s] for s in STYLES if _installed_version(node_modules, s) != _split_spec(PACKAGES[s])[1]]
    if still_missing:
        raise RuntimeError(f"npm install succeeded but {', '.join(still_missing)} is not in {node_modules}")
    return node_modules


@dataclass(frozen=True)
class EmojiRecord:
    """One image of the raw set.

    ``key`` is ``"<style>-<codepoints>"`` (e.g. ``"noto-1f98a"``); ``concept`` depends only on
    the codepoints, so it is the same in every style; ``caption`` is what the model is
    conditioned on; ``source`` is the image file, or ``"<icons.json>#<icon name>"`` for an
    Iconify body, relative to ``node_modules`` (an absolute path also works).
    """

    key: str
    style: str
    concept: str
    caption: str
    source: str


# --- codepoints and concepts -------------------------------------------------------------


def _codepoints(sequence: str) -> tuple[int, ...]:
    """Normalise a codepoint sequence spelled as hex (``"2744-FE0F"``, ``"1f3f4-e0067_e0062..."``).

    Drops variation selectors and closes a tag sequence (subdivision flag) with CANCEL TAG,
    which fluent-3d's file names leave out.
    """
    cps = tuple(int(p, 16) for p in re.split(r"[-_\s]+", sequence.strip()) if p)
    cps = tuple(c for c in cps if c not in _VARIATION_SELECTORS)
    if len(cps) > 1 and cps[0] == _BLACK_FLAG and all(_TAG_FIRST <= c <= _TAG_LAST for c in cps[1:]):
        cps += (_CANCEL_TAG,)
    if not cps:
        raise ValueError(f"no codepoints in {sequence!r}")
    return cps


def _sequence_id(cps: Sequence[int]) -> str:
    return "-".join(f"{c:04x}" for c in cps)


def _normalise_name(name: str) -> str:
    return " ".join(name.lower().split())


@functools.lru_cache(maxsize=8)
def _load_json(path: str) -> Any:
    """A parsed JSON file, cached: Iconify's ``icons.json`` is 9-25 MB."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _iconify_chars(node_modules: Path, style: str) -> dict[str, str]:
    """Codepoint sequence id -> icon name, from the set's ``chars.json`` (its visible icons)."""
    chars = _load_json(str(_package_dir(node_modules, style) / "chars.json"))
    return {_sequence_id(_codepoints(seq)): name for seq, name in chars.items()}


@functools.lru_cache(maxsize=4)
def _names(node_modules: str) -> dict[str, str]:
    """Sequence id -> concept name from every installed name source, best source first.

    OpenMoji's annotations (CLDR names) beat the Iconify icon names of noto, then
    fluent-flat. A style's images never decide its own concepts, so all styles agree.
    """
    root = Path(node_modules)
    names: dict[str, str] = {}
    openmoji_json = _package_dir(root, "openmoji") / "data" / "openmoji.json"
    if openmoji_json.is_file():
        for entry in _load_json(str(openmoji_json)):
            names.setdefault(_sequence_id(_codepoints(entry["hexcode"])), _normalise_name(entry["annotation"]))
    for style in ("noto", "fluent-flat"):
        if (_package_dir(root, style) / "chars.json").is_file():
            for seq, icon in _iconify_chars(root, style).items():
                names.setdefault(seq, _normalise_name(icon.replace("-", " ")))
    return names


def _concept(cps: tuple[int, ...], names: dict[str, str]) -> str:
    if len(cps) == 1 and (name := unicodedata.name(chr(cps[0]), "")):
        return _normalise_name(name)
    seq = _sequence_id(cps)
    if seq in names:
        return names[seq]
    # No source names the sequence: spell out its parts (ZWJ dropped), else the hex itself.
    parts = [unicodedata.name(chr(c), "") for c in cps if c != 0x200D]
    return _normalise_name(" ".join(parts)) if all(parts) else seq


def _caption(concept: str, style: str) -> str:
    return f"{concept}, {STYLE_WORDS[style]} style"


# --- listing -----------------------------------------------------------------------------


def _sources(node_modules: Path, style: str) -> dict[str, str]:
    """Sequence id -> source (relative to node_modules) of every image of one style."""
    pkg = _package_dir(node_modules, style)
    if not pkg.is_dir():
        raise FileNotFoundError(
            f"{PACKAGES[style]} is not installed in {node_modules}; run install_packages() or `make emoji-packages`"
        )
    rel = pkg.relative_to(node_modules).as_posix()
    if style in ("noto", "fluent-flat"):
        # chars.json lists exactly the visible icons; hidden ones are legacy names without codepoints.
        return {seq: f"{rel}/icons.json#{icon}" for seq, icon in _iconify_chars(node_modules, style).items()}
    folder, suffix = ("color/svg", ".svg") if style == "openmoji" else ("assets", ".webp")
    # fluent-3d draws 16 emoji twice under two spellings of one sequence ("26a7" and
    # "26a7-fe0f", "39-fe0f-20e3" and "0039-fe0f-20e3"): keep the fully qualified,
    # zero-padded spelling, the one Unicode's emoji data uses.
    found: dict[str, tuple[tuple[int, int], str]] = {}
    for path in sorted((pkg / folder).glob(f"*{suffix}")):
        stem = path.name[: -len(suffix)]
        seq = _sequence_id(_codepoints(stem))
        rank = (stem.lower().count("fe0f"), len(stem))
        if seq not in found or rank > found[seq][0]:
            found[seq] = (rank, f"{rel}/{folder}/{path.name}")
    return {seq: src for seq, (_, src) in found.items()}


def _sample_rank(concept: str) -> bytes:
    return hashlib.sha256(b"mdm-emoji-sample:" + concept.encode("utf-8")).digest()


def iter_emoji(
    node_modules: str | Path,
    styles: Sequence[str] = STYLES,
    limit_per_style: int | None = None,
) -> Iterator[EmojiRecord]:
    """Every emoji of ``styles`` in ``node_modules``, style by style, sorted by key.

    ``limit_per_style=N`` keeps N records per style: those whose concepts come first in a
    fixed hash order, so the sample is deterministic, spread over all kinds of emoji and
    mostly the same concepts in every style.
    """
    unknown = [s for s in styles if s not in PACKAGES]
    if unknown:
        raise ValueError(f"unknown style(s) {unknown}; choose from {list(STYLES)}")
    if limit_per_style is not None and limit_per_style < 0:
        raise ValueError(f"limit_per_style must be >= 0 or None, got {limit_per_style}")
    root = Path(node_modules).expanduser().resolve()
    names = _names(str(root))
    for style in styles:
        records = []
        for seq, source in _sources(root, style).items():
            concept = _concept(_codepoints(seq), names)
            records.append(EmojiRecord(f"{style}-{seq}", style, concept, _caption(concept, style), source))
        if limit_per_style is not None:
            records = sorted(records, key=lambda r: (_sample_rank(r.concept), r.key))[:limit_per_style]
        yield from sorted(records, key=lambda r: r.key)


# --- rendering ---------------------------------------------------------------------------


def _iconify_svg(icons_json: Path, icon: str) -> bytes:
    """An Iconify icon body wrapped into a standalone, square SVG document."""
    data = _load_json(str(icons_json))
    if icon not in data.get("icons", {}):
        raise KeyError(f"icon {icon!r} is not in {icons_json}")
    entry = data["icons"][icon]

    def attr(name: str, default: float) -> float:
        return float(entry.get(name, data.get(name, default)))

    left, top, width, height = attr("left", 0), attr("top", 0), attr("width", 16), attr("height", 16)
    side = max(width, height)  # a few icons are 32x33: centre them in a square view box
    view_box = f"{left - (side - width) / 2:g} {top - (side - height) / 2:g} {side:g} {side:g}"
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
        f'viewBox="{view_box}" width="{side:g}" height="{side:g}">{entry["body"]}</svg>'
    ).encode()


def _read_source(record: EmojiRecord, node_modules: str | Path) -> bytes:
    """The bytes to rasterise: an SVG document, or the encoded bitmap file."""
    path, _, icon = record.source.partition("#")
    full = Path(node_modules).expanduser() / path
    if icon:
        return _iconify_svg(full.resolve(), icon)
    if not full.is_file():
        raise FileNotFoundError(f"no image file at {full}")
    return full.read_bytes()


def _rasterise(data: bytes, size: int) -> bytes:
    """SVG or bitmap bytes -> ``size`` x ``size`` RGB PNG bytes, alpha composited onto white."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):  # XML: an SVG document
        import cairosvg

        img = Image.open(io.BytesIO(cairosvg.svg2png(bytestring=data, output_width=size, output_height=size)))
    else:
        img = Image.open(io.BytesIO(data))
    img.load()
    rgba = img.convert("RGBA")
    if rgba.size != (size, size):
        rgba = rgba.resize((size, size), Image.Resampling.LANCZOS)
    rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return out.getvalue()


def render(record: EmojiRecord, node_modules: str | Path, size: int = 512) -> bytes:
    """The record's image as PNG bytes: RGB, ``size`` x ``size``, alpha composited onto white.

    SVGs (Iconify bodies, OpenMoji files) are rasterised by cairosvg at ``size``; bitmaps
    (fluent-3d's 256x256 WebP) are resized with Lanczos when ``size`` differs.
    """
    return _rasterise(_read_source(record, node_modules), size)


# --- splits and writing ------------------------------------------------------------------


_SKIN_TONE = re.compile(r"\b(?:medium-light|medium-dark|light|medium|dark) skin tone(?:, |$)")


def split_of(record: EmojiRecord, heldout_fraction: float = 0.02) -> str:
    """``"heldout"`` or ``"train"``, fixed by a SHA-256 hash of the record's concept.

    The same concept lands in the same split in every style, on every machine and run.
    Skin tones are left out of the hash ("waving hand: dark skin tone" -> "waving hand"),
    so a held-out emoji is not seen in training in another skin tone.
    """
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    concept = _SKIN_TONE.sub("", record.concept).strip(" :,") or record.concept
    digest = hashlib.sha256(concept.encode("utf-8")).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") < heldout_fraction * 2**64 else "train"


def _licenses_md(styles: Iterable[str]) -> str:
    """LICENSES.md naming the package, version and licence of every style in the set."""
    lines = [
        "# Licences of the emoji raw set",
        "",
        "Each image comes from one of these npm packages; its key starts with the style.",
        "",
        "| style | package | version | licence | attribution |",
        "|---|---|---|---|---|",
    ]
    for style in sorted(set(styles), key=STYLES.index):
        name, version = _split_spec(PACKAGES[style])
        licence, attribution = LICENSES[style]
        lines.append(f"| {style} | `{name}` | {version} | {licence} | {attribution} |")
    return "\n".join(lines) + "\n"


def _summary(results: Iterable[tuple[str, str, str]]) -> dict:
    """(key, split, error) rows -> the summary dict of write_raw_set / build_with_ray."""
    summary: dict[str, Any] = {"written": 0, "train": 0, "heldout": 0, "failed": {}}
    for key, split, error in results:
        if error:
            summary["failed"][key] = error
        else:
            summary["written"] += 1
            summary[split] += 1
    return summary


def _prepare_out(out_uri: str, splits: Iterable[str]) -> tuple[Any, str]:
    fs, root = url_to_fs(out_uri)
    root = root.rstrip("/")
    for split in splits:
        fs.makedirs(f"{root}/{split}", exist_ok=True)
    return fs, root


def write_raw_set(
    records: Iterable[EmojiRecord],
    node_modules: str | Path,
    out_uri: str,
    size: int = 512,
    heldout_fraction: float = 0.02,
) -> dict:
    """Render ``records`` into the raw set at ``out_uri``, in this process (no Ray).

    Writes ``OUT/<split>/<key>.png`` and ``OUT/<split>/<key>.txt`` (the caption) and
    ``OUT/LICENSES.md``; ``out_uri`` is a local path, ``file://`` or ``s3://`` URI. A record
    that cannot be read or rendered (or repeats an earlier key) is reported under
    ``"failed"`` with its reason; errors of the destination itself are raised.

    Returns ``{"written": n, "train": a, "heldout": b, "failed": {key: reason}}``.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    fs, root = _prepare_out(out_uri, ("train", "heldout"))
    rows, seen, styles = [], set(), set()
    for record in records:
        split = split_of(record, heldout_fraction)
        if record.style not in PACKAGES:
            rows.append((record.key, split, f"unknown style {record.style!r}; choose from {list(STYLES)}"))
            continue
        if record.key in seen:
            rows.append((record.key, split, "duplicate key: an earlier record was written under it"))
            continue
        seen.add(record.key)
        try:
            png = render(record, node_modules, size)
        except Exception as e:  # noqa: BLE001 - one bad image must not stop the set
            rows.append((record.key, split, f"{type(e).__name__}: {e}"))
            continue
        fs.pipe_file(f"{root}/{split}/{record.key}.png", png)
        fs.pipe_file(f"{root}/{split}/{record.key}.txt", record.caption.encode("utf-8"))
        styles.add(record.style)
        rows.append((record.key, split, ""))
    fs.pipe_file(f"{root}/LICENSES.md", _licenses_md(styles).encode("utf-8"))
    return _summary(rows)


def _render_write_batch(batch: Any, out_uri: str, size: int) -> Any:
    """Ray Data UDF (pandas batches): render and write each row; one (key, split, error) row out."""
    import pandas as pd

    fs, root = _prepare_out(out_uri, set(batch["split"]))  # also on nodes the driver's mkdir missed
    errors = []
    for row in batch.itertuples(index=False):
        if row.error:
            errors.append(row.error)
            continue
        try:
            png = _rasterise(row.data, size)
        except Exception as e:  # noqa: BLE001 - one bad image must not stop the set
            errors.append(f"{type(e).__name__}: {e}")
            continue
        fs.pipe_file(f"{root}/{row.split}/{row.key}.png", png)
        fs.pipe_file(f"{root}/{row.split}/{row.key}.txt", row.caption.encode("utf-8"))
        errors.append("")
    return pd.DataFrame(
        {
            "key": batch["key"].tolist(),
            "style": batch["style"].tolist(),
            "split": batch["split"].tolist(),
            "error": errors,
        }
    )


def _ray_items(node_modules: str | Path, limit_per_style: int | None, heldout_fraction: float) -> list[dict[str, Any]]:
    """The rows build_with_ray hands to Ray Data: each record, its split and its source bytes.

    A source that cannot be read keeps empty ``data`` and its reason in ``error``.
    """
    items = []
    for record in iter_emoji(node_modules, limit_per_style=limit_per_style):
        item = {**asdict(record), "split": split_of(record, heldout_fraction), "data": b"", "error": ""}
        try:
            item["data"] = _read_source(record, node_modules)
        except Exception as e:  # noqa: BLE001 - reported like a render failure
            item["error"] = f"{type(e).__name__}: {e}"
        items.append(item)
    return items


def build_with_ray(
    node_modules: str | Path,
    out_uri: str,
    size: int = 512,
    limit_per_style: int | None = None,
    heldout_fraction: float = 0.02,
) -> dict:
    """:func:`write_raw_set` of every style, rendered in parallel by Ray Data.

    The driver lists the records and reads their source bytes (about 80 MB for all four
    styles), so workers on other nodes need no ``node_modules``, only access to
    ``out_uri``. Ray Data's progress bars show the rendering. Returns the same summary.
    """
    import ray

    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    fs, root = _prepare_out(out_uri, ("train", "heldout"))
    items = _ray_items(node_modules, limit_per_style, heldout_fraction)
    if not items:
        fs.pipe_file(f"{root}/LICENSES.md", _licenses_md(()).encode("utf-8"))
        return _summary(())
    results = (
        ray.data.from_items(items)
        .map_batches(
            _render_write_batch,
            batch_size=32,
            batch_format="pandas",
            fn_kwargs={"out_uri": out_uri, "size": size},
        )
        .to_pandas()
    )
    rows = list(zip(results["key"], results["split"], results["error"]))
    written_styles = set(results.loc[results["error"] == "", "style"])
    fs.pipe_file(f"{root}/LICENSES.md", _licenses_md(written_styles).encode("utf-8"))
    return _summary(rows)


# --- command line ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    """``python -m pipelines.emoji --out URI``: install the packages and write the raw set."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.emoji",
        description="Write the emoji raw image set (noto, fluent-flat, openmoji and fluent-3d styles): "
        "OUT/<train|heldout>/<key>.png + <key>.txt (caption) and OUT/LICENSES.md. "
        "The npm packages are installed first if missing (needs npm).",
    )
    parser.add_argument(
        "--out", required=True, help="where to write the set: a local path, file:///abs/path or s3://bucket/prefix"
    )
    parser.add_argument("--size", type=int, default=512, help="side of the square PNGs in pixels (default 512)")
    parser.add_argument(
        "--limit_per_style",
        type=int,
        default=None,
        help="keep only N images per style, a fixed sample spread over all concepts (default: all)",
    )
    parser.add_argument(
        "--heldout_fraction",
        type=float,
        default=0.02,
        help="fraction of concepts held out in every style, written under heldout/ (default 0.02)",
    )
    parser.add_argument(
        "--prefix",
        default=".state/npm",
        help="npm prefix holding (or to receive) the packages in node_modules/ (default .state/npm)",
    )
    parser.add_argument(
        "--no-ray",
        action="store_true",
        help="render in this process instead of with Ray Data (fine for small sets)",
    )
    args = parser.parse_args(argv)
    if args.size < 1:
        parser.error(f"--size must be >= 1, got {args.size}")
    if args.limit_per_style is not None and args.limit_per_style < 0:
        parser.error(f"--limit_per_style must be >= 0, got {args.limit_per_style}")
    if not 0.0 <= args.heldout_fraction <= 1.0:
        parser.error(f"--heldout_fraction must be in [0, 1], got {args.heldout_fraction}")

    node_modules = install_packages(args.prefix)
    start = time.perf_counter()
    if args.no_ray:
        records = iter_emoji(node_modules, limit_per_style=args.limit_per_style)
        summary = write_raw_set(records, node_modules, args.out, args.size, args.heldout_fraction)
    else:
        summary = build_with_ray(node_modules, args.out, args.size, args.limit_per_style, args.heldout_fraction)
    elapsed = time.perf_counter() - start
    failed = summary["failed"]
    print(
        f"wrote {summary['written']} images ({summary['train']} train, {summary['heldout']} heldout) "
        f"at {args.size}px to {args.out} in {elapsed:.1f} s; {len(failed)} failed"
    )
    for key, reason in list(failed.items())[:10]:
        print(f"  failed {key}: {reason}", file=sys.stderr)
    if len(failed) > 10:
        print(f"  ... and {len(failed) - 10} more", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
