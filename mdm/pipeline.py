"""Generation, SDEdit editing and multi-scale inpainting with a trained model.

``MDMPipeline`` owns a model, its diffusion process and its text encoder. Every method
returns one tensor per resolution (lowest first), values in [-1, 1]; sample j of a call
is seeded by ``seeds[j]`` (default ``seed + j``), so it does not depend on batch size.

Every public method takes keyword arguments by name only as its signature lists them: a
misspelt one (``guidence_scale=``) raises :class:`TypeError` naming it and the valid ones,
instead of being ignored.

The fast path (``fast``: constructor, or per call; on by default on CUDA) replays the
guided denoiser from CUDA graphs, captured once per batch size and resolution and kept by
the pipeline; on a CPU it changes nothing. It runs the same computation as the plain CUDA
path. ``compile=True`` also compiles the captured forward with ``torch.compile`` (the
first call of each shape then takes as long as the compilation).
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .conditioning import TextEncoder, get_text_encoder, make_condition
from .config import MDMConfig
from .diffusion import MultiResolutionDiffusion, image_pyramid
from .sampling import SAMPLERS, CUDAGraphForward, Denoiser, NoiseSource, time_grid
from .unet import MDMModel
from .weights import load_pretrained

__all__ = ["MDMPipeline", "feather_mask"]


def strict_keywords(fn: Callable) -> Callable:
    """Reject keyword arguments that ``fn``'s signature does not name, saying which are valid."""
    params = inspect.signature(fn).parameters
    valid = [n for n, p in params.items() if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        unknown = [k for k in kwargs if k not in valid]
        if unknown:
            bad = unknown[0]
            close = difflib.get_close_matches(bad, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(
                f"{fn.__qualname__}() got an unexpected keyword argument {bad!r}{hint}; valid: {', '.join(valid)}"
            )
        return fn(*args, **kwargs)

    return wrapper


def feather_mask(mask: torch.Tensor, feather: int) -> torch.Tensor:
    """Soften a {0,1} fill mask outward by ``feather`` pixels.

    ``max(mask, gaussian_blur(mask))`` with a kernel truncated at ``feather`` px: the mask
    keeps 1 inside the hole, ramps down over the ring, and stays exactly 0 farther away,
    so those pixels are returned untouched.
    """
    if feather <= 0:
        return mask
    sigma = max(feather / 2.0, 0.5)
    x = torch.arange(-feather, feather + 1, dtype=torch.float32, device=mask.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    m = mask.float()
    b = F.conv2d(F.pad(m, (feather, feather, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    b = F.conv2d(F.pad(b, (0, 0, feather, feather), mode="replicate"), k.view(1, 1, -1, 1))
    # Zero the blur where no hole pixel lies within the kernel's reach (exact zeros far away).
    reach = F.max_pool2d(m, 2 * feather + 1, stride=1, padding=feather)
    return torch.maximum(m, b * reach).clamp(0, 1)


class MDMPipeline:
    def __init__(
        self,
        model: MDMModel,
        config: MDMConfig,
        device: str | torch.device = "cpu",
        text_encoder: TextEncoder | None = None,
        autocast_dtype: torch.dtype | None = None,
        fast: bool | None = None,
        compile: bool = False,
    ):
        self.model = model.to(device).eval()
        self.config = config
        self.device = torch.device(device)
        self.diffusion = MultiResolutionDiffusion(config.diffusion, config.model.resolutions)
        cond = config.model.conditioning
        self.text_encoder = text_encoder
        if cond.kind == "text" and text_encoder is None:
            # On the pipeline's device: on a GPU a prompt's encoding is then a few kernels, not
            # tens of milliseconds of CPU.
            self.text_encoder = get_text_encoder(cond.text_encoder, cond.max_text_tokens, str(self.device))
        if autocast_dtype is None and self.device.type == "cuda":
            autocast_dtype = torch.bfloat16
        self.autocast_dtype = autocast_dtype
        self.fast = self.device.type == "cuda" if fast is None else fast
        # Graphs are captured on first fast use, per shape.
        self._graphed = CUDAGraphForward(self.model, compile=compile)

    @classmethod
    def from_pretrained(
        cls,
        src: str,
        device: str | torch.device = "cpu",
        text_encoder: TextEncoder | None = None,
        autocast_dtype: torch.dtype | None = None,
        fast: bool | None = None,
        compile: bool = False,
    ) -> MDMPipeline:
        model, config = load_pretrained(src, device)
        return cls(model, config, device, text_encoder, autocast_dtype, fast, compile)

    @property
    def resolutions(self) -> list[int]:
        return list(self.config.model.resolutions)

    # ------------------------------------------------------------------ helpers
    def _prompts(self, prompt: str | Sequence[str] | None, n: int) -> list[str] | None:
        if prompt is None:
            return None
        if isinstance(prompt, str):
            return [prompt] * n
        prompts = list(prompt)
        if len(prompts) != n:
            raise ValueError(f"got {len(prompts)} prompts for {n} samples")
        return prompts

    def _denoiser(
        self,
        n: int,
        prompt,
        labels,
        negative_prompt,
        guidance_scale: float,
        source_size: float | None,
        fast: bool | None = None,
    ) -> Denoiser:
        ccfg = self.config.model.conditioning
        size = float(source_size) if source_size is not None else float(self.resolutions[-1])
        kw = dict(encoder=self.text_encoder, device=self.device, source_size=size)
        if labels is not None and not isinstance(labels, (list, tuple, torch.Tensor)):
            labels = [int(labels)] * n
        cond = make_condition(ccfg, n, prompts=self._prompts(prompt, n), labels=labels, **kw)
        uncond = None
        if guidance_scale != 1.0 and ccfg.kind != "none":
            uncond = make_condition(ccfg, n, prompts=self._prompts(negative_prompt, n), **kw)
        elif negative_prompt is not None and ccfg.kind != "text":
            raise ValueError("negative prompts need a text-conditioned model")
        fast = self.fast if fast is None else fast
        model = self._graphed if fast and self.device.type == "cuda" else self.model
        return Denoiser(model, self.diffusion, cond, uncond, guidance_scale, autocast_dtype=self.autocast_dtype)

    def _seeds(self, n: int, seed: int, seeds: Sequence[int] | None) -> list[int]:
        if seeds is not None:
            if len(seeds) != n:
                raise ValueError(f"got {len(seeds)} seeds for {n} samples")
            return [int(s) for s in seeds]
        return [int(seed) + j for j in range(n)]

    def _run(
        self, denoiser: Denoiser, zs, ts, noise, sampler: str, eta: float, progress: bool, callback, project=None
    ) -> list[torch.Tensor]:
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        kw = {"eta": eta} if sampler == "ddim" else {}
        if sampler != "ddim" and eta:
            raise ValueError("eta applies to the ddim sampler only")
        out = SAMPLERS[sampler](denoiser, zs, ts, noise, callback=callback, disable=not progress, project=project, **kw)
        return [z.clamp(-1, 1) for z in out]

    def _latent_shapes(self, n: int) -> list[tuple[int, ...]]:
        c = self.config.model.in_channels
        return [(n, c, r, r) for r in self.resolutions]

    def _check_image(self, image: torch.Tensor, name: str = "image") -> torch.Tensor:
        top = self.resolutions[-1]
        if image.dim() == 3:
            image = image[None]
        if image.dim() != 4 or image.shape[1] != self.config.model.in_channels or image.shape[-2:] != (top, top):
            raise ValueError(
                f"{name} must be ({self.config.model.in_channels}, {top}, {top}) at the model's top resolution, "
                f"got {tuple(image.shape)}"
            )
        return image.to(self.device, torch.float32)

    # ------------------------------------------------------------------ public API
    @strict_keywords
    def generate(
        self,
        prompt: str | Sequence[str] | None = None,
        num_samples: int = 1,
        labels: int | Sequence[int] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        guidance_scale: float = 5.0,
        steps: int = 50,
        sampler: str = "ddim",
        eta: float = 0.0,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
        source_size: float | None = None,
        progress: bool = False,
        callback: Callable[[dict], None] | None = None,
        fast: bool | None = None,
    ) -> list[torch.Tensor]:
        """Sample every resolution jointly from pure noise (``fast``: None follows the pipeline)."""
        if num_samples < 1:
            raise ValueError("num_samples must be >= 1")
        n = num_samples
        noise = NoiseSource(self._seeds(n, seed, seeds), self.device)
        zs = [noise(torch.empty(s, device=self.device)) for s in self._latent_shapes(n)]
        den = self._denoiser(n, prompt, labels, negative_prompt, guidance_scale, source_size, fast)
        return self._run(den, zs, time_grid(steps, 1.0), noise, sampler, eta, progress, callback)

    @strict_keywords
    def edit(
        self,
        image: torch.Tensor,
        prompt: str | Sequence[str] | None = None,
        strength: float = 0.6,
        num_samples: int = 1,
        steps: int = 50,
        labels: int | Sequence[int] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        guidance_scale: float = 5.0,
        sampler: str = "ddim",
        eta: float = 0.0,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
        source_size: float | None = None,
        progress: bool = False,
        callback: Callable[[dict], None] | None = None,
        fast: bool | None = None,
    ) -> list[torch.Tensor]:
        """SDEdit (Meng et al. 2022): noise the image to t = strength, then denoise.

        ``image``: (3, R, R) in [-1, 1] at the top resolution. ``steps`` is the budget of a
        full run; ``ceil(steps * strength)`` of them are taken.
        """
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        image = self._check_image(image)
        n = num_samples
        noise = NoiseSource(self._seeds(n, seed, seeds), self.device)
        xs = image_pyramid(image.expand(n, -1, -1, -1), self.resolutions)
        t0 = torch.full((n,), strength, device=self.device)
        zs = self.diffusion.q_sample(xs, t0, [noise(x) for x in xs])
        den = self._denoiser(n, prompt, labels, negative_prompt, guidance_scale, source_size, fast)
        ts = time_grid(max(1, int(-(-steps * strength // 1))), strength)
        return self._run(den, zs, ts, noise, sampler, eta, progress, callback)

    @strict_keywords
    def inpaint(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        prompt: str | Sequence[str] | None = None,
        num_samples: int = 1,
        feather: int = 0,
        progressive: bool = True,
        refine_strength: float = 0.6,
        steps: int = 50,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | Sequence[str] | None = None,
        labels=None,
        sampler: str = "ddim",
        eta: float = 0.0,
        progress: bool = False,
        callback: Callable[[dict], None] | None = None,
        on_pass: Callable[[int, list[torch.Tensor]], None] | None = None,
        source_size: float | None = None,
        fast: bool | None = None,
    ) -> list[torch.Tensor]:
        """Multi-scale inpainting: fill where ``mask`` is 1, keep the rest.

        After every step the known region is re-imposed at every resolution:
        ``z_r <- m_r z_r + (1 - m_r)(alpha_r x_r + sigma_r eps)`` with ``m_r = D_r(mask)``.
        With ``progressive``, a coarse-to-fine warm start follows the first (joint) pass:
        pass k upsamples the fill of resolution ``r_{k-1}`` to the top, composites it with the
        known pixels and refines it from ``t = refine_strength``. The result equals the input
        exactly wherever the feathered mask is 0. ``on_pass(k, outputs)`` sees every pass.
        """
        image = self._check_image(image)
        top = self.resolutions[-1]
        if mask.dim() == 2:
            mask = mask[None]
        if mask.dim() == 3:
            mask = mask[None]
        if mask.shape[-2:] != (top, top) or mask.shape[1] != 1:
            raise ValueError(f"mask must be ({top}, {top}) like the image, got {tuple(mask.shape[-3:])}")
        mask = feather_mask(mask.to(self.device, torch.float32).clamp(0, 1), feather)
        n = num_samples
        seeds = self._seeds(n, seed, seeds)
        known = image_pyramid(image.expand(n, -1, -1, -1), self.resolutions)
        masks = image_pyramid(mask.expand(n, -1, -1, -1), self.resolutions)
        den = self._denoiser(n, prompt, labels, negative_prompt, guidance_scale, source_size, fast)

        def run(init: list[torch.Tensor] | None, t_start: float, pass_seed_offset: int) -> list[torch.Tensor]:
            noise = NoiseSource([s + 7919 * pass_seed_offset for s in seeds], self.device)

            def project(zs: list[torch.Tensor], t: float) -> list[torch.Tensor]:
                tt = torch.full((n,), float(t), device=self.device)
                kn = self.diffusion.q_sample(known, tt, [noise(x) for x in known])
                return [m * z + (1 - m) * k for z, m, k in zip(zs, masks, kn)]

            t0 = torch.full((n,), t_start, device=self.device)
            if init is None:
                zs = [noise(x) for x in known]
            else:
                zs = self.diffusion.q_sample(init, t0, [noise(x) for x in init])
            zs = project(zs, t_start)
            ts = time_grid(max(1, int(-(-steps * t_start // 1))), t_start)
            out = self._run(den, zs, ts, noise, sampler, eta, progress, callback, project)
            return [m * z + (1 - m) * k for z, m, k in zip(out, masks, known)]

        out = run(None, 1.0, 0)
        if on_pass is not None:
            on_pass(0, out)
        if progressive:
            for k in range(1, len(self.resolutions)):
                coarse = F.interpolate(out[k - 1], size=(top, top), mode="bicubic", align_corners=False).clamp(-1, 1)
                init_top = masks[-1] * coarse + (1 - masks[-1]) * known[-1]
                out = run(image_pyramid(init_top, self.resolutions), refine_strength, k)
                if on_pass is not None:
                    on_pass(k, out)
        return out
