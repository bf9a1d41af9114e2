"""Joint samplers over every resolution, with one interface.

Every sampler has the signature

    sample_x(denoiser, zs, ts, noise, callback=None, disable=False, project=None, **options)

``zs`` are the latents (lowest resolution first) at time ``ts[0]``; ``ts`` is a descending
grid ending at 0; ``noise`` draws fresh Gaussian noise shaped like a latent (per-sample
seeded, so a sample does not depend on what else is in its batch); ``callback`` is called
after each step with a dict (``i``, ``t``, ``zs``, ``x0``); ``project(zs, t)`` may
re-impose constraints after each step (inpainting). All resolutions share the time grid
and each uses its own shifted schedule, so one process yields every resolution at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .diffusion import MultiResolutionDiffusion
from .unet import Condition

__all__ = [
    "Denoiser",
    "NoiseSource",
    "time_grid",
    "sample_ddpm",
    "sample_ddim",
    "sample_dpmpp_2m",
    "SAMPLERS",
]

Latents = list[torch.Tensor]


class NoiseSource:
    """Gaussian noise from one generator per sample: batching never changes a sample."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if like.shape[0] != len(self.generators):
            raise ValueError(f"noise for {like.shape[0]} samples asked of a source of {len(self.generators)} seeds")
        shape = like.shape[1:]
        # Drawn on the CPU so that the same seed gives the same image on any device.
        out = torch.stack([torch.randn(shape, generator=g) for g in self.generators])
        return out.to(device=like.device, dtype=like.dtype)


