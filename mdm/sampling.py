"""Joint samplers over every resolution, with one interface.

Every sampler has the signature

    sample_x(denoiser, zs, ts, noise, callback=None, disable=False, project=None, **options)

``zs`` are the latents (lowest resolution first) at time ``ts[0]``; ``ts`` is a descending
grid ending at 0 (Python floats, or a tensor read once); ``noise`` draws fresh Gaussian
noise shaped like a latent (per-sample seeded, so a sample does not depend on what else is
in its batch); ``callback`` is called after each step with a dict (``i``, ``t``, ``zs``,
``x0``); ``project(zs, t)`` may re-impose constraints after each step (inpainting). All
resolutions share the time grid and each uses its own shifted schedule, so one process
yields every resolution at once.

The final step returns the denoiser's x0 estimate rather than ``z`` at t = 0: the log-SNR
is clipped, so the shifted schedules of the higher resolutions keep ``sigma_r(0) > 0``
(``sigma = 8.7e-3`` at 1024 px with p = 2) and ``z_0`` would still carry that noise.

The loop never synchronises with the device: the time grid and every step's alpha, sigma
and log-SNR are Python floats computed once before the first step, and noise is drawn on
the CPU and copied asynchronously. :class:`CUDAGraphForward` removes the remaining launch
overhead of the network on CUDA.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .diffusion import MultiResolutionDiffusion
from .unet import Condition

__all__ = [
    "Denoiser",
    "NoiseSource",
    "CUDAGraphForward",
    "time_grid",
    "sample_ddpm",
    "sample_ddim",
    "sample_dpmpp_2m",
    "SAMPLERS",
]

Latents = list[torch.Tensor]


class NoiseSource:
    """Gaussian noise from one generator per sample: batching never changes a sample.

    Drawn on the CPU so that the same seed gives the same image on any device, then copied
    to the device from pinned memory without blocking (no host synchronisation).
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if like.shape[0] != len(self.generators):
            raise ValueError(f"noise for {like.shape[0]} samples asked of a source of {len(self.generators)} seeds")
        shape = like.shape[1:]
        out = torch.stack([torch.randn(shape, generator=g) for g in self.generators])
        if like.device.type == "cuda":
            return out.pin_memory().to(device=like.device, dtype=like.dtype, non_blocking=True)
        return out.to(device=like.device, dtype=like.dtype)


