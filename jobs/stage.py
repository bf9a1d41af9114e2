"""One progressive-training stage as a Ray job: Ray Train + DeepSpeed ZeRO + MLflow.

``jobs/stage_64.py``, ``stage_128.py``, ``stage_256.py`` and ``stage_1024.py`` call
:func:`main` with their resolution. The driver (this process):

1. resolves the stage config (named model config, ``--config`` file, ``--set`` overrides);
2. finds the previous stage (``models:/mdm@stage-<R_prev>`` by default) and checks that the
   new model grows from it, before any worker starts;
3. opens the shards for the model's resolutions and starts ``TorchTrainer`` with DeepSpeed
   on ``scaling.num_workers`` workers (checkpoints and resume under ``run.storage_path``);
4. registers the final EMA weights as a version of ``mlflow.registered_model`` and moves
   the alias ``stage-<R>``;
5. with ``eval.shards`` set, scores those weights on the held-out shards (FID/KID at every
   resolution, ``jobs/evaluate.py``) and logs the metrics and report to the stage's run.

Workers run :func:`train_loop_per_worker`: the step itself is :class:`mdm.zero.ZeroTrainer`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdm.config import ConfigError, MDMConfig, apply_overrides, from_dict, to_dict  # noqa: E402
from mdm.presets import get_config, list_configs  # noqa: E402
from mdm.training import TrainConfig  # noqa: E402
from mdm.zero import ZeroConfig  # noqa: E402

__all__ = ["StageConfig", "load_stage_config", "main", "train_loop_per_worker"]


@dataclass
class DataConfig:
    shards: str = ""  # URI of the preprocessed shards (jobs/preprocess.py --out)
    shuffle_buffer: int = 256  # rows in each worker's local shuffle buffer
    cache: bool = False  # decode once and keep the set in Ray's object store (small sets)
    text_emb: bool = False  # use the shards' precomputed text_emb instead of encoding captions


@dataclass
class Scaling:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0


@dataclass
class RunConfigSection:
    name: str = ""  # default: <model>-<timestamp>; re-submitting a name resumes that run
    storage_path: str = ""  # checkpoints: s3://bucket/runs, file://... (default: state folder)
    checkpoint_every: int = 500  # steps; the last step always checkpoints
    keep_checkpoints: int = 2
    max_failures: int = 3  # worker-group restarts from the last checkpoint
    log_every: int = 10


@dataclass
class TrackingConfig:
    tracking_uri: str = ""  # default: $MLFLOW_TRACKING_URI, else SQLite in the state folder
    experiment: str = "mdm"
    registered_model: str = "mdm"
    register: bool = True
    sample_every: int = 1000  # steps between sample grids (0: only at the end)
    sample_prompts: list[str] = field(
        default_factory=lambda: ["fox face, noto style", "red apple, fluent flat style", "rocket, openmoji style"]
    )
    sample_labels: list[int] = field(default_factory=lambda: [0, 1, 2])  # class-conditioned models
    sample_steps: int = 25
    sample_guidance: float = 3.0


@dataclass
class EvalConfig:
    """FID/KID at the end of the stage (``jobs/evaluate.py`` on the final EMA weights)."""

    shards: str = ""  # held-out shard set (or a folder with heldout/); "" skips the evaluation
    num_samples: int = 256  # images generated, one per held-out caption (cycled)
    num_real: int = 0  # held-out images compared with (0: every row)
    steps: int = 25
    sampler: str = "ddim"
    guidance: float = 3.0
    batch_size: int = 16


@dataclass
class StageConfig:
    """Everything a stage job reads; ``--set a.b=v`` addresses any field."""

    model: MDMConfig = field(default_factory=lambda: get_config("64"))
    init_from: str = "auto"  # auto: the previous stage's alias; none; or models:/..., a folder, s3://...
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: ZeroConfig = field(default_factory=ZeroConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scaling: Scaling = field(default_factory=Scaling)
    run: RunConfigSection = field(default_factory=RunConfigSection)
    mlflow: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> StageConfig:
        self.model.validate()
        self.train.validate()
        self.deepspeed.validate()
        if self.scaling.num_workers < 1:
            raise ConfigError("scaling.num_workers: must be >= 1")
        if self.run.checkpoint_every < 1 or self.run.log_every < 1:
            raise ConfigError("run.checkpoint_every and run.log_every: must be >= 1")
        if self.run.keep_checkpoints < 1:
            raise ConfigError("run.keep_checkpoints: must be >= 1")
        if self.run.max_failures < 0:
            raise ConfigError("run.max_failures: must be >= 0 (-1 is not supported: failures must end a run)")
        if self.eval.shards and (self.eval.num_samples < 1 or self.eval.steps < 1 or self.eval.num_real < 0):
            raise ConfigError("eval.num_samples and eval.steps: must be >= 1; eval.num_real: >= 0 (0: every row)")
        return self

    @property
    def resolution(self) -> int:
        return self.model.model.resolutions[-1]

    @property
    def alias(self) -> str:
        return f"stage-{self.resolution}"

    def parent_source(self) -> str | None:
        """Where the previous stage comes from, or None for the innermost stage."""
        if self.init_from == "none":
            return None
        if self.init_from != "auto":
            return self.init_from
        res = self.model.model.resolutions
        if len(res) == 1:
            return None
        return f"models:/{self.mlflow.registered_model}@stage-{res[-2]}"


def _model_from(value: Any) -> MDMConfig:
    """A named config (``64-128``), a path to a config.json, or a mapping."""
    if isinstance(value, MDMConfig):
        return value
    if isinstance(value, str):
        if value in list_configs():
            return get_config(value)
        path = Path(value)
        if path.is_file():
            return MDMConfig.from_json(path.read_text())
        raise ConfigError(f"model: {value!r} is neither a named config ({', '.join(list_configs())}) nor a file")
    return from_dict(MDMConfig, value, "model").validate()


def load_stage_config(
    default_model: str, config_file: str | None = None, overrides: list[str] | None = None
) -> StageConfig:
    """Defaults <- ``config_file`` (JSON or YAML) <- ``--set`` overrides, validated.

    ``model`` may be a named config; ``--set model=tiny-64-128`` swaps the whole model
    before the other overrides apply.
    """
    data: dict[str, Any] = {}
    if config_file:
        text = Path(config_file).read_text()
        if config_file.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ConfigError(f"{config_file}: expected a mapping at the top level")
    overrides = list(overrides or [])
    model_value: Any = data.pop("model", default_model)
    rest = []
    for item in overrides:
        if item.startswith("model="):
            model_value = item.split("=", 1)[1]
        else:
            rest.append(item)
    cfg = from_dict(StageConfig, {**data, "model": to_dict(_model_from(model_value))})
    cfg = apply_overrides(cfg, rest) if rest else cfg
    return cfg.validate()


# ---------------------------------------------------------------------------- the worker
def _batches(shard, cfg: StageConfig, encoder, device, epoch_seed: int):
    """Endless :class:`mdm.training.Batch` stream from this worker's dataset shard."""
    import numpy as np
    import torch

    from mdm.conditioning import make_condition
    from mdm.training import Batch
    from mdm.unet import Condition
    from pipelines.reader import iter_training_batches, to_tensors

    res = cfg.model.model.resolutions
    ccfg = cfg.model.model.conditioning
    epoch = 0
    while True:
        got = 0
        for b in iter_training_batches(
            shard, cfg.train.batch_size, shuffle_buffer=cfg.data.shuffle_buffer, seed=epoch_seed + epoch
        ):
            got += 1
            images = to_tensors(b, res, device="cpu")
            n = images[0].shape[0]
            size = torch.from_numpy(np.minimum(b["source_width"], b["source_height"]).astype("float32"))
            if cfg.data.text_emb and ccfg.kind == "text":
                emb = np.stack([np.frombuffer(x, dtype=np.float16) for x in b["text_emb"]])
                tokens = torch.from_numpy(emb.reshape(n, -1, ccfg.text_dim).astype(np.float32))
                mask = torch.arange(tokens.shape[1])[None, :] < torch.from_numpy(b["text_len"])[:, None]
                cond = Condition(tokens, mask, None, size)
            else:
                captions = [str(c) for c in b["caption"]] if ccfg.kind == "text" else None
                labels = b["label"].astype("int64").tolist() if ccfg.kind == "class" else None
                cond = make_condition(ccfg, n, captions, labels, size, encoder, "cpu")
            yield Batch(images, cond)
        if got == 0:
            raise RuntimeError(
                f"a worker's share of {cfg.data.shards} holds fewer rows than train.batch_size="
                f"{cfg.train.batch_size}: lower the batch size or the number of workers"
            )
        epoch += 1


