"""Sample-quality metrics: the Fréchet distance, KID, Inception features, `mdm eval`, jobs/evaluate.py.

Fast and CPU-only: the Inception net sees about 100 images in the whole file.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from mdm.data import demo_images
from mdm.evaluation import (
    InceptionFeatures,
    caption_consistency,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    kid_from_features,
    real_pyramid,
    to_uint8,
)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


# --------------------------------------------------------------------------- Fréchet distance
def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    closed = float(((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum())
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(closed, rel=1e-10)


def test_frechet_distance_agrees_with_scipy_sqrtm_on_full_covariances():
    rng = np.random.default_rng(1)
    d = 32
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T / d + 0.1 * np.eye(d), b @ b.T / d + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    # symmetric, and zero for identical Gaussians
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) < 1e-9 * np.trace(s1)


def test_frechet_distance_is_exact_for_rank_deficient_covariances():
    """Fewer samples than dimensions (every small FID): the sqrt of S1 S2 must stay real and exact."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 64))
    mu, s = feature_statistics(x)
    assert np.linalg.matrix_rank(s) < 64
    assert frechet_distance(mu, s, mu, s) < 1e-9 * np.trace(s)
    # scaling the covariance by c^2 gives Tr(S)(1 - c)^2 in closed form
    c = 3.0
    assert frechet_distance(mu, s, mu, c * c * s) == pytest.approx(np.trace(s) * (1 - c) ** 2, rel=1e-8)


@pytest.mark.parametrize("n1,n2,d", [(12, 9, 40), (60, 50, 8)])
def test_fid_from_features_equals_the_statistics_formula(n1, n2, d):
    """The sample-space shortcut (n < d) and the covariance path (n >= d) give the same value."""
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(n1, d)), rng.normal(size=(n2, d)) * 1.5 + 0.3
    ref = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    assert fid_from_features(x, y) == pytest.approx(ref, rel=1e-7)  # eigh sqrt of a singular S: ~1e-8 noise
    assert fid_from_features(x, x) < 1e-9 * ref


# --------------------------------------------------------------------------- KID
def test_kid_is_unbiased_for_same_distribution_sets():
    """The mean over independent draws is ~0; the biased (V-statistic) estimator is clearly > 0."""
    rng = np.random.default_rng(3)
    vals = []
    for k in range(40):
        a, b = rng.normal(size=(50, 32)), rng.normal(size=(50, 32))
        mean, std, m = kid_from_features(a, b, num_subsets=1, seed=k)
        assert m == 50
        vals.append(mean)
    vals = np.array(vals)
    sem = vals.std(ddof=1) / np.sqrt(len(vals))
    assert abs(vals.mean()) < 3 * sem
    # the bias a diagonal-including estimator would add: 2 (E k(x,x) - E k(x,y)) / m, here ~0.28
    x = rng.normal(size=(50, 32))
    k = (x @ x.T / 32 + 1) ** 3
    bias = 2 * (np.trace(k) / 50 - (k.sum() - np.trace(k)) / (50 * 49)) / 50
    assert bias > 10 * sem
    # a shifted distribution scores far above zero
    shifted, _, _ = kid_from_features(rng.normal(size=(50, 32)), rng.normal(size=(50, 32)) + 0.5, num_subsets=10)
    assert shifted > 10 * sem


def test_kid_subsets_follow_the_convention():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(30, 8)), rng.normal(size=(20, 8))
    mean, std, m = kid_from_features(a, b, num_subsets=7)
    assert m == 20 and std > 0
    assert kid_from_features(a, b, num_subsets=7, max_subset_size=5)[2] == 5
    assert kid_from_features(a, b, num_subsets=7) == (mean, std, m)  # seeded


# --------------------------------------------------------------------------- features
def test_preprocessing_matches_the_networks_input_range():
    net = InceptionFeatures()
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 299, 299)
    y = net.preprocess(x)
    assert y.shape == (1, 3, 299, 299)
    assert y[0, :, 0, 0].tolist() == pytest.approx([-1.0, 0.0, 255 / 128 - 1])
    # [-1, 1] floats land on the PNG grid (as mdm.data.to_pil rounds them)
    f = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    assert to_uint8(f).flatten().tolist() == [0, 128, 255]