def time_grid(steps: int, t_start: float = 1.0) -> list[float]:
    """``steps + 1`` equally spaced times from ``t_start`` down to 0, as Python floats."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start must be in (0, 1], got {t_start}")
    return torch.linspace(t_start, 0.0, steps + 1, dtype=torch.float64).tolist()


class Denoiser:
    """Wrap a model into ``denoiser(zs, t) -> (x0s, epss)`` with classifier-free guidance.

    ``out = out_uncond + g * (out_cond - out_uncond)`` on the network output, where the
    unconditional branch uses ``uncond`` (the null condition or a negative prompt); both
    branches run as one forward pass of 2B samples. With ``clip_x0`` the x0 estimate is
    clamped to [-1, 1] and eps recomputed to match. ``model`` is anything called as
    ``model(zs, t, cond)``: the network, or a :class:`CUDAGraphForward` around it.
    """

    def __init__(
        self,
        model: Callable[[Latents, torch.Tensor, Condition], Latents],
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
        self._both = Condition.cat([cond, uncond]) if self.guided and uncond is not None else None

    @torch.no_grad()
    def __call__(self, zs: Latents, t: float | torch.Tensor) -> tuple[Latents, Latents]:
        b = zs[0].shape[0]
        device = zs[0].device
        if isinstance(t, torch.Tensor):
            tt = t.to(device, torch.float32).expand(b) if t.dim() == 0 else t.to(device, torch.float32)
        else:
            tt = torch.full((b,), float(t), dtype=torch.float32, device=device)
        ctx = (
            torch.autocast(device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else torch.autocast(device.type, enabled=False)
        )
        with ctx:
            if self._both is not None:
                outs = self.model([torch.cat([z, z]) for z in zs], torch.cat([tt, tt]), self._both)
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


@dataclass(frozen=True)
class Step:
    """One step from t to s of resolution i, as Python floats (no device tensors)."""

    t: float
    s: float
    alpha_t: float
    sigma_t: float
    alpha_s: float
    sigma_s: float
    lam_t: float  # logSNR / 2
    lam_s: float


def _steps(denoiser: Denoiser, ts: Sequence[float], resolutions: int) -> list[list[Step]]:
    """``steps[k][i]``: the coefficients of step k for resolution i, computed once."""
    grid = torch.tensor(list(ts), dtype=torch.float64)
    table = []
    for i in range(resolutions):
        lam = denoiser.schedule.logsnr(grid, i)
        a, s = denoiser.schedule.alpha_sigma(grid, i)
        table.append((lam.double().div(2).tolist(), a.double().tolist(), s.double().tolist()))
    t = grid.tolist()
    return [
        [Step(t[k], t[k + 1], a[k], s[k], a[k + 1], s[k + 1], lam[k], lam[k + 1]) for lam, a, s in table]
        for k in range(len(t) - 1)
    ]


Update = Callable[[int, int, Step, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _integrate(
    denoiser: Denoiser,
    zs: Latents,
    ts: Sequence[float] | torch.Tensor,
    update: Update,
    callback: Callable[[dict], None] | None,
    disable: bool,
    project: Callable[[Latents, float], Latents] | None,
    desc: str,
) -> Latents:
    """The loop every sampler shares: denoise, ``update(step, i, c, z, x0, eps)`` each
    resolution i from ``c.t`` to ``c.s``, re-impose constraints, report progress. The last
    step, to t = 0, returns the x0 estimates themselves."""
    ts = ts.tolist() if isinstance(ts, torch.Tensor) else [float(t) for t in ts]
    table = _steps(denoiser, ts, len(zs))
    zs = [z.float() for z in zs]
    last = len(ts) - 2
    for step in tqdm(range(len(ts) - 1), desc=desc, disable=disable, leave=False):
        x0s, epss = denoiser(zs, ts[step])
        if step == last and ts[-1] == 0.0:
            zs = x0s  # x0 itself: z at t = 0 still holds sigma_r(0) of noise
        else:
            new = [update(step, i, c, z, x0, eps) for i, (c, z, x0, eps) in enumerate(zip(table[step], zs, x0s, epss))]
            zs = project(new, ts[step + 1]) if project is not None else new
        if callback is not None:
            callback({"i": step, "t": ts[step], "zs": zs, "x0": x0s})
    return zs


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    zs: Latents,
    ts: Sequence[float] | torch.Tensor,
    noise: Callable[[torch.Tensor], torch.Tensor] | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool = False,
    project: Callable[[Latents, float], Latents] | None = None,
    eta: float = 0.0,
) -> Latents:
    """DDIM (Song et al. 2021, eq. 12), jointly over resolutions.

    ``z_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c xi`` with
    ``c = eta (sigma_s / sigma_t) sqrt(1 - alpha_t^2 / alpha_s^2)``; eta = 0 is
    deterministic, eta = 1 is ancestral DDPM sampling.
    """
    if eta > 0 and noise is None:
        raise ValueError("stochastic sampling (eta > 0) needs a noise source")

    def update(step, i, c, z, x0, eps):
        ratio = 1 - (c.alpha_t / c.alpha_s) ** 2
        std = eta * (c.sigma_s / c.sigma_t) * math.sqrt(max(ratio, 0.0)) if eta > 0 else 0.0
        out = c.alpha_s * x0 + math.sqrt(max(c.sigma_s**2 - std**2, 0.0)) * eps
        return out + std * noise(out) if eta > 0 and c.s > 0 else out

    return _integrate(denoiser, zs, ts, update, callback, disable, project, "ddim" if eta == 0 else f"ddim(eta={eta})")


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    zs: Latents,
    ts: Sequence[float] | torch.Tensor,
    noise: Callable[[torch.Tensor], torch.Tensor] | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool = False,
    project: Callable[[Latents, float], Latents] | None = None,
) -> Latents:
    """Ancestral DDPM (Ho et al. 2020): sample ``q(z_s | z_t, x0_hat)`` at every step.

    Posterior mean ``(alpha_ts sigma_s^2 / sigma_t^2) z_t + (alpha_s sigma_ts^2 / sigma_t^2) x0``
    and variance ``sigma_ts^2 sigma_s^2 / sigma_t^2`` with ``alpha_ts = alpha_t / alpha_s``,
    ``sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2``.
    """
    if noise is None:
        raise ValueError("DDPM sampling needs a noise source")

    def update(step, i, c, z, x0, eps):
        a_ts = c.alpha_t / c.alpha_s
        var_ts = max(c.sigma_t**2 - a_ts**2 * c.sigma_s**2, 0.0)
        mean = (a_ts * c.sigma_s**2 / c.sigma_t**2) * z + (c.alpha_s * var_ts / c.sigma_t**2) * x0
        return mean + math.sqrt(var_ts * c.sigma_s**2 / c.sigma_t**2) * noise(z) if c.s > 0 else mean

    return _integrate(denoiser, zs, ts, update, callback, disable, project, "ddpm")


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    zs: Latents,
    ts: Sequence[float] | torch.Tensor,
    noise: Callable[[torch.Tensor], torch.Tensor] | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool = False,
    project: Callable[[Latents, float], Latents] | None = None,
) -> Latents:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), per resolution in its own log-SNR.

    With ``lambda = logSNR / 2`` and ``h = lambda_s - lambda_t``:
    ``z_s = (sigma_s / sigma_t) z_t - alpha_s (e^{-h} - 1) D`` where D is x0 at the first
    step and ``(1 + 1/2r) x0_t - (1/2r) x0_prev`` after, ``r = h_prev / h``. The final step
    returns x0 (module docstring), so the last update taken is second order where
    DPM-Solver's ``lower_order_final`` would be first order at a step that is no longer taken.
    """
    history: dict[int, tuple[torch.Tensor, float]] = {}  # resolution -> (x0, h) of the last step

    def update(step, i, c, z, x0, eps):
        h = c.lam_s - c.lam_t
        if i not in history:
            d = x0  # first order at the first step
        else:
            prev_x0, prev_h = history[i]
            r = prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
        history[i] = (x0, h)
        return (c.sigma_s / c.sigma_t) * z - (c.alpha_s * math.expm1(-h)) * d

    return _integrate(denoiser, zs, ts, update, callback, disable, project, "dpm++2m")


