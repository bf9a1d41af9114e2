"""Progressive stages as Ray jobs: Ray Train + DeepSpeed ZeRO on 2 CPU workers, checkpoints
on the S3 server, runs and the registry on the MLflow server — all real, all on loopback.

The module runs in order: stage 64 (ZeRO-2, a worker killed mid-run), the same run name
re-submitted (resumes), stage 128 grown from the registered stage 64 (ZeRO-3).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.integration, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
SHARDS = "s3://jobs-shards/emoji-64-128"
RUNS = "s3://jobs-runs/ci"
MODEL = "mdm-jobs-test"  # its own registered model: the session's stack also holds the demo's "mdm"


@pytest.fixture(scope="module")
def stack(ray_session, ray_cluster, mlflow_server, s3_server):
    """Shards of the shipped emoji at 64 and 128 px in the S3 server, and a runs bucket."""
    import s3fs

    from pipelines.preprocess import PreprocessConfig, preprocess
    from pipelines.sources import open_source

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    for bucket in ("jobs-shards", "jobs-runs"):
        if not fs.exists(bucket):
            fs.mkdir(bucket)
    src = open_source(str(REPO / "mdm" / "assets" / "emoji"))
    manifest = preprocess(src, SHARDS, PreprocessConfig(resolutions=[64, 128], shard_rows=8), progress=False)
    assert manifest["rows"] == 16
    return {"dashboard": ray_cluster["dashboard"], "mlflow": mlflow_server, "s3": s3_server}


def common(name: str) -> list[str]:
    sets = {
        "data.shards": SHARDS,
        "data.cache": "true",
        "run.name": name,
        "run.storage_path": RUNS,
        "run.log_every": "1",
        "scaling.num_workers": "2",
        "scaling.cpus_per_worker": "0.5",
        "train.batch_size": "2",
        "train.warmup_steps": "2",
        "train.lr": "0.001",
        "mlflow.sample_steps": "3",
        "mlflow.registered_model": MODEL,
    }
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def submit(stack, script: str, args: list[str], wait: bool = True) -> tuple[str, subprocess.CompletedProcess]:
    """``ray job submit --working-dir <repo> -- python jobs/<script> ...``; the job gets the
    MLflow server's URI through its runtime env (the S3 variables it inherits from the head)."""
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": stack["mlflow"]}}
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        stack["dashboard"],
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps(runtime_env),
    ]
    job_id = f"{Path(script).stem}-{int(time.time() * 1000)}"
    cmd += ["--submission-id", job_id] + ([] if wait else ["--no-wait"]) + ["--", "python", f"jobs/{script}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    return job_id, proc


def job_client(stack):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(stack["dashboard"])


def wait_for_log(client, job_id: str, needle: str, timeout: float = 600) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        logs = client.get_job_logs(job_id)
        if needle in logs:
            return logs
        status = client.get_job_status(job_id)
        if status.is_terminal():
            raise AssertionError(f"job {job_id} ended ({status}) before logging {needle!r}:\n{logs[-4000:]}")
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not log {needle!r} within {timeout} s")


def wait_for_end(client, job_id: str, timeout: float = 900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status, client.get_job_logs(job_id)
        time.sleep(1)
    raise AssertionError(f"job {job_id} still running after {timeout} s")


def mlflow_run(name: str):
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name("mdm")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mdm.run_name` = '{name}'")
    assert len(runs) == 1, f"expected one MLflow run named {name}, found {len(runs)}"
    return client, runs[0]


def test_stage_64_survives_a_killed_worker_then_registers(stack):
    from ray.job_submission import JobStatus
    from ray.util.state import list_actors

    client = job_client(stack)
    args = common("ci-64") + [
        "--set", "model=tiny-64",
        "--set", "train.steps=24",
        "--set", "run.checkpoint_every=4",
        "--set", "run.max_failures=2",
        "--set", "mlflow.sample_every=12",
    ]  # fmt: skip
    job_id, proc = submit(stack, "stage_64.py", args, wait=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Kill once the step-8 checkpoint is written: by then Ray Train's controller has
    # registered the one of step 4 (a report is registered asynchronously).
    wait_for_log(client, job_id, "checkpoint saved at step 8")
    workers = list_actors(
        address=stack["dashboard"], filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    )
    assert len(workers) == 2, workers
    victim = workers[-1]["pid"]
    os.kill(victim, signal.SIGKILL)

    status, logs = wait_for_end(client, job_id)
    Path(tempfile.gettempdir(), "mdm-ci-64-job.log").write_text(logs)  # for a post-mortem
    assert status == JobStatus.SUCCEEDED, logs[-5000:]
    assert f"pid={victim})" in logs, "the killed process was one of this run's workers"
    resumed = [
        int(line.rsplit(" ", 1)[1]) for line in logs.splitlines() if "resumed from the checkpoint of step" in line
    ]
    assert resumed and resumed[0] >= 4 and resumed[0] % 4 == 0, logs[-5000:]
    assert "finished at step 24" in logs
    assert re.search(r"last progress from the workers: [^\n]*step 24", logs), "the stall watchdog hears the workers"
    assert f"registered models:/{MODEL}/1 as @stage-64" in logs

    client_ml, run = mlflow_run("ci-64")
    history = client_ml.get_metric_history(run.info.run_id, "loss")
    steps = sorted({m.step for m in history})
    assert steps[-1] == 24
    assert resumed[0] + 1 in steps, "after the restart the step count continues from the checkpoint"
    assert run.data.params["train.steps"] == "24" and run.data.params["deepspeed.stage"] == "2"
    for key in ("loss_64", "lr", "grad_norm", "images_per_s", "images_per_s_per_worker"):
        assert client_ml.get_metric_history(run.info.run_id, key), key
    samples = [a.path for a in client_ml.list_artifacts(run.info.run_id, "samples")]
    assert "samples/step_0000012_64px.png" in samples and "samples/step_0000024_64px.png" in samples


def test_resubmitting_the_run_name_resumes(stack):
    args = common("ci-64") + ["--set", "model=tiny-64", "--set", "train.steps=28", "--set", "run.checkpoint_every=4"]
    _, proc = submit(stack, "stage_64.py", args)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert "resumed from the checkpoint of step 24" in proc.stdout
    assert "step 25/28" in proc.stdout and "step 1/28" not in proc.stdout
    # Each worker line reaches the job's log once (Ray Train's print patch doubled them).
    assert proc.stdout.count("[stage] step 25/28 loss") == 1, proc.stdout[-3000:]
    assert f"registered models:/{MODEL}/2 as @stage-64" in proc.stdout


def test_stage_128_grows_the_registered_stage_64_under_zero3(stack, tmp_path):
    import mlflow
    import pandas as pd
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from mlflow import MlflowClient
    from PIL import Image

    from mdm import load_pretrained
    from mdm.growth import inner_state_dict, state_fingerprint
    from mdm.storage import url_to_fs

    stage64, _ = load_pretrained(f"models:/{MODEL}@stage-64")
    args = common("ci-128") + [
        "--set", "model=tiny-64-128",
        "--set", "deepspeed.stage=3",
        "--set", "train.steps=4",
        "--set", "train.ema_decay=0.0",
        "--set", "run.checkpoint_every=2",
        "--set", "mlflow.sample_every=0",
        "--set", f"eval.shards={SHARDS}",
        "--set", "eval.num_samples=4",
        "--set", "eval.steps=2",
        "--set", "eval.batch_size=4",
    ]  # fmt: skip
    _, proc = submit(stack, "stage_128.py", args)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert f"inner weights loaded exactly from models:/{MODEL}@stage-64 (version 2)" in proc.stdout
    assert "ZeRO-3" in proc.stdout
    assert f"registered models:/{MODEL}/3 as @stage-128" in proc.stdout

    # the stage began from exactly the registered stage-64 weights
    _, run = mlflow_run("ci-128")
    assert run.data.params["init.inner_sha256"] == state_fingerprint(inner_state_dict(stage64))

    # eval.shards: FID/KID of the final weights at both resolutions, logged to the stage's run
    assert "evaluating the final weights on" in proc.stdout
    for r in (64, 128):
        assert run.data.metrics[f"fid_{r}"] > 0 and math.isfinite(run.data.metrics[f"kid_{r}"])
    report = json.loads(url_to_fs(f"{RUNS}/ci-128/evaluation.json")[0].cat(f"{RUNS}/ci-128/evaluation.json"))
    assert set(report["metrics"]) == {"64", "128"} and report["metrics"]["128"]["num_generated"] == 4

    # both aliases live in the registry
    reg = MlflowClient()
    assert reg.get_model_version_by_alias(MODEL, "stage-64").version == "2"
    assert reg.get_model_version_by_alias(MODEL, "stage-128").version == "3"

    # the exported EMA (decay 0: the weights themselves), gathered from ZeRO-3 shards, equals
    # DeepSpeed's own consolidation of the final checkpoint
    model128, cfg128 = load_pretrained(f"models:/{MODEL}@stage-128")
    assert cfg128.model.resolutions == [64, 128]
    fs, path = url_to_fs(f"{RUNS}/ci-128/step_00000004")
    local = tmp_path / "ckpt"
    fs.get(path.rstrip("/") + "/", str(local) + "/", recursive=True)
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(local), tag="state")
    exported = model128.state_dict()
    assert exported.keys() == consolidated.keys()
    for k, v in consolidated.items():
        torch.testing.assert_close(exported[k], v.float(), rtol=0, atol=0, msg=k)

    # and the registered version generates through its pyfunc flavour
    pm = mlflow.pyfunc.load_model(f"models:/{MODEL}@stage-128")
    out = pm.predict(pd.DataFrame({"prompt": ["fox face, noto style"], "seed": [1]}), params={"steps": 3})
    assert Image.open(io.BytesIO(out["image"][0])).size == (128, 128)


def test_previous_stage_problems_fail_before_any_worker_starts(stack, tmp_path, capsys):
    from jobs.stage import main
    from mdm import MDMModel, get_config, save_pretrained

    base = ["--set", "model=tiny-64-128", "--set", f"data.shards={SHARDS}", "--set", "run.storage_path=" + RUNS]
    assert main(base + ["--set", "init_from=models:/no-such-model@stage-64"], 128, "64-128") == 2
    assert "Train the previous stage first" in capsys.readouterr().err

    cfg32 = get_config("tiny-32")
    save_pretrained(MDMModel(cfg32.model), cfg32, tmp_path / "tiny32")
    assert main(base + ["--set", f"init_from={tmp_path / 'tiny32'}"], 128, "64-128") == 2
    assert "cannot grow" in capsys.readouterr().err

    assert main(["--set", "model=tiny-64"], 128, "64-128") == 2
    assert "top resolution is 128" in capsys.readouterr().err
    assert main(["--set", "train.stepz=3"], 128, "64-128") == 2
    assert "unknown key 'stepz'" in capsys.readouterr().err
    assert main(["--set", "model=tiny-64"], 64, "64") == 2
    assert "data.shards" in capsys.readouterr().err


def test_resuming_with_a_config_the_checkpoints_cannot_take_fails_before_any_worker_starts(stack, capsys):
    """ci-64 has ZeRO-2 checkpoints of 2 workers: ZeRO-3 would fail inside DeepSpeed on every restart."""
    from jobs.stage import main

    args = common("ci-64") + ["--set", "model=tiny-64", "--set", "train.steps=28", "--set", "deepspeed.stage=3"]
    t0 = time.monotonic()
    assert main(args, 64, "64") == 2
    err = capsys.readouterr().err
    assert "deepspeed.stage: 2 -> 3" in err and "another --name" in err, err
    assert "train.steps" not in err
    assert time.monotonic() - t0 < 60


def test_a_stage_the_cluster_cannot_hold_fails_at_once_saying_what_to_change(stack, capsys):
    """README's stage defaults (2 workers x 1 CPU) on this 2-CPU cluster used to start both
    workers and then wait forever for a CPU to read the shards with."""
    from jobs.stage import main

    args = common("ci-too-big") + ["--set", "model=tiny-64", "--set", "scaling.cpus_per_worker=1"]
    t0 = time.monotonic()
    assert main(args, 64, "64") == 2
    err = capsys.readouterr().err
    assert "the cluster has 2 CPUs" in err and "--set scaling.cpus_per_worker=0.5" in err, err
    assert time.monotonic() - t0 < 60


def test_job_scripts_document_their_options():
    for script in ("stage_64.py", "stage_128.py", "stage_256.py", "stage_1024.py"):
        path = REPO / "jobs" / script
        assert os.access(path, os.X_OK) and path.read_text().startswith("#!/usr/bin/env python")
    out = subprocess.run([sys.executable, "jobs/stage_256.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "--set" in out.stdout and "models:/mdm@stage-256" in out.stdout
    cfg = subprocess.run(
        [sys.executable, "jobs/stage_256.py", "--print_config", "--set", "deepspeed.stage=3"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    printed = json.loads(cfg.stdout)
    assert printed["deepspeed"]["stage"] == 3 and printed["model"]["model"]["resolutions"] == [64, 128, 256]
