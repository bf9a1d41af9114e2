"""Ray Serve application: the sampler of a registered model behind a JSON/PNG HTTP API.

    serve run serve.app:app                                  # model from $MDM_MODEL, else models:/mdm@stage-64
    serve run serve.app:build_app model=models:/mdm@stage-256 device=cuda
    serve deploy infra/serve/mdm-serve.yaml                  # replicas, GPUs, autoscaling, the alias

Endpoints (documented at ``/docs`` and ``/openapi.json``): ``POST /v1/generate``,
``POST /v1/edit`` (SDEdit), ``POST /v1/inpaint`` (multi-scale inpainting), ``GET /v1/model``,
``GET /healthz``. One image answers ``image/png``; several images, or every resolution
at once, answer JSON with base64 PNGs.

Batching: each request becomes a :class:`~serve.engine.Job`. ``@serve.batch`` collects
the jobs that arrive together (up to ``max_batch_images`` images); a collected batch joins
the queue of the sampler, and whenever the sampler is free it takes every queued job
(again up to ``max_batch_images`` images) and runs each group of compatible jobs (same
kind, sampler, steps, guidance, strength/feather) as one pipeline call. Requests that
arrive while the sampler is busy therefore share the next call instead of queueing one by
one. Every image is seeded by its request alone, so batching never changes a request's
seeds, prompts or settings; in fp32 (the default ``precision``) the batch shape changes an
image by float rounding only, at most one level of 255 (bf16 on CUDA: a few levels).
"""

import asyncio
import base64
import json
import logging
import os
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve import Application

import mdm
from mdm.pipeline import MDMPipeline
from mdm.sampling import SAMPLERS

from .engine import Job, RegistryRef, Result, locate_model, run_jobs, set_precision
from .images import InputError, decode_base64, encode_png, image_tensor, mask_tensor, open_image
from .schema import (
    MAX_IMAGES,
    MAX_STEPS,
    ConditioningInfo,
    EditParams,
    EditRequest,
    ErrorOut,
    GenerateRequest,
    Health,
    ImageOut,
    ImagesResponse,
    InpaintParams,
    InpaintRequest,
    ModelInfo,
)

__all__ = ["api", "MDMServer", "AppArgs", "build_app", "app", "DEFAULT_MODEL", "API_KEY_HEADER"]

DEFAULT_MODEL = "models:/mdm@stage-64"
API_KEY_HEADER = "X-API-Key"

logger = logging.getLogger("ray.serve")

api = FastAPI(
    title="mdm sampler",
    version=mdm.__version__,
    description="Matryoshka Diffusion Models: sample, edit and inpaint images at every resolution of a "
    "registered model. Errors answer 4xx with a `detail` that says what to change. When the deployment "
    f"has an API key, every /v1 endpoint needs it in the `{API_KEY_HEADER}` header.",
)
api_key_scheme = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="Needed when the deployment has one.")
AUTH = [Security(api_key_scheme)]  # documents the header; the middleware below checks it

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "Unusable input: malformed JSON, image or mask, prompt too long, ..."},
    401: {"model": ErrorOut, "description": "Missing or wrong API key."},
    413: {"model": ErrorOut, "description": "Image too large."},
    422: {"model": ErrorOut, "description": "A field out of range or of the wrong type."},
}
IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": ImagesResponse,
        "description": "`image/png` for one image at one resolution; JSON with base64 PNGs for several images "
        "or `resolution: 'all'`. A PNG answer carries the image's seed and resolution in the `X-Seed` and "
        "`X-Resolution` headers. Every answer tells in `X-Batch-Images` how many images the sampler call that "
        "made it ran (more than the request's own: it was batched with others), and in `X-Sampler-Seconds` "
        "how long that call took.",
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
    },
    **ERRORS,
}


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def describe_errors(errors: list[dict]) -> str:
    """Pydantic's errors as one line: ``field: what is wrong (got ...)``."""
    parts = []
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        kind = e.get("type", "")
        if kind == "extra_forbidden":
            parts.append(f"{loc}: unknown field; see /docs for the fields of this endpoint")
        elif kind == "missing":
            parts.append(f"{loc}: required")
        else:
            got = repr(e.get("input"))
            got = got if len(got) <= 60 else got[:57] + "..."
            parts.append(f"{loc}: {e.get('msg', 'invalid')} (got {got})")
    return "; ".join(parts)


