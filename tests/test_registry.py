"""The model registry contract: a registered version is a pyfunc that generates images and
a model folder that every part of the project loads by ``models:/name@alias``."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.integration


def test_register_resolve_and_generate_through_pyfunc(mlflow_server, trained):
    import mlflow
    import pandas as pd

    from jobs.registry import register_model, resolve_version, set_tracking
    from mdm import load_pretrained

    set_tracking(None, "registry-test")
    version = register_model(trained["stage64"], name="mdm-registry-test", alias="stage-64")
    assert resolve_version("models:/mdm-registry-test@stage-64") == ("mdm-registry-test", version)

    model, cfg = load_pretrained("models:/mdm-registry-test@stage-64")
    ref, _ = load_pretrained(trained["stage64"])
    assert cfg.model.resolutions == [32, 64]
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k

    pm = mlflow.pyfunc.load_model("models:/mdm-registry-test@stage-64")
    df = pd.DataFrame({"prompt": ["fox face", "red apple"], "seed": [3, 4]})
    out = pm.predict(df, params={"steps": 4, "resolution": 32})
    assert list(out["seed"]) == [3, 4]
    sizes = [Image.open(io.BytesIO(b)).size for b in out["image"]]
    assert sizes == [(32, 32), (32, 32)]
    top = pm.predict(df.iloc[:1], params={"steps": 4})
    assert Image.open(io.BytesIO(top["image"][0])).size == (64, 64)
    again = pm.predict(df.iloc[:1], params={"steps": 4})
    assert again["image"][0] == top["image"][0], "same seed and params must give the same image"

    # a second version moves the alias; the first stays addressable by number
    v2 = register_model(trained["stage32"], name="mdm-registry-test", alias="stage-64")
    assert int(v2) == int(version) + 1
    assert resolve_version("models:/mdm-registry-test@stage-64")[1] == v2
    assert resolve_version(f"models:/mdm-registry-test/{version}")[1] == version


def test_missing_alias_is_a_clear_error(mlflow_server):
    from jobs.registry import resolve_version, set_tracking

    set_tracking(None, "registry-test")
    with pytest.raises(LookupError, match="Train the previous stage first"):
        resolve_version("models:/no-such-model@stage-64")


def test_a_crash_between_registering_and_the_alias_leaves_no_orphan_on_the_rerun(mlflow_server, trained, monkeypatch):
    """The stage job registers, then moves the alias; killed in between (or between logging
    the model and registering it), the re-submitted run must finish that registration, not
    add a second version of the same weights."""
    import mlflow
    from mlflow import MlflowClient

    from jobs.registry import find_or_create_run, register_model, set_tracking

    set_tracking(None, "registry-test")
    run_id, _ = find_or_create_run("registry-test", "registration-once")
    name = "mdm-registry-once"
    client = MlflowClient()

    def gone(*args, **kwargs):
        raise ConnectionError("the tracking server went away")

    with monkeypatch.context() as m:  # killed after logging the model, before registering it
        m.setattr(mlflow, "register_model", gone)
        with pytest.raises(ConnectionError):
            register_model(trained["stage64"], name=name, alias="stage-64", run_id=run_id, step=60)
    with monkeypatch.context() as m:  # re-run: registered now, killed before the alias moves
        m.setattr(MlflowClient, "set_registered_model_alias", gone)
        with pytest.raises(ConnectionError):
            register_model(trained["stage64"], name=name, alias="stage-64", run_id=run_id, step=60)
    version = register_model(trained["stage64"], name=name, alias="stage-64", run_id=run_id, step=60)

    assert [v.version for v in client.search_model_versions(f"name = '{name}'")] == [version]
    assert client.get_model_version_by_alias(name, "stage-64").version == version
    logged = mlflow.search_logged_models(filter_string=f"source_run_id = '{run_id}'", output_format="list")
    assert len(logged) == 1, "the re-runs reused the model the first attempt logged"
    assert register_model(trained["stage64"], name=name, alias="stage-64", run_id=run_id, step=60) == version

    # the same run resumed with more steps registers its new weights as a new version
    later = register_model(trained["stage64"], name=name, alias="stage-64", run_id=run_id, step=80)
    assert int(later) == int(version) + 1
    assert client.get_model_version(name, later).tags["step"] == "80"


def test_the_parent_alias_is_resolved_once_and_that_version_is_loaded(mlflow_server, trained, tmp_path, monkeypatch):
    """A stage that grows ``models:/…@stage-32`` loads the version the alias named when it was
    resolved (and logged), even if the alias moves before the weights are read."""
    from jobs import registry
    from jobs.registry import register_model, set_tracking
    from jobs.stage import _load_parent
    from jobs.stage_config import load_stage_config
    from mdm import MDMModel, get_config, load_pretrained, save_pretrained
    from mdm.growth import inner_state_dict, state_fingerprint

    set_tracking(None, "registry-test")
    name = "mdm-registry-parent"
    first = register_model(trained["stage32"], name=name, alias="stage-32")
    cfg32 = get_config("tiny-32")
    save_pretrained(MDMModel(cfg32.model), cfg32, tmp_path / "other32")  # other weights, same config
    moved = register_model(tmp_path / "other32", name=name, alias="stage-32")
    resolve = registry.resolve_version
    # the alias pointed at `first` when it was resolved, and at `moved` from then on
    monkeypatch.setattr(registry, "resolve_version", lambda src: (resolve(src)[0], first))

    cfg = load_stage_config("tiny-32-64", None, [f"init_from=models:/{name}@stage-32"])
    parent = _load_parent(cfg)
    assert parent["source"] == f"models:/{name}@stage-32 (version {first})"
    want, _ = load_pretrained(trained["stage32"])
    assert parent["inner_sha256"] == state_fingerprint(inner_state_dict(want))
    assert moved != first


def test_models_uris_resolve_in_the_registry_the_jobs_write_by_default(trained, tmp_path):
    """With no MLFLOW_TRACKING_URI a stage job registers in SQLite under $MDM_STATE_DIR.
    ``mdm sample --checkpoint models:/...`` and Serve, run from another folder, must look
    there too, not in MLflow's own default (``./mlflow.db`` of the current folder), where
    the model is not (the emoji run's grids failed on exactly this)."""
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MDM_STATE_DIR=str(tmp_path / "state"), PYTHONPATH=str(repo))
    register = (
        "from jobs.registry import register_model, set_tracking; set_tracking(None, 'default-registry'); "
        f"register_model({str(trained['stage64'])!r}, name='mdm-default', alias='stage-64')"
    )
    subprocess.run([sys.executable, "-c", register], cwd=repo, env=env, check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    load = (
        "from mdm import load_pretrained; from serve.engine import locate_model; "
        "m, c = load_pretrained('models:/mdm-default@stage-64'); ref = locate_model('models:/mdm-default@stage-64'); "
        "print('resolutions', c.model.resolutions, 'version', ref.version)"
    )
    out = subprocess.run([sys.executable, "-c", load], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resolutions [32, 64] version 1" in out.stdout
    assert not (elsewhere / "mlflow.db").exists()
