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


def test_independent_noise_and_shared_t_statistics():
    d = MultiResolutionDiffusion(DiffusionConfig(shift_power=1.0), [32, 64])
    x = [torch.zeros(2000, 1, r, r) for r in (32, 64)]
    n = [torch.randn_like(v) for v in x]
    t = torch.full((2000,), 0.5)
    z = d.q_sample(x, t, n)
    a0, s0 = d.schedule.alpha_sigma(t[:1], 0)
    a1, s1 = d.schedule.alpha_sigma(t[:1], 1)
    assert abs(float(z[0].std()) - float(s0)) < 0.01
    assert abs(float(z[1].std()) - float(s1)) < 0.01
    assert float(s1) > float(s0)  # the higher resolution is noisier at the same t


def test_loss_weights_are_applied():
    class Zero(torch.nn.Module):
        def forward(self, zs, t, cond):
            return [torch.zeros_like(z) for z in zs]

    x = [torch.randn(3, 3, r, r) for r in (8, 16)]
    d1 = MultiResolutionDiffusion(DiffusionConfig(loss_weights=[1.0, 0.0]), [8, 16])
    total, per = d1.loss(Zero(), x, None, generator=torch.Generator().manual_seed(0))
    assert per.shape == (2,)
    assert torch.allclose(total, per[0])
