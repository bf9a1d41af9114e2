"""The typed config of a stage job, and what may change when a run is resumed.

``load_stage_config`` builds a :class:`StageConfig` from the defaults, a ``--config`` file
and ``--set`` overrides; :func:`resume_changes` compares the config a run was started with
against the one it is re-submitted with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mdm.config import ConfigError, MDMConfig, apply_overrides, from_dict, to_dict
from mdm.presets import get_config, list_configs
from mdm.training import TrainConfig
from mdm.zero import ZeroConfig

__all__ = [
    "StageConfig",
    "load_stage_config",
    "resume_changes",
    "flatten",
    "RESUME_SAFE",
]


@dataclass
class DataConfig:
    shards: str = ""  # URI of the preprocessed shards (jobs/preprocess.py --out)
    shuffle_buffer: int = 256  # rows in each worker's local shuffle buffer
    cache: bool = False  # decode once and keep the set in Ray's object store (small sets)
    text_emb: bool = False  # use the shards' precomputed text_emb instead of encoding captions
    prefetch_batches: int = 32  # batches read ahead by a thread, across epoch starts (0: none)


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
    stall_timeout_s: float = 1800.0  # fail the job after this long without progress (0: never)


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
    grid_prompts: int = 8  # rows of the sample grid drawn beside the report (held-out prompts x 4 seeds); 0: none


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
        if self.data.prefetch_batches < 0:
            raise ConfigError("data.prefetch_batches: must be >= 0 (0 reads in the training loop's thread)")
        if self.scaling.num_workers < 1:
            raise ConfigError("scaling.num_workers: must be >= 1")
        if self.run.checkpoint_every < 1 or self.run.log_every < 1:
            raise ConfigError("run.checkpoint_every and run.log_every: must be >= 1")
        if self.run.keep_checkpoints < 1:
            raise ConfigError("run.keep_checkpoints: must be >= 1")
        if self.run.stall_timeout_s < 0:
            raise ConfigError("run.stall_timeout_s: must be >= 0 (0 turns the stall check off)")
        if self.run.max_failures < 0:
            raise ConfigError("run.max_failures: must be >= 0 (-1 is not supported: failures must end a run)")
        if self.eval.shards and (
            self.eval.num_samples < 1 or self.eval.steps < 1 or self.eval.num_real < 0 or self.eval.grid_prompts < 0
        ):
            raise ConfigError(
                "eval.num_samples and eval.steps: must be >= 1; eval.num_real and eval.grid_prompts: >= 0 (0: every "
                "row, no grid)"
            )
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


# Fields a resumed run may change. Anything else would either fail inside DeepSpeed on every
# restart (model shapes, ZeRO stage, worker count: the optimizer partitions) or be silently
# ignored (the learning rate lives in the restored optimizer and scheduler state).
RESUME_SAFE = (
    "train.steps",
    "run.",
    "mlflow.",
    "eval.",
    "data.shards",
    "data.shuffle_buffer",
    "data.cache",
    "data.prefetch_batches",
    "scaling.cpus_per_worker",
    "train.gradient_checkpointing",  # recomputes activations: same maths, less memory
    "deepspeed.overlap_comm",
    "deepspeed.reduce_bucket_size",
    "deepspeed.compile",
    "deepspeed.compile_backend",
    "deepspeed.stage3_memory_efficient_linear",  # the same maths through torch's own linear
    "deepspeed.channels_last",
)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys (list items of mappings by index, as ``--set`` addresses them) -> values."""
    items = d.items() if isinstance(d, dict) else enumerate(d) if _mappings(d) else None
    if items is None:
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def _mappings(d: Any) -> bool:
    return isinstance(d, list) and bool(d) and all(isinstance(x, dict) for x in d)


def with_defaults(stored: dict) -> dict:
    """``stored`` with the fields a newer version added filled in at their defaults: a run
    started before a field existed ran as its default does, so resuming it is no change."""
    try:
        return to_dict(from_dict(StageConfig, stored))
    except (ConfigError, TypeError, ValueError):
        return stored  # compared as written: whatever no longer parses shows up as a change


def resume_changes(stored: dict, new: dict) -> tuple[list[str], list[str]]:
    """``(safe, unsafe)``: the dotted fields whose values differ between the config a run
    was started with (``stored``, as ``to_dict`` wrote it) and ``new``, each as
    ``"field: old -> new"``. Fields ``stored`` lacks count at their defaults."""
    old_leaves, new_leaves = flatten(with_defaults(stored)), flatten(new)
    safe, unsafe = [], []
    for key in sorted(set(old_leaves) | set(new_leaves)):
        a, b = old_leaves.get(key, "<absent>"), new_leaves.get(key, "<absent>")
        if a == b:
            continue
        line = f"{key}: {json.dumps(a)} -> {json.dumps(b)}"
        (safe if any(key == s or (s.endswith(".") and key.startswith(s)) for s in RESUME_SAFE) else unsafe).append(line)
    return safe, unsafe
