"""Progressive growth: the grown model predicts what the stage-k model predicted."""

import pytest
import torch
from conftest import randomize_

from mdm import ConfigError, MDMModel, get_config, grow
from mdm.config import apply_overrides
from mdm.unet import Condition


def _cond(cfg, b, seed=0, source_size=300.0):
    c = cfg.model.conditioning
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, c.max_text_tokens, dtype=torch.bool)
    mask[:, :5] = True
    size = None if source_size is None else torch.full((b,), float(source_size))
    return Condition(torch.randn(b, c.max_text_tokens, c.text_dim, generator=g), mask, source_size=size)


@pytest.mark.parametrize("source_size", [None, 48.0, 300.0])  # None: the default users get
@pytest.mark.parametrize("inner_name, outer_name", [("tiny-32", "tiny-32-64"), ("tiny-64", "tiny-64-128")])
def test_grown_model_reproduces_inner_predictions(inner_name, outer_name, source_size):
    """Exact at the inner resolutions with or without a source size: each level sees the
    size clamped at its own resolution, which is what the previous stage trained with."""
    inner_cfg, outer_cfg = get_config(inner_name), get_config(outer_name)
    torch.manual_seed(0)
    small = randomize_(MDMModel(inner_cfg.model)).eval()  # zero-initialised layers perturbed too
    big = grow(small, inner_cfg, outer_cfg).eval()
    b = 3
    lo, hi = inner_cfg.model.resolutions[0], outer_cfg.model.resolutions[-1]
    z_lo, z_hi = torch.randn(b, 3, lo, lo), torch.randn(b, 3, hi, hi)
    t = torch.tensor([0.1, 0.5, 0.9])
    cond = _cond(inner_cfg, b, source_size=source_size)
    with torch.no_grad():
        ref = small([z_lo], t, cond)[0]
        out = big([z_lo, z_hi], t, cond)
    assert torch.equal(out[0], ref)  # exactly, not approximately
    assert ref.abs().mean() > 1e-3  # the check is not vacuous
    # After the adapters move, the outer shell does influence the inner prediction.
    with torch.no_grad():
        big.unet.in_adapter.weight.add_(0.1)
        moved = big([z_lo, z_hi], t, cond)[0]
    assert not torch.allclose(moved, ref)


def test_inner_weights_load_exactly_and_freeze():
    cfg32, cfg64 = get_config("tiny-32"), get_config("tiny-32-64")
    small = randomize_(MDMModel(cfg32.model))
    big = grow(small, cfg32, cfg64, freeze_inner=True)
    big_sd = big.state_dict()
    for k, v in small.state_dict().items():
        k2 = k.replace("unet.", "unet.inner.", 1) if k.startswith("unet.") else k
        assert torch.equal(big_sd[k2], v), k
    frozen = {n for n, p in big.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in big.named_parameters() if p.requires_grad}
    assert frozen and trainable
    assert all(n.startswith("unet.inner.") or not n.startswith("unet.") for n in frozen)
    assert all(n.startswith("unet.") and not n.startswith("unet.inner.") for n in trainable)


def test_growth_rejects_mismatched_stages():
    cfg32, cfg64 = get_config("tiny-32"), get_config("tiny-32-64")
    small = MDMModel(cfg32.model)
    with pytest.raises(ConfigError, match="add exactly one resolution"):
        grow(small, cfg32, get_config("tiny-64-128"))
    wider = apply_overrides(cfg64, ["model.unets.0.channels=[32,128]"])
    with pytest.raises(ConfigError, match=r"model.unets\[0\] differs"):
        grow(small, cfg32, wider)
    other_text = apply_overrides(cfg64, ["model.conditioning.context_dim=32"])
    with pytest.raises(ConfigError, match="model.conditioning differs"):
        grow(small, cfg32, other_text)


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = get_config("tiny-32-64")
    torch.manual_seed(0)
    model = randomize_(MDMModel(cfg.model))
    zs = [torch.randn(2, 3, r, r) for r in cfg.model.resolutions]
    t, cond = torch.rand(2), _cond(cfg, 2)

    def grads(ckpt):
        model.zero_grad()
        model.set_gradient_checkpointing(ckpt)
        out = model(zs, t, cond)
        sum(o.square().mean() for o in out).backward()
        return [p.grad.clone() for p in model.parameters()]

    a, b = grads(False), grads(True)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a, b))


