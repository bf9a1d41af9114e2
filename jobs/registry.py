"""MLflow glue shared by the stage jobs and the tests: tracking URI, runs, the model registry.

A registered version of ``mdm`` is a pyfunc model (``jobs/mdm_pyfunc.py``, logged from
code) whose artifact ``weights/`` is a model folder (``config.json`` + EMA weights in
``model.safetensors``); ``mdm.weights.resolve_source("models:/mdm@stage-128")`` finds that
folder, and ``mlflow.pyfunc.load_model`` generates images from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mdm.storage import default_tracking_uri, state_dir  # one default for the jobs and the library

__all__ = [
    "state_dir",
    "default_tracking_uri",
    "set_tracking",
    "register_model",
    "resolve_version",
    "find_or_create_run",
]

PYFUNC_CODE = Path(__file__).with_name("mdm_pyfunc.py")
MDM_PACKAGE = Path(__file__).resolve().parents[1] / "mdm"


def set_tracking(tracking_uri: str | None, experiment: str) -> str:
    """Point MLflow at ``tracking_uri`` (or the default) and ``experiment``; returns the URI.

    With a SQLite/file store the experiment's artifacts go next to the database (never into
    the job's temporary working dir); a tracking server stores them where it was told to.
    """
    import mlflow

    uri = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri[len("sqlite:///") :]).parent / "artifacts").as_uri()
        try:
            mlflow.create_experiment(experiment, artifact_location=location)
        except Exception:  # noqa: BLE001 - created concurrently by another process
            if mlflow.get_experiment_by_name(experiment) is None:
                raise
    mlflow.set_experiment(experiment)
    return uri


def find_or_create_run(experiment: str, run_name: str, tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """The MLflow run of a training run name (resumed runs log into the same one).

    Returns ``(run_id, existed)``.
    """
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = mlflow.get_experiment_by_name(experiment)
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`mdm.run_name` = '{run_name}'", max_results=1)
    if found:
        return found[0].info.run_id, True
    run = client.create_run(exp.experiment_id, run_name=run_name, tags={"mdm.run_name": run_name, **(tags or {})})
    return run.info.run_id, False


def resolve_version(src: str) -> tuple[str, str]:
    """``models:/name@alias`` or ``models:/name/version`` -> (name, version); clear error if absent."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not src.startswith("models:/"):
        raise ValueError(f"{src!r} is not a registry URI (models:/name@alias or models:/name/version)")
    body = src[len("models:/") :]
    client = MlflowClient()
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            return name, client.get_model_version_by_alias(name, alias).version
        name, version = body.rsplit("/", 1)
        return name, client.get_model_version(name, version).version
    except MlflowException as e:
        import mlflow

        raise LookupError(
            f"{src} is not in the MLflow registry at {mlflow.get_tracking_uri()}: {e.message.splitlines()[0]}. "
            "Train the previous stage first (it registers the alias), or pass an existing version or weights URI."
        ) from None


def register_model(
    model_dir: str | os.PathLike,
    *,
    name: str = "mdm",
    alias: str | None = None,
    run_id: str | None = None,
    step: int | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Log ``model_dir`` (config.json + model.safetensors) as a pyfunc model, register a new
    version of ``name`` and point ``alias`` at it. Returns the version.

    Logs into ``run_id`` when given (the training run), else into a new run of the current
    experiment. With ``run_id`` and ``step`` the registration happens once per run and step:
    a re-run after a crash between logging, registering and moving the alias finds what the
    first attempt made (the version by its run and ``step`` tag, the logged model by its
    ``mdm.step`` tag) and finishes the job instead of adding an orphan version.
    """
    import mlflow
    import torch
    from mlflow import MlflowClient

    client = MlflowClient()
    folder = Path(model_dir)
    config = json.loads((folder / "config.json").read_text())
    resolutions = config["model"]["resolutions"]
    version_tags = {
        "resolutions": ",".join(map(str, resolutions)),
        "config": config.get("name", ""),
        **({"step": str(step)} if step is not None else {}),
        **(tags or {}),
    }
    model_uri = None
    if run_id is not None and step is not None:  # once per run and step
        for mv in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            if mv.tags.get("step") == str(step):
                if alias:
                    client.set_registered_model_alias(name, alias, mv.version)
                return str(mv.version)
        found = mlflow.search_logged_models(
            filter_string=f"source_run_id = '{run_id}' AND tags.`mdm.step` = '{step}'", output_format="list"
        )
        model_uri = f"models:/{found[0].model_id}" if found else None
    if model_uri is None:
        reqs = [
            f"torch=={torch.__version__.split('+')[0]}",
            "numpy",
            "pillow",
            "safetensors",
            "transformers",
            "pandas",
        ]
        model_tags = {"mdm.config": config.get("name", ""), **({"mdm.step": str(step)} if step is not None else {})}
        with mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=f"register-{name}"):
            info = mlflow.pyfunc.log_model(
                signature=_signature(config),
                name="model",
                python_model=str(PYFUNC_CODE),
                artifacts={"weights": str(folder)},
                code_paths=[str(MDM_PACKAGE)],
                pip_requirements=reqs,
                tags=model_tags,
            )
        model_uri = info.model_uri
    mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in version_tags.items()})
    version = str(mv.version)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return version


def _signature(config: dict):
    """Inputs one row per image; generation settings are inference-time params."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    kind = config["model"]["conditioning"]["kind"]
    cols = [ColSpec("long", "seed", required=False)]
    if kind == "text":
        cols = [ColSpec("string", "prompt"), ColSpec("string", "negative_prompt", required=False), *cols]
    elif kind == "class":
        cols = [ColSpec("long", "label"), *cols]
    top = int(config["model"]["resolutions"][-1])
    params = ParamSchema(
        [
            ParamSpec("steps", "long", 25),
            ParamSpec("sampler", "string", "dpmpp_2m"),
            ParamSpec("guidance_scale", "double", 3.0),
            ParamSpec("resolution", "long", top),
        ]
    )
    outputs = Schema(
        [
            ColSpec("string", "prompt"),
            ColSpec("long", "seed"),
            ColSpec("long", "resolution"),
            ColSpec("binary", "image"),
        ]
    )
    return ModelSignature(inputs=Schema(cols), outputs=outputs, params=params)
