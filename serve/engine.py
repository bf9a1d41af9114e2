"""The sampler behind the endpoint, free of HTTP and of Serve: jobs, batching, registry.

A :class:`Job` is one validated request (generate, edit or inpaint) of ``n`` images.
:func:`run_jobs` runs a list of jobs with as few sampler calls as it can: jobs whose
sampler settings agree (:attr:`Job.key`) are concatenated into one call of
:class:`~mdm.pipeline.MDMPipeline`, up to ``max_images`` samples a call. Every sample is
seeded on its own (``seeds``), so its noise does not depend on its batch; what batching
can still change is float rounding of the batched matrix products (about 1e-5 on values
in [-1, 1], checked in the tests), never the seed, prompt or settings a sample gets.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mdm.pipeline import MDMPipeline

__all__ = [
    "Job",
    "Result",
    "run_jobs",
    "group_jobs",
    "evaluations",
    "INPAINT_REFINE_STRENGTH",
    "set_precision",
    "RegistryRef",
    "locate_model",
]

# Inpainting refines the fill once per resolution after the first (joint) pass, from this t.
INPAINT_REFINE_STRENGTH = 0.6


@dataclass
class Job:
    """One request: ``n`` images with their seeds, conditioning and shared settings.

    ``prompts``/``negatives`` (text models) and ``labels`` (class models) hold one entry
    per image; ``image`` (1, 3, R, R) and ``mask`` (1, 1, R, R) are at the top resolution.
    ``options`` are the settings a sampler call shares, so they are the batching key.
    """

    kind: str  # "generate" | "edit" | "inpaint"
    seeds: list[int]
    options: tuple  # (sampler, steps, guidance_scale, strength or feather or None)
    prompts: list[str] | None = None
    negatives: list[str] | None = None
    labels: list[int] | None = None
    image: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    abandoned: bool = False  # the request is gone (client left, timed out): drop the job if not yet run

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def key(self) -> tuple:
        return (self.kind, self.options)


@dataclass
class Result:
    """A job's images, one CPU tensor (n, 3, r, r) per resolution, and how many images the
    sampler call that made them ran in all (1 job alone: its own n)."""

    images: list[torch.Tensor]
    batch_images: int
    sampler_s: float = 0.0  # wall time of that sampler call


def _ceil(x: float) -> int:
    return int(-(-x // 1))


def evaluations(kind: str, steps: int, extra: float | int | None, resolutions: int, guided: bool) -> int:
    """Network evaluations one image of a job costs: the sampler's steps (SDEdit:
    ``ceil(steps * strength)``; inpainting: a joint pass plus one refining pass per further
    resolution, ``ceil(steps * INPAINT_REFINE_STRENGTH)`` steps each), twice that with
    classifier-free guidance (a conditional and an unconditional prediction)."""
    if kind == "edit":
        n = max(1, _ceil(steps * float(extra)))
    elif kind == "inpaint":
        n = steps + (resolutions - 1) * max(1, _ceil(steps * INPAINT_REFINE_STRENGTH))
    else:
        n = steps
    return n * (2 if guided else 1)


def group_jobs(jobs: Sequence[Job], max_images: int) -> list[list[int]]:
    """Indices of jobs that can share a sampler call, in arrival order, at most
    ``max_images`` samples a group (a single larger job gets a group of its own)."""
    groups: list[list[int]] = []
    open_groups: dict[tuple, tuple[list[int], int]] = {}
    for i, job in enumerate(jobs):
        current = open_groups.get(job.key)
        if current is not None and current[1] + job.n <= max_images:
            current[0].append(i)
            open_groups[job.key] = (current[0], current[1] + job.n)
            continue
        group = [i]
        groups.append(group)
        open_groups[job.key] = (group, job.n)
    return groups


def _concat(jobs: Sequence[Job], attr: str) -> list | None:
    parts = [getattr(j, attr) for j in jobs]
    if all(p is None for p in parts):
        return None
    if any(p is None for p in parts):
        raise ValueError(f"jobs of one group disagree on {attr}")
    return [x for p in parts for x in p]


def _run_group(pipe: MDMPipeline, jobs: Sequence[Job]) -> list[list[torch.Tensor]]:
    """One sampler call for jobs of one key; per job, one CPU tensor (n, 3, r, r) per resolution."""
    kind, (sampler, steps, guidance, extra) = jobs[0].key
    seeds = [s for j in jobs for s in j.seeds]
    common = dict(
        num_samples=len(seeds),
        seeds=seeds,
        steps=steps,
        sampler=sampler,
        guidance_scale=guidance,
        negative_prompt=_concat(jobs, "negatives"),
        labels=_concat(jobs, "labels"),
    )
    prompts = _concat(jobs, "prompts")
    with torch.inference_mode():
        if kind == "generate":
            outs = pipe.generate(prompts, **common)
        else:
            image = torch.cat([j.image.expand(j.n, -1, -1, -1) for j in jobs])
            if kind == "edit":
                outs = pipe.edit(image, prompts, strength=extra, **common)
            elif kind == "inpaint":
                mask = torch.cat([j.mask.expand(j.n, -1, -1, -1) for j in jobs])
                outs = pipe.inpaint(
                    image, mask, prompts, feather=extra, refine_strength=INPAINT_REFINE_STRENGTH, **common
                )
            else:
                raise ValueError(f"unknown job kind {kind!r}")
        outs = [o.to("cpu", non_blocking=False) for o in outs]
    sizes = [j.n for j in jobs]
    per_res = [torch.split(o, sizes) for o in outs]
    return [[res[k] for res in per_res] for k in range(len(jobs))]


def run_jobs(pipe: MDMPipeline, jobs: Sequence[Job], max_images: int = 32) -> list[Result | Exception]:
    """Run every job; a job's entry is its :class:`Result`, or the exception it raised.

    A failed shared call is retried job by job, so one job that fails (e.g. out of memory
    with a large batch) does not fail the jobs it was batched with.
    """
    results: list[Result | Exception | None] = [None] * len(jobs)
    for group in group_jobs(jobs, max_images):
        size = sum(jobs[i].n for i in group)
        try:
            t0 = time.perf_counter()
            outs = _run_group(pipe, [jobs[i] for i in group])
            took = time.perf_counter() - t0
            for i, out in zip(group, outs):
                results[i] = Result(out, size, took)
        except Exception as e:  # noqa: BLE001 - reported to the request that caused it
            if len(group) == 1:
                results[group[0]] = e
                continue
            _release_memory(pipe)
            for i in group:
                try:
                    t0 = time.perf_counter()
                    out = _run_group(pipe, [jobs[i]])[0]
                    results[i] = Result(out, jobs[i].n, time.perf_counter() - t0)
                except Exception as e1:  # noqa: BLE001
                    results[i] = e1
    return results  # type: ignore[return-value]


def set_precision(pipe: MDMPipeline, precision: str) -> None:
    """``fp32``: float32 activations (TF32 matmuls on CUDA), so batching changes a sample by
    float rounding only. ``bf16``: bf16 autocast on CUDA, faster, but a bf16 activation
    rounds differently when the batch shape picks another kernel, and over the sampler's
    steps that moves pixels by a few levels. On CPU both run in float32."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if pipe.device.type != "cuda":
        pipe.autocast_dtype = None
    elif precision == "bf16":
        pipe.autocast_dtype = torch.bfloat16
    else:
        pipe.autocast_dtype = None
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _release_memory(pipe: MDMPipeline) -> None:
    if pipe.device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class RegistryRef:
    """Where the served weights come from; for registry sources, the version pinned at load."""

    source: str
    load_source: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    aliases: list[str] = field(default_factory=list)


