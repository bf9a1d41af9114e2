"""Multi-resolution diffusion (Gu et al. 2024, Sec. 3.1): schedule, forward process, loss.

One diffusion process over the extended latent ``(x_r1, ..., x_rK)`` with
``x_r = D_r(x)`` (average pooling of the top image). Every resolution shares one
timestep t in [0, 1] and gets its own noise. The schedule of resolution r is the cosine
base schedule shifted by its size:

    logSNR_base(t) = -2 log tan(a t + b)          (clipped to [logsnr_min, logsnr_max])
    logSNR_r(t)    = logSNR_base(t) - p log(r / r_base)
    alpha_r^2 = sigmoid(logSNR_r),  sigma_r^2 = sigmoid(-logSNR_r)
    z_r = alpha_r x_r + sigma_r eps_r

so ``SNR_r = SNR_base / (r / r_base)^p``. The network predicts v (or eps, or x0); the loss
is ``sum_r w_r * mean ||e_r||^2`` with ``e_r`` the prediction's error measured in the space
``loss_target`` (v, eps or x0). With ``v = alpha eps - sigma x`` and
``eps_hat = sigma z + alpha v_hat``, ``x_hat = alpha z - sigma v_hat``:

    eps_hat - eps = alpha (v_hat - v),    x_hat - x = -sigma (v_hat - v),

so the eps loss of a v prediction (the reference's ``loss_target_type: DDPM``) is the
v-MSE weighted by ``alpha_r(t)^2`` per sample, and the x0 loss weights it by ``sigma_r^2``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import DiffusionConfig

__all__ = ["ShiftedCosineSchedule", "MultiResolutionDiffusion", "image_pyramid"]


def image_pyramid(x: torch.Tensor, resolutions: list[int]) -> list[torch.Tensor]:
    """``[D_r(x) for r in resolutions]``: average pooling of the top image (lowest first)."""
    top = x.shape[-1]
    out = []
    for r in resolutions:
        if top % r:
            raise ValueError(f"image size {top} is not a multiple of resolution {r}")
        out.append(x if r == top else F.avg_pool2d(x, kernel_size=top // r))
    return out


class ShiftedCosineSchedule:
    """Cosine log-SNR schedule with the per-resolution shift of the paper."""

    def __init__(self, resolutions: list[int], shift_power: float, logsnr_min: float = -15.0, logsnr_max: float = 15.0):
        self.resolutions = list(resolutions)
        self.shift_power = float(shift_power)
        self.logsnr_min = float(logsnr_min)
        self.logsnr_max = float(logsnr_max)
        self._b = math.atan(math.exp(-0.5 * logsnr_max))
        self._a = math.atan(math.exp(-0.5 * logsnr_min)) - self._b
        base = self.resolutions[0]
        self.shifts = [self.shift_power * math.log(r / base) for r in self.resolutions]

    def logsnr_base(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        return -2.0 * torch.log(torch.tan(self._a * t + self._b))

    def logsnr(self, t: torch.Tensor, index: int) -> torch.Tensor:
        """log-SNR of resolution ``resolutions[index]`` at time t."""
        return self.logsnr_base(t) - self.shifts[index]

    def alpha_sigma(self, t: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        lam = self.logsnr(t, index)
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


def _bcast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


class MultiResolutionDiffusion:
    """The forward process, the prediction parameterisations and the training loss."""

    def __init__(self, config: DiffusionConfig, resolutions: list[int]):
        config.validate(len(resolutions))
        self.config = config
        self.resolutions = list(resolutions)
        self.schedule = ShiftedCosineSchedule(resolutions, config.shift_power, config.logsnr_min, config.logsnr_max)
        self.loss_weights = config.weights(len(resolutions))
        self.mixed_ratio = float(config.mixed_ratio)

    # --------------------------------------------------------------- forward process
    def q_sample(self, xs: list[torch.Tensor], t: torch.Tensor, noises: list[torch.Tensor]) -> list[torch.Tensor]:
        """``z_r = alpha_r(t) x_r + sigma_r(t) eps_r`` for every resolution."""
        out = []
        for i, (x, n) in enumerate(zip(xs, noises)):
            a, s = self.schedule.alpha_sigma(t, i)
            out.append(_bcast(a, x) * x + _bcast(s, x) * n)
        return out

    def quantity(self, space: str, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, index: int) -> torch.Tensor:
        """eps, x0 or ``v = alpha eps - sigma x0`` of resolution ``index`` from (x0, eps)."""
        if space == "eps":
            return eps
        if space == "x0":
            return x
        a, s = self.schedule.alpha_sigma(t, index)
        return _bcast(a, x) * eps - _bcast(s, x) * x

    def target(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, index: int) -> torch.Tensor:
        """What the network is trained to predict (``config.prediction``)."""
        return self.quantity(self.config.prediction, x, noise, t, index)

    def to_x0_eps(
        self, z: torch.Tensor, pred: torch.Tensor, t: torch.Tensor, index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn a network output into (x0, eps) estimates for resolution ``index``."""
        a, s = self.schedule.alpha_sigma(t, index)
        a, s = _bcast(a, z), _bcast(s, z)
        pred = pred.to(z.dtype)
        p = self.config.prediction
        if p == "v":
            return a * z - s * pred, s * z + a * pred
        if p == "eps":
            return (z - s * pred) / a, pred
        return pred, (z - a * pred) / s

    def in_loss_space(self, z: torch.Tensor, pred: torch.Tensor, t: torch.Tensor, index: int) -> torch.Tensor:
        """The network output ``pred`` expressed in the space ``config.loss_target``."""
        space = self.config.loss_target
        if space == self.config.prediction:
            return pred
        x0, eps = self.to_x0_eps(z, pred, t, index)
        return self.quantity(space, x0, eps, t, index)

    def loss_target(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, index: int) -> torch.Tensor:
        """The true value of the ``config.loss_target`` quantity (eps, x0 or v)."""
        return self.quantity(self.config.loss_target, x, noise, t, index)

    def top_batch(self, batch: int) -> int:
        """How many samples (the first ones) the top resolution trains on: ``mixed_ratio * B``, at least 1."""
        return batch if self.mixed_ratio >= 1.0 else max(1, int(self.mixed_ratio * batch))

    # --------------------------------------------------------------- training loss
    def sample_t(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.rand(batch, device=device, generator=generator)

    def loss(
        self,
        model: torch.nn.Module,
        xs: list[torch.Tensor],
        cond,
        t: torch.Tensor | None = None,
        noises: list[torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted multi-resolution loss and the (R,) per-resolution MSE (no host sync).

        ``sum_r w_r * mean_{samples, pixels} ||e_r||^2`` with ``e_r`` the error in the
        ``loss_target`` space (module docstring). The top resolution is computed, and its
        loss averaged, over the first :meth:`top_batch` samples only (``mixed_ratio``).
        """
        b = xs[0].shape[0]
        device = xs[0].device
        if t is None:
            t = self.sample_t(b, device, generator)
        if noises is None:
            noises = [torch.randn(x.shape, device=device, dtype=x.dtype, generator=generator) for x in xs]
        zs = self.q_sample(xs, t, noises)
        bh = self.top_batch(b)
        if bh < b:
            zs, xs, noises = zs[:-1] + [zs[-1][:bh]], xs[:-1] + [xs[-1][:bh]], noises[:-1] + [noises[-1][:bh]]
        preds = model(zs, t, cond)
        losses = []
        for i, (z, p, x, n) in enumerate(zip(zs, preds, xs, noises)):
            ti = t[: z.shape[0]]
            err = self.in_loss_space(z.float(), p.float(), ti, i) - self.loss_target(x.float(), n.float(), ti, i)
            losses.append(err.square().mean())
        total = sum(w * loss for w, loss in zip(self.loss_weights, losses))
        return total, torch.stack(losses).detach()
