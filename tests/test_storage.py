"""Weights from object storage: a real S3-protocol server (moto) on loopback."""

import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import randomize_

from mdm import MDMModel, get_config, load_pretrained, save_pretrained

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3_endpoint():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    yield url
    proc.terminate()
    proc.wait(10)


def test_load_weights_from_s3(s3_endpoint, tmp_path, monkeypatch):
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    cfg = get_config("tiny-32")
    model = randomize_(MDMModel(cfg.model))
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("weights")
    save_pretrained(model, cfg, "s3://weights/stage-32")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("weights/stage-32")) == ["config.json", "model.safetensors"]
    again, cfg2 = load_pretrained("s3://weights/stage-32")
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        load_pretrained("s3://weights/nothing-here")
