"""Ray Serve application: the sampler of a registered model behind a JSON/PNG HTTP API.

    serve run serve.app:build_app                            # model from $MDM_MODEL, else models:/mdm@stage-64
    serve run serve.app:build_app model=models:/mdm@stage-256 device=cuda api_key=$KEY
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

Bounds (docs/RELIABILITY.md): without an API key a replica starts only behind a loopback
proxy (or with ``allow_anonymous``); a request's work is capped (``max_steps``,
``max_request_cost``), a replica's queue too (``max_queued_images``, 503 + Retry-After), a
request's wait (``request_timeout_s``), and a body's bytes as they arrive (:class:`Gate`); a
job whose request is gone before it starts is dropped; ``/openapi.json`` is this deployment's.
"""

import asyncio
import base64
import copy
import ipaddress
import json
import logging
import math
import os
import secrets
import time
import typing
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

from .engine import Job, RegistryRef, Result, evaluations, locate_model, run_jobs, set_precision
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

__all__ = [
    "api",
    "MDMServer",
    "AppArgs",
    "build_app",
    "DEFAULT_MODEL",
    "API_KEY_HEADER",
    "is_loopback",
]

DEFAULT_MODEL = "models:/mdm@stage-64"
API_KEY_HEADER = "X-API-Key"
MAX_PARAMS_BODY_BYTES = 64 * 1024  # a body without images: the fields, prompts of MAX_PROMPT_CHARS

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
    401: {"model": ErrorOut, "description": "Missing or wrong API key (only when the deployment has one)."},
    413: {"model": ErrorOut, "description": "Body or image too large."},
    422: {
        "model": ErrorOut,
        "description": "A field out of range or of the wrong type, or a request that costs more than the "
        "deployment's budget (`max_request_cost` of GET /v1/model): the detail says what to lower.",
    },
    503: {
        "model": ErrorOut,
        "description": "The replica is busy (its queue is full, or the request did not finish within the "
        "deployment's request timeout): retry after the `Retry-After` header's seconds.",
        "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}},
    },
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


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class Busy(Exception):
    """The replica cannot take the request now: 503 with ``Retry-After``."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after = str(max(1, math.ceil(retry_after_s)))


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


def _whole_numbers(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema counts 2.0 as an integer, so the server does too: an integral float (or,
    in a form, its text such as ``"2.0"``) given for an integer field becomes that integer."""
    out = dict(data)
    for name, value in data.items():
        field = model.model_fields.get(name)
        if field is None or not (field.annotation is int or int in typing.get_args(field.annotation)):
            continue
        if isinstance(value, float) and value.is_integer():
            out[name] = int(value)
        elif isinstance(value, str) and not value.strip().lstrip("+-").isdigit():
            try:
                number = float(value)
            except ValueError:
                continue
            if number.is_integer():
                out[name] = str(int(number))
    return out


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
        return _error(
            400,
            'the body is not valid JSON: send a JSON object, e.g. {"prompt": "fox face, fluent 3d style", "steps": 25}',
        )
    return _error(422, describe_errors(errors))


OPEN_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def _servable() -> Any:
    """This replica's :class:`MDMServer` (Serve runs a copy of the app in every replica)."""
    try:
        return serve.get_replica_context().servable_object
    except Exception:  # noqa: BLE001 - not inside a replica
        return None


