#!/usr/bin/env python
"""The figures of ``docs/RESULTS.md`` from one ``bench/emoji_run.py`` run (after ``bench/emoji_eval.py``).

    python bench/emoji_report.py --run runs/emoji --out docs/images/emoji-run

Reads ``metrics.json`` (FID/KID per evaluation point), ``summary.json`` and each phase's
``<phase>_log.json`` (loss history) and grids, and writes to ``--out``:

- ``fid_vs_gpu_seconds.png``: FID at 128 px against cumulative GPU seconds of training, the
  MDM run (stage 64, then stage 128 grown from it: its points sit after stage 64's seconds)
  beside the single-resolution baseline, with MDM's 64 px FID for reference; and the
  training loss of every phase;
- ``<phase>_grid.jpg``: the last evaluation point's grid of each phase (8 held-out prompts,
  4 seeds each);
- ``table.md``: the table of every point and the claim's numbers, ready to paste.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image


def cumulative(summary: dict, phase: str, gpu_s: float) -> float:
    """GPU seconds since the start of the run that ``phase`` belongs to."""
    return gpu_s + (summary["stage64"]["gpu_s"] if phase == "stage128" else 0.0)


def points(rows: list[dict], phase: str, resolution: int) -> list[dict]:
    """The evaluation points of ``phase`` at ``resolution``, in GPU-time order."""
    return sorted((r for r in rows if r["phase"] == phase and r["resolution"] == resolution), key=lambda r: r["gpu_s"])


def claim(rows: list[dict], summary: dict) -> dict:
    """The paper's claim at equal GPU time: when does MDM reach the baseline's final FID at 128?"""
    base, mdm = points(rows, "baseline128", 128), points(rows, "stage128", 128)
    if not base or not mdm:
        raise SystemExit("metrics.json needs 128 px points of both baseline128 and stage128")
    target = base[-1]["fid"]
    reached = next((cumulative(summary, "stage128", r["gpu_s"]) for r in mdm if r["fid"] <= target), None)
    return {
        "baseline_final_fid": target,
        "baseline_gpu_s": summary["baseline128"]["gpu_s"],
        "mdm_final_fid": mdm[-1]["fid"],
        "mdm_gpu_s": cumulative(summary, "stage128", summary["stage128"]["gpu_s"]),
        "mdm_reaches_baseline_final_at_gpu_s": reached,
    }


def plot(rows: list[dict], summary: dict, logs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [
        ("baseline128", 128, "single-resolution 128 (small-128)", "tab:red", "o-"),
        ("stage128", 128, "MDM 64→128 at 128 px (stage 128)", "tab:blue", "o-"),
        ("stage64", 64, "MDM at 64 px (stage 64)", "tab:blue", "s:"),
        ("stage128", 64, "MDM at 64 px (stage 128)", "tab:cyan", "s:"),
    ]
    for phase, res, label, colour, style in series:
        pts = points(rows, phase, res)
        if pts:
            xs = [cumulative(summary, phase, r["gpu_s"]) for r in pts]
            ax.plot(xs, [r["fid"] for r in pts], style, color=colour, label=label)
    if "stage64" in summary:
        ax.axvline(summary["stage64"]["gpu_s"], color="grey", lw=0.8, ls="--")
        ax.annotate(
            " grow 64→128",
            (summary["stage64"]["gpu_s"], 0.02),
            xycoords=("data", "axes fraction"),
            fontsize=8,
            color="grey",
        )
    ax.set_xlabel("GPU seconds of training (one H200)")
    ax.set_ylabel(f"FID vs {rows[0]['n']} held-out images")
    ax.set_title("FID against GPU time")
    ax.legend(fontsize=8)
    for phase, log in logs.items():
        xs = [cumulative(summary, phase, h["gpu_s"]) for h in log["history"]]
        losses = list(zip(*[h["loss"] for h in log["history"]]))
        for i, ys in enumerate(losses):
            bx.plot(xs, ys, label=f"{phase} loss[{i}]")
    bx.set_xlabel("GPU seconds of training")
    bx.set_ylabel("training loss (per resolution, smallest first)")
    bx.set_yscale("log")
    bx.set_title("training loss")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(rows: list[dict], summary: dict) -> str:
    lines = [
        "| phase | config | GPU s (phase) | GPU s (run) | resolution | FID | KID |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["phase"] != "stage64", r["phase"], r["resolution"], r["gpu_s"])):
        cfg = summary.get(r["phase"], {}).get("config", "?")
        run_s = cumulative(summary, r["phase"], r["gpu_s"])
        lines.append(
            f"| {r['phase']} | {cfg} | {r['gpu_s']} | {run_s:.0f} | {r['resolution']} | {r['fid']:.1f} | {r['kid']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="bench/emoji_run.py --out folder, evaluated")
    p.add_argument("--out", type=Path, required=True, help="folder for the figures and table")
    args = p.parse_args()
    rows = json.loads((args.run / "metrics.json").read_text())
    summary = json.loads((args.run / "summary.json").read_text())
    logs = {ph: json.loads((args.run / ph / f"{ph}_log.json").read_text()) for ph in summary}
    args.out.mkdir(parents=True, exist_ok=True)
    plot(rows, summary, logs, args.out / "fid_vs_gpu_seconds.png")
    for ph, log in logs.items():
        last = log["evals"][-1]["tag"]
        Image.open(args.run / ph / f"{last}_grid.png").convert("RGB").save(args.out / f"{ph}_grid.jpg", quality=88)
        prompts = json.loads((args.run / ph / f"{last}_grid_prompts.json").read_text())
        (args.out / f"{ph}_grid_prompts.json").write_text(json.dumps(prompts, indent=1) + "\n")
    text = table(rows, summary) + "\n" + json.dumps(claim(rows, summary), indent=1) + "\n"
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