def test_channels_last_matches_contiguous():
    cfg = get_config("tiny-32-64")
    model = randomize_(MDMModel(cfg.model)).eval()
    zs = [torch.randn(2, 3, r, r) for r in cfg.model.resolutions]
    t, cond = torch.rand(2), _cond(cfg, 2)
    with torch.no_grad():
        ref = model(zs, t, cond)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl([z.to(memory_format=torch.channels_last) for z in zs], t, cond)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(ref, out))


def test_conditioning_reaches_every_resolution():
    cfg = get_config("tiny-32-64")
    model = randomize_(MDMModel(cfg.model)).eval()
    zs = [torch.randn(2, 3, r, r) for r in cfg.model.resolutions]
    t = torch.rand(2)
    with torch.no_grad():
        a = model(zs, t, _cond(cfg, 2, seed=1))
        b = model(zs, t, _cond(cfg, 2, seed=2))
    assert all((x - y).abs().mean() > 1e-4 for x, y in zip(a, b))


@pytest.mark.parametrize(
    "overrides",
    [
        ['model.conditioning.kind="class"', "model.conditioning.num_classes=10"],
        ['model.conditioning.kind="none"', "model.conditioning.micro_conditioning=false"],
    ],
)
def test_class_and_unconditional_models(overrides):
    cfg = apply_overrides(get_config("tiny-32-64"), overrides)
    model = randomize_(MDMModel(cfg.model)).eval()
    zs = [torch.randn(2, 3, r, r) for r in cfg.model.resolutions]
    labels = torch.tensor([3, -1]) if cfg.model.conditioning.kind == "class" else None
    out = model(zs, torch.rand(2), Condition(labels=labels))
    assert [o.shape[-1] for o in out] == [32, 64]
    if labels is not None:
        out2 = model(zs, torch.rand(2) * 0 + 0.5, Condition(labels=torch.tensor([4, -1])))
        out1 = model(zs, torch.rand(2) * 0 + 0.5, Condition(labels=torch.tensor([3, -1])))
        assert not torch.allclose(out1[0][0], out2[0][0])
        assert torch.allclose(out1[0][1], out2[0][1])  # the null class is the same in both


def test_default_source_size_is_what_training_feeds():
    """Training batches carry the stage's top resolution (mdm.data.InMemoryImageSet); a
    call without a source size (sampling's default) conditions every level identically."""
    cfg = get_config("tiny-32-64")
    model = randomize_(MDMModel(cfg.model)).eval()
    zs = [torch.randn(2, 3, r, r) for r in cfg.model.resolutions]
    t = torch.rand(2)
    with torch.no_grad():
        default = model(zs, t, _cond(cfg, 2, source_size=None))
        trained = model(zs, t, _cond(cfg, 2, source_size=cfg.model.resolutions[-1]))
        smaller = model(zs, t, _cond(cfg, 2, source_size=40.0))
    assert all(torch.equal(a, b) for a, b in zip(default, trained))
    assert not torch.allclose(default[1], smaller[1])  # the top level does see the size


def test_top_level_may_run_on_part_of_the_batch():
    """Mixed-ratio training: the top shell runs on the first samples only; those match a
    full run, and the rest get the inner net's prediction without outer features."""
    cfg = get_config("tiny-32-64")
    model = randomize_(MDMModel(cfg.model)).eval()
    z_lo, z_hi = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 64, 64)
    t, cond = torch.rand(3), _cond(cfg, 3)
    with torch.no_grad():
        part = model([z_lo, z_hi[:2]], t, cond)
        full = model([z_lo, z_hi], t, cond)
        model.unet.in_adapter.weight.zero_()
        model.unet.in_adapter.bias.zero_()
        alone = model([z_lo, z_hi], t, cond)
    assert part[1].shape[0] == 2
    assert torch.allclose(part[1], full[1][:2], atol=1e-5)
    assert torch.allclose(part[0][:2], full[0][:2], atol=1e-5)
    assert torch.allclose(part[0][2], alone[0][2], atol=1e-5)
    assert not torch.allclose(part[0][2], full[0][2], atol=1e-4)
