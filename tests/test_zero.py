"""The per-worker DeepSpeed step (``mdm.zero.ZeroTrainer``) runs in the precision it is given.

DeepSpeed 0.16 and later switch an outer ``torch.autocast`` off inside ``engine.forward``
unless the config's ``torch_autocast`` section is on: the stage jobs' "bf16" step ran its
whole forward in fp32 (measured on an H200, config 64, batch 64, eager ZeRO-2: 103.7 img/s
and 79 GiB before, 134.0 img/s and 68 GiB after). DeepSpeed's switch looks at CUDA's
autocast only, so the behaviour itself shows on a GPU alone (``bench/zero_step.py
--engine_autocast_off`` runs the step as it was); here the config that fixes it.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from mdm.training import TrainConfig
from mdm.zero import ZeroConfig, deepspeed_config


def test_config_keeps_autocast_inside_the_engine():
    cfg = deepspeed_config(TrainConfig(), ZeroConfig(), 1, torch.bfloat16)
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "torch_autocast" not in deepspeed_config(TrainConfig(), ZeroConfig(), 1, None)


def _tiny_trainer(stage: int, **zero):
    from mdm import MDMModel, get_config
    from mdm.zero import ZeroTrainer

    cfg = get_config("tiny-32")
    cfg.model.conditioning.kind = "none"
    torch.manual_seed(0)
    return ZeroTrainer(
        MDMModel(cfg.model), cfg, TrainConfig(batch_size=2, warmup_steps=1), ZeroConfig(stage=stage, **zero)
    )


def test_zero3_groups_fine_grained_modules_under_the_granularity_threshold():
    """The threshold reaches DeepSpeed: above it, small submodules are fetched as one leaf
    unit (fewer per-module hooks, the host cost of ZeRO-3 on one GPU); at 0 none is."""
    from mdm.config import ConfigError

    grouped = _tiny_trainer(3, stage3_module_granularity_threshold=10**9)
    assert any(getattr(m, "_z3_leaf", False) for m in grouped.engine.module.modules())
    plain = _tiny_trainer(3)
    assert not any(getattr(m, "_z3_leaf", False) for m in plain.engine.module.modules())
    with pytest.raises(ConfigError, match="stage3_module_granularity_threshold"):
        ZeroConfig(stage=3, stage3_module_granularity_threshold=-1).validate()


def test_zero3_keeps_parameters_under_the_persistence_threshold_whole():
    """The threshold reaches DeepSpeed: above every parameter's size nothing is partitioned
    (no gather/free per module, the one-GPU case); at 0 every parameter is."""
    from mdm.config import ConfigError

    every = _tiny_trainer(3, stage3_persistence_threshold=10**12)
    params = list(every.engine.module.parameters())
    assert params and all(p.ds_persist for p in params)
    none = _tiny_trainer(3, stage3_persistence_threshold=0)
    assert not any(p.ds_persist for p in none.engine.module.parameters())
    with pytest.raises(ConfigError, match="stage3_persistence_threshold"):
        ZeroConfig(stage=3, stage3_persistence_threshold=-1).validate()


def _batches():
    from mdm.training import Batch
    from mdm.unet import Condition

    g = torch.Generator().manual_seed(0)
    while True:
        yield Batch([torch.rand(2, 3, 32, 32, generator=g) * 2 - 1], Condition())


class _Payload:
    """Unpickling this runs ``touch <marker>``: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("stage", [2, 3])
def test_a_checkpoint_resumes_but_code_pickled_into_it_never_runs(tmp_path, stage):
    """Whoever can write the run storage must not run code in the workers that resume from
    it: DeepSpeed's own loader unpickles anything (``weights_only=False``)."""
    trainer = _tiny_trainer(stage)
    batches = _batches()
    for _ in range(2):
        trainer.train_step(batches)
    trainer.save(tmp_path / "ckpt")
    ref = {k: v.clone() for k, v in trainer.export_ema().items()}

    trainer.train_step(batches)  # move on, then resume: weights, optimizer and step come back
    assert trainer.load(tmp_path / "ckpt")["step"] == 2 and trainer.step == 2
    for k, v in trainer.export_ema().items():  # the EMA (gathered under ZeRO-3) comes back too
        assert torch.equal(v, ref[k]), k
    trainer.train_step(batches)

    optim = next((tmp_path / "ckpt" / "state").glob("*optim_states.pt"))
    state = torch.load(optim, weights_only=False)  # trusted here: we wrote it
    marker = tmp_path / "code-ran"
    state["payload"] = _Payload(marker)
    torch.save(state, optim)
    with pytest.raises(pickle.UnpicklingError, match="refused, nothing of it was run"):
        trainer.load(tmp_path / "ckpt")
    assert not marker.exists(), "the checkpoint's pickled code ran"


