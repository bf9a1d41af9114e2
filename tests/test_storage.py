"""Weights from object storage: the local stack's S3-protocol server on loopback."""

import pytest
import torch
from conftest import randomize_

from mdm import MDMModel, get_config, load_pretrained, save_pretrained

pytestmark = pytest.mark.integration


def test_load_weights_from_s3(s3_server, tmp_path):
    import s3fs

    s3_endpoint = s3_server
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
