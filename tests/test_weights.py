"""Weights folders: exact round trip, URIs, and no unpickling."""

import pickle

import pytest
import torch
from conftest import randomize_

from mdm import MDMModel, get_config, load_pretrained, save_pretrained
from mdm.unet import Condition


def test_roundtrip_is_exact(tmp_path):
    cfg = get_config("tiny-32-64")
    model = randomize_(MDMModel(cfg.model)).eval()
    save_pretrained(model, cfg, tmp_path / "m")
    again, cfg2 = load_pretrained(f"file://{tmp_path / 'm'}")
    assert cfg2.to_json() == cfg.to_json()
    c = cfg.model.conditioning
    cond = Condition(torch.randn(1, c.max_text_tokens, c.text_dim), torch.ones(1, c.max_text_tokens, dtype=torch.bool))
    zs = [torch.randn(1, 3, r, r) for r in cfg.model.resolutions]
    with torch.no_grad():
        assert all(
            torch.equal(a, b)
            for a, b in zip(model(zs, torch.rand(1) * 0 + 0.3, cond), again(zs, torch.rand(1) * 0 + 0.3, cond))
        )


def test_loading_never_unpickles(tmp_path):
    cfg = get_config("tiny-32")
    folder = save_pretrained(MDMModel(cfg.model), cfg, tmp_path / "m")

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    (folder / "model.safetensors").write_bytes(pickle.dumps({"w": Boom()}))
    with pytest.raises(Exception) as info:
        load_pretrained(str(folder))
    assert not isinstance(info.value, SystemExit)


def test_missing_or_mismatched_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_pretrained(str(tmp_path / "empty"))
    cfg32, cfg64 = get_config("tiny-32"), get_config("tiny-32-64")
    folder = save_pretrained(MDMModel(cfg32.model), cfg64, tmp_path / "wrong")  # weights of another config
    with pytest.raises(ValueError, match="do not match config.json"):
        load_pretrained(str(folder))
