"""The model registry contract: a registered version is a pyfunc that generates images and
a model folder that every part of the project loads by ``models:/name@alias``."""

from __future__ import annotations

import io

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
