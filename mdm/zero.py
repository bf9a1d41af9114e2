"""The per-worker training step under DeepSpeed ZeRO (stage 1, 2 or 3), without Ray.

Ray Train workers run it in ``jobs/``; ``torchrun`` or plain ``python`` runs it for GPU
benchmarks. One optimizer step:

    trainer = ZeroTrainer(model, config, train, ZeroConfig(stage=2), null=null)
    per_res = trainer.train_step(batches)      # (R,) losses on the device, no host sync
    trainer.save(folder)                       # DeepSpeed state + EMA shard + RNG, every rank
    trainer.load(folder)                       # resume: weights, optimizer, LR, step, EMA, RNG
    weights = trainer.export_ema()             # full EMA state dict on rank 0 (collective)

Precision: ``bf16`` runs the forward under ``torch.autocast`` with fp32 weights and fp32
gradients: autocast casts every weight to bf16 at every use (what ``bench/`` measures);
``bf16-weights`` is DeepSpeed's own ``bf16`` mode under the same autocast: the module's
weights and gradients are bf16, the optimizer steps fp32 master copies of them, so no
weight is cast in the step (ops autocast keeps in fp32, GroupNorm and the loss, still run
in fp32); ``fp32`` is used on CPU (gloo).

Layout and compilation: on GPU the step feeds channels-last activations. DeepSpeed keeps
parameters in flat contiguous buffers, so ``channels_last_weights`` stores each convolution's
weight as (out, kH, kW, in) and shows the convolution a channels-last view of it (exports
stay (out, in, kH, kW)). ``compile`` goes through DeepSpeed's ``engine.compile``, for every
ZeRO stage; ``deepcompile`` adds DeepSpeed's DeepCompile (CUDA only), which turns ZeRO's
per-parameter and per-module hooks into passes of the compiled graph.

The EMA is kept on each rank's own partition: under ZeRO-3 every rank averages only the
slice of each parameter it owns (``ds_tensor``), so EMA memory shrinks with the world size
like the weights do, and :meth:`ShardedEMA.full_state_dict` gathers it for export.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ConfigError, MDMConfig
from .training import Batch, TrainConfig, TrainStep, lr_multiplier, make_optimizer
from .unet import Condition
from .weights import ema_decay

__all__ = ["ZeroConfig", "ZeroTrainer", "ShardedEMA", "deepspeed_config", "CHECKPOINT_GLOBALS"]

STATE_TAG = "state"

# The only classes DeepSpeed 0.19's ZeRO checkpoints hold besides tensors and containers
# (found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO 0-3 files).
# Checkpoints are read with ``weights_only=True`` and these alone allowed: whoever can
# write the run storage can then make a load fail, but never run code in a worker.
CHECKPOINT_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _checkpoint_globals() -> list:
    import importlib

    out = []
    for path in CHECKPOINT_GLOBALS:
        module, name = path.rsplit(".", 1)
        out.append(getattr(importlib.import_module(module), name))
    return out


def _weights_only_engine(config_params):
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True``.

    DeepSpeed's own engine calls ``torch.load(weights_only=False)``: a crafted optimizer
    file in the run storage would run arbitrary code in every worker that resumes."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(_checkpoint_globals()):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:
                raise pickle.UnpicklingError(
                    f"{path} holds objects a DeepSpeed checkpoint does not (refused, nothing of it was run): "
                    f"{str(e).splitlines()[0][:300]}. If a newer DeepSpeed writes a new class into its "
                    "checkpoints, add it to mdm.zero.CHECKPOINT_GLOBALS after checking it is plain data."
                ) from None

    return WeightsOnlyCheckpointEngine(config_params)


Precision = Literal["auto", "bf16", "bf16-weights", "fp32"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


@dataclass
class ZeroConfig:
    """DeepSpeed settings of a stage."""

    stage: int = 2  # ZeRO stage: 1 optimizer states, 2 + gradients, 3 + parameters
    # auto: bf16 on GPU, fp32 on CPU; bf16-weights: DeepSpeed's bf16 mode (bf16 weights, fp32 masters)
    precision: Precision = "auto"
    overlap_comm: bool = True
    reduce_bucket_size: int = 50_000_000
    channels_last: bool = True  # on GPU: channels-last activations
    # Convolution weights (kernels larger than 1x1) stored as (out, kH, kW, in), contiguous,
    # so DeepSpeed's flat buffers keep them; each convolution sees a channels-last view of
    # that storage, so cuDNN gets NHWC weights without a layout copy at every use.
    # Exported weights and state dicts are the usual (out, in, kH, kW).
    channels_last_weights: bool = False
    compile: bool = False  # torch.compile the model through the engine (DeepSpeed's engine.compile)
    compile_backend: str = "inductor"  # torch.compile backend (eager/aot_eager: trace only, for checks)
    # DeepSpeed's DeepCompile (ZeRO 1-3, CUDA only): the ZeRO work (gradient reduction,
    # ZeRO-3's gathers) becomes passes of the compiled graph instead of per-parameter and
    # per-module Python hooks; implies compile
    deepcompile: bool = False
    # ZeRO-3: parameters of at most this many elements stay whole on every rank instead of
    # being gathered before and freed after each module's use (DeepSpeed's default: 1e5)
    stage3_persistence_threshold: int = 100_000
    # ZeRO-3: modules whose parameters per descendant fall under this are fetched as one unit,
    # with one pair of hooks instead of one per submodule (DeepSpeed's default 0: off)
    stage3_module_granularity_threshold: int = 0
    # ZeRO-3: DeepSpeed's memory-efficient linear (its default) replaces
    # torch.nn.functional.linear for the whole process with a Python autograd function
    stage3_memory_efficient_linear: bool = True

    def validate(self) -> ZeroConfig:
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.stage: {self.stage} is not a ZeRO stage (0, 1, 2 or 3)")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"deepspeed.precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.stage3_module_granularity_threshold < 0:
            raise ConfigError(
                f"deepspeed.stage3_module_granularity_threshold: {self.stage3_module_granularity_threshold} is "
                "negative; give parameters per descendant module (0 turns the grouping off)"
            )
        if self.deepcompile and self.stage == 0:
            raise ConfigError("deepspeed.deepcompile: needs ZeRO stage 1, 2 or 3 (DeepCompile compiles ZeRO's work)")
        if self.deepcompile and self.compile_backend not in ("inductor", "eager"):
            raise ConfigError(
                f"deepspeed.compile_backend: DeepCompile runs on inductor or eager, not {self.compile_backend!r}"
            )
        if self.stage3_persistence_threshold < 0:
            raise ConfigError(
                f"deepspeed.stage3_persistence_threshold: {self.stage3_persistence_threshold} is negative; "
                "give a parameter size in elements (0 partitions every parameter)"
            )
        return self


def deepspeed_config(
    train: TrainConfig, zero: ZeroConfig, world_size: int, autocast: torch.dtype | None = None
) -> dict:
    """The DeepSpeed JSON config of a stage (optimizer and schedule are passed as objects).

    ``autocast``: the dtype of the step's ``torch.autocast``. DeepSpeed (0.16 and later)
    switches an outer autocast *off* inside ``engine.forward`` unless its own
    ``torch_autocast`` section is on, so without that section a "bf16" step silently runs
    the whole forward in fp32.
    """
    zero_opt: dict = {"stage": zero.stage}
    if zero.stage > 0:
        zero_opt.update(
            overlap_comm=zero.overlap_comm,
            contiguous_gradients=True,
            reduce_bucket_size=zero.reduce_bucket_size,
        )
    if zero.stage == 3:
        zero_opt.update(
            stage3_gather_16bit_weights_on_model_save=False,
            stage3_param_persistence_threshold=zero.stage3_persistence_threshold,
            stage3_module_granularity_threshold=zero.stage3_module_granularity_threshold,
            memory_efficient_linear=zero.stage3_memory_efficient_linear,
        )
    extra: dict = {}
    if zero.deepcompile:
        extra["compile"] = {"deepcompile": True}
    if autocast is not None:
        extra["torch_autocast"] = {"enabled": True, "dtype": str(autocast).removeprefix("torch.")}
    if zero.precision == "bf16-weights":
        extra["bf16"] = {"enabled": True}
    return {
        **extra,
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero_opt,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


_STORED = ".parametrizations.weight.original"


class _NHWCWeight(nn.Module):
    """Parametrization of a convolution's weight: stored (O, kH, kW, I), seen (O, I, kH, kW)
    with channels-last strides (a view, no copy)."""

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.permute(0, 3, 1, 2)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.permute(0, 2, 3, 1).contiguous()


def store_conv_weights_channels_last(model: nn.Module) -> int:
    """Reparametrize every convolution with a kernel larger than 1x1 (1x1 weights are
    channels-last already); returns how many. Values are unchanged."""
    from torch.nn.utils import parametrize

    count = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.weight.shape[2:] != (1, 1) and not parametrize.is_parametrized(m, "weight"):
            parametrize.register_parametrization(m, "weight", _NHWCWeight())
            count += 1
    return count


def standard_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of a model with channels-last stored weights, in the usual names and
    (O, I, kH, kW) layout; other entries pass through."""
    out = {}
    for k, v in state.items():
        if k.endswith(_STORED):
            out[k[: -len(_STORED)] + ".weight"] = v.permute(0, 3, 1, 2).contiguous()
        else:
            out[k] = v
    return out


