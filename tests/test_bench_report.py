"""bench/emoji_report.py: the claim's arithmetic and the figures of docs/RESULTS.md."""

import json
import sys

from conftest import load_module
from PIL import Image


def load_report():
    return load_module("bench/emoji_report.py", "bench_emoji_report")


def point(phase, secs, res, fid):
    return {"phase": phase, "gpu_s": secs, "resolution": res, "n": 8, "fid": fid, "kid": fid / 1000, "kid_std": 0.0}


SUMMARY = {
    "stage64": {"config": "small-64", "gpu_s": 100.0},
    "stage128": {"config": "small-64-128", "gpu_s": 100.0},
    "baseline128": {"config": "small-128", "gpu_s": 200.0},
}


def test_claim_counts_stage64_seconds_before_stage128():
    report = load_report()
    rows = [
        point("stage64", 100, 64, 90.0),
        point("stage128", 50, 128, 70.0),  # run second 150: not yet at the baseline's final 60
        point("stage128", 80, 128, 55.0),  # run second 180: first point at or below it
        point("stage128", 100, 128, 50.0),
        point("stage128", 100, 64, 40.0),  # a 64 px point must not count for the 128 px claim
        point("baseline128", 100, 128, 80.0),
        point("baseline128", 200, 128, 60.0),
    ]
    result = report.claim(rows, SUMMARY)
    assert result["baseline_final_fid"] == 60.0
    assert result["mdm_final_fid"] == 50.0
    assert result["mdm_reaches_baseline_final_at_gpu_s"] == 180.0
    assert result["mdm_gpu_s"] == 200.0


def test_claim_says_when_mdm_never_reaches_the_baseline():
    report = load_report()
    rows = [point("stage128", 100, 128, 70.0), point("stage128", 100, 64, 10.0), point("baseline128", 200, 128, 60.0)]
    assert report.claim(rows, SUMMARY)["mdm_reaches_baseline_final_at_gpu_s"] is None


def test_report_writes_figure_grids_and_table(tmp_path, monkeypatch):
    run, out = tmp_path / "run", tmp_path / "out"
    rows = []
    for phase, res_list, last in [("stage64", [64], 100), ("stage128", [64, 128], 100), ("baseline128", [128], 200)]:
        (run / phase).mkdir(parents=True)
        tag = f"{phase}_{last}s"
        Image.new("RGB", (16, 16), (200, 10, 10)).save(run / phase / f"{tag}_grid.png")
        (run / phase / f"{tag}_grid_prompts.json").write_text(json.dumps(["a fox, noto style"]))
        log = {"history": [{"gpu_s": 50.0, "loss": [0.5] * len(res_list)}, {"gpu_s": float(last), "loss": [0.2] * len(res_list)}],
               "evals": [{"tag": tag}]}  # fmt: skip
        (run / phase / f"{phase}_log.json").write_text(json.dumps(log))
        rows += [point(phase, last, r, 100.0 - r / 10) for r in res_list]
    (run / "metrics.json").write_text(json.dumps(rows))
    (run / "summary.json").write_text(json.dumps(SUMMARY))
    monkeypatch.setattr(sys, "argv", ["emoji_report.py", "--run", str(run), "--out", str(out)])
    load_report().main()
    assert Image.open(out / "fid_vs_gpu_seconds.png").size[0] > 500
    assert Image.open(out / "stage128_grid.jpg").getpixel((8, 8))[0] > 150
    table = (out / "table.md").read_text()
    # stage128's point sits after stage64's 100 s in the run column
    assert "| stage128 | small-64-128 | 100 | 200 | 128 |" in table