class CUDAGraphForward:
    """``model(zs, t, cond)`` replayed from a CUDA graph per input signature (fast path).

    The first call with a new signature (shapes and dtypes of every input, autocast
    setting) warms up and captures the forward pass into a :class:`torch.cuda.CUDAGraph`
    with static input buffers; later calls copy their inputs in and replay it, so a step
    costs one launch instead of hundreds. Graphs are kept for the life of the object, so
    repeated calls with the same batch size and resolution reuse them. On a CPU tensor it
    is the plain model. Outputs are copies, safe to keep across calls. The model's weights
    are read in place, so loading new weights into it needs no new capture.

    ``compile=True`` captures ``torch.compile(model)`` instead (compiled in the warm-up of
    the first capture; the graph then replays Inductor's fused kernels, fewer and shorter
    than the eager ones).
    """

    def __init__(self, model: torch.nn.Module, warmup: int = 2, compile: bool = False):
        self.model = model
        self.warmup = warmup
        # What is captured; torch.compile itself compiles on the first (warm-up) call.
        self.fn = torch.compile(model, dynamic=False) if compile else model
        self.graphs: dict[tuple, tuple] = {}
        # One memory pool for every captured shape: a server sees many batch sizes, and a
        # pool per graph would hold each one's activations for good. Sharing is safe because
        # replays run one at a time (the lock) and outputs are copied out at once.
        self._pool = None
        self._lock = threading.Lock()

    @staticmethod
    def _signature(zs: Latents, t: torch.Tensor, cond: Condition) -> tuple:
        def sig(x: torch.Tensor | None):
            return None if x is None else (tuple(x.shape), x.dtype, x.device)

        fields = (cond.text_tokens, cond.text_mask, cond.labels, cond.source_size)
        autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        return (tuple(sig(z) for z in zs), sig(t), tuple(sig(f) for f in fields), autocast)

    def __call__(self, zs: Latents, t: torch.Tensor, cond: Condition) -> Latents:
        if zs[0].device.type != "cuda":
            return self.model(zs, t, cond)
        key = self._signature(zs, t, cond)
        with self._lock:
            if key not in self.graphs:
                self.graphs[key] = self._capture(zs, t, cond)
            graph, static_zs, static_t, static_cond, outs = self.graphs[key]
            for dst, src in zip(static_zs, zs):
                dst.copy_(src)
            static_t.copy_(t)
            for dst, src in zip(_fields(static_cond), _fields(cond)):
                if dst is not None:
                    dst.copy_(src)
            graph.replay()
            return [o.clone() for o in outs]

    def _capture(self, zs: Latents, t: torch.Tensor, cond: Condition) -> tuple:
        static_zs = [z.clone() for z in zs]
        static_t = t.clone()
        static_cond = Condition(*[None if f is None else f.clone() for f in _fields(cond)])
        enabled, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        # Autocast's weight-cast cache would hand the graph casts freed on exit: capture without it.
        autocast = torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), autocast:
            for _ in range(self.warmup):
                self.fn(static_zs, static_t, static_cond)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool), autocast:
            outs = self.fn(static_zs, static_t, static_cond)
        return graph, static_zs, static_t, static_cond, outs


def _fields(cond: Condition) -> tuple:
    return (cond.text_tokens, cond.text_mask, cond.labels, cond.source_size)


SAMPLERS: dict[str, Callable[..., Latents]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
}
