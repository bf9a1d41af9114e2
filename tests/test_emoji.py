"""The emoji raw image set, on the real npm packages.

The packages are installed once into ``.state/npm`` (as ``make emoji-packages`` does) and
reused; without them and without npm the module fails with npm's message.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import emoji
from pipelines.emoji import (
    PACKAGES,
    STYLES,
    EmojiRecord,
    build_with_ray,
    install_packages,
    iter_emoji,
    render,
    split_of,
    write_raw_set,
)

PREFIX = Path(__file__).resolve().parents[1] / ".state" / "npm"
# Images per style in the pinned packages (Iconify's hidden legacy icons and fluent-3d's
# 16 duplicate spellings left out).
COUNTS = {"noto": 3729, "fluent-flat": 3139, "openmoji": 4495, "fluent-3d": 3375}


@pytest.fixture(scope="module")
def node_modules() -> Path:
    # install_packages reuses .state/npm, else runs npm (which `make test` machines have) and
    # fails with npm's own message when it cannot.
    return install_packages(PREFIX)


@pytest.fixture(scope="module")
def records(node_modules) -> dict[str, list[EmojiRecord]]:
    by_style = defaultdict(list)
    for r in iter_emoji(node_modules):
        by_style[r.style].append(r)
    return by_style


def by_key(records, style: str, sequence: str) -> EmojiRecord:
    found = [r for r in records[style] if r.key == f"{style}-{sequence}"]
    assert found, f"no {style}-{sequence} among the {style} records"
    return found[0]


def decode(png: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.mode == "RGB"
    return np.asarray(img)


def test_installed_packages_are_the_pinned_versions_and_licences(node_modules):
    assert install_packages(PREFIX) == node_modules  # second call: already there, no npm
    for style, spec in PACKAGES.items():
        name, version = emoji._split_spec(spec)
        meta = json.loads((node_modules / name / "package.json").read_text())
        assert (meta["name"], meta["version"], meta["license"]) == (name, version, emoji.LICENSES[style][0])


def test_every_style_lists_its_images_with_captions(records):
    assert {s: len(rs) for s, rs in records.items()} == COUNTS
    for style, rs in records.items():
        keys = [r.key for r in rs]
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
        for r in rs:
            assert r.style == style and r.key.startswith(f"{style}-")
            assert r.concept and r.concept == r.concept.lower()
            assert r.caption == f"{r.concept}, {emoji.STYLE_WORDS[style]} style"


@pytest.mark.parametrize("style", STYLES)
def test_known_emoji_have_shared_concepts(records, style):
    fox = by_key(records, style, "1f98a")
    assert fox.concept == "fox face"
    assert fox.caption == f"fox face, {emoji.STYLE_WORDS[style]} style"
    assert by_key(records, style, "2744").concept == "snowflake"  # fluent-3d's file is 2744-fe0f.webp
    assert by_key(records, style, "1f44d-1f3fd").concept == "thumbs up: medium skin tone"
    assert by_key(records, style, "1f43b-200d-2744").concept == "polar bear"  # a ZWJ sequence
    assert by_key(records, style, "1f3c4-1f3fd-200d-2640").concept == "woman surfing: medium skin tone"


def test_captions_read_like_the_examples(records):
    assert by_key(records, "fluent-3d", "1f98a").caption == "fox face, fluent 3d style"
    assert by_key(records, "fluent-flat", "1f98a").caption == "fox face, fluent flat style"
    assert by_key(records, "openmoji", "1f1e9-1f1ea").caption == "flag: germany, openmoji style"
    # fluent-3d names subdivision flags without the closing CANCEL TAG; the key has it
    england = "1f3f4-e0067-e0062-e0065-e006e-e0067-e007f"
    assert by_key(records, "fluent-3d", england).concept == by_key(records, "openmoji", england).concept


def test_the_same_codepoints_mean_the_same_concept_in_every_style(records):
    concepts = defaultdict(set)
    for style, rs in records.items():
        for r in rs:
            concepts[r.key[len(style) + 1 :]].add(r.concept)
    assert all(len(c) == 1 for c in concepts.values())
    styles_of = defaultdict(set)
    for style, rs in records.items():
        for r in rs:
            styles_of[r.concept].add(style)
    assert sum(len(s) == 4 for s in styles_of.values()) > 3000  # most concepts are drawn in all four


def test_limit_per_style_is_a_fixed_sample_shared_across_styles(node_modules):
    first = list(iter_emoji(node_modules, limit_per_style=5))
    assert first == list(iter_emoji(node_modules, limit_per_style=5))
    assert [r.style for r in first] == [s for s in STYLES for _ in range(5)]
    concepts = {s: {r.concept for r in first if r.style == s} for s in STYLES}
    assert len(set.intersection(*concepts.values())) >= 2  # mostly the same emoji in every style
    assert list(iter_emoji(node_modules, styles=["openmoji"], limit_per_style=0)) == []
    with pytest.raises(ValueError, match="unknown style"):
        list(iter_emoji(node_modules, styles=["emojione"]))


@pytest.mark.parametrize("style", STYLES)
def test_render_is_a_white_backed_rgb_png_of_the_asked_size(records, node_modules, style):
    img = decode(render(by_key(records, style, "1f98a"), node_modules, size=64))
    assert img.shape == (64, 64, 3)
    for corner in (img[0, 0], img[0, -1], img[-1, 0], img[-1, -1]):
        assert tuple(corner) == (255, 255, 255)
    drawn = (img < 240).any(axis=2).mean()
    assert 0.15 < drawn < 0.95, f"{style} fox covers {drawn:.0%} of the image"
    assert img[..., 0].mean() > img[..., 2].mean()  # a fox is orange, not blue


def test_render_keeps_non_square_icons_square_and_bitmaps_at_native_size(records, node_modules):
    keycap = by_key(records, "fluent-flat", "0035-20e3")  # a 32x33 Iconify icon
    img = decode(render(keycap, node_modules, size=66))
    assert img.shape == (66, 66, 3) and tuple(img[0, 0]) == (255, 255, 255)
    native = decode(render(by_key(records, "fluent-3d", "1f98a"), node_modules, size=256))
    assert native.shape == (256, 256, 3)


def test_split_is_fixed_by_concept_and_shared_across_styles(records):
    def record(concept: str, style: str = "noto") -> EmojiRecord:
        return EmojiRecord(f"{style}-x", style, concept, f"{concept}, {style} style", "x")

    # pinned: a change of hash would silently reshuffle every split
    assert [split_of(record(c), 0.5) for c in ("fox face", "red apple", "penguin", "rocket")] == [
        "train",
        "heldout",
        "heldout",
        "train",
    ]
    assert {split_of(record("penguin", s), 0.5) for s in STYLES} == {"heldout"}
    assert split_of(record("waving hand: dark skin tone")) == split_of(record("waving hand"))
    assert split_of(record("fox face"), 0.0) == "train" and split_of(record("fox face"), 1.0) == "heldout"
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_of(record("fox face"), 1.5)

    splits = defaultdict(set)
    for rs in records.values():
        for r in rs:
            splits[r.concept].add(split_of(r))
    assert all(len(s) == 1 for s in splits.values())
    held = sum(s == {"heldout"} for s in splits.values()) / len(splits)
    assert 0.01 < held < 0.04


def test_write_raw_set_writes_png_caption_pairs_and_licences(node_modules, tmp_path):
    sample = list(iter_emoji(node_modules, limit_per_style=3))
    out = tmp_path / "raw"
    summary = write_raw_set(sample, node_modules, f"file://{out}", size=64, heldout_fraction=0.5)
    assert summary["written"] == 12 and summary["failed"] == {}
    assert summary["train"] + summary["heldout"] == 12
    for r in sample:
        split = split_of(r, 0.5)
        assert decode((out / split / f"{r.key}.png").read_bytes()).shape == (64, 64, 3)
        assert (out / split / f"{r.key}.txt").read_text() == r.caption
    for split in ("train", "heldout"):
        assert len(list((out / split).glob("*.png"))) == summary[split]
    licences = (out / "LICENSES.md").read_text()
    for style, spec in PACKAGES.items():
        name, version = emoji._split_spec(spec)
        assert name in licences and version in licences and emoji.LICENSES[style][0] in licences


def test_a_broken_record_is_counted_not_raised(node_modules, tmp_path):
    good = next(iter_emoji(node_modules, styles=["fluent-3d"], limit_per_style=1))
    missing = EmojiRecord("fluent-3d-0", "fluent-3d", "nothing", "nothing, fluent 3d style", "no/such/file.webp")
    no_icon = EmojiRecord("noto-0", "noto", "nothing", "nothing, noto style", "@iconify-json/noto/icons.json#no-such")
    alien = EmojiRecord("emojione-0", "emojione", "nothing", "nothing, emojione style", good.source)
    summary = write_raw_set([missing, good, no_icon, good, alien], node_modules, str(tmp_path), size=32)
    assert summary["written"] == 1
    assert set(summary["failed"]) == {"fluent-3d-0", "noto-0", good.key, "emojione-0"}
    assert "unknown style" in summary["failed"]["emojione-0"]
    assert "FileNotFoundError" in summary["failed"]["fluent-3d-0"]
    assert "no-such" in summary["failed"]["noto-0"]
    assert "duplicate key" in summary["failed"][good.key]
    assert "| fluent-3d |" in (tmp_path / "LICENSES.md").read_text()


def test_the_ray_batch_function_renders_like_the_plain_writer(node_modules, tmp_path):
    """build_with_ray's driver rows and per-batch function, run here without Ray."""
    import pandas as pd

    items = emoji._ray_items(node_modules, limit_per_style=1, heldout_fraction=0.5)
    assert [i["key"] for i in items] == [r.key for r in iter_emoji(node_modules, limit_per_style=1)]
    assert all(i["data"] and not i["error"] for i in items)  # the source bytes travel with the row
    items[0] = {**items[0], "data": b"", "error": "FileNotFoundError: gone"}
    items[1] = {**items[1], "data": b"not an image"}
    out = emoji._render_write_batch(pd.DataFrame(items), str(tmp_path), size=32)
    assert list(out.columns) == ["key", "style", "split", "error"] and len(out) == 4
    assert out["error"].tolist()[0] == "FileNotFoundError: gone"
    assert out["error"].tolist()[1].startswith("UnidentifiedImageError")
    for item, error in zip(items[2:], out["error"].tolist()[2:]):
        assert error == ""
        assert decode((tmp_path / item["split"] / f"{item['key']}.png").read_bytes()).shape == (32, 32, 3)
        assert (tmp_path / item["split"] / f"{item['key']}.txt").read_text() == item["caption"]


