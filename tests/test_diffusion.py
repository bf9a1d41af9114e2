"""The multi-resolution process: pyramid, shifted schedule, parameterisations."""

import math

import pytest
import torch
import torch.nn.functional as F

from mdm import DiffusionConfig, MultiResolutionDiffusion, ShiftedCosineSchedule, image_pyramid


def test_pyramid_is_average_pooling():
    x = torch.randn(2, 3, 64, 64)
    lo, mid, hi = image_pyramid(x, [16, 32, 64])
    assert torch.equal(hi, x)
    assert torch.allclose(mid, x.reshape(2, 3, 32, 2, 32, 2).mean((3, 5)), atol=1e-6)
    assert torch.allclose(lo, F.avg_pool2d(x, 4), atol=1e-6)
    with pytest.raises(ValueError, match="not a multiple"):
        image_pyramid(x, [48])


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_schedule_shift_matches_formula(p):
    """SNR_r(t) = SNR_base(t) / (r / r_base)^p at every t."""
    s = ShiftedCosineSchedule([64, 256, 1024], shift_power=p)
    t = torch.linspace(0.01, 0.99, 50)
    base = s.logsnr(t, 0)
    for i, r in enumerate([64, 256, 1024]):
        snr_ratio = torch.exp(s.logsnr(t, i)) / torch.exp(base)
        assert torch.allclose(snr_ratio, torch.full_like(t, (r / 64) ** -p), rtol=1e-4)
        a, sg = s.alpha_sigma(t, i)
        assert torch.allclose(a**2 + sg**2, torch.ones_like(t), atol=1e-6)
        assert torch.all(a[1:] < a[:-1])  # signal decreases with t


def test_base_schedule_is_cosine_and_clipped():
    s = ShiftedCosineSchedule([64], shift_power=1.0, logsnr_min=-15, logsnr_max=15)
    assert math.isclose(float(s.logsnr(torch.tensor([0.0]), 0)), 15.0, abs_tol=1e-3)
    assert math.isclose(float(s.logsnr(torch.tensor([1.0]), 0)), -15.0, abs_tol=1e-3)
    wide = ShiftedCosineSchedule([64], 1.0, logsnr_min=-40, logsnr_max=40)
    t = torch.tensor([0.2, 0.5, 0.8])
    cosine = -2 * torch.log(torch.tan(math.pi * t / 2))  # alpha = cos(pi t / 2)
    assert torch.allclose(wide.logsnr(t, 0), cosine, atol=1e-3)


@pytest.mark.parametrize("prediction", ["v", "eps", "x0"])
def test_parameterisations_invert(prediction):
    d = MultiResolutionDiffusion(DiffusionConfig(prediction=prediction), [32, 64])
    x = [torch.rand(4, 3, r, r) * 2 - 1 for r in (32, 64)]
    n = [torch.randn_like(v) for v in x]
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    zs = d.q_sample(x, t, n)
    for i in range(2):
        x0, eps = d.to_x0_eps(zs[i], d.target(x[i], n[i], t, i), t, i)
        assert torch.allclose(x0, x[i], atol=2e-3)
        assert torch.allclose(eps, n[i], atol=2e-3)


class Recorder(torch.nn.Module):
    """A stub network: records its inputs and returns fixed outputs (zeros by default)."""

    def __init__(self, outs=None):
        super().__init__()
        self.outs, self.zs = outs, None

    def forward(self, zs, t, cond):
        self.zs = [z.clone() for z in zs]
        return (
            [torch.zeros_like(z) for z in zs] if self.outs is None else [o[: z.shape[0]] for o, z in zip(self.outs, zs)]
        )


def test_loss_draws_independent_noise_per_resolution():
    """The loss's own noise: unit variance at every resolution, and the low resolution's
    noise is not the pooled noise of the high one (each resolution gets its own)."""
    d = MultiResolutionDiffusion(DiffusionConfig(shift_power=1.0), [16, 32])
    x = [torch.zeros(512, 1, r, r) for r in (16, 32)]
    t = torch.full((512,), 0.5)
    rec = Recorder()
    d.loss(rec, x, None, t=t, generator=torch.Generator().manual_seed(0))
    eps = [z / d.schedule.alpha_sigma(t[:1], i)[1] for i, z in enumerate(rec.zs)]  # z = sigma eps at x = 0
    assert all(abs(float(e.std()) - 1.0) < 0.01 for e in eps)
    pooled = F.avg_pool2d(eps[1], 2) * 2  # unit variance if it were the source of eps[0]
    corr = float((pooled * eps[0]).mean())
    assert abs(corr) < 0.02, corr
    assert float(d.schedule.alpha_sigma(t[:1], 1)[1]) > float(d.schedule.alpha_sigma(t[:1], 0)[1])


def _fixed_loss_inputs(b=6):
    g = torch.Generator().manual_seed(0)
    x = [torch.rand(b, 3, r, r, generator=g) * 2 - 1 for r in (8, 16)]
    n = [torch.randn(b, 3, r, r, generator=g) for r in (8, 16)]
    preds = [torch.randn(b, 3, r, r, generator=g) for r in (8, 16)]
    t = torch.linspace(0.05, 0.95, b)
    return x, n, preds, t


