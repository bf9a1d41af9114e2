"""Named configs: the paper's stages, the ratio-2 chain and tiny CPU configs.

A name lists the resolutions of its chain, innermost first: ``64-128-256`` is the model
that stage 256 trains, grown from ``64-128``. ``get_config(name)`` returns a fresh,
validated :class:`~mdm.config.MDMConfig`.

- ``64``: the innermost 64x64 text-conditioned UNet of the reference cc12m_64x64 config
  (channels 256/512/768, 2 res blocks a level, 1 and 5 attention layers with FFN at the
  two lower levels, mid block, 2048-d token context).
- ``64-128``, ``64-128-256``: ratio-2 chain, a light conv shell per stage (p = 1).
- ``64-256``, ``64-256-1024``: the paper's ratio-4 chain (p = 1 for 64->256, p = 2 for 1024),
  the 256 shell as in the reference cc12m_256x256 config.
- ``small-64``, ``small-64-128``: a ~70M-parameter chain that trains in minutes on one GPU
  (``bench/emoji_run.py``); ``small-128`` is their single-resolution baseline of
  about the same size (the paper's comparison).
- ``tiny-32``, ``tiny-32-64``, ``tiny-64``, ``tiny-64-128``: a few hundred thousand
  parameters, train on CPU in seconds.

Loss (all predict v): ``64``, ``64-256`` and ``64-256-1024`` use the reference's loss —
measured on eps (``loss_target_type: DDPM``, i.e. v-MSE weighted by alpha^2); ``64-256``
computes the 256 resolution on 2/3 of each batch (``mixed_ratio: '2:1'``) with equal
weights; ``64-256-1024`` weights 64:256:1024 as 1:4:16 (the reference's
``multi_res_weights: '16:4:1'``, listed there from the top resolution down) on the whole
batch. The ratio-2 chains and the tiny configs keep the plain v loss, equal weights and
the whole batch at every resolution.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from .config import ConditioningConfig, ConfigError, DiffusionConfig, MDMConfig, ModelConfig, UNetConfig

__all__ = ["get_config", "list_configs", "chain_of"]


def _inner_64() -> UNetConfig:
    return UNetConfig(
        channels=[256, 512, 768],
        num_res_blocks=[2, 2, 2],
        attention_layers=[0, 1, 5],
        attention_ffn=True,
        mid_block=True,
    )


def _text(context_dim: int = 2048) -> ConditioningConfig:
    return ConditioningConfig(kind="text", context_dim=context_dim)


def _cfg(
    name: str,
    resolutions: list[int],
    unets: list[UNetConfig],
    shift_power: float,
    conditioning: ConditioningConfig | None = None,
    **loss,
) -> MDMConfig:
    return MDMConfig(
        name=name,
        model=ModelConfig(
            resolutions=resolutions,
            unets=unets,
            emb_dim=4 * unets[0].channels[0],
            conditioning=conditioning or _text(),
        ),
        diffusion=DiffusionConfig(prediction="v", shift_power=shift_power, **loss),
    )


def _shell_128() -> UNetConfig:
    return UNetConfig(channels=[128, 256], num_res_blocks=[2, 2])


def _shell_256_r2() -> UNetConfig:
    return UNetConfig(channels=[64, 128], num_res_blocks=[2, 2])


def _shell_256_r4() -> UNetConfig:
    return UNetConfig(channels=[64, 128, 256], num_res_blocks=[2, 2, 1])


def _shell_1024_r4() -> UNetConfig:
    return UNetConfig(channels=[32, 64, 128], num_res_blocks=[2, 2, 1])


def _tiny_inner() -> UNetConfig:
    return UNetConfig(
        channels=[32, 64],
        num_res_blocks=[1, 1],
        attention_layers=[0, 1],
        attention_ffn=True,
        mid_block=True,
        num_groups=8,
        num_heads=4,
    )


def _tiny_inner_64() -> UNetConfig:
    """The tiny inner net at 64 px: one more level, attention only at 16x16 (CPU-fast)."""
    return UNetConfig(
        channels=[16, 32, 64],
        num_res_blocks=[1, 1, 1],
        attention_layers=[0, 0, 1],
        attention_ffn=True,
        mid_block=True,
        num_groups=8,
        num_heads=4,
    )


def _tiny_shell() -> UNetConfig:
    return UNetConfig(channels=[16, 32], num_res_blocks=[1, 1], num_groups=8)


def _small_inner() -> UNetConfig:
    """The single-GPU 64 px inner net of the emoji runs (``bench/emoji_run.py``): ~69M parameters,
    attention at 32 and 16 px."""
    return UNetConfig(
        channels=[128, 256, 384],
        num_res_blocks=[2, 2, 2],
        attention_layers=[0, 1, 2],
        attention_ffn=True,
        mid_block=True,
    )


def _small_shell() -> UNetConfig:
    return UNetConfig(channels=[64, 128], num_res_blocks=[2, 2])


def _small_128_flat() -> UNetConfig:
    """The single-resolution 128 px baseline: the small inner net's levels under one more
    128 px level like the shell's, so its size matches ``small-64-128``."""
    return UNetConfig(
        channels=[64, 128, 256, 384],
        num_res_blocks=[2, 2, 2, 2],
        attention_layers=[0, 0, 1, 2],
        attention_ffn=True,
        mid_block=True,
    )


