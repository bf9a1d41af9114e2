"""One progressive-training stage as a Ray job: Ray Train + DeepSpeed ZeRO + MLflow.

``jobs/stage_64.py``, ``stage_128.py``, ``stage_256.py`` and ``stage_1024.py`` call
:func:`main` with their resolution. The driver (this process):

1. resolves the stage config (``jobs/stage_config.py``: named model config, ``--config``
   file, ``--set`` overrides); a re-submitted run name is checked against the config the
   run was started with, and changes that a resume cannot honour are refused;
2. finds the previous stage (``models:/mdm@stage-<R_prev>`` by default: the alias is
   resolved once, that exact version loaded) and checks that the new model grows from it;
3. checks that the Ray cluster can hold the workers and the data pipeline;
4. opens the shards for the model's resolutions and starts ``TorchTrainer`` with DeepSpeed
   on ``scaling.num_workers`` workers (``jobs/stage_worker.py``; checkpoints and resume
   under ``run.storage_path``), failing the job when it makes no progress for
   ``run.stall_timeout_s``, and at once on a worker error that a restart would only repeat
   (out of accelerator memory: :func:`fail_fast_callback`);
5. registers the final EMA weights as a version of ``mlflow.registered_model`` (once per
   run and step, also when re-run after a crash) and moves the alias ``stage-<R>``;
6. with ``eval.shards`` set, scores those weights on the held-out shards (FID/KID at every
   resolution, ``jobs/evaluate.py``) and logs the metrics and report to the stage's run.

Steps 1 to 3 happen before any worker starts, and each fails with what to change.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.stage_config import StageConfig, flatten, load_stage_config, resume_changes  # noqa: E402
from jobs.stage_worker import NotRetryableError, train_loop_per_worker  # noqa: E402
from mdm.config import ConfigError, to_dict  # noqa: E402

__all__ = [
    "StageConfig",
    "load_stage_config",
    "main",
    "train_loop_per_worker",
    "check_cluster_fits",
    "check_resume",
    "fit_with_watchdog",
    "StalledError",
    "fail_fast_callback",
]

CONFIG_FILE = "mdm_stage_config.json"  # beside the run's checkpoints: the config it was started with


def _log(msg: str) -> None:
    print(f"[stage] {msg}", flush=True)


class StalledError(RuntimeError):
    """The run made no progress for ``run.stall_timeout_s``."""


# ---------------------------------------------------------------------------- the driver
def evaluate_stage(cfg: StageConfig, model_dir: Path, run_id: str, tracking_uri: str, out: str) -> None:
    """``jobs/evaluate.py`` on the stage's final weights, logged to the stage's MLflow run."""
    from jobs import evaluate

    e = cfg.eval
    argv = [
        "--model", str(model_dir), "--shards", e.shards, "--num_samples", str(e.num_samples),
        "--steps", str(e.steps), "--sampler", e.sampler, "--guidance_scale", str(e.guidance),
        "--batch_size", str(e.batch_size), "--grid_prompts", str(e.grid_prompts),
        "--mlflow_run_id", run_id, "--tracking_uri", tracking_uri,
        "--out", out, "--no_progress",
    ]  # fmt: skip
    if e.num_real:
        argv += ["--num_real", str(e.num_real)]
    _log(f"evaluating the final weights on {e.shards}: {e.num_samples} samples, {e.sampler} {e.steps} steps")
    if evaluate.main(argv) != 0:
        raise RuntimeError(
            f"the stage's weights are registered, but their evaluation on {e.shards} failed (see above); "
            "re-run it alone with jobs/evaluate.py"
        )


def check_text_emb(manifest: dict, ccfg: Any, shards: str) -> None:
    """Refuse shards whose precomputed ``text_emb`` is not what the model's own encoder gives:
    another encoder, or another token count (``max_text_tokens``; a longer encoding cut
    short differs from a short one, since every token attends to all the others)."""
    stored = manifest.get("text_encoder")  # {"name": ..., "max_tokens": ...}, written by jobs/preprocess.py
    want = {"name": ccfg.text_encoder, "max_tokens": ccfg.max_text_tokens}
    if not isinstance(stored, dict) or {k: stored.get(k) for k in want} != want:
        raise ConfigError(
            f"data.text_emb: {shards} was encoded with {stored!r}, the model needs {want}; re-run preprocessing "
            f"with --text_encoder {ccfg.text_encoder} --max_text_tokens {ccfg.max_text_tokens}, or drop data.text_emb"
        )


def _params(cfg: StageConfig) -> dict[str, str]:
    """The config as MLflow params: dotted keys, lists, booleans and null as JSON."""
    return {
        k: json.dumps(v) if isinstance(v, (list, bool)) or v is None else str(v)
        for k, v in flatten(to_dict(cfg)).items()
    }


def _load_parent(cfg: StageConfig) -> dict | None:
    """Fetch and check the previous stage before any worker starts.

    A registry alias is resolved to a version once, and that version is what is loaded:
    an alias that moves meanwhile cannot hand the workers another model than the one named
    in the log and the run's parameters."""
    from mdm.growth import check_growable, inner_state_dict, state_fingerprint
    from mdm.weights import load_pretrained

    src = cfg.parent_source()
    if src is None:
        return None
    version, load_from = None, src
    if src.startswith("models:/"):
        from jobs.registry import resolve_version

        name, version = resolve_version(src)  # LookupError with what to do
        load_from = f"models:/{name}/{version}"
    prev, pconfig = load_pretrained(load_from)
    try:
        check_growable(pconfig, cfg.model)
    except ConfigError as e:
        raise ConfigError(f"the previous stage {src} ({pconfig.name}) cannot grow into {cfg.model.name}: {e}") from None
    inner = inner_state_dict(prev)
    return {
        "source": src if version is None else f"{src} (version {version})",
        "version": version,
        "config": pconfig.to_json(),
        "state": prev.state_dict(),
        "inner_sha256": state_fingerprint(inner),
        "tensors": len(inner),
    }


