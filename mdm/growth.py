"""Progressive growth: wrap a trained stage-k model in a new outer shell (stage k+1).

The grown model's conditioner and inner NestedUNet load the stage-k weights exactly; the
new shell's adapters start at zero, so at initialisation the grown model predicts what
the stage-k model predicted at every inner resolution.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch

from .config import ConfigError, MDMConfig, to_dict
from .unet import MDMModel

__all__ = ["check_growable", "grow", "inner_state_dict", "state_fingerprint"]


def check_growable(prev: MDMConfig, new: MDMConfig) -> None:
    """Raise :class:`ConfigError` unless ``new`` is ``prev`` plus one outer shell."""
    pm, nm = prev.model, new.model
    if len(nm.resolutions) != len(pm.resolutions) + 1 or nm.resolutions[:-1] != pm.resolutions:
        raise ConfigError(
            f"cannot grow a {pm.resolutions} model into {nm.resolutions}: the new config must add exactly one "
            f"resolution on top of {pm.resolutions}"
        )
    for i, (a, b) in enumerate(zip(pm.unets, nm.unets)):
        if to_dict(a) != to_dict(b):
            raise ConfigError(f"model.unets[{i}] differs from the previous stage's; inner UNets must match exactly")
    for key in ("in_channels", "emb_dim", "conditioning"):
        if to_dict(getattr(pm, key)) != to_dict(getattr(nm, key)):
            raise ConfigError(
                f"model.{key} differs from the previous stage's ({getattr(pm, key)} vs {getattr(nm, key)})"
            )


def inner_state_dict(model: MDMModel) -> dict[str, torch.Tensor]:
    """The weights of ``model`` named as they appear inside a model grown from it."""
    out = {}
    for k, v in model.state_dict().items():
        out[k.replace("unet.", "unet.inner.", 1) if k.startswith("unet.") else k] = v
    return out


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a state dict (order-independent)."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def grow(prev_model: MDMModel, prev_config: MDMConfig, new_config: MDMConfig, freeze_inner: bool = False) -> MDMModel:
    """Build the stage-(k+1) model of ``new_config`` from the stage-k model.

    Every stage-k tensor is copied exactly (verified); only the new shell is fresh.
    ``freeze_inner`` stops gradients to the inherited weights.
    """
    check_growable(prev_config, new_config)
    model = MDMModel(dataclasses.replace(new_config.model))
    inherited = inner_state_dict(prev_model)
    own = model.state_dict()
    for k, v in inherited.items():
        if k not in own or own[k].shape != v.shape:
            raise ConfigError(f"stage weights do not fit the grown model at {k!r}")
    result = model.load_state_dict(inherited, strict=False)
    if result.unexpected_keys:
        raise ConfigError(f"unexpected stage weights: {result.unexpected_keys[:5]}")
    new_state = model.state_dict()
    for k, v in inherited.items():
        if not torch.equal(new_state[k], v.to(new_state[k].device)):
            raise RuntimeError(f"inner weight {k} did not load exactly")
    if freeze_inner:
        for name, p in model.named_parameters():
            if name in inherited:
                p.requires_grad_(False)
    return model.to(next(prev_model.parameters()).device)