def _validate(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise InputError(describe_errors(e.errors()), 422) from None


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    bad_json = [e for e in errors if e.get("type") == "json_invalid"]
    if bad_json:
        why = (bad_json[0].get("ctx") or {}).get("error", "")
        return _error(
            400,
            f"the body is not valid JSON ({why}): send a JSON object, e.g. "
            '{"prompt": "fox face, fluent 3d style", "steps": 25}',
        )
    return _error(422, describe_errors(errors))


OPEN_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


@api.middleware("http")
async def _check_api_key(request: Request, call_next: Callable) -> Response:
    """With a key, every path but health and the API docs needs it (under any route prefix)."""
    # The replica's own key: Serve runs a copy of this app, so the key lives on the replica.
    key = getattr(serve.get_replica_context().servable_object, "api_key", None)
    if key:
        path, root = request.url.path, request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        given = request.headers.get(API_KEY_HEADER, "")
        if path not in OPEN_PATHS and not secrets.compare_digest(given.encode(), key.encode()):
            what = "wrong" if given else "missing"
            return _error(401, f"{what} API key: send the deployment's key in the {API_KEY_HEADER} header")
    return await call_next(request)


def _body_schema(model: type[BaseModel], files: list[str]) -> dict[str, Any]:
    """OpenAPI request body of an endpoint that takes JSON (images base64) or a multipart form."""
    schema = model.model_json_schema()
    form = json.loads(json.dumps(schema))
    form["title"] = f"{model.__name__} as multipart/form-data"
    for f in files:
        form["properties"][f] = {"type": "string", "format": "binary", "description": "PNG or JPEG file."}
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}, "multipart/form-data": {"schema": form}},
        }
    }