def _log(msg: str) -> None:
    print(f"[stage] {msg}", flush=True)


def train_loop_per_worker(payload: dict) -> None:
    """Ray Train worker: build (or grow) the model, run ZeroTrainer, checkpoint, log."""
    import ray
    import ray.train
    import torch

    from mdm.conditioning import get_text_encoder, null_condition
    from mdm.growth import grow, inner_state_dict, state_fingerprint
    from mdm.unet import MDMModel
    from mdm.weights import save_pretrained
    from mdm.zero import ZeroTrainer

    cfg = from_dict(StageConfig, payload["config"]).validate()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not cfg.scaling.use_gpu:
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))  # no oversubscription
    torch.manual_seed(cfg.train.seed)  # same fresh weights on every rank
    mcfg = cfg.model
    parent = payload.get("parent")
    if parent is not None:
        pstate = ray.get(parent["state_ref"])
        pconfig = MDMConfig.from_json(parent["config"])
        prev = MDMModel(pconfig.model)
        prev.load_state_dict(pstate)
        model = grow(prev, pconfig, mcfg)
        inherited = inner_state_dict(prev).keys()
        got = state_fingerprint({k: v for k, v in model.state_dict().items() if k in inherited})
        if got != parent["inner_sha256"]:
            raise RuntimeError(f"rank {rank}: inner weights differ from {parent['source']} after growth")
        if rank == 0:
            _log(
                f"inner weights loaded exactly from {parent['source']}: {len(pstate)} tensors, "
                f"sha256 {got[:16]}; new shell initialised (adapters at zero)"
            )
        del prev, pstate
    else:
        model = MDMModel(mcfg.model)
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.scaling.use_gpu else torch.device("cpu")
    ccfg = mcfg.model.conditioning
    # The frozen text encoder encodes captions (unless the shards carry text_emb) and the
    # empty caption that caption dropout substitutes.
    encoder = get_text_encoder(ccfg.text_encoder, ccfg.max_text_tokens, "cpu") if ccfg.kind == "text" else None
    null = null_condition(ccfg, 1, encoder) if ccfg.kind != "none" else None
    trainer = ZeroTrainer(model, mcfg, cfg.train, cfg.deepspeed, null=null, device=device)

    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            trainer.load(d)
        start = trainer.step
        if rank == 0:
            _log(f"resumed from the checkpoint of step {start}")

    tracker = _Tracker(payload, cfg) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    batches = _batches(shard, cfg, None if cfg.data.text_emb else encoder, device, cfg.train.seed * 7919 + start)
    images_per_step = cfg.train.batch_size * cfg.train.grad_accum * world
    t0, last_step = time.perf_counter(), start
    steps = cfg.train.steps
    for _ in range(start, steps):
        per_res = trainer.train_step(batches)
        done = trainer.step
        is_last = done == steps
        if done % cfg.run.log_every == 0 or is_last or done == start + 1:
            per = per_res.float().cpu().tolist()  # host sync at log steps only
            elapsed = time.perf_counter() - t0
            ips = images_per_step * (done - last_step) / max(elapsed, 1e-9)
            t0, last_step = time.perf_counter(), done
            gn = trainer.grad_norm()
            if tracker is not None:
                tracker.log_step(done, per, trainer.lr(), gn, ips, world)
        sample_now = cfg.mlflow.sample_every > 0 and done % cfg.mlflow.sample_every == 0
        ckpt_now = done % cfg.run.checkpoint_every == 0 or is_last
        if sample_now or ckpt_now:  # the last step always checkpoints
            ema = trainer.export_ema()  # collective under ZeRO-3
            if tracker is not None and (sample_now or is_last):
                tracker.log_samples(done, ema, device)
            if ckpt_now:
                with tempfile.TemporaryDirectory(prefix="mdm-ckpt-") as d:
                    trainer.save(d)
                    if rank == 0:
                        save_pretrained(trainer.module, mcfg, Path(d) / "model", state_dict=ema)
                    ray.train.report(
                        {"step": done},
                        checkpoint=ray.train.Checkpoint.from_directory(d),
                        checkpoint_dir_name=f"step_{done:08d}",
                    )
                if rank == 0:
                    _log(f"checkpoint saved at step {done}")


