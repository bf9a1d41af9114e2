"""Configs: every named config builds with the right shapes; bad configs fail clearly."""

import math

import pytest
import torch

from mdm import ConfigError, MDMConfig, MDMModel, get_config, list_configs
from mdm.config import apply_overrides, from_dict, to_dict
from mdm.unet import Condition


@pytest.mark.parametrize("name", list_configs())
def test_named_config_shapes_on_meta_device(name):
    """Shapes of every prediction for every named config (meta tensors: no compute)."""
    cfg = get_config(name)
    m = cfg.model
    with torch.device("meta"):
        model = MDMModel(m)
        b = 2
        zs = [torch.randn(b, 3, r, r) for r in m.resolutions]
        cond = Condition(
            text_tokens=torch.randn(b, m.conditioning.max_text_tokens, m.conditioning.text_dim),
            text_mask=torch.ones(b, m.conditioning.max_text_tokens, dtype=torch.bool),
        )
        out = model(zs, torch.rand(b), cond)
    assert [tuple(o.shape) for o in out] == [(b, 3, r, r) for r in m.resolutions]
    # Most parameters sit in the innermost net (the paper's design).
    inner = sum(
        p.numel() for n, p in model.named_parameters() if n.startswith("unet." + "inner." * (len(m.resolutions) - 1))
    )
    total = sum(p.numel() for p in model.parameters())
    assert inner / total > (0.7 if name.startswith("tiny") else 0.9)


@pytest.mark.parametrize("name", ["tiny-32-64", "tiny-64-128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_forward_dtypes(name, dtype):
    cfg = get_config(name)
    model = MDMModel(cfg.model).to(dtype)
    b = 2
    zs = [torch.randn(b, 3, r, r, dtype=dtype) for r in cfg.model.resolutions]
    c = cfg.model.conditioning
    cond = Condition(
        torch.randn(b, c.max_text_tokens, c.text_dim, dtype=dtype), torch.ones(b, c.max_text_tokens, dtype=torch.bool)
    )
    out = model(zs, torch.rand(b), cond)
    assert all(o.dtype == dtype for o in out)
    assert all(torch.isfinite(o.float()).all() for o in out)


def test_config_json_roundtrip():
    cfg = get_config("64-256-1024")
    again = MDMConfig.from_json(cfg.to_json())
    assert to_dict(again) == to_dict(cfg)
    assert cfg.model.nest_ratios == [4, 4]
    assert get_config("64-128-256").model.nest_ratios == [2, 2]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["model"]["unets"][0].update(colour=1), "unknown key(s) 'colour'"),
        (lambda d: d["model"].update(resolutions=[32, 96]), "nest ratio 96/32"),
        (lambda d: d["model"].update(resolutions=[64, 32]), "strictly ascending"),
        (
            lambda d: d["model"]["unets"][1].update(
                channels=[16, 32, 64], num_res_blocks=[1, 1, 1], attention_layers=[0, 0, 0]
            ),
            "needs 2 levels",
        ),
        (lambda d: d["model"]["unets"][0].update(channels=[30, 64]), "not divisible by num_groups"),
        (lambda d: d["model"]["unets"][0].update(num_res_blocks=[1]), "one entry per level"),
        (lambda d: d["diffusion"].update(prediction="score"), "'score' is not one of"),
        (lambda d: d["diffusion"].update(loss_weights=[1.0]), "one weight per resolution"),
        (lambda d: d["diffusion"].update(cond_dropout=1.5), "cond_dropout"),
        (lambda d: d["model"]["conditioning"].update(kind="class", num_classes=0), "num_classes > 0"),
        (lambda d: d["model"]["unets"][0].update(channels="32,64"), "expected a list"),
    ],
)
def test_bad_config_is_rejected_with_a_clear_message(mutate, message):
    data = to_dict(get_config("tiny-32-64"))
    mutate(data)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_dict(MDMConfig, data).validate()


def test_unknown_named_config():
    with pytest.raises(ConfigError, match="choose one of"):
        get_config("64-512")


def test_overrides_apply_and_validate():
    cfg = apply_overrides(get_config("tiny-32"), ["diffusion.shift_power=2", "model.unets.0.dropout=0.1"])
    assert cfg.diffusion.shift_power == 2.0 and cfg.model.unets[0].dropout == 0.1
    with pytest.raises(ConfigError, match="unknown key 'shift'"):
        apply_overrides(get_config("tiny-32"), ["diffusion.shift=2"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(get_config("tiny-32"), ["diffusion.shift_power"])
    with pytest.raises(ConfigError, match="must be >= 0"):
        apply_overrides(get_config("tiny-32"), ["diffusion.shift_power=-1"])


def test_model_rejects_wrong_inputs():
    cfg = get_config("tiny-32-64")
    model = MDMModel(cfg.model)
    c = cfg.model.conditioning
    cond = Condition(torch.randn(1, c.max_text_tokens, c.text_dim), torch.ones(1, c.max_text_tokens, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected 2 inputs"):
        model([torch.randn(1, 3, 32, 32)], torch.rand(1), cond)
    with pytest.raises(ValueError, match=r"must be \(B, 3, 64, 64\)"):
        model([torch.randn(1, 3, 32, 32), torch.randn(1, 3, 48, 48)], torch.rand(1), cond)
    with pytest.raises(ValueError, match="text-conditioned"):
        model([torch.randn(1, 3, 32, 32), torch.randn(1, 3, 64, 64)], torch.rand(1), Condition())


def test_emb_dim_default_follows_innermost_width():
    cfg = get_config("64")
    assert cfg.model.emb_dim == 4 * 256
    assert math.isclose(get_config("64-256-1024").diffusion.shift_power, 2.0)