def _images_in(jobs: list[Job]) -> int:
    return sum(j.n for j in jobs)


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class MDMServer:
    """One replica: the pipeline of one pinned model version, its batcher and the API."""

    def __init__(
        self,
        model: str,
        device: str | None = None,
        api_key: str | None = None,
        mlflow_tracking_uri: str | None = None,
        max_batch_images: int = 32,
        batch_wait_timeout_s: float = 0.01,
        max_image_bytes: int = 16 * 2**20,
        max_image_pixels: int = 4096 * 4096,
        precision: str = "fp32",
    ):
        if mlflow_tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(mlflow_tracking_uri)
        self.ref: RegistryRef = locate_model(model)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pipe = MDMPipeline.from_pretrained(self.ref.load_source, device=device)
        set_precision(self.pipe, precision)
        self.resolutions = self.pipe.resolutions
        self.cond = self.pipe.config.model.conditioning
        self.max_batch_images = max_batch_images
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.api_key = api_key or None
        # Serve collects up to this many images; the sampler queue below applies the cap itself
        # (a request larger than the cap still runs, alone).
        self._sample.set_max_batch_size(max(max_batch_images, MAX_IMAGES))
        self._sample.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mdm-sampler")
        self._queue: list[tuple[Job, asyncio.Future]] = []
        self._sampler_free = asyncio.Lock()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.info = ModelInfo(
            name=self.ref.name,
            version=self.ref.version,
            alias=self.ref.alias,
            aliases=self.ref.aliases,
            source=self.ref.source,
            config=self.pipe.config.name,
            resolutions=self.resolutions,
            conditioning=ConditioningInfo(
                kind=self.cond.kind,
                text_encoder=self.cond.text_encoder if self.cond.kind == "text" else None,
                max_text_tokens=self.cond.max_text_tokens if self.cond.kind == "text" else None,
                num_classes=self.cond.num_classes if self.cond.kind == "class" else None,
            ),
            samplers=list(SAMPLERS),
            max_images=MAX_IMAGES,
            max_steps=MAX_STEPS,
            device=str(self.pipe.device),
            precision=precision if self.pipe.device.type == "cuda" else "fp32",
            threads=torch.get_num_threads(),
        )
        # One tiny call so that the first request does not pay for lazy kernel setup.
        run_jobs(self.pipe, [self._job("generate", GenerateRequest(steps=1, guidance_scale=1.0), None)])
        logger.info("mdm: serving %s (%s) on %s", self.ref.load_source, self.info.config, self.info.device)

    # ------------------------------------------------------------------ batching
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, max_concurrent_batches=64, batch_size_fn=_images_in)
    async def _sample(self, jobs: list[Job]) -> list[Result | Exception]:
        """Queue a collected batch for the sampler; when it is free, run everything queued."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in jobs]
        self._queue.extend(zip(jobs, futures))
        while not all(f.done() for f in futures):
            async with self._sampler_free:
                taken = self._take_queued()
                if not taken:  # cannot happen: whoever takes a job answers it before releasing
                    break
                results: list = [RuntimeError("sampling was interrupted")] * len(taken)
                try:
                    results = await loop.run_in_executor(
                        self._executor, run_jobs, self.pipe, [j for j, _ in taken], self.max_batch_images
                    )
                except Exception as e:  # noqa: BLE001 - reported to every request of the call
                    results = [e] * len(taken)
                finally:  # every taken job gets an answer, even when this task is cancelled
                    for (_, fut), res in zip(taken, results):
                        if not fut.done():
                            fut.set_result(res)
        return [f.result() if f.done() else RuntimeError("the request was lost by the batcher") for f in futures]

    def _take_queued(self) -> list[tuple[Job, asyncio.Future]]:
        taken, images = [], 0
        while self._queue and (not taken or images + self._queue[0][0].n <= self.max_batch_images):
            item = self._queue.pop(0)
            taken.append(item)
            images += item[0].n
        return taken

    # ------------------------------------------------------------------ validation
    def _resolution_indices(self, p: GenerateRequest) -> list[int]:
        if p.resolution == "all":
            return list(range(len(self.resolutions)))
        res = self.resolutions[-1] if p.resolution is None else p.resolution
        if res not in self.resolutions:
            raise InputError(
                f"resolution {res} is not one of this model's resolutions {self.resolutions}: "
                "pick one of them, or 'all'"
            )
        return [self.resolutions.index(res)]

    def _check_prompt(self, field: str, prompt: str | None) -> None:
        if not prompt:
            return
        limit = self.cond.max_text_tokens
        n = self.pipe.text_encoder.count_tokens(prompt)
        if n > limit:
            raise InputError(
                f"{field} is {n} tokens long; this model reads at most {limit} tokens (counted by its text encoder "
                f"{self.cond.text_encoder}, special tokens included): shorten it"
            )

    def _conditioning(self, p: GenerateRequest) -> dict[str, list | None]:
        n, kind = p.num_images, self.cond.kind
        if kind == "text":
            if p.label is not None:
                raise InputError("this model is text-conditioned: send a prompt, not a label")
            self._check_prompt("prompt", p.prompt)
            self._check_prompt("negative_prompt", p.negative_prompt)
            return {"prompts": [p.prompt or ""] * n, "negatives": [p.negative_prompt or ""] * n, "labels": None}
        if p.prompt or p.negative_prompt:
            if kind == "class":
                raise InputError("this model is class-conditioned: send a label, not a prompt or negative_prompt")
            raise InputError("this model is unconditional: send no prompt, negative_prompt or label")
        if kind == "class":
            if p.label is not None and not 0 <= p.label < self.cond.num_classes:
                raise InputError(
                    f"label {p.label} is out of range: this model has classes 0 to {self.cond.num_classes - 1}"
                )
            return {"prompts": None, "negatives": None, "labels": [-1 if p.label is None else p.label] * n}
        if p.label is not None:
            raise InputError("this model is unconditional: send no label")
        return {"prompts": None, "negatives": None, "labels": None}

    def _job(self, kind: str, p: GenerateRequest, extra: float | int | None, image=None, mask=None) -> Job:
        self._resolution_indices(p)
        return Job(
            kind=kind,
            seeds=[p.seed + j for j in range(p.num_images)],
            options=(p.sampler, p.steps, float(p.guidance_scale), extra),
            image=image,
            mask=mask,
            **self._conditioning(p),
        )

    async def _read_with_images(
        self, request: Request, params_model: type[GenerateRequest], json_model: type[GenerateRequest], files: list[str]
    ) -> tuple[Any, dict[str, bytes]]:
        """Parameters and image bytes from a JSON body (base64) or a multipart form (files)."""
        length = request.headers.get("content-length")
        limit = len(files) * (self.max_image_bytes * 4 // 3 + 1024) + 64 * 1024
        if length and length.isdigit() and int(length) > limit:
            raise InputError(
                f"the body is {int(length) / 2**20:.1f} MiB; the limit is {limit / 2**20:.1f} MiB: send smaller images",
                413,
            )
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=len(files), max_fields=32)
            except Exception as e:  # noqa: BLE001 - multipart parser errors
                raise InputError(f"cannot read the multipart body ({e}): send a multipart/form-data form") from None
            fields: dict[str, Any] = {}
            blobs: dict[str, bytes] = {}
            for key, value in form.multi_items():
                if key in files:
                    blobs[key] = decode_base64(value, key) if isinstance(value, str) else await value.read()
                else:
                    fields[key] = value
            missing = [f for f in files if f not in blobs]
            if missing:
                raise InputError(f"the form lacks {' and '.join(missing)}: send each as a file part")
            return _validate(params_model, fields), blobs
        if ctype not in ("application/json", ""):
            raise InputError(
                f"unsupported content type {ctype!r}: send application/json (images base64) "
                "or multipart/form-data (images as files)",
                415,
            )
        try:
            data = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(
                f"the body is not valid JSON ({e}): send a JSON object with {', '.join(files)} as base64 strings"
            ) from None
        if not isinstance(data, dict):
            raise InputError("the body must be a JSON object (with named fields), not a list or a value")
        req = _validate(json_model, data)
        blobs = {f: decode_base64(getattr(req, f), f) for f in files}
        return params_model.model_validate(req.model_dump(exclude=set(files))), blobs

    def _decode(self, blobs: dict[str, bytes]) -> tuple[torch.Tensor, torch.Tensor | None]:
        top = self.resolutions[-1]
        img = open_image(blobs["image"], "image", self.max_image_bytes, self.max_image_pixels)
        mask = None
        if "mask" in blobs:
            m = open_image(blobs["mask"], "mask", self.max_image_bytes, self.max_image_pixels)
            mask = mask_tensor(m, img.size, top)
        return image_tensor(img, top), mask

    # ------------------------------------------------------------------ answering
    async def _answer(self, p: GenerateRequest, build: Callable[[], Job]) -> Response:
        try:
            job = build()
            out = await self._sample(job)
            if isinstance(out, Exception):
                raise out
            return await asyncio.to_thread(self._render, p, job, out)
        except InputError as e:
            return _error(e.status, str(e))
        except ValueError as e:  # the pipeline refused the input
            return _error(400, str(e))
        except torch.OutOfMemoryError:
            return _error(503, "the accelerator is out of memory: ask for fewer images, or retry")
        except Exception as e:  # noqa: BLE001 - the replica never dies of a request
            logger.exception("mdm: request failed")
            return _error(500, f"sampling failed ({type(e).__name__}: {e})")

    def _render(self, p: GenerateRequest, job: Job, result: Result) -> Response:
        idx = self._resolution_indices(p)
        out = result.images
        headers = {"X-Batch-Images": str(result.batch_images), "X-Sampler-Seconds": f"{result.sampler_s:.4f}"}
        if job.n == 1 and p.resolution != "all":
            i = idx[0]
            headers.update({"X-Seed": str(job.seeds[0]), "X-Resolution": str(self.resolutions[i])})
            return Response(encode_png(out[i][0]), media_type="image/png", headers=headers)
        images = [
            ImageOut(
                index=j,
                seed=job.seeds[j],
                resolution=self.resolutions[i],
                png=base64.b64encode(encode_png(out[i][j])).decode("ascii"),
            )
            for j in range(job.n)
            for i in idx
        ]
        return JSONResponse(ImagesResponse(images=images).model_dump(), headers=headers)

    # ------------------------------------------------------------------ endpoints
    @api.get("/healthz", response_model=Health, tags=["service"])
    async def healthz(self) -> Health:
        """200 once the model is loaded; names the replica that answered."""
        return Health(replica=self.replica)

    @api.get("/v1/model", response_model=ModelInfo, responses={401: ERRORS[401]}, dependencies=AUTH, tags=["model"])
    async def model(self) -> ModelInfo:
        """The served model: registry name, pinned version and alias, resolutions, conditioning, limits."""
        return self.info

    @api.post("/v1/generate", response_model=None, responses=IMAGE_RESPONSES, dependencies=AUTH, tags=["sample"])
    async def generate(self, body: GenerateRequest | None = None) -> Response:
        """Sample every resolution jointly from noise; return the one asked for (or all).

        An empty body samples one unconditional image at the top resolution."""
        p = body or GenerateRequest()
        return await self._answer(p, lambda: self._job("generate", p, None))

    @api.post(
        "/v1/edit",
        response_model=None,
        responses={**IMAGE_RESPONSES, 415: {"model": ErrorOut, "description": "Not JSON nor multipart."}},
        dependencies=AUTH,
        tags=["sample"],
        openapi_extra=_body_schema(EditRequest, ["image"]),
    )
    async def edit(self, request: Request) -> Response:
        """SDEdit: noise the image to `strength`, then denoise toward the prompt.

        JSON with the image base64, or multipart/form-data with the image as a file part and
        the other fields as form fields."""
        return await self._with_images(request, "edit", EditParams, EditRequest, ["image"])

    @api.post(
        "/v1/inpaint",
        response_model=None,
        responses={**IMAGE_RESPONSES, 415: {"model": ErrorOut, "description": "Not JSON nor multipart."}},
        dependencies=AUTH,
        tags=["sample"],
        openapi_extra=_body_schema(InpaintRequest, ["image", "mask"]),
    )
    async def inpaint(self, request: Request) -> Response:
        """Multi-scale inpainting: fill where the mask is white, keep the rest (unchanged where the
        feathered mask is 0). JSON with image and mask base64, or multipart/form-data with both as
        file parts."""
        return await self._with_images(request, "inpaint", InpaintParams, InpaintRequest, ["image", "mask"])

    async def _with_images(self, request: Request, kind: str, params_model, json_model, files: list[str]) -> Response:
        try:
            p, blobs = await self._read_with_images(request, params_model, json_model, files)
            self._resolution_indices(p)
            self._conditioning(p)
            image, mask = await asyncio.to_thread(self._decode, blobs)
        except InputError as e:
            return _error(e.status, str(e))
        except Exception as e:  # noqa: BLE001 - the replica never dies of a request
            logger.exception("mdm: reading the request failed")
            return _error(400, f"cannot read the request ({type(e).__name__}: {e})")
        extra = p.strength if kind == "edit" else p.feather
        return await self._answer(p, lambda: self._job(kind, p, extra, image, mask))


class AppArgs(BaseModel):
    """Arguments of :func:`build_app` (``args:`` of a Serve config, or ``key=value`` after
    ``serve run serve.app:build_app``)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None,
        description=f"Weights source: models:/name@alias, models:/name/<version>, a folder, file:// or s3://. "
        f"Default: $MDM_MODEL, else {DEFAULT_MODEL}.",
    )
    device: str | None = Field(None, description="cuda or cpu; default cuda when the replica has a GPU.")
    api_key: str | None = Field(None, description="Require this key in the X-API-Key header; default $MDM_API_KEY.")
    mlflow_tracking_uri: str | None = Field(None, description="Registry to load from; default $MLFLOW_TRACKING_URI.")
    max_batch_images: int = Field(
        32,
        ge=1,
        description="Most images one sampler call runs; 1 turns batching off (a request of several images "
        "still runs whole, alone).",
    )
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, le=5.0, description="How long a batch waits to fill.")
    max_image_bytes: int = Field(16 * 2**20, gt=0, description="Largest accepted image file.")
    max_image_pixels: int = Field(4096 * 4096, gt=0, description="Largest accepted image, in pixels.")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="On CUDA: fp32 (TF32 matmuls) keeps batching from changing any image beyond one level of 255; "
        "bf16 autocast saves memory, but batching then moves pixels by a few levels. CPU runs fp32.",
    )


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The Serve application for ``args`` (see :class:`AppArgs`); environment defaults are
    read here, where the app is built."""
    a = AppArgs.model_validate(dict(args or {}))
    return MDMServer.bind(
        model=a.model or os.environ.get("MDM_MODEL") or DEFAULT_MODEL,
        device=a.device,
        api_key=a.api_key or os.environ.get("MDM_API_KEY") or None,
        mlflow_tracking_uri=a.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None,
        max_batch_images=a.max_batch_images,
        batch_wait_timeout_s=a.batch_wait_timeout_s,
        max_image_bytes=a.max_image_bytes,
        max_image_pixels=a.max_image_pixels,
        precision=a.precision,
    )


app = build_app()
