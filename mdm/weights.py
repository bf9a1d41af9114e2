"""Weights: EMA, and model folders of ``config.json`` + ``model.safetensors``.

A model folder is what every part of the project exchanges (training writes it, the
registry stores it, serving loads it). Loading never unpickles: configs are JSON and
tensors are safetensors.

Sources accepted by :func:`resolve_source`: a local folder, ``file://`` URI, any fsspec URI
(``s3://bucket/prefix``, endpoint from ``AWS_ENDPOINT_URL``), or ``models:/name@alias`` /
``models:/name/version`` from the MLflow registry.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import MDMConfig
from .storage import is_remote, url_to_fs
from .unet import MDMModel

__all__ = ["EMA", "save_pretrained", "load_pretrained", "resolve_source", "CONFIG_FILE", "WEIGHTS_FILE"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def ema_decay(decay: float, num_updates: int, warmup: bool = True) -> float:
    """The decay of update ``num_updates + 1``: ``min(decay, (1 + n) / (10 + n))`` with warm-up."""
    n = num_updates
    return min(decay, (1 + n) / (10 + n)) if warmup else decay


class EMA:
    """Exponential moving average of parameters: ``shadow <- shadow + (1 - d)(param - shadow)``.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` so early averages are not
    dominated by the random initialisation. Runs as fused foreach ops, no host sync.
    Under DeepSpeed ZeRO, :class:`mdm.zero.ShardedEMA` averages each rank's own partition.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.names = [n for n, p in model.named_parameters()]
        self.shadow = [p.detach().clone().float() for p in model.parameters()]

    def current_decay(self) -> float:
        return ema_decay(self.decay, self.num_updates, self.warmup)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach().float() if p.dtype != torch.float32 else p.detach() for p in model.parameters()]
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.current_decay())
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for p, s in zip(model.parameters(), self.shadow):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: s for n, s in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int | None = None) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for i, n in enumerate(self.names):
            self.shadow[i].copy_(state[n])
        if num_updates is not None:
            self.num_updates = num_updates


def save_pretrained(
    model: nn.Module, config: MDMConfig, folder: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None
) -> str | Path:
    """Write ``config.json`` and ``model.safetensors`` to a folder or storage URI.

    ``state_dict`` defaults to the model's (pass the EMA weights to publish those).
    """
    target = str(folder)
    if is_remote(target):
        with tempfile.TemporaryDirectory(prefix="mdm-save-") as tmp:
            save_pretrained(model, config, tmp, state_dict)
            fs, path = url_to_fs(target)
            fs.makedirs(path, exist_ok=True)
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                fs.put(os.path.join(tmp, name), f"{path.rstrip('/')}/{name}")
        return target
    out = Path(target[len("file://") :] if target.startswith("file://") else target)
    out.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    (out / CONFIG_FILE).write_text(config.to_json())
    save_file(sd, str(out / WEIGHTS_FILE), metadata={"format": "pt", "name": config.name})
    return out


def resolve_source(src: str) -> Path:
    """Turn a weights source into a local folder holding config.json and model.safetensors."""
    if src.startswith("models:/"):
        try:
            import mlflow
        except ImportError as e:
            raise RuntimeError("loading from the model registry needs mlflow (pip install mlflow)") from e
        from .storage import use_default_registry

        registry = use_default_registry()
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=src)
        except Exception as e:  # noqa: BLE001 - mlflow raises many types
            raise FileNotFoundError(
                f"cannot fetch {src} from the MLflow registry at {registry}: {e}. "
                "Check MLFLOW_TRACKING_URI (or MDM_STATE_DIR, whose SQLite registry is the default) "
                "and that the version or alias exists."
            ) from e
        path = Path(local)
        for cand in [path, path / "model", *path.rglob(CONFIG_FILE)]:
            cand = cand.parent if cand.name == CONFIG_FILE else cand
            if (cand / CONFIG_FILE).exists():
                return cand
        raise FileNotFoundError(f"{src} holds no {CONFIG_FILE}")
    if is_remote(src):
        fs, path = url_to_fs(src)
        if not fs.exists(f"{path.rstrip('/')}/{CONFIG_FILE}"):
            raise FileNotFoundError(f"{src} holds no {CONFIG_FILE}: is it a model folder?")
        local = Path(tempfile.mkdtemp(prefix="mdm-weights-"))
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            fs.get(f"{path.rstrip('/')}/{name}", str(local / name))
        return local
    path = Path(src[len("file://") :] if src.startswith("file://") else src).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"weights folder {src!r} does not exist")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).exists():
            raise FileNotFoundError(f"{src!r} has no {name}: a model folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    return path


def load_pretrained(src: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[MDMModel, MDMConfig]:
    """Rebuild the model of a weights folder/URI/registry entry, weights loaded strictly."""
    folder = resolve_source(str(src))
    config = MDMConfig.from_json((folder / CONFIG_FILE).read_text())
    model = MDMModel(config.model)
    state = load_file(str(folder / WEIGHTS_FILE), device="cpu")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"weights in {src} do not match config.json: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shapes {wrong[:3]}; was the folder written by another model?"
        )
    model.load_state_dict(state)
    return model.to(device).eval(), config