class ShardedEMA:
    """EMA of the parameters this rank owns: whole tensors (ZeRO 0–2) or the rank's
    partition of each tensor (ZeRO-3). ``shadow <- shadow + (1 - d)(param - shadow)`` with
    the warm-up ``d = min(decay, (1 + n) / (10 + n))``; fused foreach ops, no host sync."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.named = list(module.named_parameters())
        self.partitioned = any(hasattr(p, "ds_tensor") for _, p in self.named)
        self.shadow = [self._local(p).detach().float().clone() for _, p in self.named]

    def _local(self, p: torch.Tensor) -> torch.Tensor:
        return p.ds_tensor if self.partitioned else p

    def current_decay(self) -> float:
        return ema_decay(self.decay, self.num_updates, self.warmup)

    @torch.no_grad()
    def update(self) -> None:
        local = [self._local(p).detach() for _, p in self.named]
        local = [t if t.dtype == torch.float32 else t.float() for t in local]
        torch._foreach_lerp_(self.shadow, local, 1.0 - self.current_decay())
        self.num_updates += 1

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full EMA tensors (on CPU) on rank 0, ``None`` elsewhere; a collective under ZeRO-3."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        if not self.partitioned:
            return {n: s.detach().cpu().clone() for (n, _), s in zip(self.named, self.shadow)} if rank == 0 else None
        # Every rank holds partition r of each tensor: elements [r*ps, (r+1)*ps) of its flat
        # view, zero-padded at the end. One all-gather moves all shards at once.
        flat = torch.cat([s.reshape(-1) for s in self.shadow])
        world = dist.get_world_size()
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if rank != 0:
            return None
        table = torch.stack(gathered).cpu()  # (world, sum of partition sizes)
        out, offset = {}, 0
        for (name, p), s in zip(self.named, self.shadow):
            size = s.numel()
            full = table[:, offset : offset + size].reshape(-1)[: p.ds_numel]
            out[name] = full.reshape(p.ds_shape).clone()
            offset += size
        return out

    def local_state(self) -> dict[str, torch.Tensor]:
        return {f"{i}:{n}": s for i, ((n, _), s) in enumerate(zip(self.named, self.shadow))}

    @torch.no_grad()
    def load_local_state(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        for i, ((n, _), s) in enumerate(zip(self.named, self.shadow)):
            key = f"{i}:{n}"
            if key not in state or state[key].shape != s.shape:
                raise ValueError(
                    f"EMA checkpoint does not match this model at {n!r} (a different model or world size?)"
                )
            s.copy_(state[key])
        self.num_updates = num_updates


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ZeroTrainer:
    """A model, its DeepSpeed engine, the EMA and the step counter of one worker."""

    def __init__(
        self,
        model: nn.Module,
        config: MDMConfig,
        train: TrainConfig,
        zero: ZeroConfig,
        null: Condition | None = None,
        device: torch.device | str | None = None,
    ):
        import deepspeed

        train.validate()
        zero.validate()
        self.rank, self.world = _rank_world()
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        on_gpu = self.device.type == "cuda"
        precision = zero.precision if zero.precision != "auto" else ("bf16" if on_gpu else "fp32")
        self.autocast = torch.bfloat16 if precision in ("bf16", "bf16-weights") else None
        self.channels_last = zero.channels_last and on_gpu
        self.config, self.train, self.zero = config, train, zero
        if hasattr(model, "set_gradient_checkpointing"):
            model.set_gradient_checkpointing(train.gradient_checkpointing)
        # Weights stay contiguous: DeepSpeed broadcasts and flattens parameters as plain
        # buffers (NCCL refuses channels-last strides). Channels-last inputs still make the
        # convolutions run NHWC.
        model = model.to(self.device)
        if zero.channels_last_weights:
            store_conv_weights_channels_last(model)
        opt = make_optimizer(model, train)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, train))
        if zero.deepcompile and not on_gpu:
            raise ConfigError("deepspeed.deepcompile: DeepSpeed's DeepCompile runs on CUDA only; set it false here")
        if not dist.is_initialized():
            # plain `python` is a world of one; torchrun and Ray Train set these themselves
            for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
                os.environ.setdefault(key, value)
            os.environ.setdefault("MASTER_PORT", "29511")
            deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False)
            self.rank, self.world = _rank_world()
        ds_config = deepspeed_config(train, zero, self.world, self.autocast)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=ds_config
        )
        if zero.compile or zero.deepcompile:
            # DeepSpeed's own entry point: it compiles the module under the engine, turns its
            # NVTX ranges off (graph breaks) and, with deepcompile, swaps ZeRO's hooks for passes.
            self.engine.compile(backend=zero.compile_backend)
        # Loads never unpickle code (see _weights_only_engine); saving is DeepSpeed's own.
        self.engine.checkpoint_engine = _weights_only_engine(self.engine._config)
        self.step_fn = TrainStep(self.engine, config, null)
        self.ema = ShardedEMA(self.engine.module, train.ema_decay)
        # Per-rank stream of noise, timesteps and caption dropout.
        self.generator = torch.Generator(self.device).manual_seed(train.seed * 1009 + self.rank)
        self.step = 0

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def train_step(self, batches: Iterator[Batch]) -> torch.Tensor:
        """One optimizer step over ``grad_accum`` micro-batches; returns the (R,) mean
        per-resolution losses, left on the device."""
        acc = None
        for _ in range(self.train.grad_accum):
            batch = next(batches).to(self.device, channels_last=self.channels_last)
            with torch.autocast(self.device.type, self.autocast, enabled=self.autocast is not None):
                loss, per_res = self.step_fn.loss(batch, self.generator)
            self.engine.backward(loss)
            self.engine.step()
            acc = per_res if acc is None else acc + per_res
        self.ema.update()
        self.step += 1
        return acc / self.train.grad_accum

    def grad_norm(self) -> float | None:
        """Global gradient norm of the last step (a host sync: call at log steps only)."""
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    # ------------------------------------------------------------------ checkpoints
    def save(self, folder: str | os.PathLike, extra: dict | None = None) -> None:
        """Every rank writes its part of the state into ``folder`` (a collective)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        client = {"step": self.step, "ema_updates": self.ema.num_updates, "world_size": self.world, **(extra or {})}
        self.engine.save_checkpoint(str(folder), tag=STATE_TAG, client_state=client)
        # ZeRO 0-2: every rank's EMA is the same whole model, rank 0 writes it once.
        if self.ema.partitioned or self.rank == 0:
            name = f"ema_rank{self.rank}.safetensors" if self.ema.partitioned else "ema.safetensors"
            save_file({k: v.contiguous().cpu() for k, v in self.ema.local_state().items()}, str(folder / name))
        rng = {"generator": self.generator.get_state(), "torch_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        save_file(rng, str(folder / f"rng_rank{self.rank}.safetensors"))
        if self.rank == 0:
            (folder / "trainer.json").write_text(json.dumps(client, indent=2))

    def load(self, folder: str | os.PathLike) -> dict:
        """Restore everything :meth:`save` wrote; returns the client state (step, …)."""
        folder = Path(folder)
        meta = json.loads((folder / "trainer.json").read_text())
        if meta.get("world_size") != self.world and (self.ema.partitioned or self.zero.stage > 0):
            raise ValueError(
                f"checkpoint at {folder} was written by {meta.get('world_size')} workers, this run has {self.world}; "
                "resume with the same number of workers"
            )
        _, client = self.engine.load_checkpoint(
            str(folder), tag=STATE_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if client is None:
            raise FileNotFoundError(f"no DeepSpeed state in {folder}")
        name = f"ema_rank{self.rank}.safetensors" if self.ema.partitioned else "ema.safetensors"
        self.ema.load_local_state(load_file(str(folder / name), device=str(self.device)), client["ema_updates"])
        rng_file = folder / f"rng_rank{self.rank}.safetensors"
        if rng_file.exists():
            rng = load_file(str(rng_file))
            self.generator.set_state(rng["generator"])
            torch.set_rng_state(rng["torch_cpu"])
            if "torch_cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["torch_cuda"], self.device)
        self.step = int(client["step"])
        return client

    def export_ema(self) -> dict[str, torch.Tensor] | None:
        """The EMA weights as a full state dict on rank 0 (``None`` on other ranks), in the
        model's usual names and layouts."""
        state = self.ema.full_state_dict()
        return None if state is None else standard_state(state)