def time_grid(steps: int, t_start: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """``steps + 1`` equally spaced times from ``t_start`` down to 0."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start must be in (0, 1], got {t_start}")
    return torch.linspace(t_start, 0.0, steps + 1, device=device, dtype=torch.float64)


class Denoiser:
    """Wrap a model into ``denoiser(zs, t) -> (x0s, epss)`` with classifier-free guidance.

    ``out = out_uncond + g * (out_cond - out_uncond)`` on the network output, where the
    unconditional branch uses ``uncond`` (the null condition or a negative prompt). With
    ``clip_x0`` the x0 estimate is clamped to [-1, 1] and eps recomputed to match.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        diffusion: MultiResolutionDiffusion,
        cond: Condition,
        uncond: Condition | None = None,
        guidance_scale: float = 1.0,
        clip_x0: bool = True,
        autocast_dtype: torch.dtype | None = None,
    ):
        self.model = model
        self.diffusion = diffusion
        self.schedule = diffusion.schedule
        self.cond = cond
        self.uncond = uncond
        self.guidance_scale = float(guidance_scale)
        self.clip_x0 = clip_x0
        self.autocast_dtype = autocast_dtype
        self.guided = uncond is not None and self.guidance_scale != 1.0

    @torch.no_grad()
    def __call__(self, zs: Latents, t: torch.Tensor) -> tuple[Latents, Latents]:
        b = zs[0].shape[0]
        tt = t.to(torch.float32).expand(b) if t.dim() == 0 else t.to(torch.float32)
        device = zs[0].device
        ctx = (
            torch.autocast(device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else torch.autocast(device.type, enabled=False)
        )
        with ctx:
            if self.guided:
                assert self.uncond is not None
                outs = self.model(
                    [torch.cat([z, z]) for z in zs], torch.cat([tt, tt]), Condition.cat([self.cond, self.uncond])
                )
                g = self.guidance_scale
                outs = [o[b:].float() + g * (o[:b].float() - o[b:].float()) for o in outs]
            else:
                outs = [o.float() for o in self.model(zs, tt, self.cond)]
        x0s, epss = [], []
        for i, (z, o) in enumerate(zip(zs, outs)):
            x0, eps = self.diffusion.to_x0_eps(z.float(), o, tt, i)
            if self.clip_x0:
                x0 = x0.clamp(-1.0, 1.0)
                a, s = self.schedule.alpha_sigma(tt, i)
                eps = (z.float() - a.view(-1, 1, 1, 1) * x0) / s.view(-1, 1, 1, 1)
            x0s.append(x0)
            epss.append(eps)
        return x0s, epss


def _alpha_sigma(denoiser: Denoiser, t: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    a, s = denoiser.schedule.alpha_sigma(t.reshape(1), i)
    return a.reshape(()), s.reshape(())


Update = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _integrate(
    denoiser: Denoiser,
    zs: Latents,
    ts: torch.Tensor,
    update: Update,
    callback: Callable[[dict], None] | None,
    disable: bool,
    project: Callable[[Latents, torch.Tensor], Latents] | None,
    desc: str,
) -> Latents:
    """The loop every sampler shares: denoise, ``update(step, i, t, s, z, x0, eps)`` each
    resolution i from t to s, re-impose constraints, report progress."""
    zs = [z.float() for z in zs]
    for step in tqdm(range(len(ts) - 1), desc=desc, disable=disable, leave=False):
        t, s = ts[step], ts[step + 1]
        x0s, epss = denoiser(zs, t)
        new = [update(step, i, t, s, z, x0, eps) for i, (z, x0, eps) in enumerate(zip(zs, x0s, epss))]
        zs = project(new, s) if project is not None else new
        if callback is not None:
            callback({"i": step, "t": float(t), "zs": zs, "x0": x0s})
    return zs


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    zs: Latents,
    ts: torch.Tensor,
    noise: Callable[[torch.Tensor], torch.Tensor] | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool = False,
    project: Callable[[Latents, torch.Tensor], Latents] | None = None,
    eta: float = 0.0,
) -> Latents:
    """DDIM (Song et al. 2021, eq. 12), jointly over resolutions.

    ``z_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c xi`` with
    ``c = eta (sigma_s / sigma_t) sqrt(1 - alpha_t^2 / alpha_s^2)``; eta = 0 is
    deterministic, eta = 1 is ancestral DDPM sampling.
    """
    if eta > 0 and noise is None:
        raise ValueError("stochastic sampling (eta > 0) needs a noise source")

    def update(step, i, t, s, z, x0, eps):
        a_t, s_t = _alpha_sigma(denoiser, t, i)
        a_s, s_s = _alpha_sigma(denoiser, s, i)
        c = eta * (s_s / s_t) * (1 - (a_t / a_s) ** 2).clamp_min(0).sqrt() if eta > 0 else torch.zeros(())
        out = a_s * x0 + (s_s**2 - c**2).clamp_min(0).sqrt() * eps
        return out + c * noise(out) if eta > 0 and s > 0 else out

    return _integrate(denoiser, zs, ts, update, callback, disable, project, "ddim" if eta == 0 else f"ddim(eta={eta})")


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    zs: Latents,
    ts: torch.Tensor,
    noise: Callable[[torch.Tensor], torch.Tensor] | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool = False,
    project: Callable[[Latents, torch.Tensor], Latents] | None = None,
) -> Latents:
    """Ancestral DDPM (Ho et al. 2020): sample ``q(z_s | z_t, x0_hat)`` at every step.

    Posterior mean ``(alpha_ts sigma_s^2 / sigma_t^2) z_t + (alpha_s sigma_ts^2 / sigma_t^2) x0``
    and variance ``sigma_ts^2 sigma_s^2 / sigma_t^2`` with ``alpha_ts = alpha_t / alpha_s``,
    ``sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2``.
    """
    if noise is None:
        raise ValueError("DDPM sampling needs a noise source")

    def update(step, i, t, s, z, x0, eps):
        a_t, s_t = _alpha_sigma(denoiser, t, i)
        a_s, s_s = _alpha_sigma(denoiser, s, i)
        a_ts = a_t / a_s
        var_ts = (s_t**2 - a_ts**2 * s_s**2).clamp_min(0)
        mean = (a_ts * s_s**2 / s_t**2) * z + (a_s * var_ts / s_t**2) * x0
        return mean + (var_ts * s_s**2 / s_t**2).sqrt() * noise(z) if s > 0 else mean

    return _integrate(denoiser, zs, ts, update, callback, disable, project, "ddpm")


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    zs: Latents,
    ts: torch.Tensor,
    noise: Callable[[torch.Tensor], torch.Tensor] | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool = False,
    project: Callable[[Latents, torch.Tensor], Latents] | None = None,
) -> Latents:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), per resolution in its own log-SNR.

    With ``lambda = logSNR / 2`` and ``h = lambda_s - lambda_t``:
    ``z_s = (sigma_s / sigma_t) z_t - alpha_s (e^{-h} - 1) D`` where D is x0 at the first
    step and ``(1 + 1/2r) x0_t - (1/2r) x0_prev`` after, ``r = h_prev / h``. The final step,
    where the log-SNR jumps to its maximum and r is tiny, is taken at first order (as
    DPM-Solver's ``lower_order_final``) to avoid amplifying the extrapolation.
    """
    history: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # resolution -> (x0, h) of the last step

    def update(step, i, t, s, z, x0, eps):
        _, s_t = _alpha_sigma(denoiser, t, i)
        a_s, s_s = _alpha_sigma(denoiser, s, i)
        lam_t = denoiser.schedule.logsnr(t.reshape(1), i).reshape(()) / 2
        lam_s = denoiser.schedule.logsnr(s.reshape(1), i).reshape(()) / 2
        h = lam_s - lam_t
        if i not in history or step == len(ts) - 2:
            d = x0  # first order at the first and the final step
        else:
            prev_x0, prev_h = history[i]
            r = prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
        history[i] = (x0, h)
        return (s_s / s_t) * z - a_s * torch.expm1(-h) * d

    return _integrate(denoiser, zs, ts, update, callback, disable, project, "dpm++2m")


SAMPLERS: dict[str, Callable[..., Latents]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
}