def _small_text() -> ConditioningConfig:
    return ConditioningConfig(kind="text", max_text_tokens=24)


def _tiny_text() -> ConditioningConfig:
    return ConditioningConfig(kind="text", context_dim=64, max_text_tokens=16)


_PRESETS: dict[str, Callable[[], MDMConfig]] = {
    "64": lambda: _cfg("64", [64], [_inner_64()], 1.0, loss_target="eps"),
    "64-128": lambda: _cfg("64-128", [64, 128], [_inner_64(), _shell_128()], 1.0),
    "64-128-256": lambda: _cfg("64-128-256", [64, 128, 256], [_inner_64(), _shell_128(), _shell_256_r2()], 1.0),
    "64-256": lambda: _cfg(
        "64-256", [64, 256], [_inner_64(), _shell_256_r4()], 1.0, loss_target="eps", mixed_ratio=2 / 3
    ),
    "64-256-1024": lambda: _cfg(
        "64-256-1024",
        [64, 256, 1024],
        [_inner_64(), _shell_256_r4(), _shell_1024_r4()],
        2.0,
        loss_target="eps",
        loss_weights=[1.0, 4.0, 16.0],
    ),
    "tiny-32": lambda: _cfg("tiny-32", [32], [_tiny_inner()], 1.0, _tiny_text()),
    "tiny-32-64": lambda: _cfg("tiny-32-64", [32, 64], [_tiny_inner(), _tiny_shell()], 1.0, _tiny_text()),
    "tiny-64": lambda: _cfg("tiny-64", [64], [_tiny_inner_64()], 1.0, _tiny_text()),
    "tiny-64-128": lambda: _cfg("tiny-64-128", [64, 128], [_tiny_inner_64(), _tiny_shell()], 1.0, _tiny_text()),
    "small-64": lambda: _cfg("small-64", [64], [_small_inner()], 1.0, _small_text()),
    "small-64-128": lambda: _cfg("small-64-128", [64, 128], [_small_inner(), _small_shell()], 1.0, _small_text()),
    "small-128": lambda: _cfg("small-128", [128], [_small_128_flat()], 1.0, _small_text()),
}


def list_configs() -> list[str]:
    return list(_PRESETS)


def get_config(name: str) -> MDMConfig:
    """A fresh, validated copy of the named config."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown config {name!r}; choose one of: {', '.join(_PRESETS)}")
    return copy.deepcopy(_PRESETS[name]()).validate()


def chain_of(name: str) -> list[str]:
    """The stage names leading to ``name``: ``chain_of('64-128-256') == ['64', '64-128', '64-128-256']``."""
    prefix = "tiny-" if name.startswith("tiny-") else ""
    parts = name[len(prefix) :].split("-")
    return [prefix + "-".join(parts[: i + 1]) for i in range(len(parts))]