# ---------------------------------------------------------------------------- resume
def check_resume(cfg: StageConfig, fs, root: str) -> None:
    """Before anything starts: a run with checkpoints resumes only with a config it can honour.

    The config a run was started with is kept beside its checkpoints (``CONFIG_FILE``).
    Re-submitting the run name with other values of fields a resume cannot honour (the
    model, the ZeRO stage, the worker count, the learning rate, ...) is refused with the
    list of what differs; changes in :data:`jobs.stage_config.RESUME_SAFE` (more steps,
    logging, checkpoints, evaluation) are reported and kept. Writes the accepted config.
    """
    import pyarrow.fs as pafs

    run_dir = f"{root.rstrip('/')}/{cfg.run.name}"
    path = f"{run_dir}/{CONFIG_FILE}"
    new = to_dict(cfg)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        with fs.open_input_stream(path) as f:
            stored = json.loads(f.read().decode())
        checkpoints = _checkpoint_dirs(fs, run_dir)
        if checkpoints:
            safe, unsafe = resume_changes(stored, new)
            if unsafe:
                raise ConfigError(
                    f"run {cfg.run.name!r} has checkpoints up to {max(checkpoints)} in {run_dir}, and this config "
                    f"differs from the one it was started with in fields a resume cannot honour:\n  "
                    + "\n  ".join(unsafe)
                    + "\nSet them back to the stored values to resume, or start a new run with another --name."
                )
            for line in safe:
                _log(f"resuming with a changed {line}")
    elif _checkpoint_dirs(fs, run_dir):
        _log(f"{run_dir} has checkpoints but no {CONFIG_FILE} (an older run): its config cannot be compared")
    fs.create_dir(run_dir, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(new, indent=2).encode())


def _checkpoint_dirs(fs, run_dir: str) -> list[str]:
    """The names of the run's checkpoint folders (``step_<N>``, as the worker reports them)."""
    import pyarrow.fs as pafs

    entries = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    return [e.base_name for e in entries if e.type == pafs.FileType.Directory and e.base_name.startswith("step_")]


# ---------------------------------------------------------------------------- resources
def cluster_capacity() -> dict[str, float] | None:
    """What the connected Ray cluster can offer: ``cpus``, ``gpus`` in all, and the most
    ``node_cpus``/``node_gpus`` of one node, with ``source`` saying whether these are the
    autoscaler's maxima or the nodes alive now. ``None`` for an autoscaling cluster whose
    autoscaler publishes no maxima (Ray's v1 autoscaler): what it can grow to is unknown."""
    import ray

    try:  # an autoscaling cluster (KubeRay, the cluster launcher) can grow to its configured maxima
        from ray._private.state import state

        config = state.get_cluster_config()
        groups = [dict(g.resources) for g in config.node_group_configs if g.max_count != 0] if config else []
        maxima = state.get_max_resources_from_cluster_config() if groups else None
        if not groups and _autoscales_without_maxima():
            return None
    except Exception:  # noqa: BLE001 - private APIs; without them the live nodes are what counts
        groups, maxima = [], None
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if maxima:
        total, source, per_node = {k: float(v) for k, v in maxima.items()}, "the autoscaler's maxima", groups + nodes
    else:
        total, source, per_node = {k: float(v) for k, v in ray.cluster_resources().items()}, "nodes alive now", nodes
    return {
        "cpus": total.get("CPU", 0.0),
        "gpus": total.get("GPU", 0.0),
        "node_cpus": max((float(n.get("CPU", 0)) for n in per_node), default=0.0),
        "node_gpus": max((float(n.get("GPU", 0)) for n in per_node), default=0.0),
        "source": source,
    }