def test_bf16_weights_mode_keeps_bf16_weights_and_steps_fp32_masters(tmp_path):
    """``precision: bf16-weights`` is DeepSpeed's bf16 mode: the module computes with bf16
    weights (nothing to cast at each use), and the optimizer steps fp32 master copies, so
    an update far below bf16's resolution (lr 1e-6 against weights of ~0.05, whose bf16
    spacing is ~2e-4) still moves the masters. A checkpoint brings the masters back."""
    from mdm import MDMModel, get_config
    from mdm.zero import ZeroTrainer

    cfg = get_config("tiny-32")
    cfg.model.conditioning.kind = "none"
    torch.manual_seed(0)
    train = TrainConfig(batch_size=2, warmup_steps=1, lr=1e-6, ema_decay=0.9)
    trainer = ZeroTrainer(MDMModel(cfg.model), cfg, train, ZeroConfig(stage=2, precision="bf16-weights"))
    assert trainer.autocast == torch.bfloat16
    weights = [p for p in trainer.engine.module.parameters() if p.requires_grad]
    assert weights and all(p.dtype == torch.bfloat16 for p in weights)
    masters = trainer.optimizer.single_partition_of_fp32_groups
    assert masters and all(m.dtype == torch.float32 for m in masters)
    before_masters = [m.detach().clone() for m in masters]
    before_weights = [p.detach().clone() for p in weights]
    batches = _batches()
    losses = [trainer.train_step(batches) for _ in range(2)]
    assert all(torch.isfinite(x).all() for x in losses)
    moved = [(m - b).abs().max().item() for m, b in zip(masters, before_masters)]
    assert max(moved) > 0 and max(moved) < 1e-4  # the masters took the tiny update
    # ... which no bf16 weight of magnitude > 0.01 (spacing >= 6e-5) can show yet
    big = [(p[b.abs() > 0.01], b[b.abs() > 0.01]) for p, b in zip(weights, before_weights)]
    assert sum(b.numel() for _, b in big) > 1000
    assert all(torch.equal(p, b) for p, b in big)
    assert all(v.dtype == torch.float32 for v in trainer.export_ema().values())

    trainer.save(tmp_path / "ckpt")
    saved = [m.detach().clone() for m in masters]
    trainer.train_step(batches)
    trainer.load(tmp_path / "ckpt")
    assert all(torch.equal(m, s) for m, s in zip(trainer.optimizer.single_partition_of_fp32_groups, saved))


_GRAPH_CALLS = {"compiled": 0, "ran": 0}


def _counting_backend(gm, example_inputs):
    """A torch.compile backend that runs the captured graph as it is and counts it."""
    _GRAPH_CALLS["compiled"] += 1

    def run(*args):
        _GRAPH_CALLS["ran"] += 1
        return gm.forward(*args)

    return run


@pytest.mark.parametrize("stage", [2, 3])
def test_compile_reaches_the_engines_step_and_computes_the_same(stage):
    """``deepspeed.compile`` goes through DeepSpeed's ``engine.compile``: the graphs the
    training step runs are the compiled ones (a backend that counts them sees every step),
    and the losses equal the eager step's. ZeRO-3 compiles too (it was refused before)."""
    from torch._dynamo.backends.registry import list_backends

    torch._dynamo.reset()
    if "mdm_counting" not in list_backends(exclude_tags=()):
        torch._dynamo.register_backend(compiler_fn=_counting_backend, name="mdm_counting")
    eager = _tiny_trainer(stage)
    compiled = _tiny_trainer(stage, compile=True, compile_backend="mdm_counting")
    assert compiled.engine.is_compiled
    a, b = _batches(), _batches()
    before = dict(_GRAPH_CALLS)
    for _ in range(3):
        ran = _GRAPH_CALLS["ran"]
        loss_c = compiled.train_step(b)
        assert _GRAPH_CALLS["ran"] > ran, "a training step ran no compiled graph"
        assert torch.equal(loss_c, eager.train_step(a))
    assert _GRAPH_CALLS["compiled"] > before["compiled"]
    torch._dynamo.reset()