def _jittered(images: torch.Tensor, seed: int, size: int) -> torch.Tensor:
    """A random crop of ``size`` and a random flip of every image: a second draw of the same distribution."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for x in images:
        i, j = torch.randint(0, images.shape[-1] - size + 1, (2,), generator=g).tolist()
        y = x[:, i : i + size, j : j + size]
        out.append(y.flip(-1) if torch.rand(1, generator=g).item() < 0.5 else y)
    return torch.stack(out)


@pytest.fixture(scope="module")
def feats():
    torch.manual_seed(0)
    net = InceptionFeatures(batch_size=16)
    im72, captions = demo_images(72)
    a, b = _jittered(im72, 1, 64), _jittered(im72, 2, 64)
    noise = torch.rand(len(a), 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    small = demo_images(32)[0]
    return {"a": net(a), "b": net(b), "noise": net(noise), "small": net(small), "captions": captions}


def test_features_are_finite_2048d_and_stable_under_resizing(feats):
    a = feats["a"]
    assert a.shape == (16, 2048) and a.dtype == torch.float64 and torch.isfinite(a).all()
    # the same emoji at 32 px (differently resized, uncropped) is its own nearest neighbour for most emoji
    d = torch.cdist(feats["a"], feats["small"])
    own = d.diagonal()
    others = d.masked_fill(torch.eye(16, dtype=torch.bool), float("inf")).min(dim=1).values
    assert own.mean() < 0.8 * others.mean()
    assert (d.argmin(dim=1) == torch.arange(16)).float().mean() >= 0.75


def test_fid_self_disjoint_and_noise(feats):
    self_fid = fid_from_features(feats["a"], feats["a"])
    disjoint = fid_from_features(feats["a"], feats["b"])
    noise = fid_from_features(feats["a"], feats["noise"])
    print(f"FID self {self_fid:.3g}, disjoint {disjoint:.2f}, noise {noise:.2f}")
    assert disjoint > 0
    assert self_fid < 1e-3 * disjoint
    assert noise > 10 * disjoint
    kid_disjoint = kid_from_features(feats["a"], feats["b"], 20)[0]
    kid_noise = kid_from_features(feats["a"], feats["noise"], 20)[0]
    assert kid_noise > 10 * abs(kid_disjoint)


def test_caption_consistency_retrieves_the_matching_caption(feats):
    captions = feats["captions"]

    def embed(texts):  # one-hot "embeddings": cosine 1 for equal captions, 0 otherwise
        uniq = sorted(set(captions))
        return torch.eye(len(uniq))[[uniq.index(t) for t in texts]]

    good = caption_consistency(feats["b"], captions, feats["a"], captions, embed)
    assert good["caption_top1"] >= 0.75
    assert good["caption_similarity"] == pytest.approx(good["caption_top1"])
    assert good["caption_chance"] == pytest.approx(1 / 16)
    shuffled = captions[1:] + captions[:1]
    bad = caption_consistency(feats["b"], shuffled, feats["a"], captions, embed)
    assert bad["caption_top1"] <= 0.25


def test_real_pyramid_pools_missing_resolutions():
    top = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    out = real_pyramid({8: top}, [4, 8])
    expect = torch.nn.functional.avg_pool2d(top.float(), 2).round().to(torch.uint8)
    assert torch.equal(out[4], expect) and torch.equal(out[8], top)
    with pytest.raises(ValueError, match="top resolution"):
        real_pyramid({4: out[4]}, [4, 8])


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import mdm

    torch.manual_seed(0)
    cfg = mdm.get_config("tiny-32-64")
    folder = tmp_path_factory.mktemp("tiny") / "model"
    mdm.save_pretrained(mdm.MDMModel(cfg.model), cfg, folder)
    return folder


def test_mdm_eval_reports_every_resolution(tiny_model, tmp_path):
    out = tmp_path / "report.json"
    args = ["--checkpoint", str(tiny_model), "--num_samples", "6", "--num_real", "6", "--steps", "2"]
    args += ["--kid_subsets", "5", "--device", "cpu", "--no_progress", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "mdm.cli", "eval", *args], capture_output=True, text=True, timeout=300, env=ENV
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["resolutions"] == [32, 64]
    assert set(report["metrics"]) == {"32", "64"}
    for m in report["metrics"].values():
        assert np.isfinite(m["fid"]) and m["fid"] > 0
        assert np.isfinite(m["kid_mean"]) and m["kid_std"] >= 0
        assert m["num_generated"] == 6 and m["num_real"] == 6
        assert 0 <= m["caption_top1"] <= 1 and -1 <= m["caption_similarity"] <= 1
    assert report["caption"]["text_encoder"]
    assert report["settings"]["seeds"] == "0..5" and report["settings"]["steps"] == 2
    assert set(report["timings"]) >= {"generate_s", "features_s", "total_s"}


def test_sample_grid_rows_are_prompts_and_columns_are_seeds(tiny_model):
    """Row i holds prompt i, column k seed SEED + k in every row, whatever the batching; each
    cell is what ``generate`` draws for that prompt and seed alone."""
    from mdm.evaluation import grid_prompts, sample_grid
    from mdm.pipeline import MDMPipeline

    assert grid_prompts(["a", "b", "b", "", "c", "d", "e", "f"], 3) == ["a", "c", "e"]
    assert grid_prompts(["a", "b"], 8) == ["a", "b"] and grid_prompts(["a"], 0) == []
    pipe = MDMPipeline.from_pretrained(tiny_model, device="cpu")
    prompts = ["a red circle", "a blue square"]
    grids = sample_grid(pipe, prompts, per_row=3, seed=5, steps=2, guidance=2.0, batch_size=4)
    assert set(grids) == {32, 64}
    for r, img in grids.items():
        assert img.size == (3 * (r + 2) + 2, 2 * (r + 2) + 2)

    def cell(i: int, k: int, r: int = 64) -> np.ndarray:
        a = np.asarray(grids[r]).astype(int)
        return a[2 + i * (r + 2) : 2 + i * (r + 2) + r, 2 + k * (r + 2) : 2 + k * (r + 2) + r]

    alone = pipe.generate(prompt=[prompts[1]], num_samples=1, seeds=[6], steps=2, guidance_scale=2.0)[-1]
    expected = to_uint8(alone)[0].permute(1, 2, 0).numpy().astype(int)
    assert np.abs(cell(1, 1) - expected).max() <= 2  # batch shape changes fp32 round-off only
    assert np.abs(cell(1, 0) - expected).mean() > 10  # another seed is another image


def _write_shards(folder: Path, resolutions: list[int]) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from pipelines.preprocess import MANIFEST, SCHEMA_VERSION

    images, captions = demo_images(max(resolutions))
    cols: dict[str, list] = {"key": [], "caption": [], "label": []}
    for r in resolutions:
        cols[f"image_{r}"] = []
    for k, (x, c) in enumerate(zip(images, captions)):
        cols["key"].append(f"{k:04x}")
        cols["caption"].append(c)
        cols["label"].append(-1)
        for r in resolutions:
            xr = torch.nn.functional.avg_pool2d(x[None], max(resolutions) // r)[0]
            buf = io.BytesIO()
            Image.fromarray(to_uint8(xr)[0].permute(1, 2, 0).numpy()).save(buf, format="PNG")
            cols[f"image_{r}"].append(buf.getvalue())
    folder.mkdir(parents=True)
    pq.write_table(pa.table(cols), folder / "part-0.parquet")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "resolutions": resolutions,
        "rows": len(captions),
        "files": ["part-0.parquet"],
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return captions


def test_read_heldout_reads_images_and_captions_without_ray(tmp_path):
    pytest.importorskip("pyarrow")
    from jobs.evaluate import read_heldout, resolve_split

    captions = _write_shards(tmp_path / "shards" / "heldout", [32, 64])
    uri = resolve_split(str(tmp_path / "shards"))
    assert uri.endswith("heldout")
    images, caps, manifest = read_heldout(uri, [32, 64], limit=5)
    assert caps == captions[:5]
    assert images[64].shape == (5, 3, 64, 64) and images[64].dtype == torch.uint8
    assert images[32].shape == (5, 3, 32, 32)
    with pytest.raises(ValueError, match="top resolution 128"):
        read_heldout(uri, [64, 128])
    with pytest.raises(FileNotFoundError, match="heldout"):
        resolve_split(str(tmp_path))


def test_evaluate_job_end_to_end_on_shards(tiny_model, tmp_path):
    pytest.importorskip("pyarrow")
    _write_shards(tmp_path / "shards", [64])
    out = tmp_path / "r.json"
    args = ["--model", str(tiny_model), "--shards", str(tmp_path / "shards"), "--num_samples", "3"]
    args += ["--num_real", "4", "--steps", "1", "--kid_subsets", "3", "--device", "cpu", "--no_progress"]
    args += ["--no_mlflow", "--grid_prompts", "2", "--grid_seeds", "3", "--out", str(out)]
    # run as the job runs, then check that nothing imported Ray
    code = (
        "import sys; from jobs.evaluate import main; rc = main(sys.argv[1:]); "
        "assert 'ray' not in sys.modules, 'the evaluation job imported ray'; sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert set(report["metrics"]) == {"32", "64"}  # 32 px pooled from the stored 64 px images
    assert report["num_real"] == {"32": 4, "64": 4}
    assert report["shards"] == str(tmp_path / "shards")
    from PIL import Image

    # the grid: 2 of the held-out captions, 3 seeds, one picture per resolution beside the report
    captions = demo_images(64)[1]
    assert len(report["grid"]["prompts"]) == 2 and set(report["grid"]["prompts"]) <= set(captions)
    assert report["grid"]["seeds"] == [0, 1, 2]
    for r in (32, 64):
        path = tmp_path / f"r_grid_{r}.png"
        assert report["grid"]["files"][str(r)] == str(path)
        assert Image.open(path).size == (3 * (r + 2) + 2, 2 * (r + 2) + 2)


def test_evaluate_job_help_documents_every_option():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "evaluate.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    for opt in ["--model", "--shards", "--num_samples", "--steps", "--sampler", "--guidance_scale", "--seed"]:
        assert opt in proc.stdout
    assert "--out" in proc.stdout and "--device" in proc.stdout and "--mlflow_run_id" in proc.stdout
    from jobs.evaluate import build_parser

    for action in build_parser()._actions:
        assert action.help, f"jobs/evaluate.py {action.option_strings} has no help text"


@pytest.mark.integration
def test_report_is_logged_to_an_mlflow_run(mlflow_server, tmp_path):
    """On the session's MLflow server (a private store set through ``set_tracking_uri`` would
    leave the process pointing away from the server for every later test)."""
    import mlflow

    from jobs.evaluate import log_to_mlflow, mlflow_run_for

    mlflow.set_tracking_uri(mlflow_server)
    client = mlflow.MlflowClient()
    exp = client.create_experiment(f"eval-{tmp_path.name}")
    run_id = client.create_run(exp).info.run_id
    report = {
        "metrics": {
            "32": {"fid": 12.5, "kid_mean": 0.01, "caption_similarity": 0.5},
            "64": {"fid": 20.0, "kid_mean": 0.02},
        }
    }
    assert mlflow_run_for(str(tmp_path), run_id) == run_id
    assert mlflow_run_for(str(tmp_path), None) is None  # a folder model has no run of its own
    from PIL import Image

    log_to_mlflow(run_id, report, {"report_grid_64.png": Image.new("RGB", (8, 8), (255, 0, 0))})
    assert [a.path for a in client.list_artifacts(run_id, "evaluation")] == [
        "evaluation/report.json",
        "evaluation/report_grid_64.png",
    ]
    metrics = client.get_run(run_id).data.metrics
    assert metrics == {"fid_32": 12.5, "kid_32": 0.01, "caption_similarity_32": 0.5, "fid_64": 20.0, "kid_64": 0.02}
    logged = mlflow.artifacts.load_dict(f"runs:/{run_id}/evaluation/report.json")
    assert logged == report
