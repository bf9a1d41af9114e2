"""The HTTP schema: request and response bodies of the sampler endpoint.

These pydantic models are what ``/openapi.json`` documents. Limits that do not depend on
the served model (images per request, steps, guidance, seed) are checked here; the ones
that do (resolution, prompt length in tokens, conditioning kind) by the deployment.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mdm.sampling import SAMPLERS

__all__ = [
    "MAX_IMAGES",
    "MAX_STEPS",
    "SamplerName",
    "GenerateRequest",
    "EditParams",
    "EditRequest",
    "InpaintParams",
    "InpaintRequest",
    "ImageOut",
    "ImagesResponse",
    "ConditioningInfo",
    "ModelInfo",
    "Health",
    "ErrorOut",
]

MAX_IMAGES = 8
MAX_STEPS = 500
MAX_PROMPT_CHARS = 4000

SamplerName = Literal[tuple(SAMPLERS)]  # type: ignore[valid-type]


class GenerateRequest(BaseModel):
    """What to sample. Image j of a request is seeded by ``seed + j``: the same seed and
    parameters give the same images, whatever else the server is doing."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(
        None,
        max_length=MAX_PROMPT_CHARS,
        description="Caption to draw (text-conditioned models). Omit for an unconditional sample.",
        examples=["fox face, fluent 3d style"],
    )
    negative_prompt: str | None = Field(
        None,
        max_length=MAX_PROMPT_CHARS,
        description="What guidance steers away from (text-conditioned models; needs guidance_scale != 1).",
    )
    label: int | None = Field(None, description="Class id (class-conditioned models).")
    num_images: int = Field(1, ge=1, le=MAX_IMAGES, description=f"Images to sample, 1 to {MAX_IMAGES}.")
    resolution: int | Literal["all"] | None = Field(
        None,
        description="Output side in pixels, one of the model's resolutions (default: the highest), "
        "or 'all' for every resolution of the joint sample.",
    )
    sampler: SamplerName = Field("dpmpp_2m", description="ddpm, ddim or dpmpp_2m (DPM-Solver++(2M)).")
    steps: int = Field(25, ge=1, le=MAX_STEPS, description=f"Sampler steps, 1 to {MAX_STEPS}.")
    guidance_scale: float = Field(3.0, ge=0.0, le=30.0, description="Classifier-free guidance; 1 turns it off.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the first image; image j uses seed + j.")


class EditParams(GenerateRequest):
    strength: float = Field(
        0.6,
        gt=0.0,
        le=1.0,
        description="SDEdit strength: how far the image is noised before denoising (1 = from pure noise). "
        "ceil(steps * strength) steps are taken.",
    )


class EditRequest(EditParams):
    """SDEdit of an image. The image is centre-cropped to a square and resized to the model's
    highest resolution."""

    image: str = Field(description="PNG or JPEG, base64 (a data: URL is accepted).")


class InpaintParams(GenerateRequest):
    feather: int = Field(0, ge=0, le=64, description="Soften the mask's edge outward by this many pixels.")


class InpaintRequest(InpaintParams):
    """Multi-scale inpainting: fill where the mask is white, keep the rest. The image and the
    mask are centre-cropped to a square and resized to the model's highest resolution."""

    image: str = Field(description="PNG or JPEG, base64 (a data: URL is accepted).")
    mask: str = Field(
        description="PNG or JPEG of the image's size, base64: white (>= 128) = fill, black = keep.",
    )


class ImageOut(BaseModel):
    index: int = Field(description="Position in the request (0 .. num_images - 1).")
    seed: int
    resolution: int
    png: str = Field(description="The image as a base64 PNG.")


class ImagesResponse(BaseModel):
    """Several images, or every resolution at once (ordered by index, then resolution)."""

    images: list[ImageOut]


class ConditioningInfo(BaseModel):
    kind: Literal["text", "class", "none"]
    text_encoder: str | None = None
    max_text_tokens: int | None = None
    num_classes: int | None = None


class ModelInfo(BaseModel):
    name: str | None = Field(description="Registered model name (None for a model folder).")
    version: str | None = Field(description="Registered version being served (pinned at load).")
    alias: str | None = Field(description="The alias the source named, else one the version holds.")
    aliases: list[str] = Field(default_factory=list, description="Every alias of the served version.")
    source: str = Field(description="Where the weights came from.")
    config: str = Field(description="Name of the model's config.")
    resolutions: list[int]
    conditioning: ConditioningInfo
    samplers: list[str]
    max_images: int
    max_steps: int = Field(description="Most sampler steps a request may ask for on this deployment.")
    max_request_cost: float = Field(
        description="Most megapixel-steps one request may cost: images x network evaluations x top-resolution "
        "pixels / 1e6 (guidance doubles the evaluations)."
    )
    request_timeout_s: float = Field(description="A request not answered by then answers 503.")
    device: str
    precision: Literal["fp32", "bf16"] = Field(description="Activation precision of the sampler.")
    threads: int = Field(description="CPU threads of the replica's torch.")


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    replica: str = Field(description="Id of the Serve replica that answered.")
    queued_images: int = Field(0, description="Images of requests the replica holds now (queued or sampling).")
    dropped_requests: int = Field(
        0, description="Requests whose job was dropped before sampling (the client left, or it timed out)."
    )


class ErrorOut(BaseModel):
    detail: str = Field(description="What was wrong with the request and what to change.")