def _autoscales_without_maxima() -> bool:
    """Ray's v1 autoscaler names node types (``ray.worker.gpu``) in its status report; a
    fixed cluster's report names each node after itself (``node_<id>``)."""
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
    report = (json.loads(raw).get("autoscaler_report") or {}) if raw else {}
    mapping = report.get("node_type_mapping") or {}
    return bool(report.get("pending_launches")) or any(kind != f"node_{node}" for node, kind in mapping.items())


DATA_CPUS = 1.0  # Ray Data's reading and decoding of the shards needs at least one CPU of its own


def check_cluster_fits(cfg: StageConfig, cap: dict[str, float]) -> None:
    """Refuse a stage the cluster cannot run, before any worker starts.

    Ray would start the workers and then wait forever for the CPU that reading the shards
    needs (Ray Data logs "Cluster resources are not enough to run any task ... may hang
    forever"): the workers' CPUs plus one for the data pipeline must fit.
    """
    s = cfg.scaling
    where = f" ({cap['source']})"
    if s.cpus_per_worker > cap["node_cpus"]:
        raise ConfigError(
            f"scaling.cpus_per_worker={s.cpus_per_worker:g}: no node of the cluster has that many CPUs "
            f"(the largest has {cap['node_cpus']:g}{where}); lower it"
        )
    if s.use_gpu and cap["node_gpus"] < 1:
        raise ConfigError(
            f"scaling.use_gpu=true, but the cluster has no GPU node{where}; add GPU nodes or set scaling.use_gpu=false"
        )
    if s.use_gpu and cap["gpus"] < s.num_workers:
        raise ConfigError(
            f"scaling.num_workers={s.num_workers} GPU workers, but the cluster has {cap['gpus']:g} GPUs{where}; "
            f"lower scaling.num_workers to {int(cap['gpus'])} or add GPUs"
        )
    need = s.num_workers * s.cpus_per_worker + DATA_CPUS
    if need > cap["cpus"] + 1e-9:
        spare = cap["cpus"] - DATA_CPUS
        hint = []
        if spare > 0:
            per = math.floor(spare / s.num_workers * 10) / 10
            if per > 0:
                hint.append(f"--set scaling.cpus_per_worker={per:g}")
            if s.cpus_per_worker <= spare:
                hint.append(f"--set scaling.num_workers={int(spare // s.cpus_per_worker)}")
        raise ConfigError(
            f"the cluster has {cap['cpus']:g} CPUs{where}; this stage needs {s.num_workers} workers x "
            f"{s.cpus_per_worker:g} CPU + {DATA_CPUS:g} CPU for reading the shards = {need:g}, so its workers would "
            "start and wait forever for their data. "
            + (f"Try {' or '.join(hint)}, or add CPUs." if hint else "Add CPUs to the cluster.")
        )


# ---------------------------------------------------------------------------- progress
def progress_board():
    """An actor the rank-0 worker tells where it is (``jobs.stage_worker.Heartbeat``)."""
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        def __init__(self):
            self.at, self.what = time.time(), "the trainer was started"

        def beat(self, what: str) -> None:
            self.at, self.what = time.time(), what

        def last(self) -> tuple[float, str]:
            return time.time() - self.at, self.what

    return ProgressBoard.remote()


