"""The per-worker training step, and a plain-PyTorch loop around it.

``TrainStep`` computes the multi-resolution loss of one batch with caption/class dropout;
it is what Ray Train workers run inside DeepSpeed and what ``bench/`` times under plain
``python``/``torchrun``. Nothing in the step synchronises with the host: losses stay on
the device until a caller asks for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from .conditioning import drop_condition
from .config import ConfigError, MDMConfig
from .diffusion import MultiResolutionDiffusion
from .unet import Condition
from .weights import EMA

__all__ = [
    "Batch",
    "PixelBatch",
    "TrainConfig",
    "TrainStep",
    "lr_multiplier",
    "make_optimizer",
    "pixels_to_unit",
    "train_local",
]


@dataclass
class Batch:
    """Images at every resolution (lowest first, float in [-1, 1]) and their condition."""

    images: list[torch.Tensor]
    cond: Condition

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, channels_last: bool = False) -> Batch:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        imgs = [x.to(device=device, dtype=dtype or x.dtype, memory_format=fmt, non_blocking=True) for x in self.images]
        return Batch(imgs, self.cond.to(device, dtype))


def pixels_to_unit(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, R, R, 3) pixels -> float32 (N, 3, R, R) in [-1, 1], on ``x``'s device.

    The permuted uint8 view is already channels-last in memory, so ``channels_last=True``
    costs no extra copy."""
    y = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@dataclass
class PixelBatch:
    """A batch as the data pipeline delivers it: uint8 (N, R, R, 3) pixels at every resolution
    (lowest first) and the condition, on the host.

    ``to`` returns the :class:`Batch` on ``device``: the uint8 bytes cross (4x fewer than
    float) and are converted there. After :meth:`pin_memory` (done off the training thread)
    the copies are asynchronous, so feeding a step never makes the host wait for the GPU;
    from pageable memory each copy would wait for every kernel queued before it."""

    pixels: list[torch.Tensor]
    cond: Condition

    def pin_memory(self) -> PixelBatch:
        return PixelBatch([x.pin_memory() for x in self.pixels], self.cond.pin_memory())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, channels_last: bool = False) -> Batch:
        imgs = [pixels_to_unit(x.to(device, non_blocking=True), channels_last) for x in self.pixels]
        if dtype is not None:
            imgs = [x.to(dtype) for x in imgs]
        return Batch(imgs, self.cond.to(device, dtype, non_blocking=True))


@dataclass
class TrainConfig:
    """Optimisation settings shared by the local loop and the Ray/DeepSpeed jobs."""

    steps: int = 1000
    batch_size: int = 16  # per worker
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup_steps: int = 100
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 2.0  # 0 disables
    grad_accum: int = 1
    ema_decay: float = 0.999
    seed: int = 0
    gradient_checkpointing: bool = False

    def validate(self) -> TrainConfig:
        if self.steps < 1:
            raise ConfigError("train.steps: must be >= 1")
        if self.batch_size < 1:
            raise ConfigError("train.batch_size: must be >= 1")
        if self.lr <= 0:
            raise ConfigError("train.lr: must be positive")
        if self.warmup_steps < 0:
            raise ConfigError("train.warmup_steps: must be >= 0")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"train.lr_schedule: {self.lr_schedule!r} is not 'constant' or 'cosine'")
        if self.grad_accum < 1:
            raise ConfigError("train.grad_accum: must be >= 1")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError("train.ema_decay: must be in [0, 1)")
        if len(self.betas) != 2:
            raise ConfigError("train.betas: needs two values")
        return self


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1, then constant or cosine down to ``min_lr_ratio``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (is everything frozen?)")
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=fused)


class TrainStep:
    """Loss of one batch: caption dropout, then the weighted multi-resolution loss.

    ``null`` is the one-sample null condition (the empty caption's encoding) that dropout
    substitutes; it is moved to the batch's device once.
    """

    def __init__(self, model: nn.Module, config: MDMConfig, null: Condition | None = None):
        self.model = model
        self.config = config
        self.diffusion = MultiResolutionDiffusion(config.diffusion, config.model.resolutions)
        self.null = null
        self._null_on: dict[tuple, Condition] = {}

    def _null_for(self, cond: Condition) -> Condition | None:
        if self.null is None:
            return None
        ref = cond.text_tokens if cond.text_tokens is not None else cond.labels
        if ref is None:
            return None
        key = (ref.device, cond.text_tokens.dtype if cond.text_tokens is not None else None)
        if key not in self._null_on:
            self._null_on[key] = self.null.to(ref.device, key[1])
        return self._null_on[key]

    def loss(self, batch: Batch, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        cond = batch.cond
        p = self.config.diffusion.cond_dropout
        kind = self.config.model.conditioning.kind
        if p > 0 and kind != "none":
            if kind == "text" and self.null is None:
                raise ValueError("caption dropout needs the null (empty-caption) condition: pass null= to TrainStep")
            cond = drop_condition(cond, self._null_for(cond) or Condition(), p, generator)
        return self.diffusion.loss(self.model, batch.images, cond, generator=generator)


def train_local(
    model: nn.Module,
    config: MDMConfig,
    batches: Iterator[Batch],
    train: TrainConfig,
    null: Condition | None = None,
    ema: EMA | None = None,
    device: str | torch.device = "cpu",
    log_every: int = 10,
    on_log: Callable[[int, dict], None] | None = None,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` in this process for ``train.steps`` optimizer steps.

    Returns the loss of every logged step (host sync only at log steps).
    """
    train.validate()
    model.to(device).train()
    step_fn = TrainStep(model, config, null)
    opt = make_optimizer(model, train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, train))
    gen = torch.Generator(device=device).manual_seed(train.seed)
    history: list[float] = []
    bar = tqdm(range(train.steps), desc=f"train {config.name}", disable=not progress)
    for step in bar:
        opt.zero_grad(set_to_none=True)
        acc = None
        for _ in range(train.grad_accum):
            batch = next(batches).to(device)
            loss, per_res = step_fn.loss(batch, gen)
            (loss / train.grad_accum).backward()
            acc = per_res if acc is None else acc + per_res
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip) if train.grad_clip > 0 else None
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(model)
        if step % log_every == 0 or step == train.steps - 1:
            assert acc is not None
            per = (acc / train.grad_accum).tolist()
            total = float(sum(w * v for w, v in zip(step_fn.diffusion.loss_weights, per)))
            history.append(total)
            bar.set_postfix(loss=f"{total:.4f}")
            if on_log is not None:
                metrics = {"loss": total, "lr": sched.get_last_lr()[0]}
                metrics.update({f"loss_{r}": v for r, v in zip(config.model.resolutions, per)})
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                on_log(step, metrics)
    model.eval()
    return history
