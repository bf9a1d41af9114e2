"""Training: the loss falls on real images; dropout, EMA and the LR schedule behave."""

import numpy as np
import pytest
import torch

from mdm import EMA, TrainConfig
from mdm.conditioning import drop_condition, make_condition, null_condition
from mdm.config import ConditioningConfig
from mdm.training import PixelBatch, lr_multiplier
from mdm.unet import Condition


def _mean(xs):
    return sum(xs) / len(xs)


def test_overfit_on_real_images_loss_falls(trained):
    """Stage 32 on four real emoji: the loss falls by more than half."""
    h = trained["hist32"]
    first, last = _mean(h[:3]), _mean(h[-5:])
    assert last < 0.5 * first, (first, last)


def test_grown_stage_keeps_learning(trained):
    h = trained["hist64"]
    assert _mean(h[-3:]) < _mean(h[:2])


def test_caption_dropout_replaces_with_the_empty_caption(text_encoder):
    cfg = ConditioningConfig(max_text_tokens=16)
    one = make_condition(cfg, 1, prompts=["a red apple"], encoder=text_encoder)
    cond = Condition(one.text_tokens.expand(2000, -1, -1), one.text_mask.expand(2000, -1))
    null = null_condition(cfg, 1, text_encoder)
    out = drop_condition(cond, null, 0.1, torch.Generator().manual_seed(0))
    dropped = (out.text_tokens - null.text_tokens).abs().sum((1, 2)) == 0
    kept = (out.text_tokens - cond.text_tokens).abs().sum((1, 2)) == 0
    assert torch.all(dropped ^ kept)
    assert 0.07 < dropped.float().mean() < 0.13
    assert torch.equal(out.text_mask[dropped][0], null.text_mask[0])
    labels = drop_condition(
        Condition(labels=torch.zeros(2000, dtype=torch.long)), Condition(), 0.5, torch.Generator().manual_seed(0)
    ).labels
    assert 0.45 < (labels == -1).float().mean() < 0.55


def test_ema_tracks_the_average():
    lin = torch.nn.Linear(2, 2, bias=False)
    torch.nn.init.zeros_(lin.weight)
    ema = EMA(lin, decay=0.5, warmup=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update(lin)  # 0.5 * 0 + 0.5 * 1
    ema.update(lin)  # 0.5 * 0.5 + 0.5 * 1
    assert torch.allclose(ema.shadow[0], torch.full((2, 2), 0.75))
    ema.copy_to(lin)
    assert torch.allclose(lin.weight, torch.full((2, 2), 0.75))


def test_lr_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    assert abs(lr_multiplier(0, cfg) - 0.1) < 1e-9
    assert abs(lr_multiplier(9, cfg) - 1.0) < 1e-9
    assert abs(lr_multiplier(10, cfg) - 1.0) < 1e-9
    assert abs(lr_multiplier(100, cfg) - 0.1) < 1e-9
    assert lr_multiplier(55, cfg) < lr_multiplier(30, cfg)
    assert lr_multiplier(80, TrainConfig(steps=100, warmup_steps=10)) == 1.0


@pytest.mark.parametrize("channels_last", [False, True])
def test_pixel_batch_converts_on_the_device_as_the_reference_does(channels_last):
    # The stage jobs ship uint8 pixels and convert after the copy: the floats must be exactly
    # x / 127.5 - 1 of every pixel, in the layout the trainer asked for.
    rng = np.random.default_rng(0)
    arrs = [rng.integers(0, 256, (3, r, r, 3), dtype=np.uint8) for r in (8, 16)]
    arrs[0][0, 0, 0] = (0, 255, 128)
    cond = Condition(torch.randn(3, 4, 6), torch.ones(3, 4, dtype=torch.bool), None, torch.tensor([64.0, 80, 96]))
    batch = PixelBatch([torch.from_numpy(a) for a in arrs], cond).to("cpu", torch.float64, channels_last)
    for x, a in zip(batch.images, arrs):
        want = torch.from_numpy((a.astype(np.float32) / np.float32(127.5) - np.float32(1)).transpose(0, 3, 1, 2))
        assert x.dtype == torch.float64 and torch.equal(x, want.double())
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert x.is_contiguous(memory_format=fmt)
    assert batch.images[0][0, :, 0, 0].tolist() == [-1.0, 1.0, float(np.float32(128) / np.float32(127.5) - 1)]
    assert batch.cond.text_tokens.dtype == torch.float64 and torch.equal(
        batch.cond.text_tokens.float(), cond.text_tokens
    )
    assert batch.cond.text_mask.dtype == torch.bool and batch.cond.source_size.dtype == torch.float32