def fit_with_watchdog(
    fit: Callable[[], Any], last_progress: Callable[[], tuple[float, str]], stall_timeout_s: float, poll_s: float = 10.0
) -> Any:
    """``fit()`` in a thread; raise :class:`StalledError` once ``last_progress()`` (seconds
    since the last progress, and what it was) says nothing moved for ``stall_timeout_s``
    (0: wait as long as ``fit`` takes). ``fit``'s own error is re-raised."""
    out: dict[str, Any] = {}

    def target():
        try:
            out["value"] = fit()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            out["error"] = e

    thread = threading.Thread(target=target, name="stage-fit", daemon=True)
    thread.start()
    started, seen = time.monotonic(), (0.0, "the trainer was started")
    while True:
        thread.join(poll_s)
        if not thread.is_alive():
            break
        if not stall_timeout_s:
            continue
        try:
            seen = last_progress()
        except Exception:  # noqa: BLE001 - an unanswered poll is no news; the clock runs on
            seen = (max(seen[0], time.monotonic() - started), seen[1])
        age, what = seen
        if age > stall_timeout_s:
            raise StalledError(
                f"no progress for {age:.0f} s (run.stall_timeout_s={stall_timeout_s:g}); the last was: {what}. "
                'Look above for Ray\'s reasons ("Cluster resources are not enough", workers pending, a stuck '
                "worker); the checkpoints so far are kept: fix the cause and re-submit the same run name to resume."
            )
    if "error" in out:
        raise out["error"]
    return out["value"]


def fail_fast_callback():
    """A Ray Train callback (it runs in the controller) that ends the run at the first worker
    error a restart would only repeat (:class:`jobs.stage_worker.NotRetryableError`, e.g. the
    accelerator's memory): raising from it fails the controller's step, which Ray Train does not
    retry. Every other worker error still gets the ``run.max_failures`` restarts."""
    import ray.train

    class FailFast(ray.train.UserCallback):
        def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
            for error in worker_exceptions.values():
                if isinstance(error, NotRetryableError):
                    raise NotRetryableError(str(error))

    return FailFast()