class _Tracker:
    """Rank 0's MLflow logging: metrics every log step, sample grids per resolution."""

    def __init__(self, payload: dict, cfg: StageConfig):
        from mlflow import MlflowClient

        self.client = MlflowClient(payload["tracking_uri"])
        self.run_id = payload["run_id"]
        self.cfg = cfg
        self.pipe = None

    def log_step(self, step: int, per: list[float], lr: float, grad_norm: float | None, ips: float, world: int):
        from mlflow.entities import Metric

        res = self.cfg.model.model.resolutions
        total = sum(w * v for w, v in zip(self.cfg.model.diffusion.weights(len(res)), per))
        now = int(time.time() * 1000)
        values = {"loss": total, "lr": lr, "images_per_s": ips, "images_per_s_per_worker": ips / world}
        values.update({f"loss_{r}": v for r, v in zip(res, per)})
        if grad_norm is not None:
            values["grad_norm"] = grad_norm
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])
        parts = " ".join(f"{r}:{v:.4f}" for r, v in zip(res, per))
        _log(
            f"step {step}/{self.cfg.train.steps} loss {total:.4f} ({parts}) lr {lr:.2e} "
            f"grad_norm {grad_norm if grad_norm is None else round(grad_norm, 3)} {ips:.1f} img/s"
        )

    def log_samples(self, step: int, ema: dict, device) -> None:
        import torch

        from mdm.data import make_grid
        from mdm.pipeline import MDMPipeline
        from mdm.unet import MDMModel

        mcfg = self.cfg.model
        if self.pipe is None:
            self.pipe = MDMPipeline(MDMModel(mcfg.model), mcfg, device)
        self.pipe.model.load_state_dict(ema)
        kind = mcfg.model.conditioning.kind
        n = len(self.cfg.mlflow.sample_prompts) if kind != "class" else len(self.cfg.mlflow.sample_labels)
        n = n if kind != "none" else 4
        with torch.no_grad():
            images = self.pipe.generate(
                self.cfg.mlflow.sample_prompts if kind == "text" else None,
                num_samples=n,
                labels=self.cfg.mlflow.sample_labels if kind == "class" else None,
                guidance_scale=self.cfg.mlflow.sample_guidance if kind != "none" else 1.0,
                steps=self.cfg.mlflow.sample_steps,
                sampler="dpmpp_2m",
                seed=0,
            )
        for r, x in zip(mcfg.model.resolutions, images):
            img = make_grid(x, nrow=n, upscale_to=mcfg.model.resolutions[-1])
            self.client.log_image(self.run_id, img, artifact_file=f"samples/step_{step:07d}_{r}px.png")
        _log(f"sample grids of step {step} logged ({n} per resolution)")