@pytest.mark.parametrize("space, factor", [("eps", "alpha"), ("x0", "sigma")])
def test_loss_in_eps_or_x0_space_is_weighted_v_mse(space, factor):
    """With v = alpha eps - sigma x: eps_hat - eps = alpha (v_hat - v) and x_hat - x = -sigma (v_hat - v),
    so the eps loss of a v prediction is the alpha^2-weighted v-MSE (the reference's DDPM target)."""
    x, n, preds, t = _fixed_loss_inputs()
    res = [8, 16]
    v_loss = MultiResolutionDiffusion(DiffusionConfig(prediction="v", loss_target="v"), res)
    other = MultiResolutionDiffusion(DiffusionConfig(prediction="v", loss_target=space), res)
    total, per = other.loss(Recorder(preds), x, None, t=t, noises=n)
    want = []
    for i in range(2):
        a, s = v_loss.schedule.alpha_sigma(t, i)
        w = (a if factor == "alpha" else s) ** 2
        v_err = (preds[i] - v_loss.target(x[i], n[i], t, i)).square().mean((1, 2, 3))
        want.append((w * v_err).mean())
    assert torch.allclose(per, torch.stack(want), rtol=1e-4)
    assert torch.allclose(total, sum(want), rtol=1e-4)
    _, per_v = v_loss.loss(Recorder(preds), x, None, t=t, noises=n)
    assert not torch.allclose(per, per_v, rtol=1e-2)  # the weighting matters


def test_loss_weights_follow_the_formula():
    x, n, preds, t = _fixed_loss_inputs()
    plain = MultiResolutionDiffusion(DiffusionConfig(), [8, 16])
    weighted = MultiResolutionDiffusion(DiffusionConfig(loss_weights=[1.0, 4.0]), [8, 16])
    _, per = plain.loss(Recorder(preds), x, None, t=t, noises=n)
    total, per_w = weighted.loss(Recorder(preds), x, None, t=t, noises=n)
    assert torch.allclose(per_w, per)
    assert torch.allclose(total, per[0] + 4.0 * per[1])


def test_mixed_ratio_trains_the_top_resolution_on_part_of_the_batch():
    """mixed_ratio 2/3 (the reference's '2:1'): the top resolution runs on, and its loss
    averages over, the first 4 of 6 samples; the lower one uses all 6."""
    x, n, preds, t = _fixed_loss_inputs(6)
    d = MultiResolutionDiffusion(DiffusionConfig(mixed_ratio=2 / 3), [8, 16])
    rec = Recorder(preds)
    total, per = d.loss(rec, x, None, t=t, noises=n)
    assert [z.shape[0] for z in rec.zs] == [6, 4]
    want_lo = (preds[0] - d.target(x[0], n[0], t, 0)).square().mean()
    want_hi = (preds[1][:4] - d.target(x[1][:4], n[1][:4], t[:4], 1)).square().mean()
    assert torch.allclose(per, torch.stack([want_lo, want_hi]))
    assert torch.allclose(total, want_lo + want_hi)


def test_paper_configs_use_the_reference_loss():
    from mdm import get_config

    d256, d1024, tiny = get_config("64-256").diffusion, get_config("64-256-1024").diffusion, get_config("tiny-32-64")
    assert (d256.prediction, d256.loss_target, d256.mixed_ratio, d256.loss_weights) == ("v", "eps", 2 / 3, None)
    assert (d1024.loss_target, d1024.mixed_ratio, d1024.loss_weights) == ("eps", 1.0, [1.0, 4.0, 16.0])
    assert (tiny.diffusion.loss_target, tiny.diffusion.mixed_ratio) == ("v", 1.0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"loss_target": "score"}, "diffusion.loss_target"),
        ({"mixed_ratio": 0.0}, "diffusion.mixed_ratio"),
        ({"mixed_ratio": 1.5}, "diffusion.mixed_ratio"),
        ({"loss_weights": [1.0]}, "diffusion.loss_weights"),
        ({"loss_weights": [1.0, -1.0]}, "diffusion.loss_weights"),
    ],
)
def test_bad_loss_settings_name_the_field(kwargs, field):
    from mdm import ConfigError

    with pytest.raises(ConfigError, match=field):
        DiffusionConfig(**kwargs).validate(2)


def test_loss_weights_are_applied():
    class Zero(torch.nn.Module):
        def forward(self, zs, t, cond):
            return [torch.zeros_like(z) for z in zs]

    x = [torch.randn(3, 3, r, r) for r in (8, 16)]
    d1 = MultiResolutionDiffusion(DiffusionConfig(loss_weights=[1.0, 0.0]), [8, 16])
    total, per = d1.loss(Zero(), x, None, generator=torch.Generator().manual_seed(0))
    assert per.shape == (2,)
    assert torch.allclose(total, per[0])