def _not_retryable(error: BaseException) -> NotRetryableError | None:
    """The :class:`NotRetryableError` that ended a run, from what ``trainer.fit`` raised."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, NotRetryableError):
            return error
        error = getattr(error, "controller_failure", None) or error.__cause__ or error.__context__
    return None


def parse_args(argv: list[str] | None, resolution: int, default_model: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"jobs/stage_{resolution}.py",
        description=(
            f"Train the stage whose top resolution is {resolution} (default model: {default_model}) on a Ray "
            "cluster with Ray Train + DeepSpeed ZeRO, log it to MLflow and register it as "
            f"models:/mdm@stage-{resolution}. Run it with `ray job submit --working-dir . -- python "
            f"jobs/stage_{resolution}.py ...` or plain `python` (starts a local Ray)."
        ),
        epilog=(
            "Every field of the stage config can be set with --set, e.g.\n"
            "  --set model=tiny-64-128             named model config (`mdm configs` lists them)\n"
            "  --set data.shards=s3://bucket/shards --set train.steps=20000 --set train.batch_size=32\n"
            "  --set deepspeed.stage=3 --set scaling.num_workers=8 --set scaling.use_gpu=true\n"
            "  --set init_from=models:/mdm/3        previous stage by version (default: its alias)\n"
            "  --set run.name=my-run                re-submitting the same name resumes the run\n"
            "  --set run.stall_timeout_s=3600       fail after this long without progress (0: never)\n"
            "Print every field and its default with --print_config."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, help="stage config file (JSON or YAML) applied over the defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one field (repeatable)")
    p.add_argument("--name", default=None, help="run name (same as --set run.name=...)")
    p.add_argument("--print_config", action="store_true", help="print the resolved config as JSON and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None, resolution: int, default_model: str) -> int:
    args = parse_args(argv, resolution, default_model)
    sets = list(args.set) + ([f"run.name={args.name}"] if args.name else [])
    try:
        cfg = load_stage_config(default_model, args.config, sets)
    except (ConfigError, OSError, ValueError) as e:
        print(f"stage_{resolution}: error: {e}", file=sys.stderr)
        return 2
    if cfg.resolution != resolution:
        print(
            f"stage_{resolution}: error: this job trains a model whose top resolution is {resolution}, but "
            f"{cfg.model.name} tops at {cfg.resolution}; use jobs/stage_{cfg.resolution}.py or another model",
            file=sys.stderr,
        )
        return 2
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    try:
        return run_stage(cfg)
    except (ConfigError, LookupError, FileNotFoundError, ValueError) as e:
        print(f"stage_{resolution}: error: {e}", file=sys.stderr)
        return 2
    except (StalledError, NotRetryableError) as e:
        print(f"stage_{resolution}: error: {e}", file=sys.stderr)
        import ray

        ray.shutdown()  # this driver owns the trainer: its workers go with it
        return 1


def run_stage(cfg: StageConfig) -> int:
    from jobs.registry import find_or_create_run, register_model, set_tracking, state_dir
    from pipelines.storage import arrow_fs

    if not cfg.data.shards:
        raise ConfigError("data.shards: set the shard folder, e.g. --set data.shards=s3://bucket/shards")
    name = cfg.run.name or f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = cfg.run.storage_path or (state_dir() / "runs").as_uri()
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=name, storage_path=storage))

    from pipelines.reader import open_shards, read_manifest

    manifest = read_manifest(cfg.data.shards)  # clear error if missing, before Ray starts
    missing = [r for r in cfg.model.model.resolutions if r not in manifest["resolutions"]]
    if missing:
        raise ConfigError(f"{cfg.data.shards} holds resolutions {manifest['resolutions']}, the model needs {missing}")
    if cfg.data.text_emb:
        check_text_emb(manifest, cfg.model.model.conditioning, cfg.data.shards)
    fs, root = arrow_fs(storage)
    check_resume(cfg, fs, root)
    tracking_uri = set_tracking(cfg.mlflow.tracking_uri or None, cfg.mlflow.experiment)
    parent = _load_parent(cfg)
    if parent:
        _log(f"previous stage: {parent['source']} ({parent['tensors']} tensors, sha256 {parent['inner_sha256'][:16]})")

    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True, ignore_reinit_error=True)
    capacity = cluster_capacity()
    if capacity is None:
        _log("an autoscaler without published maxima runs this cluster: resources not checked up front")
    else:
        check_cluster_fits(cfg, capacity)

    run_id, existed = find_or_create_run(
        cfg.mlflow.experiment, name, tags={"mdm.stage": cfg.alias, "mdm.config": cfg.model.name}
    )
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient()
    if not existed:
        params = _params(cfg)
        if parent:
            params["init.source"] = parent["source"]
            params["init.inner_sha256"] = parent["inner_sha256"]
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i : i + 100])
    else:
        _log(f"MLflow run {run_id} exists for {name}: resuming it")

    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    # The step log lines are the progress display; Ray Data's per-epoch bars would drown them.
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = open_shards(cfg.data.shards, cfg.model.model.resolutions, with_text_emb=cfg.data.text_emb)
    if cfg.data.cache:
        ds = ds.materialize()
    board = progress_board()
    payload: dict[str, Any] = {
        "config": to_dict(cfg),
        "tracking_uri": tracking_uri,
        "run_id": run_id,
        "progress": board,
    }
    if parent:
        payload["parent"] = {
            "source": parent["source"],
            "config": parent["config"],
            "inner_sha256": parent["inner_sha256"],
            "state_ref": ray.put(parent.pop("state")),
        }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=payload,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=root,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            callbacks=[fail_fast_callback()],
        ),
        datasets={"train": ds},
    )
    _log(f"run {name}: {cfg.scaling.num_workers} workers, ZeRO-{cfg.deepspeed.stage}, checkpoints in {storage}/{name}")

    def last_progress() -> tuple[float, str]:
        return ray.get(board.last.remote(), timeout=30)

    try:
        result = fit_with_watchdog(trainer.fit, last_progress, cfg.run.stall_timeout_s)
    except Exception as e:
        fatal = _not_retryable(e)
        if fatal is None:
            raise
        raise fatal from None
    try:
        _log(f"last progress from the workers: {last_progress()[1]}")
    except Exception:  # noqa: BLE001 - informational only
        pass
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}")
    if result.checkpoint is None:
        raise RuntimeError("training reported no checkpoint")
    with result.checkpoint.as_directory() as d:
        meta = json.loads((Path(d) / "trainer.json").read_text())
        if meta["step"] != cfg.train.steps:
            raise RuntimeError(f"the last checkpoint is of step {meta['step']}, not {cfg.train.steps}")
        _log(f"finished at step {meta['step']}; final checkpoint {result.checkpoint.path}")
        if cfg.mlflow.register:
            version = register_model(
                Path(d) / "model",
                name=cfg.mlflow.registered_model,
                alias=cfg.alias,
                run_id=run_id,
                step=meta["step"],
                tags={"run_name": name, "init_from": parent["source"] if parent else ""},
            )
            _log(f"registered models:/{cfg.mlflow.registered_model}/{version} as @{cfg.alias}")
            print(json.dumps({"run": name, "step": meta["step"], "version": version, "alias": cfg.alias}))
        if cfg.eval.shards:
            evaluate_stage(
                cfg, Path(d) / "model", run_id, tracking_uri, f"{storage.rstrip('/')}/{name}/evaluation.json"
            )
    client.set_terminated(run_id)
    return 0