# ---------------------------------------------------------------------------- the driver
def evaluate_stage(cfg: StageConfig, model_dir: Path, run_id: str, tracking_uri: str, out: str) -> None:
    """``jobs/evaluate.py`` on the stage's final weights, logged to the stage's MLflow run."""
    from jobs import evaluate

    e = cfg.eval
    argv = [
        "--model", str(model_dir), "--shards", e.shards, "--num_samples", str(e.num_samples),
        "--steps", str(e.steps), "--sampler", e.sampler, "--guidance_scale", str(e.guidance),
        "--batch_size", str(e.batch_size), "--mlflow_run_id", run_id, "--tracking_uri", tracking_uri,
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


def _flatten(d: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = json.dumps(d) if isinstance(d, (list, bool)) or d is None else str(d)
    return out


def _load_parent(cfg: StageConfig) -> dict | None:
    """Fetch and check the previous stage before any worker starts."""
    from mdm.growth import check_growable, inner_state_dict, state_fingerprint
    from mdm.weights import load_pretrained

    src = cfg.parent_source()
    if src is None:
        return None
    version = None
    if src.startswith("models:/"):
        from jobs.registry import resolve_version

        name, version = resolve_version(src)  # LookupError with what to do
    prev, pconfig = load_pretrained(src)
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


def run_stage(cfg: StageConfig) -> int:
    from jobs.registry import find_or_create_run, register_model, set_tracking, state_dir

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
    ccfg = cfg.model.model.conditioning
    if cfg.data.text_emb and manifest.get("text_encoder") != ccfg.text_encoder:
        raise ConfigError(
            f"data.text_emb: the shards were encoded with {manifest.get('text_encoder')!r}, the model uses "
            f"{ccfg.text_encoder!r}; re-run preprocessing with --text_encoder {ccfg.text_encoder} or drop text_emb"
        )
    tracking_uri = set_tracking(cfg.mlflow.tracking_uri or None, cfg.mlflow.experiment)
    parent = _load_parent(cfg)
    if parent:
        _log(f"previous stage: {parent['source']} ({parent['tensors']} tensors, sha256 {parent['inner_sha256'][:16]})")

    run_id, existed = find_or_create_run(
        cfg.mlflow.experiment, name, tags={"mdm.stage": cfg.alias, "mdm.config": cfg.model.name}
    )
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient()
    if not existed:
        params = _flatten(to_dict(cfg))
        if parent:
            params["init.source"] = parent["source"]
            params["init.inner_sha256"] = parent["inner_sha256"]
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i : i + 100])
    else:
        _log(f"MLflow run {run_id} exists for {name}: resuming it")

    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.storage import arrow_fs

    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True, ignore_reinit_error=True)
    # The step log lines are the progress display; Ray Data's per-epoch bars would drown them.
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = open_shards(cfg.data.shards, cfg.model.model.resolutions, with_text_emb=cfg.data.text_emb)
    if cfg.data.cache:
        ds = ds.materialize()
    payload: dict[str, Any] = {"config": to_dict(cfg), "tracking_uri": tracking_uri, "run_id": run_id}
    if parent:
        payload["parent"] = {
            "source": parent["source"],
            "config": parent["config"],
            "inner_sha256": parent["inner_sha256"],
            "state_ref": ray.put(parent.pop("state")),
        }
    fs, root = arrow_fs(storage)
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
        ),
        datasets={"train": ds},
    )
    _log(f"run {name}: {cfg.scaling.num_workers} workers, ZeRO-{cfg.deepspeed.stage}, checkpoints in {storage}/{name}")
    result = trainer.fit()
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
                tags={"run_name": name, "step": str(meta["step"]), "init_from": parent["source"] if parent else ""},
            )
            _log(f"registered models:/{cfg.mlflow.registered_model}/{version} as @{cfg.alias}")
            print(json.dumps({"run": name, "step": meta["step"], "version": version, "alias": cfg.alias}))
        if cfg.eval.shards:
            evaluate_stage(
                cfg, Path(d) / "model", run_id, tracking_uri, f"{storage.rstrip('/')}/{name}/evaluation.json"
            )
    client.set_terminated(run_id)
    return 0