def test_deepcompile_is_refused_where_deepspeed_cannot_run_it():
    from mdm.config import ConfigError

    assert deepspeed_config(TrainConfig(), ZeroConfig(deepcompile=True), 1)["compile"] == {"deepcompile": True}
    assert "compile" not in deepspeed_config(TrainConfig(), ZeroConfig(compile=True), 1)
    with pytest.raises(ConfigError, match="stage 1, 2 or 3"):
        ZeroConfig(stage=0, deepcompile=True).validate()
    with pytest.raises(ConfigError, match="CUDA only"):
        _tiny_trainer(2, deepcompile=True)  # this machine has no GPU


@pytest.mark.parametrize("stage", [2, 3])
def test_channels_last_weights_survive_deepspeeds_flat_buffers_and_change_nothing(tmp_path, stage):
    """DeepSpeed flattens parameters into contiguous buffers, so a channels-last weight comes
    out contiguous and every convolution pays a layout copy (0.85-0.88x of the plain step on
    an H200, 2026-11-26). With ``channels_last_weights`` the stored parameter is contiguous
    (O, kH, kW, I) and the convolution sees a channels-last view of it; the step computes the
    same, and the exported weights have the usual names and (O, I, kH, kW) layout."""
    from mdm import MDMModel, get_config

    plain = _tiny_trainer(stage)
    nhwc = _tiny_trainer(stage, channels_last_weights=True)
    convs = [m for m in nhwc.engine.module.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs
    for m in convs:
        stored = m.parametrizations.weight.original
        assert stored.is_contiguous()  # what DeepSpeed's buffers hold
        seen = m.weight  # (gathered first under ZeRO-3)
        assert seen.shape == (m.out_channels, m.in_channels, *m.kernel_size)
        assert seen.is_contiguous(memory_format=torch.channels_last) and not seen.is_contiguous()
    a, b = _batches(), _batches()
    for _ in range(3):
        torch.testing.assert_close(nhwc.train_step(b), plain.train_step(a), rtol=1e-5, atol=1e-6)
    got, want = nhwc.export_ema(), plain.export_ema()
    cfg = get_config("tiny-32")
    cfg.model.conditioning.kind = "none"
    fresh = MDMModel(cfg.model).state_dict()
    assert got.keys() == want.keys() == fresh.keys()
    for k, v in got.items():
        assert v.shape == fresh[k].shape and v.is_contiguous(), k
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6)
    nhwc.save(tmp_path / "ckpt")
    nhwc.train_step(b)
    nhwc.load(tmp_path / "ckpt")
    for k, v in nhwc.export_ema().items():
        assert torch.equal(v, got[k]), k


def test_switching_the_weight_layout_is_not_resume_safe():
    """The optimizer's flat state follows the stored layout: a resumed run may not change it."""
    from jobs.stage_config import load_stage_config, resume_changes
    from mdm.config import to_dict

    old = to_dict(load_stage_config("tiny-32"))
    new = to_dict(load_stage_config("tiny-32", overrides=["deepspeed.channels_last_weights=true"]))
    safe, unsafe = resume_changes(old, new)
    assert not safe and [u.split(":")[0] for u in unsafe] == ["deepspeed.channels_last_weights"]
    # a run stored before the field existed ran as its default does: resuming it is no change,
    # and turning the field on is refused all the same
    before = to_dict(load_stage_config("tiny-32"))
    for key in ("channels_last_weights", "deepcompile", "compile_backend", "stage3_memory_efficient_linear"):
        del before["deepspeed"][key]
    assert resume_changes(before, to_dict(load_stage_config("tiny-32"))) == ([], [])
    safe, unsafe = resume_changes(before, new)
    assert not safe and [u.split(":")[0] for u in unsafe] == ["deepspeed.channels_last_weights"]


def test_zero3_leaves_torchs_linear_alone_when_asked():
    """DeepSpeed's ZeRO-3 swaps ``torch.nn.functional.linear`` for its own Python autograd
    function in the whole process (every other model in the worker, the sampler included, then
    runs through it); ``stage3_memory_efficient_linear=false`` keeps torch's own."""
    import torch.nn.functional as F

    builtin = torch._C._nn.linear  # what F.linear is until DeepSpeed replaces it
    F.linear = builtin  # an earlier ZeRO-3 engine of this process may have replaced it already
    try:
        _tiny_trainer(3, stage3_memory_efficient_linear=False)
        assert F.linear is builtin
        _tiny_trainer(3)  # DeepSpeed's default, what the option exists to turn off
        assert F.linear is not builtin
    finally:
        F.linear = builtin