def locate_model(source: str) -> RegistryRef:
    """Pin a source to what will be loaded.

    ``models:/name@alias`` is resolved to its version *before* the download, and that
    version is what is loaded and reported, even if the alias moves later (redeploy to
    follow it). ``models:/name/<version>`` is looked up for its aliases. Any other source
    (folder, ``file://``, ``s3://``) is loaded as it is.
    """
    if not source.startswith("models:/"):
        return RegistryRef(source=source, load_source=source)
    from mlflow import MlflowClient

    from mdm.storage import use_default_registry

    body = source[len("models:/") :]
    registry = use_default_registry()  # the app's or $MLFLOW_TRACKING_URI, else the stage jobs' default
    client = MlflowClient()
    alias = None
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        elif "/" in body:
            name, version = body.rsplit("/", 1)
            mv = client.get_model_version(name, version)
        else:
            raise ValueError(f"{source!r}: write models:/<name>@<alias> or models:/<name>/<version>")
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - mlflow raises many types
        msg = str(getattr(e, "message", e)).splitlines()[0]
        raise LookupError(
            f"{source} is not in the MLflow registry at {registry}: {msg}. "
            "Check MLFLOW_TRACKING_URI (or the app's mlflow_tracking_uri) and the alias or version."
        ) from None
    aliases = list(getattr(mv, "aliases", []) or [])
    return RegistryRef(
        source=source,
        load_source=f"models:/{name}/{mv.version}",
        name=name,
        version=str(mv.version),
        alias=alias or (aliases[0] if aliases else None),
        aliases=aliases,
    )