class Gate:
    """ASGI middleware in front of every route: the API key first (before any byte of the body
    is read), then the body limit, counted on the bytes actually received, so a chunked body
    (no Content-Length) or a false Content-Length cannot get past it. The body is read whole
    here and replayed to the route; a client that leaves while sending is dropped."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        server = _servable()
        if scope["type"] != "http" or server is None:
            return await self.app(scope, receive, send)
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        key = server.api_key
        if key and path not in OPEN_PATHS:
            given = ""
            for name, value in scope.get("headers", []):
                if name.decode("latin-1").lower() == API_KEY_HEADER.lower():
                    given = value.decode("latin-1")
            if not secrets.compare_digest(given.encode(), key.encode()):
                what = "wrong" if given else "missing"
                detail = f"{what} API key: send the deployment's key in the {API_KEY_HEADER} header"
                return await _error(401, detail)(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = server.body_limit(path)
        too_large = _error(
            413,
            f"the body is larger than this endpoint's limit of {limit / 2**20:.2f} MiB: "
            + ("send smaller images" if limit > MAX_PARAMS_BODY_BYTES else "send only the documented fields"),
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                return await too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None  # the client left before its body arrived: nothing to answer
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return await too_large(scope, receive, send)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then the real channel: it reports a disconnect

        return await self.app(scope, replay, send)


api.add_middleware(Gate)


def _openapi() -> dict[str, Any]:
    """``/openapi.json`` of this replica: the routes' schema narrowed to what this deployment
    accepts (its model's resolutions and conditioning, its step limit; the API key only when
    it has one)."""
    if api.openapi_schema is None:
        spec = FastAPI.openapi(api)
        server = _servable()
        api.openapi_schema = server.contract(spec) if server is not None else spec
    return api.openapi_schema


api.openapi = _openapi  # type: ignore[method-assign]


def _body_schema(model: type[BaseModel], files: list[str], required: bool = True) -> dict[str, Any]:
    """OpenAPI request body of an endpoint that takes JSON (images base64) or a multipart form.

    In a form every value is text and absent means default, so the form's fields are not
    nullable (send a field, or leave it out)."""
    schema = model.model_json_schema()
    for f in files:
        schema["properties"][f].update(
            {"format": "byte", "minLength": 4, "contentEncoding": "base64", "contentMediaType": "image/*"}
        )
    content: dict[str, Any] = {"application/json": {"schema": schema}}
    if files:
        form = json.loads(json.dumps(schema))
        form["title"] = f"{model.__name__} as multipart/form-data"
        for prop in form["properties"].values():
            if "anyOf" in prop:
                prop["anyOf"] = [alt for alt in prop["anyOf"] if alt.get("type") != "null"]
                if len(prop["anyOf"]) == 1:
                    alt = prop.pop("anyOf")[0]
                    prop.update(alt)
                if prop.get("default", 0) is None:
                    del prop["default"]
        for f in files:
            form["properties"][f] = {
                "type": "string",
                "format": "binary",
                "minLength": 1,
                "description": "PNG, JPEG or WebP file.",
            }
        content["multipart/form-data"] = {"schema": form}
    return {"requestBody": {"required": required, "content": content}}


def is_loopback(host: str) -> bool:
    """Whether a listening address is reachable from this machine only."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _http_host() -> str:
    """The address Serve's HTTP proxies listen on (``http_options.host`` of the Serve instance)."""
    from ray.serve.context import _get_global_client

    return _get_global_client().http_config.host


def _images_in(jobs: list[Job]) -> int:
    return sum(j.n for j in jobs)