def test_install_packages_says_what_is_wrong(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="npm is not on PATH"):
        install_packages(tmp_path)

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/npm")
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="npm error code E404\nnpm error 404 Not Found")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(RuntimeError, match="(?s)exit code 1.*E404"):
        install_packages(tmp_path)


def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        emoji.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--size", "--limit_per_style", "--heldout_fraction", "--prefix", "--no-ray"):
        assert option in text


def test_cli_without_ray_writes_and_summarises(node_modules, tmp_path, capsys):
    summary = emoji.main(
        ["--out", str(tmp_path), "--size", "32", "--limit_per_style", "1", "--prefix", str(PREFIX), "--no-ray"]
    )
    assert summary["written"] == 4 and not summary["failed"]
    assert "wrote 4 images" in capsys.readouterr().out


@pytest.mark.ray
def test_build_with_ray_matches_the_plain_writer(ray_session, node_modules, tmp_path):
    summary = build_with_ray(node_modules, str(tmp_path / "ray"), size=32, limit_per_style=2, heldout_fraction=0.5)
    plain = write_raw_set(
        iter_emoji(node_modules, limit_per_style=2), node_modules, str(tmp_path / "plain"), 32, heldout_fraction=0.5
    )
    assert summary == plain and summary["written"] == 8
    for split in ("train", "heldout"):
        ray_files = sorted(p.name for p in (tmp_path / "ray" / split).iterdir())
        assert ray_files == sorted(p.name for p in (tmp_path / "plain" / split).iterdir())
    assert (tmp_path / "ray" / "LICENSES.md").read_text() == (tmp_path / "plain" / "LICENSES.md").read_text()
