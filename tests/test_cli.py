"""The mdm command line, run as a user runs it."""

import subprocess
import sys

import pytest
from PIL import Image

from mdm.cli import build_parser


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "mdm.cli", *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout + proc.stderr)
    return proc


def test_every_option_is_documented():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest == "help":
                continue
            assert action.help, f"mdm {name} {action.option_strings} has no help text"


def test_sample_writes_every_resolution(trained, tmp_path):
    out = tmp_path / "s"
    run(
        "sample",
        "--checkpoint",
        str(trained["stage64"]),
        "--prompt",
        "rocket, fluent 3d style",
        "--num_samples",
        "2",
        "--steps",
        "3",
        "--out",
        str(out),
        "--device",
        "cpu",
    )
    for r in (32, 64):
        for j in range(2):
            assert Image.open(out / f"sample_{r}px_{j:02d}.png").size == (r, r)
        assert (out / f"sample_{r}px_grid.png").exists()


def test_inpaint_and_edit(trained, tmp_path):
    img = tmp_path / "in.png"
    from mdm.data import to_pil

    to_pil(trained["images"][0]).save(img)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "inp"
    run(
        "inpaint",
        "--checkpoint",
        str(trained["stage64"]),
        "--image",
        str(img),
        "--mask",
        str(tmp_path / "mask.png"),
        "--prompt",
        "fox face, fluent 3d style",
        "--steps",
        "4",
        "--out",
        str(out),
        "--device",
        "cpu",
    )
    names = {p.name for p in out.iterdir()}
    assert {
        "pass0_coarse_fill_32px.png",
        "pass1_upsampled_from_32px.png",
        "pass1_refined_64px.png",
        "inpaint_final_64px_00.png",
        "inpaint_progression.png",
    } <= names
    run(
        "edit",
        "--checkpoint",
        str(trained["stage64"]),
        "--image",
        str(img),
        "--strength",
        "0.5",
        "--steps",
        "4",
        "--resolution",
        "64",
        "--out",
        str(tmp_path / "ed"),
        "--device",
        "cpu",
    )
    assert Image.open(tmp_path / "ed" / "edit_64px_00.png").size == (64, 64)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--resolution", "48"], "not one of the model's resolutions"),
        (["--steps", "0"], "steps must be >= 1"),
    ],
)
def test_bad_requests_fail_with_a_message(trained, tmp_path, args, message):
    proc = run(
        "sample",
        "--checkpoint",
        str(trained["stage64"]),
        "--prompt",
        "x",
        "--out",
        str(tmp_path),
        "--device",
        "cpu",
        *args,
        check=False,
    )
    assert proc.returncode != 0
    assert message in proc.stderr


def test_missing_checkpoint(tmp_path):
    proc = run("sample", "--checkpoint", str(tmp_path / "none"), "--device", "cpu", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