@serve.deployment(max_ongoing_requests=64, max_queued_requests=128, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class MDMServer:
    """One replica: the pipeline of one pinned model version, its batcher and the API.

    ``model`` is the :class:`~serve.engine.RegistryRef` that :func:`build_app` pinned once for
    the deployment (every replica loads that exact version), or a source without an alias
    (a folder, ``file://``, ``s3://`` or ``models:/name/<version>``)."""

    def __init__(
        self,
        model: RegistryRef | str,
        device: str | None = None,
        api_key: str | None = None,
        allow_anonymous: bool = False,
        mlflow_tracking_uri: str | None = None,
        max_batch_images: int = 32,
        batch_wait_timeout_s: float = 0.01,
        max_image_bytes: int = 16 * 2**20,
        max_image_pixels: int = 4096 * 4096,
        precision: str = "fp32",
        compile: bool = False,
        max_steps: int = MAX_STEPS,
        max_images: int = MAX_IMAGES,
        max_request_cost: float = 64.0,
        max_queued_images: int = 64,
        request_timeout_s: float = 300.0,
    ):
        self.api_key = api_key or None
        if not self.api_key and not allow_anonymous:
            host = _http_host()
            if not is_loopback(host):
                raise PermissionError(
                    f"refusing to serve without an API key on {host} (not loopback): set api_key (or MDM_API_KEY "
                    "where the app is built), bind Serve's http_options.host to 127.0.0.1, or pass "
                    "allow_anonymous=true to serve anyone who can reach the port"
                )
        if mlflow_tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(mlflow_tracking_uri)
        if isinstance(model, str):
            if model.startswith("models:/") and "@" in model:
                raise ValueError(
                    f"{model}: an alias is resolved once per deployment, where the app is built; "
                    "deploy through serve.app:build_app, or name the version (models:/<name>/<version>)"
                )
            model = locate_model(model)
        self.ref: RegistryRef = model
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pipe = MDMPipeline.from_pretrained(self.ref.load_source, device=device, compile=compile)
        set_precision(self.pipe, precision)
        self.resolutions = self.pipe.resolutions
        self.cond = self.pipe.config.model.conditioning
        self.max_batch_images = max_batch_images
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.max_steps = max_steps
        self.max_images = max_images
        self.max_request_cost = max_request_cost
        self.max_queued_images = max_queued_images
        self.request_timeout_s = request_timeout_s
        # Serve collects up to this many images; the sampler queue below applies the cap itself
        # (a request larger than the cap still runs, alone).
        self._sample.set_max_batch_size(max(max_batch_images, MAX_IMAGES))
        self._sample.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mdm-sampler")
        self._queue: list[tuple[Job, asyncio.Future]] = []
        self._sampler_free = asyncio.Lock()
        self._admitted_images = 0  # images of requests admitted and not yet answered
        self._dropped = 0  # jobs dropped before sampling: their client left or timed out
        self._last_call_s = 1.0  # duration of the last sampler call, for Retry-After
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
            max_images=max_images,
            max_steps=max_steps,
            max_request_cost=max_request_cost,
            request_timeout_s=request_timeout_s,
            device=str(self.pipe.device),
            precision=precision if self.pipe.device.type == "cuda" else "fp32",
            threads=torch.get_num_threads(),
        )
        # One tiny call so that the first request does not pay for lazy kernel setup. A replica
        # whose warm-up fails would answer every request with an error: it must not start
        # (Serve reports the deployment unhealthy and retries it).
        (warm,) = run_jobs(self.pipe, [self._job("generate", GenerateRequest(steps=1, guidance_scale=1.0), None)])
        if isinstance(warm, Exception):
            logger.error("mdm: warm-up of %s on %s failed", self.ref.load_source, device, exc_info=warm)
            raise RuntimeError(
                f"the warm-up sample of {self.ref.load_source} on {device} failed ({type(warm).__name__}); "
                "the replica's log has the traceback: check the device and the model"
            )
        logger.info("mdm: serving %s (%s) on %s", self.ref.load_source, self.info.config, self.info.device)

    # ------------------------------------------------------------------ limits and the contract
    def body_limit(self, path: str) -> int:
        """Most bytes a request body to ``path`` may have (counted as they are received)."""
        files = {"/v1/edit": 1, "/v1/inpaint": 2}.get(path, 0)
        return files * (self.max_image_bytes * 4 // 3 + 1024) + MAX_PARAMS_BODY_BYTES

    def cost(self, kind: str, p: GenerateRequest, extra: float | int | None) -> tuple[float, int]:
        """Megapixel-steps a request costs: images x network evaluations x top-resolution pixels."""
        guided = float(p.guidance_scale) != 1.0 and self.cond.kind != "none"
        per_image = evaluations(kind, p.steps, extra, len(self.resolutions), guided)
        return p.num_images * per_image * self.resolutions[-1] ** 2 / 1e6, per_image

    def _with_defaults(self, p: Any) -> Any:
        """The request with this deployment's defaults: ``steps`` left out is at most ``max_steps``."""
        if "steps" not in p.model_fields_set and p.steps > self.max_steps:
            return p.model_copy(update={"steps": self.max_steps})
        return p

    def _check_limits(self, kind: str, p: GenerateRequest, extra: float | int | None) -> None:
        if p.steps > self.max_steps:
            raise InputError(f"steps: at most {self.max_steps} on this deployment (got {p.steps}): lower steps", 422)
        if p.num_images > self.max_images:
            raise InputError(
                f"num_images: at most {self.max_images} on this deployment (got {p.num_images}): ask for fewer", 422
            )
        cost, per_image = self.cost(kind, p, extra)
        if cost <= self.max_request_cost:
            return
        top = self.resolutions[-1]
        fit_images = int(self.max_request_cost // (per_image * top * top / 1e6))
        fits = [
            s
            for s in range(1, p.steps)
            if self.cost(kind, p.model_copy(update={"steps": s}), extra)[0] <= self.max_request_cost
        ]
        fit_steps = fits[-1] if fits else 0
        fixes = []
        if fit_steps:
            fixes.append(f"steps to {fit_steps}")
        if 1 <= fit_images < p.num_images:
            fixes.append(f"num_images to {fit_images}")
        guided = per_image != evaluations(kind, p.steps, extra, len(self.resolutions), False)
        if guided:
            fixes.append("guidance_scale to 1 (halves the cost)")
        raise InputError(
            f"this request costs {cost:.2f} megapixel-steps ({p.num_images} images x {per_image} network evaluations "
            f"each{' (guidance doubles them)' if guided else ''} x {top}x{top} pixels); this deployment allows "
            f"{self.max_request_cost:g}: lower {' or '.join(fixes) or 'steps'}",
            422,
        )

    def contract(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The OpenAPI of the routes narrowed to this deployment: what it accepts, exactly."""
        spec = copy.deepcopy(spec)
        if not self.api_key:
            spec.get("components", {}).pop("securitySchemes", None)
        for ops in spec["paths"].values():
            for op in ops.values():
                if not self.api_key:
                    op.pop("security", None)
                    op.get("responses", {}).pop("401", None)
                for content in op.get("requestBody", {}).get("content", {}).values():
                    self._narrow(content["schema"])
        return spec

    def _narrow(self, schema: dict[str, Any]) -> None:
        props = schema.get("properties", {})
        kind = self.cond.kind
        if kind != "text":
            props.pop("prompt", None)
            props.pop("negative_prompt", None)
        else:
            for f in ("prompt", "negative_prompt"):
                if f in props:
                    props[f]["x-max-tokens"] = self.cond.max_text_tokens
                    props[f]["description"] += (
                        f" At most {self.cond.max_text_tokens} tokens of {self.cond.text_encoder} "
                        "(special tokens included); a longer one answers 400."
                    )
        if kind != "class":
            props.pop("label", None)
        elif "label" in props:
            label = {"type": "integer", "minimum": 0, "maximum": self.cond.num_classes - 1}
            nullable = "anyOf" in props["label"]
            props["label"] = {
                **({"anyOf": [label, {"type": "null"}]} if nullable else label),
                "description": "Class id; omit for an unconditional sample.",
            }
        if "resolution" in props:
            res = props["resolution"]
            alts = [{"type": "integer", "enum": list(self.resolutions)}, {"type": "string", "const": "all"}]
            nullable = any(a.get("type") == "null" for a in res.get("anyOf", []))
            res.pop("type", None)
            res.pop("enum", None)
            res.pop("const", None)
            res["anyOf"] = alts + ([{"type": "null"}] if nullable else [])
        if "num_images" in props:
            props["num_images"]["maximum"] = self.max_images
            props["num_images"]["description"] = f"Images to sample, 1 to {self.max_images}."
        if "steps" in props:
            props["steps"]["maximum"] = self.max_steps
            props["steps"]["default"] = min(props["steps"].get("default", self.max_steps), self.max_steps)
            props["steps"]["description"] = f"Sampler steps, 1 to {self.max_steps}."
        schema["x-max-request-cost"] = self.max_request_cost

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
                if not taken:  # every queued job was dropped (or answered by another call)
                    continue
                results: list = [RuntimeError("sampling was interrupted")] * len(taken)
                try:
                    t0 = time.perf_counter()
                    results = await loop.run_in_executor(
                        self._executor, run_jobs, self.pipe, [j for j, _ in taken], self.max_batch_images
                    )
                    self._last_call_s = time.perf_counter() - t0
                except Exception as e:  # noqa: BLE001 - reported to every request of the call
                    results = [e] * len(taken)
                finally:  # every taken job gets an answer, even when this task is cancelled
                    for (_, fut), res in zip(taken, results):
                        if not fut.done():
                            fut.set_result(res)
        return [f.result() if f.done() else RuntimeError("the request was lost by the batcher") for f in futures]

    def _take_queued(self) -> list[tuple[Job, asyncio.Future]]:
        """The next sampler call's jobs, in arrival order; a job whose request is gone is
        answered (nobody reads it) and dropped, never sampled."""
        taken, images = [], 0
        while self._queue and (not taken or images + self._queue[0][0].n <= self.max_batch_images):
            job, fut = self._queue.pop(0)
            if job.abandoned:
                self._dropped += 1
                if not fut.done():
                    fut.set_result(RuntimeError("dropped: the request was gone before sampling"))
                continue
            taken.append((job, fut))
            images += job.n
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
        self._check_limits(kind, p, extra)
        return Job(
            kind=kind,
            seeds=[p.seed + j for j in range(p.num_images)],
            options=(p.sampler, p.steps, float(p.guidance_scale), extra),
            image=image,
            mask=mask,
            **self._conditioning(p),
        )

    async def _read_body(
        self, request: Request, params_model: type[GenerateRequest], json_model: type[GenerateRequest], files: list[str]
    ) -> tuple[Any, dict[str, bytes]]:
        """Parameters and image bytes from a JSON body (images base64) or a multipart form
        (images as files). The :class:`Gate` has already read the body within its limit.

        JSON is validated strictly (a number is not a string, nor a string a number: what the
        OpenAPI says); a form's values are text, so they are parsed."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data" and files:
            try:
                form = await request.form(max_files=len(files), max_fields=32)
            except Exception:  # noqa: BLE001 - multipart parser errors
                raise InputError(
                    f"cannot read the multipart body: send a multipart/form-data form with {' and '.join(files)} "
                    "as file parts and at most 32 fields"
                ) from None
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
            return _validate(params_model, _whole_numbers(params_model, fields)), blobs
        if ctype not in ("application/json", ""):
            accepted = "application/json" + (
                " (images base64) or multipart/form-data (images as files)" if files else ""
            )
            raise InputError(f"unsupported content type {ctype!r}: send {accepted}", 415)
        raw = await request.body()
        if not raw.strip() and not files:
            return params_model(), {}  # no body: every field's default
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            example = f"with {', '.join(files)} as base64 strings" if files else '{"prompt": "fox face", "steps": 25}'
            raise InputError(f"the body is not valid JSON: send a JSON object {example}") from None
        if not isinstance(data, dict):
            raise InputError("the body must be a JSON object (with named fields), not a list or a value")
        try:
            req = json_model.model_validate(_whole_numbers(json_model, data), strict=True)
        except ValidationError as e:
            raise InputError(describe_errors(e.errors()), 422) from None
        blobs = {f: decode_base64(getattr(req, f), f) for f in files}
        return params_model.model_validate(req.model_dump(exclude=set(files), exclude_unset=True)), blobs

    def _decode(self, blobs: dict[str, bytes]) -> tuple[torch.Tensor, torch.Tensor | None]:
        top = self.resolutions[-1]
        img = open_image(blobs["image"], "image", self.max_image_bytes, self.max_image_pixels)
        mask = None
        if "mask" in blobs:
            m = open_image(blobs["mask"], "mask", self.max_image_bytes, self.max_image_pixels)
            mask = mask_tensor(m, img.size, top)
        return image_tensor(img, top), mask

    # ------------------------------------------------------------------ answering
    def _admit(self, job: Job) -> None:
        """Take the job into this replica's queue, or refuse it (503) when the queue is full."""
        if self._admitted_images and self._admitted_images + job.n > self.max_queued_images:
            calls = self._admitted_images / self.max_batch_images + 1
            raise Busy(
                f"the replica is busy ({self._admitted_images} images queued or sampling; it holds at most "
                f"{self.max_queued_images}): retry later",
                calls * self._last_call_s,
            )
        self._admitted_images += job.n

    async def _answer(self, p: GenerateRequest, build: Callable[[], Job]) -> Response:
        job, admitted = None, False
        try:
            job = build()
            self._admit(job)
            admitted = True
            try:
                out = await asyncio.wait_for(asyncio.shield(self._sample(job)), self.request_timeout_s)
            except TimeoutError:
                raise Busy(
                    f"the request did not finish within the deployment's timeout of {self.request_timeout_s:g} s "
                    "(the replica is busy): retry later, or ask for fewer steps or images",
                    self._last_call_s,
                ) from None
            if isinstance(out, Exception):
                raise out
            return await asyncio.to_thread(self._render, p, job, out)
        except InputError as e:
            return _error(e.status, str(e))
        except Busy as e:
            return _error(503, str(e), {"Retry-After": e.retry_after})
        except torch.OutOfMemoryError:
            return _error(503, "the accelerator is out of memory: ask for fewer images, or retry", {"Retry-After": "5"})
        except Exception:  # noqa: BLE001 - the replica never dies of a request; details stay in its log
            logger.exception("mdm: request failed")
            return _error(500, "sampling failed on the server (the replica's log has the details): retry later")
        finally:
            if job is not None:
                # gone (answered, timed out, or the client left, which cancels this task): a job
                # still queued is dropped, never sampled
                job.abandoned = True
            if admitted:
                self._admitted_images -= job.n

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
        """200 once the model is loaded and its warm-up sample ran; names the replica that
        answered and how loaded it is."""
        return Health(replica=self.replica, queued_images=self._admitted_images, dropped_requests=self._dropped)

    @api.get("/v1/model", response_model=ModelInfo, responses={401: ERRORS[401]}, dependencies=AUTH, tags=["model"])
    async def model(self) -> ModelInfo:
        """The served model: registry name, pinned version and alias, resolutions, conditioning, limits."""
        return self.info

    @api.post(
        "/v1/generate",
        response_model=None,
        responses={**IMAGE_RESPONSES, 415: {"model": ErrorOut, "description": "Not JSON."}},
        dependencies=AUTH,
        tags=["sample"],
        openapi_extra=_body_schema(GenerateRequest, [], required=False),
    )
    async def generate(self, request: Request) -> Response:
        """Sample every resolution jointly from noise; return the one asked for (or all).

        An empty body samples one unconditional image at the top resolution."""
        try:
            p, _ = await self._read_body(request, GenerateRequest, GenerateRequest, [])
            p = self._with_defaults(p)
        except InputError as e:
            return _error(e.status, str(e))
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
            p, blobs = await self._read_body(request, params_model, json_model, files)
            p = self._with_defaults(p)
            self._resolution_indices(p)
            self._conditioning(p)
            self._check_limits(kind, p, p.strength if kind == "edit" else p.feather)
            image, mask = await asyncio.to_thread(self._decode, blobs)
        except InputError as e:
            return _error(e.status, str(e))
        except Exception:  # noqa: BLE001 - the replica never dies of a request; details stay in its log
            logger.exception("mdm: reading the request failed")
            return _error(400, "cannot read the image or the mask: send PNG, JPEG or WebP files")
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
    allow_anonymous: bool = Field(
        False,
        description="Serve without an API key although Serve's HTTP proxy listens beyond loopback. Without it, "
        "a replica with no key refuses to start unless http_options.host is 127.0.0.1 (or ::1, localhost).",
    )
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
    max_steps: int = Field(
        MAX_STEPS, ge=1, le=MAX_STEPS, description="Most sampler steps a request may ask for (the OpenAPI says it)."
    )
    max_images: int = Field(
        MAX_IMAGES, ge=1, le=MAX_IMAGES, description="Most images a request may ask for (the OpenAPI says it)."
    )
    max_request_cost: float = Field(
        64.0,
        gt=0.0,
        description="Most work one request may ask for, in megapixel-steps: images x network evaluations x "
        "top-resolution pixels / 1e6 (guidance doubles the evaluations; SDEdit takes ceil(steps x strength); "
        "inpainting adds a refining pass per further resolution). 64 allows e.g. 8 images x 50 guided steps at "
        "256 px, or 1 image x 30 guided steps at 1024 px. A costlier request answers 422 saying what to lower.",
    )
    max_queued_images: int = Field(
        64,
        ge=1,
        description="Most images a replica holds (queued or sampling); a request beyond it answers 503 with "
        "Retry-After. Serve's own max_queued_requests bounds the requests waiting before the replica.",
    )
    request_timeout_s: float = Field(
        300.0,
        gt=0.0,
        description="A request not answered within this many seconds answers 503 with Retry-After; its job is "
        "dropped if it has not started.",
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="On CUDA: fp32 (TF32 matmuls) keeps batching from changing any image beyond one level of 255; "
        "bf16 autocast saves memory, but batching then moves pixels by a few levels. CPU runs fp32.",
    )
    compile: bool = Field(
        False,
        description="On CUDA: torch.compile the denoiser inside its CUDA graph (about 2x faster sampling on an "
        "H200); each new batch size then compiles once, for a minute or more, before it is answered.",
    )


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The Serve application for ``args`` (see :class:`AppArgs`); environment defaults are
    read here, where the app is built.

    A registry alias (``models:/name@alias``) is resolved here, once for the deployment: every
    replica, autoscaled ones included, loads the version it named now, even after the alias
    moves (build and deploy again to follow it)."""
    a = AppArgs.model_validate(dict(args or {}))
    tracking = a.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    source = a.model or os.environ.get("MDM_MODEL") or DEFAULT_MODEL
    if source.startswith("models:/") and tracking:
        import mlflow

        mlflow.set_tracking_uri(tracking)
    return MDMServer.bind(
        model=locate_model(source),
        device=a.device,
        api_key=a.api_key or os.environ.get("MDM_API_KEY") or None,
        allow_anonymous=a.allow_anonymous,
        mlflow_tracking_uri=tracking,
        max_batch_images=a.max_batch_images,
        batch_wait_timeout_s=a.batch_wait_timeout_s,
        max_image_bytes=a.max_image_bytes,
        max_image_pixels=a.max_image_pixels,
        precision=a.precision,
        compile=a.compile,
        max_steps=a.max_steps,
        max_images=a.max_images,
        max_request_cost=a.max_request_cost,
        max_queued_images=a.max_queued_images,
        request_timeout_s=a.request_timeout_s,
    )
